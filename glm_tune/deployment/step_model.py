"""One decoding step of a ChatGLM as a graph that reads the KV cache as an input and returns only the new keys
and values.

The exported engine runs this step graph: a prefill call on the prompt with an empty cache, then one call per new
token. Compared with exporting `model.generate` (the whole loop in a static graph, ~5x slower than dygraph on CPU
as measured), each call does one token's work and the Python loop stays trivial. The host keeps the cache
(`kv_cache.KVCache`) and writes each step's new columns into it in place, so no step copies the whole cache:
neither a past + new concatenation inside the graph nor a round trip through numpy.

Graph inputs (all int64 but the caches):
  input_ids       [B, S]
  position_ids    [B, S]        v2/v3;  [B, 2, S] v1 (absolute, block)
  attention_mask  [B, C+S]      v2/v3 (1 = a real token);  [B, 1, S, C+S] v1 (1 = may attend)
                  the first C columns are the cache's (its unused tail masked), the last S the step's tokens
  num_logits      [1]           K: logits are returned for the last K positions (1 to decode and prefill; 1 + the
                                drafts to verify a speculative step)
  cache_k_0, cache_v_0, …, cache_k_{L-1}, cache_v_{L-1}: the cache, C columns (C = 0 at prefill), one key and
                  one value per layer: [B, G, C, D] v2/v3;  [C, B, H, D] v1 (PaddleNLP's own layout)
Graph outputs: logits [B, K, V] (the last K positions), then each layer's new key and value (S columns, same
layout).
`StepFeeds` (step_feeds.py, numpy only) builds these inputs for both the engine and the dygraph reference.
"""
import types
from typing import NamedTuple
import numpy as np
import paddle
import paddle.nn.functional as F

from glm_tune.errors import GlmTuneError
from glm_tune.deployment.step_feeds import cache_names, cache_shape



class GenerationStep(paddle.nn.Layer):
    """Wraps a PaddleNLP ChatGLM so one call maps (tokens, positions, mask, cache) to (next logits, new keys and
    values). ChatGLM2/3 run `lean_attention` in the wrapped model (export only)."""

    def __init__(self, model, generation: str):
        super().__init__()
        self.model = model
        self.generation = generation
        self.num_layers = model.config.num_hidden_layers
        if generation != "chatglm":
            if getattr(model.config, "use_long_sequence_strategies", False):
                raise GlmTuneError("PaddleNLP's use_long_sequence_strategies models cannot be exported yet; "
                                   "ChatGLM3-6B-32K's rope_ratio is supported without it")
            encoder = model.chatglm_v2.encoder
            for layer in encoder.layers:
                layer.self_attention.forward = types.MethodType(lean_attention, layer.self_attention)
            if model.config.rmsnorm:
                norms = [encoder.final_layernorm] if getattr(encoder, "post_layer_norm", True) else []
                for norm in norms + [n for layer in encoder.layers
                                     for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
                    norm.forward = types.MethodType(fusable_rms_norm, norm)

    def forward(self, input_ids, position_ids, attention_mask, num_logits, caches):
        past = [(caches[2 * i], caches[2 * i + 1]) for i in range(self.num_layers)]
        if self.generation == "chatglm":
            logits, rest = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                      cache=tuple(past), use_cache=True, return_dict=False)
            # PaddleNLP's ChatGLM-6B attention returns past + new; the host keeps the past already
            start = caches[0].shape[0]
            new = [tensor[start:] for present in rest[0] for tensor in present[:2]]
            return (paddle.slice(logits, axes=[1], starts=-num_logits, ends=[2 ** 31 - 1]).astype("float32"), *new)
        hidden, presents = chatglm2_step(self.model.chatglm_v2, input_ids, position_ids, attention_mask, past)
        # the vocabulary projection for the last K positions only (S x 65024 x hidden at prefill otherwise);
        # hidden states are [S, B, H], the output layer returns [B, K, V]
        last = paddle.slice(hidden, axes=[0], starts=-num_logits, ends=[2 ** 31 - 1])
        logits = self.model.chatglm_v2.output_layer(last).astype("float32")
        return (logits, *[tensor for present in presents for tensor in present])


def chatglm2_step(core, input_ids, position_ids, attention_mask, past):
    """PaddleNLP's ChatGLMv2Model.forward for a cache of C columns read as [B, G, C, D]: the same embedding,
    mask rule (a cache column where the row's mask says real, the step's own tokens causally), rotary table and
    encoder; the rotary factors are built once per step for every layer (`rotary_factors`)."""
    steps, cached = input_ids.shape[1], past[0][0].shape[2]
    hidden = core.embedding(input_ids)  # [S, B, H]
    causal = paddle.tril(paddle.ones([steps, steps])).astype("bool")
    seen = paddle.concat([paddle.ones([steps, cached], dtype="bool"), causal], axis=-1)
    mask = seen.unsqueeze([0, 1]) & attention_mask.astype("bool").unsqueeze([1, 2])  # [B, 1, S, C+S]
    table = core.rotary_pos_emb(core.max_sequence_length)[position_ids].transpose([1, 0, 2, 3])  # [S, B, R, 2]
    # the rotary factors and the cache length travel to every layer in the rotary argument (PaddleNLP's encoder
    # passes nothing else through): computed once, not once per layer (a length read per layer is ~8 more graph
    # nodes each)
    attention = core.encoder.layers[0].self_attention
    heads, groups = attention.num_attention_heads_per_partition, attention.num_multi_query_groups_per_partition
    step = StepRotary(*rotary_factors(table, attention.hidden_size_per_attention_head, heads + groups, groups), cached)
    hidden, presents = core.encoder(hidden, mask, rotary_pos_emb=step, kv_caches=past, use_cache=True)[:2]
    return hidden, presents


def fusable_rms_norm(self, hidden_states):
    """PaddleNLP's ChatGLMv2 RMSNorm written x / sqrt(mean(x^2) + eps) * weight, the form ONNX Runtime fuses into
    one SimplifiedLayerNormalization node (PaddleNLP's rsqrt(...) * x exports as 7 nodes it does not fuse)."""
    variance = hidden_states.astype("float32").pow(2).mean(-1, keepdim=True)
    return (hidden_states / paddle.sqrt(variance + self.epsilon) * self.weight).astype(hidden_states.dtype)


def rotary_factors(table, dim: int, rotated: int, passed: int):
    """(cos, sin, swap) such that rotary(x) = x * cos + (x @ swap) * sin for the fused query/key/value heads
    x [S, B, rotated + passed, dim]: PaddleNLP's apply_rotary_pos_emb (pairs (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)
    on the first 2R channels, the rest passed through) on the first `rotated` heads (queries and keys) in four ops
    per layer instead of ~30, and bit for bit the same: `swap` maps each pair to (-x1, x0) and is zero on the
    passed channels, where cos is 1 and sin 0, as on the `passed` (value) heads."""
    cos, sin = table[..., 0], table[..., 1]  # [S, B, R]
    pairs = cos.shape[-1]
    # constant matrices instead of expand / concat on dynamic shapes (each of those is a Shape-Max-Expand chain in
    # ONNX): `spread` copies each pair's factor to both its channels, `keep` marks the rotated heads' channels
    spread, keep, swap = (np.zeros((pairs, dim), "float32"), np.zeros((rotated + passed, dim), "float32"),
                          np.zeros((dim, dim), "float32"))
    keep[:rotated, :2 * pairs] = 1.0
    for i in range(pairs):
        spread[i, 2 * i] = spread[i, 2 * i + 1] = 1.0
        swap[2 * i + 1, 2 * i], swap[2 * i, 2 * i + 1] = -1.0, 1.0
    spread, keep, swap = (paddle.to_tensor(m, dtype=cos.dtype) for m in (spread, keep, swap))
    cos = paddle.matmul(cos, spread).unsqueeze(2) * keep + (1.0 - keep)  # [S, B, heads, dim]
    sin = paddle.matmul(sin, spread).unsqueeze(2) * keep
    return cos, sin, swap


class StepRotary(NamedTuple):
    """What `chatglm2_step` hands every layer in PaddleNLP's `rotary_pos_emb` argument."""
    cos: object     # [S, B, heads, dim] (rotary_factors)
    sin: object
    swap: object    # [dim, dim]
    cached: object  # the cache's length C: where the step's own columns start


def apply_rotary(x, step: StepRotary):
    return x * step.cos + paddle.matmul(x, step.swap) * step.sin


def lean_attention(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True,
                   output_attentions=False):
    """PaddleNLP's ChatGLMv2 SelfAttention.forward for the step graph with the same arithmetic, but:
    each key/value group serves its query heads through a reshape (PaddleNLP `tile`s the cache to every head);
    the cache [B, G, C, D] is read where it lies: scores against it and against the step's own keys are
    computed apart and the context sums the two parts, so nothing concatenates or transposes the cache;
    only the step's keys and values are returned ([B, G, S, D])."""
    heads, groups = self.num_attention_heads_per_partition, self.num_multi_query_groups_per_partition
    dim, core = self.hidden_size_per_attention_head, self.core_attention
    fused = self.query_key_value(hidden_states).reshape([0, 0, heads + 2 * groups, dim])
    query, key, value = apply_rotary(fused, rotary_pos_emb).split([heads, groups, groups], axis=2)  # [S, B, n, D]
    key, value = key.transpose([1, 2, 0, 3]), value.transpose([1, 2, 0, 3])  # [B, G, S, D]
    past_key, past_value = kv_cache
    cached = rotary_pos_emb.cached
    # [B, groups, heads/groups * S, dim]: query head h belongs to group h // (heads / groups), as tile ordered them
    grouped = query.transpose([1, 2, 0, 3]).reshape([0, groups, -1, dim])
    scores = paddle.concat([paddle.matmul(grouped, past_key, transpose_y=True),
                            paddle.matmul(grouped, key, transpose_y=True)], axis=-1) * (1.0 / core.norm_factor)
    scores = scores.reshape([0, heads, -1, 0]).astype("float32")  # [B, heads, S, C+S]
    if core.coeff is not None:
        scores = scores * core.coeff
    probs = F.softmax(scores + attention_mask, axis=-1).astype(query.dtype).reshape([0, groups, -1, 0])
    context = paddle.matmul(probs[:, :, :, :cached], past_value) + paddle.matmul(probs[:, :, :, cached:], value)
    context = context.reshape([0, heads, -1, dim]).transpose([2, 0, 1, 3]).reshape([0, 0, heads * dim])
    return self.dense(context), ((key, value) if use_cache else None)


def input_specs(config, generation: str, dtype: str = "float32"):
    from paddle.static import InputSpec

    layers, heads, dim = cache_shape(config, generation)
    if generation == "chatglm":
        pos, mask = InputSpec([None, 2, None], "int64", "position_ids"), InputSpec([None, 1, None, None], "int64",
                                                                                    "attention_mask")
        cache = [None, None, heads, dim]
    else:
        pos, mask = InputSpec([None, None], "int64", "position_ids"), InputSpec([None, None], "int64",
                                                                                "attention_mask")
        cache = [None, heads, None, dim]
    return [InputSpec([None, None], "int64", "input_ids"), pos, mask, InputSpec([1], "int64", "num_logits"),
            [InputSpec(cache, dtype, name) for name in cache_names(layers)]]
