"""Tensor parallel for ChatGLM2/3 past their key/value groups, and the shard layouts PaddleNLP gets wrong.

ChatGLM2/3 share key/value heads in `multi_query_group_num` groups (2 for the 6B models). PaddleNLP splits whole
groups across ranks, so it stops at degree 2 (as every peer does: CoLLiE #135). Here a degree d above the g groups
(d a multiple of g) gives each rank its query heads and a copy of the one key/value projection those heads read:
ranks r with r * g // d == j hold group j. Forward math is unchanged; it is exactly a model with d groups whose
groups j*d/g .. (j+1)*d/g - 1 are copies of group j. So the attention layer is built as if the config had d groups,
and the checkpoint mappings split and merge the fused query_key_value columns by that rule (merge checks that the
copies are equal and refuses otherwise). The copies' gradients are summed over their holders before each optimizer
step, and counted once in the global gradient norm (glm_tune/training/kv_replica_sync.py).

Also here: LoRA's lora_B of the fused column layers (query_key_value, dense_h_to_4h). PaddleNLP splits and merges
it as a plain column block, but its columns have the weight's [q | k | v] / [fc | gate] layout, so an adapter saved
by a tensor-parallel run and loaded by one process had its key/value and gate columns in the wrong places. It now
uses the weight's own mapping.
"""
from functools import partial

import numpy as np

from glm_tune.errors import GlmTuneError

REPLICATED_KV_SUFFIXES = ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
                          "self_attention.query_key_value.lora_B")
FUSED_COLUMN_LAYERS = ("self_attention.query_key_value", "mlp.dense_h_to_4h")
_installed = False


class ReplicaMismatch(GlmTuneError):
    """Copies of one key/value group differ between the shards that hold them; nothing was written."""


def supported_degree(heads: int, groups: int, degree: int) -> bool:
    """A degree the grouped attention can be split by: it divides the groups, or is a multiple of them that
    divides the heads."""
    return degree >= 1 and heads % degree == 0 and (groups % degree == 0 or degree % groups == 0)


def groups_of_rank(groups: int, degree: int, rank: int) -> range:
    """The key/value groups rank `rank` holds: its own share when degree <= groups, else the one its heads read."""
    per_rank = max(groups // degree, 1)
    first = rank * groups // degree
    return range(first, first + per_rank)


def _concat(parts):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=-1)
    import paddle

    return paddle.concat(parts, axis=-1)


def split_qkv(tensor, hidden_size: int, head_dim: int, groups: int, degree: int, rank: int):
    """Rank `rank`'s columns [q_r | k_j.. | v_j..] of a fused [Q | K | V] weight, bias or lora_B."""
    kv = groups * head_dim
    if tensor.shape[-1] != hidden_size + 2 * kv:
        raise ValueError(f"query_key_value has {tensor.shape[-1]} columns, expected {hidden_size + 2 * kv}")
    q_width = hidden_size // degree
    owned = groups_of_rank(groups, degree, rank)
    lo, hi = owned[0] * head_dim, (owned[-1] + 1) * head_dim
    return _concat([tensor[..., rank * q_width:(rank + 1) * q_width],
                    tensor[..., hidden_size + lo:hidden_size + hi],
                    tensor[..., hidden_size + kv + lo:hidden_size + kv + hi]])


def merge_qkv(parts, hidden_size: int, head_dim: int, groups: int, degree: int):
    """The fused [Q | K | V] tensor back from `degree` rank shards; copies of a group must agree."""
    if len(parts) != degree:
        raise ValueError(f"{len(parts)} query_key_value shards for tensor_parallel_degree {degree}")
    q_width = hidden_size // degree
    kv_width = len(groups_of_rank(groups, degree, 0)) * head_dim
    keys, values = {}, {}
    for rank, part in enumerate(parts):
        if part.shape[-1] != q_width + 2 * kv_width:
            raise ValueError(f"query_key_value shard tp{rank:02d} has {part.shape[-1]} columns, expected "
                             f"{q_width + 2 * kv_width}")
        first = groups_of_rank(groups, degree, rank)[0]
        k, v = part[..., q_width:q_width + kv_width], part[..., q_width + kv_width:]
        if first in keys:
            _check_copy(keys[first], k, first, rank, "key")
            _check_copy(values[first], v, first, rank, "value")
        else:
            keys[first], values[first] = k, v
    order = sorted(keys)
    return _concat([part[..., :q_width] for part in parts] + [keys[j] for j in order] + [values[j] for j in order])


def _check_copy(kept, other, group: int, rank: int, what: str) -> None:
    a, b = np.asarray(kept, dtype="float32"), np.asarray(other, dtype="float32")
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    if diff > 1e-6 * max(1.0, float(np.abs(a).max())):
        raise ReplicaMismatch(
            f"the {what} projection of key/value group {group} differs between its copies (shard tp{rank:02d} is "
            f"{diff:.3g} away from the first copy): the shards come from different runs or steps; merge the shards "
            "of one checkpoint")


def qkv_action(config, is_split: bool):
    """PaddleNLP-style mapping action for query_key_value tensors at any supported degree."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    args = (hidden, hidden // heads, config.multi_query_group_num, config.tensor_parallel_degree)
    if is_split:
        return partial(_split_action, args=args, rank=config.tensor_parallel_rank)
    return partial(_merge_action, args=args)


def _split_action(tensor, args, rank):
    return split_qkv(tensor, *args, rank)


def _merge_action(parts, args):
    return merge_qkv(parts, *args)


# ------------------------------------------------------------------------------------- PaddleNLP hooks


def _patch_attention(attention_class):
    original = attention_class.__init__

    def __init__(self, config, layer_number, device=None):
        groups, degree = config.multi_query_group_num, max(config.tensor_parallel_degree, 1)
        if degree <= groups:
            return original(self, config, layer_number, device)
        # Build the layer of a model with `degree` groups: one group (a copy of the real one) per rank.
        config.multi_query_group_num = degree
        try:
            original(self, config, layer_number, device)
        finally:
            config.multi_query_group_num = groups
        self.multi_query_group_num = groups

    attention_class.__init__ = __init__


def _patch_mappings(model_class):
    original = model_class._get_tensor_parallel_mappings.__func__

    def _get_tensor_parallel_mappings(cls, config, is_split=True):
        mappings = original(cls, config, is_split=is_split)
        if max(config.tensor_parallel_degree, 1) > 1:
            action = qkv_action(config, is_split)
            for key in mappings:
                if ".query_key_value." in key:
                    mappings[key] = action
        return mappings

    model_class._get_tensor_parallel_mappings = classmethod(_get_tensor_parallel_mappings)


def _patch_lora_actions(lora_model_class):
    original = lora_model_class._get_tensor_parallel_convert_actions

    def _get_tensor_parallel_convert_actions(self, loaded_keys, is_split=True, ignore_error=False, config=None):
        actions = original(self, loaded_keys, is_split=is_split, ignore_error=ignore_error, config=config)
        weight_actions = self.model._get_tensor_parallel_mappings(config or self.model.config, is_split=is_split)
        for key in list(actions):
            layer = key[:-len(".lora_B")] if key.endswith(".lora_B") else None
            if layer is None or not layer.endswith(FUSED_COLUMN_LAYERS):
                continue
            weight = next((k for k in weight_actions if (layer + ".weight").endswith(k)), None)
            if weight is not None:
                actions[key] = partial(_on_tensors, weight_actions[weight])
        return actions

    lora_model_class._get_tensor_parallel_convert_actions = _get_tensor_parallel_convert_actions


def _on_tensors(action, value):
    """PaddleNLP's fused-layer split concatenates with paddle ops, and a resumed LoRA checkpoint arrives as numpy:
    give the action a tensor and hand back what came in."""
    if isinstance(value, np.ndarray):
        import paddle

        return np.asarray(action(paddle.to_tensor(value)).numpy())
    return action(value)


def install() -> None:
    """Patch PaddleNLP's ChatGLMv2 attention, its checkpoint mappings and LoRA's lora_B mappings; once."""
    global _installed
    if _installed:
        return
    from paddlenlp.peft import LoRAModel
    from paddlenlp.transformers.chatglm_v2 import modeling

    _patch_attention(modeling.SelfAttention)
    _patch_mappings(modeling.ChatGLMv2PretrainedModel)
    _patch_lora_actions(LoRAModel)
    _installed = True


def mark_replicated_kv(model) -> int:
    """Tag the parameters whose key/value columns are copies shared with other ranks (degree > groups), for the
    optimizer-side sync; returns how many were tagged."""
    config = model.model.config if hasattr(model, "model") and hasattr(model.model, "config") else model.config
    groups, degree = getattr(config, "multi_query_group_num", None), max(config.tensor_parallel_degree, 1)
    if not groups or degree <= groups:
        return 0
    q_width = config.hidden_size // degree
    tagged = 0
    for name, param in model.named_parameters():
        if name.endswith(REPLICATED_KV_SUFFIXES):
            param.replicated_kv = {"q_width": q_width, "copies": degree // groups, "groups": groups,
                                   "group": groups_of_rank(groups, degree, config.tensor_parallel_rank)[0]}
            tagged += 1
    return tagged
