"""CPU-only stand-ins that let Paddle's tensor-parallel layers run on gloo (2+ CPU processes).

Why: on CPU, Paddle's model-parallel ops need pieces gloo and the CPU build lack: `all_reduce_on_calc_stream`
and `all_gather_into_tensor_on_calc_stream` ("ProcessGroupGLOO does not support all_reduce with sync_op and
use_calc_stream flag"), and CUDA-only kernels for c_identity, c_split, c_concat and
c_softmax_with_cross_entropy. Each is replaced here by the same math written with gloo's synchronous
collectives. `install()` does nothing unless the process runs on CPU, so GPU and XPU runs keep Paddle's own
kernels. Correctness is checked by tests/test_tensor_parallel.py against the single-process model.
"""
import logging

import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer

logger = logging.getLogger(__name__)
_installed = False


def _on_cpu() -> bool:
    return paddle.get_device().split(":")[0] == "cpu"


# ------------------------------------------------------------------------------------- process group


def _all_reduce_on_calc_stream(self, tensor, op):
    self.all_reduce(tensor, op, True).wait()


def _all_gather_into_tensor_on_calc_stream(self, out, tensor):
    self.all_gather_into_tensor(out, tensor, True).wait()


# ------------------------------------------------------------------------------------- model-parallel ops


def _identity_forward(ctx, tensor, group, skip_c_identity_dynamic):
    ctx.group = group
    # A new tensor, as the c_identity kernel makes: a PyLayer that hands back its own input is skipped
    # by autograd, and the all-reduce in backward would never run.
    return tensor.clone()


def _identity_backward(ctx, dy):
    return dy


def _split_forward(ctx, tensor, group, rank, nranks):
    ctx.group, ctx.nranks = group, nranks
    return paddle.split(tensor, nranks, axis=-1)[rank].clone()


def _split_backward(ctx, dy):
    parts = []
    dist.all_gather(parts, dy.contiguous(), group=ctx.group)
    return paddle.concat(parts, axis=-1)


class _ConcatLastAxis(PyLayer):
    """All-gather along the last axis (c_concat); the gradient is this rank's slice."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.rank, ctx.nranks = group.rank, group.nranks
        parts = []
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return paddle.concat(parts, axis=-1)

    @staticmethod
    def backward(ctx, dy):
        return paddle.split(dy, ctx.nranks, axis=-1)[ctx.rank].clone()


def _c_concat(tensor, group=None):
    group = dist.collective._get_default_group() if group is None else group
    return _ConcatLastAxis.apply(tensor, group)


class _VocabParallelCrossEntropy(PyLayer):
    """Cross-entropy over logits whose vocabulary axis is split across the ranks of `group`."""

    @staticmethod
    def forward(ctx, logits, label, group, ignore_index):
        vocab_shard = logits.shape[-1]
        start = group.rank * vocab_shard
        logits32 = logits.astype("float32")
        row_max = logits32.max(axis=-1, keepdim=True)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits32 - row_max
        exp = paddle.exp(shifted)
        exp_sum = exp.sum(axis=-1, keepdim=True)
        dist.all_reduce(exp_sum, op=dist.ReduceOp.SUM, group=group)
        label = label.astype("int64")
        local = label - start
        owned = (local >= 0) & (local < vocab_shard)
        safe_local = paddle.where(owned, local, paddle.zeros_like(local))
        target = paddle.take_along_axis(shifted, safe_local, axis=-1) * owned.astype("float32")
        dist.all_reduce(target, op=dist.ReduceOp.SUM, group=group)
        valid = (label != ignore_index).astype("float32")
        loss = (paddle.log(exp_sum) - target) * valid
        ctx.save_for_backward(exp / exp_sum, safe_local, owned, valid)
        ctx.vocab_shard = vocab_shard
        return loss.astype(logits.dtype)

    @staticmethod
    def backward(ctx, dloss):
        softmax, safe_local, owned, valid = ctx.saved_tensor()
        one_hot = paddle.nn.functional.one_hot(safe_local.squeeze(-1), ctx.vocab_shard)
        one_hot = one_hot * owned.astype("float32")
        grad = (softmax - one_hot) * (dloss.astype("float32") * valid)
        return grad.astype(dloss.dtype), None


def _c_softmax_with_cross_entropy(logits, label, group=None, return_softmax=False, ignore_index=-100):
    if return_softmax:
        raise NotImplementedError("tp_cpu_compat: return_softmax=True is not needed by ChatGLM and not provided")
    group = dist.collective._get_default_group() if group is None else group
    if label.ndim == logits.ndim - 1:
        label = label.unsqueeze(-1)
    return _VocabParallelCrossEntropy.apply(logits, label, group, ignore_index)


def _broadcast_input_data(hcg, *inputs, **kwargs):
    """Every rank of a tensor-parallel group must see the same batch: send the group source's tensors."""
    group, src = hcg.get_model_parallel_group(), hcg.get_model_parallel_group_src_rank()

    def send(value):
        if isinstance(value, paddle.Tensor):
            dist.broadcast(value, src=src, group=group)
        elif isinstance(value, (list, tuple)):
            for v in value:
                send(v)
        elif isinstance(value, dict):
            for v in value.values():
                send(v)
        return value

    return send(inputs), send(kwargs)


def install() -> bool:
    """Patch Paddle's model-parallel ops with the gloo versions above; only on CPU, only once.
    Returns True when the CPU versions are active."""
    global _installed
    if _installed:
        return True
    if not _on_cpu():
        return False
    from paddle.base import core
    from paddle.distributed import collective
    from paddle.distributed.fleet.layers.mpu import mp_ops
    from paddle.distributed.fleet.meta_parallel import tensor_parallel

    core.ProcessGroupGloo.all_reduce_on_calc_stream = _all_reduce_on_calc_stream
    core.ProcessGroupGloo.all_gather_into_tensor_on_calc_stream = _all_gather_into_tensor_on_calc_stream
    mp_ops.c_identity_eager.forward = staticmethod(_identity_forward)
    mp_ops.mp_allreduce_eager.backward = staticmethod(_identity_backward)
    mp_ops.c_split_eager.forward = staticmethod(_split_forward)
    mp_ops.c_split_eager.backward = staticmethod(_split_backward)
    for module in (mp_ops, collective):
        module._c_concat = _c_concat
        module._c_softmax_with_cross_entropy = _c_softmax_with_cross_entropy
    tensor_parallel.broadcast_input_data = _broadcast_input_data
    _installed = True
    logger.info("tensor parallel on CPU: gloo stand-ins for Paddle's model-parallel ops installed")
    return True
