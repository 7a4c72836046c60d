"""The step graph's inputs on the host side, in numpy only: what the engines (and the dygraph reference) are fed
for a batch of prompts, then one token at a time, with the KV cache the host keeps. Serving and the ONNX Runtime
engine import this module, never the graph code (step_model.py, which needs paddle)."""
from typing import Dict

import numpy as np

from glm_tune.data.collator import DataCollator
from glm_tune.deployment.kv_cache import KVCache, widen

# The cache's time axis per generation: PaddleNLP's ChatGLM-6B keeps [columns, batch, heads, dim], ChatGLM2/3 the
# step graph's [batch, groups, columns, dim].
TIME_AXIS = {"chatglm": 0, "chatglm2": 2, "chatglm3": 2}
ONE = np.ones(1, dtype="int64")  # num_logits of a plain step: the last position's logits only


def cache_shape(config, generation: str):
    """(layers, kv heads, head dim) of the cache."""
    if generation == "chatglm":
        return config.num_hidden_layers, config.num_attention_heads, config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.multi_query_group_num, config.kv_channels


def cache_names(layers: int, prefix: str = "cache") -> list:
    """cache_k_0, cache_v_0, cache_k_1, …: the graph's cache inputs; with prefix "new", its outputs in the same
    order."""
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("k", "v")]


class StepFeeds:
    """Inputs of the step graph for a batch of prompts, advanced one token at a time (numpy, no framework).
    After `prefill`, `cache` holds the batch's keys and values and `valid` [B, cache.length] marks its real
    columns; `advance` writes a step's new columns into the cache and returns the next step's inputs."""

    def __init__(self, tokenizer, generation: str, config, dtype: str = "float32"):
        self.collator = DataCollator(tokenizer, generation)
        self.generation = generation
        self.layers, self.heads, self.dim = cache_shape(config, generation)
        self.dtype = dtype
        self.time_axis = TIME_AXIS[generation]
        self.cache_names = cache_names(self.layers)

    def prefill(self, prompts) -> Dict[str, np.ndarray]:
        batch = self.collator([{"input_ids": p} for p in prompts])
        self.cache = KVCache.empty(self.layers, len(prompts), self.heads, self.dim, self.dtype, self.time_axis)
        feeds = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                 "attention_mask": batch["attention_mask"], "num_logits": ONE,
                 **dict(zip(self.cache_names, self.cache.buffers))}
        # Columns each row may attend to: its real tokens (v1's last prompt row sees exactly those).
        self.valid = batch["attention_mask"] if self.generation != "chatglm" else batch["attention_mask"][:, 0, -1, :]
        return feeds

    def advance(self, feeds, next_tokens: np.ndarray, new_columns) -> Dict[str, np.ndarray]:
        """The next step's inputs: the chosen tokens, and the cache with the new columns the last step returned
        (in graph order) written in."""
        self.valid = append_step(self.cache, self.valid, new_columns)
        return self.next_feeds(self.valid, feeds["position_ids"][..., -1:], next_tokens, self.cache)

    def next_feeds(self, valid: np.ndarray, last_positions: np.ndarray, next_tokens: np.ndarray,
                   cache: KVCache) -> Dict[str, np.ndarray]:
        """Inputs of a one-token step for rows whose cache columns are `valid` [B, cache.length] and whose last
        positions were `last_positions` ([B, 1], or [B, 2, 1] for v1)."""
        tokens = np.asarray(next_tokens).reshape(len(next_tokens), 1).astype("int64")
        return self.extend_feeds(valid, last_positions, tokens, np.ones(tokens.shape, dtype=valid.dtype), cache)

    def extend_feeds(self, valid: np.ndarray, last_positions: np.ndarray, tokens: np.ndarray, real: np.ndarray,
                     cache: KVCache, num_logits: int = 1) -> Dict[str, np.ndarray]:
        """Inputs of a step over T tokens per row on top of `cache` (a speculative step's drafts, or the new end of
        a prompt whose beginning came from the prefix cache). `tokens` [B, T] are left-padded: `real` [B, T] marks
        each row's real ones, which continue from `last_positions` one position each and see one another
        causally; logits come back for the last `num_logits` positions."""
        size, steps = tokens.shape
        real = real.astype(valid.dtype)
        columns = np.concatenate([widen(valid, cache.capacity), real], axis=1)
        advance = np.cumsum(real, axis=1).astype("int64")  # a padding slot repeats its row's last position
        if self.generation == "chatglm":
            position = np.repeat(last_positions, steps, axis=2)
            position[:, 1] += advance  # the absolute position stays at [gMASK]; the block position counts on
            # may attend: the cache's real columns, and the step's real tokens up to the query's own
            causal = np.tril(np.ones((steps, steps), dtype=valid.dtype))[None] * real[:, None, :]
            mask = np.concatenate([np.repeat(columns[:, None, :-steps], steps, axis=1), causal], axis=2)[:, None]
        else:
            position, mask = last_positions + advance, columns
        return {"input_ids": tokens.astype("int64"), "position_ids": position, "attention_mask": mask,
                "num_logits": np.full(1, num_logits, dtype="int64"), **dict(zip(self.cache_names, cache.buffers))}


def append_step(cache: KVCache, valid: np.ndarray, new_columns) -> np.ndarray:
    """Write a step's new keys and values into `cache`; the mask of real columns grows with them (a decode
    step's token is real; a prefill's columns were marked by its prompt mask already)."""
    cache.append(new_columns)
    return widen(valid, cache.length, fill=1)
