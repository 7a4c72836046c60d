"""Keep the key/value copies of tensor parallel past the KV groups exact (see glm_tune/tensor_parallel_layout.py).

Rank r's copy of its group's key/value projection only sees the gradient of r's own query heads; the true
gradient is the sum over every rank that holds a copy. Before each optimizer step that sum is formed with one
all-reduce over the model-parallel group (each rank writes its part into its group's slot of a [groups, ...]
buffer), so every copy takes the same update and the copies stay equal. In the global gradient norm the copied
columns would count once per copy (the fused weight is marked distributed, so its squares are summed over ranks);
their excess is taken out before the norm is communicated, so clipping sees the single-process norm.
"""
import paddle
import paddle.distributed as dist

_installed = False


def _replicated(params):
    return [p for p in params if getattr(p, "replicated_kv", None) and p.grad is not None]


def sum_copies(params, group) -> None:
    """Replace each tagged gradient's key/value columns by their sum over the ranks holding the same group
    (`params`: the tagged parameters that have a gradient)."""
    for param in params:
        info, grad = param.replicated_kv, param.grad
        q = info["q_width"]
        kv = grad[..., q:]
        slots = paddle.zeros([info["groups"], *kv.shape], dtype=kv.dtype)
        slots[info["group"]] = kv
        dist.all_reduce(slots, group=group)
        summed = paddle.concat([grad[..., :q], slots[info["group"]]], axis=-1)
        paddle.assign(summed, output=grad)


def excess_square_norm(params_grads):
    """Sum of squares the copied columns add to the distributed norm beyond one count per group (this rank's
    share: each of the `copies` holders takes out (copies - 1) / copies of its columns' squares)."""
    total = paddle.zeros([], dtype="float32")
    for param, grad in params_grads:
        info = getattr(param, "replicated_kv", None)
        if grad is None or not info or getattr(param, "need_clip", True) is False:
            continue
        kv = grad[..., info["q_width"]:].astype("float32")
        total = total + (kv * kv).sum() * ((info["copies"] - 1) / info["copies"])
    return total


def install() -> None:
    """Wrap Paddle's hybrid-parallel optimizer step and clip; a no-op for parameters without copies."""
    global _installed
    if _installed:
        return
    from paddle.distributed import fleet
    from paddle.distributed.fleet.meta_optimizers.dygraph_optimizer import hybrid_parallel_optimizer as hpo

    step = hpo.HybridParallelOptimizer._step

    def _step(self, parameters_list):
        tagged = _replicated(parameters_list)
        if tagged:
            sum_copies(tagged, fleet.get_hybrid_communicate_group().get_model_parallel_group())
        return step(self, parameters_list)

    comm_and_clip = hpo.HybridParallelClipGrad._comm_and_clip

    def _comm_and_clip(self, params_grads, global_norm_var_dist, global_norm_var_not_dist):
        excess = excess_square_norm(params_grads)
        return comm_and_clip(self, params_grads, global_norm_var_dist - excess.astype(global_norm_var_dist.dtype),
                             global_norm_var_not_dist)

    hpo.HybridParallelOptimizer._step = _step
    hpo.HybridParallelClipGrad._comm_and_clip = _comm_and_clip
    _installed = True
