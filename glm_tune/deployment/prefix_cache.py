"""Keys and values of earlier requests, kept by their token prefix so a new request that starts the same way (the
next turn of a conversation, the same ChatGLM3 tools system message) prefills only its new end.

A prefix is cut into blocks of BLOCK tokens; a block's key hashes its tokens together with the key of the block
before it, so a key stands for the whole prefix up to the block's end (content and position). Only whole blocks
are kept, least recently used first out when the budget is passed; a lookup walks the chain from the first block
and stops at the first one missing. The columns kept are what the cache held after the request: the prompt's and
the answer's, so a conversation's next turn finds its history, answers included, where they tokenize the same.

ChatGLM2/3 only: their attention is causal, so a token's keys and values depend on the tokens before it alone.
ChatGLM-6B's prompt attends both ways (a prefix LM): a prompt's keys depend on the whole prompt, so nothing of an
earlier request can be reused there, and this cache is not used for it.
"""
import hashlib
from collections import OrderedDict
from typing import List, Sequence, Tuple

import numpy as np

from glm_tune.deployment.kv_cache import KVCache, round_up

BLOCK = 16
CACHEABLE = ("chatglm2", "chatglm3")


def block_keys(ids: Sequence[int], block: int = BLOCK) -> List[bytes]:
    """The chained key of each whole block of `ids`."""
    keys, key = [], b""
    array = np.asarray(ids, dtype="int64")
    for start in range(0, len(array) - block + 1, block):
        key = hashlib.blake2b(key + array[start:start + block].tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys


class PrefixCache:
    """Blocks of [2 x layers, kv heads, BLOCK, head dim] (the step graph's [B, G, T, D] cache, one row), at most
    `budget_bytes` of them."""

    def __init__(self, budget_bytes: int, block: int = BLOCK):
        self.budget, self.block = int(budget_bytes), block
        self.blocks: "OrderedDict[bytes, np.ndarray]" = OrderedDict()
        self.bytes = 0
        self.stats = {"lookups": 0, "hits": 0, "tokens_reused": 0, "tokens_stored": 0, "evicted_blocks": 0}

    def _touch(self, keys: List[bytes]) -> None:
        for key in reversed(keys):  # the first block ends most recent: a chain loses its tail before its root
            self.blocks.move_to_end(key)

    def lookup(self, ids: Sequence[int], limit: int) -> Tuple[int, KVCache]:
        """(tokens found, a one-row cache of their columns) for the longest kept prefix of `ids` of at most
        `limit` tokens; (0, None) when none is kept."""
        self.stats["lookups"] += 1
        found = []
        for key in block_keys(ids[:limit], self.block):
            if key not in self.blocks:
                break
            found.append(key)
        if not found:
            return 0, None
        self._touch(found)
        columns = np.concatenate([self.blocks[key] for key in found], axis=2)  # [2L, G, n, D]
        count = columns.shape[2]
        self.stats["hits"] += 1
        self.stats["tokens_reused"] += count
        capacity = round_up(count)
        buffers = []
        for layer_columns in columns:
            buffer = np.zeros((1, layer_columns.shape[0], capacity, layer_columns.shape[2]), dtype=columns.dtype)
            buffer[0, :, :count] = layer_columns
            buffers.append(buffer)
        return count, KVCache(buffers, count, time_axis=2)

    def store(self, ids: Sequence[int], cache: KVCache, row: int, columns: np.ndarray) -> None:
        """Keep the whole blocks of `ids` whose keys and values are in `cache` row `row` at `columns` (the row's
        real columns, in the order of `ids`)."""
        keys = block_keys(ids[:len(columns)], self.block)
        for index, key in enumerate(keys):
            if key in self.blocks:
                continue
            where = columns[index * self.block:(index + 1) * self.block]
            kept = np.stack([buffer[row][:, where] for buffer in cache.buffers])  # [2L, G, BLOCK, D]
            if kept.nbytes > self.budget:
                return
            self.blocks[key] = kept
            self.bytes += kept.nbytes
            self.stats["tokens_stored"] += self.block
        if keys:
            self._touch([k for k in keys if k in self.blocks])
        while self.bytes > self.budget and self.blocks:
            _, dropped = self.blocks.popitem(last=False)
            self.bytes -= dropped.nbytes
            self.stats["evicted_blocks"] += 1

    def summary(self) -> dict:
        return {**self.stats, "blocks": len(self.blocks), "megabytes": round(self.bytes / 2 ** 20, 2),
                "budget_megabytes": round(self.budget / 2 ** 20, 2)}
