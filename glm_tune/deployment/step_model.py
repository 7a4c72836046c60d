"""One decoding step of a ChatGLM as a graph with the KV cache as explicit inputs and outputs.

The exported engine runs this step graph: a prefill call on the prompt with an empty cache, then one call per new
token with the cache it returned. Compared with exporting `model.generate` (the whole loop in a static graph,
~5x slower than dygraph on CPU as measured), each call does one token's work and the Python loop stays trivial.

Graph inputs (all int64 but the caches):
  input_ids       [B, S]
  position_ids    [B, S]        v2/v3;  [B, 2, S] v1 (absolute, block)
  attention_mask  [B, P+S]      v2/v3 (1 = real token);  [B, 1, S, P+S] v1 (1 = may attend)
  cache_k_0, cache_v_0, …, cache_k_{L-1}, cache_v_{L-1}   [P, B, G, D] each (P = 0 at prefill)
Graph outputs: next_logits [B, V] (last position), then each layer's key and value [P+S, B, G, D] in that order.
One cache per layer, not a stacked [L, …] tensor: slicing a stacked input and stacking the output copied the
whole cache twice more per step.
`StepFeeds` builds these inputs for both the engine and the dygraph reference, from the same DataCollator batch.
"""
import types
from typing import Dict

import numpy as np
import paddle
import paddle.nn.functional as F

from data import DataCollator


class GenerationStep(paddle.nn.Layer):
    """Wraps a PaddleNLP ChatGLM so one call maps (tokens, positions, mask, cache) to (next logits, cache).
    ChatGLM2/3's attention is swapped for `grouped_query_attention` in the wrapped model (export only)."""

    def __init__(self, model, generation: str):
        super().__init__()
        self.model = model
        self.generation = generation
        self.num_layers = model.config.num_hidden_layers
        if generation != "chatglm" and model.config.tensor_parallel_degree <= 1:
            for layer in model.chatglm_v2.encoder.layers:
                layer.self_attention.forward = types.MethodType(grouped_query_attention, layer.self_attention)

    def forward(self, input_ids, position_ids, attention_mask, caches):
        past = tuple((caches[2 * i], caches[2 * i + 1]) for i in range(self.num_layers))
        if self.generation == "chatglm":
            logits, rest = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                      cache=past, use_cache=True, return_dict=False)
            presents = rest[0]
            next_logits = logits[:, -1, :].astype("float32")
        else:
            # the vocabulary projection for the last position only: PaddleNLP's ChatGLMv2 ignores
            # return_last_logit and would project every prompt position at prefill (S x 65024 x hidden)
            hidden, presents = self.model.chatglm_v2(input_ids=input_ids, position_ids=position_ids,
                                                     attention_mask=attention_mask, past_key_values=past,
                                                     use_cache=True, return_dict=False)[:2]
            # its hidden states are [S, B, H]; the output layer returns [B, S', V]
            next_logits = self.model.chatglm_v2.output_layer(hidden[-1:])[:, 0, :].astype("float32")
        return (next_logits, *[tensor for present in presents for tensor in present[:2]])


def grouped_query_attention(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True,
                            output_attentions=False):
    """PaddleNLP's ChatGLMv2 SelfAttention.forward for the step graph, the same arithmetic in the same order,
    but each key/value group serves its query heads through a reshape instead of PaddleNLP's `tile`, which
    copied the whole cache once per query head of the group at every step (4x for 8 heads in 2 groups)."""
    from paddlenlp.transformers.chatglm_v2.modeling import apply_rotary_pos_emb

    heads, groups = self.num_attention_heads_per_partition, self.num_multi_query_groups_per_partition
    dim, core = self.hidden_size_per_attention_head, self.core_attention
    query, key, value = self.query_key_value(hidden_states).split([heads * dim, groups * dim, groups * dim], axis=-1)
    query = apply_rotary_pos_emb(query.reshape([0, 0, heads, dim]), rotary_pos_emb)  # [S, B, heads, dim]
    key = apply_rotary_pos_emb(key.reshape([0, 0, groups, dim]), rotary_pos_emb)
    value = value.reshape([0, 0, groups, dim])
    if kv_cache is not None:
        key, value = paddle.concat((kv_cache[0], key), axis=0), paddle.concat((kv_cache[1], value), axis=0)
    # [B, groups, heads/groups * S, dim]: query head h belongs to group h // (heads / groups), as tile ordered them
    grouped = query.transpose([1, 2, 0, 3]).reshape([0, groups, -1, dim])
    scores = paddle.matmul(grouped, key.transpose([1, 2, 3, 0])) * (1.0 / core.norm_factor)
    scores = scores.reshape([0, heads, -1, 0]).astype("float32")  # [B, heads, S, T]
    if core.coeff is not None:
        scores = scores * core.coeff
    probs = F.softmax(scores + attention_mask, axis=-1).astype(query.dtype)
    context = paddle.matmul(probs.reshape([0, groups, -1, 0]), value.transpose([1, 2, 0, 3]))
    context = context.reshape([0, heads, -1, dim]).transpose([2, 0, 1, 3]).reshape([0, 0, heads * dim])
    return self.dense(context), ((key, value) if use_cache else None)


def cache_shape(config, generation: str):
    """(layers, kv heads, head dim) of the cache."""
    if generation == "chatglm":
        return config.num_hidden_layers, config.num_attention_heads, config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.multi_query_group_num, config.kv_channels


def input_specs(config, generation: str, dtype: str = "float32"):
    from paddle.static import InputSpec

    layers, heads, dim = cache_shape(config, generation)
    if generation == "chatglm":
        pos, mask = InputSpec([None, 2, None], "int64", "position_ids"), InputSpec([None, 1, None, None], "int64",
                                                                                    "attention_mask")
    else:
        pos, mask = InputSpec([None, None], "int64", "position_ids"), InputSpec([None, None], "int64",
                                                                                "attention_mask")
    return [InputSpec([None, None], "int64", "input_ids"), pos, mask,
            [InputSpec([None, None, heads, dim], dtype, name) for name in cache_names(layers)]]


def cache_names(layers: int) -> list:
    """cache_k_0, cache_v_0, cache_k_1, …: the graph's cache inputs, in the order its outputs return them."""
    return [f"cache_{kind}_{i}" for i in range(layers) for kind in ("k", "v")]


class StepFeeds:
    """Inputs of the step graph for a batch of prompts, advanced one token at a time (numpy, no framework)."""

    def __init__(self, tokenizer, generation: str, config, dtype: str = "float32"):
        self.collator = DataCollator(tokenizer, generation)
        self.generation = generation
        self.layers, self.heads, self.dim = cache_shape(config, generation)
        self.dtype = dtype
        self.cache_names = cache_names(self.layers)

    def prefill(self, prompts) -> Dict[str, np.ndarray]:
        batch = self.collator([{"input_ids": p} for p in prompts])
        size = len(prompts)
        empty = np.zeros((0, size, self.heads, self.dim), dtype=self.dtype)
        feeds = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                 "attention_mask": batch["attention_mask"], **{name: empty for name in self.cache_names}}
        # Columns each row may attend to: its real tokens (v1's last prompt row sees exactly those).
        self.valid = batch["attention_mask"] if self.generation != "chatglm" else batch["attention_mask"][:, 0, -1, :]
        return feeds

    def advance(self, feeds, next_tokens: np.ndarray, caches) -> Dict[str, np.ndarray]:
        """The next step's inputs: the chosen tokens and the caches the last step returned (in graph order)."""
        self.valid = np.concatenate([self.valid, np.ones((len(next_tokens), 1), dtype="int64")], axis=1)
        return self.next_feeds(self.valid, feeds["position_ids"][..., -1:], next_tokens, caches)

    def next_feeds(self, valid: np.ndarray, last_positions: np.ndarray, next_tokens: np.ndarray,
                   caches) -> Dict[str, np.ndarray]:
        """Inputs of a one-token step for rows whose cache columns (the new token's included) are `valid` [B, T]
        and whose last positions were `last_positions` ([B, 1], or [B, 2, 1] for v1)."""
        size = len(next_tokens)
        if self.generation == "chatglm":
            position = last_positions.copy()
            position[:, 1] += 1  # the absolute position stays at [gMASK]; the block position counts on
            mask = valid[:, None, None, :]
        else:
            position, mask = last_positions + 1, valid
        return {"input_ids": np.asarray(next_tokens).reshape(size, 1).astype("int64"), "position_ids": position,
                "attention_mask": mask, **dict(zip(self.cache_names, caches))}
