"""The key/value cache of a batch being decoded on an exported step graph, kept by the host and written in place.

The step graph reads the cache as it is and returns only the keys and values of the tokens it just ran; this
class writes those into its buffers at the next free column. Nothing copies the whole cache at a decode step:
ONNX Runtime binds the buffers without a copy (the same memory at every step), and the graph's attention reads
them once. Buffers grow by whole chunks of columns (one copy per CHUNK tokens); the columns past `length` are
zeros and masked in every step's attention mask, so a row attends to exactly the columns it would alone.

The time axis is the generation's: ChatGLM2/3's lean attention keeps [B, groups, T, dim] (what its matmuls read
without a transpose); ChatGLM-6B keeps PaddleNLP's [T, B, heads, dim].
"""
from typing import List, Sequence

import numpy as np

CHUNK = 64  # columns added when the buffers are full: one whole-cache copy per 64 tokens


def round_up(columns: int) -> int:
    return -(-columns // CHUNK) * CHUNK


class KVCache:
    def __init__(self, buffers: List[np.ndarray], length: int, time_axis: int):
        self.buffers, self.length, self.time_axis = list(buffers), length, time_axis
        self.batch_axis = 0 if time_axis == 2 else 1

    @classmethod
    def empty(cls, layers: int, batch: int, heads: int, dim: int, dtype: str, time_axis: int) -> "KVCache":
        shape = (batch, heads, 0, dim) if time_axis == 2 else (0, batch, heads, dim)
        return cls([np.zeros(shape, dtype=dtype) for _ in range(2 * layers)], 0, time_axis)

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[self.time_axis]

    def _columns(self, start, stop) -> tuple:
        index = [slice(None)] * 4
        index[self.time_axis] = slice(start, stop)
        return tuple(index)

    def _resized(self, array: np.ndarray, capacity: int, start: int = 0) -> np.ndarray:
        """A copy of columns [start, length) of `array` at the front of `capacity` columns, zeros after."""
        shape = list(array.shape)
        shape[self.time_axis] = capacity
        grown = np.zeros(shape, dtype=array.dtype)
        grown[self._columns(0, self.length - start)] = array[self._columns(start, self.length)]
        return grown

    def append(self, new: Sequence) -> None:
        """Write the step graph's new keys and values (one per cache buffer, in graph order) after `length`."""
        new = [np.asarray(value) for value in new]
        if len(new) != len(self.buffers):
            raise ValueError(f"the step graph returned {len(new)} key/value tensors for {len(self.buffers)} "
                             "cache buffers")
        count = new[0].shape[self.time_axis]
        if self.length + count > self.capacity:
            capacity = round_up(self.length + count)
            self.buffers = [self._resized(b, capacity) for b in self.buffers]
        where = self._columns(self.length, self.length + count)
        for buffer, value in zip(self.buffers, new):
            buffer[where] = value
        self.length += count

    def select(self, rows: List[int], start: int = 0) -> "KVCache":
        """A cache of only `rows`, without the columns before `start` (a copy)."""
        index = [slice(None)] * 4
        index[self.batch_axis] = rows
        length = self.length - start
        return KVCache([self._resized(b[tuple(index)], round_up(length), start) for b in self.buffers], length,
                       self.time_axis)

    def merge(self, other: "KVCache") -> "KVCache":
        """Both batches' rows in one cache; each row keeps its columns from 0, the shorter side's tail is zeros
        (its mask marks it), and the next column is written after the longer one."""
        length = max(self.length, other.length)
        capacity = round_up(length)
        merged = [np.concatenate([self._resized(a, capacity), other._resized(b, capacity)], axis=self.batch_axis)
                  for a, b in zip(self.buffers, other.buffers)]
        return KVCache(merged, length, self.time_axis)


def widen(valid: np.ndarray, width: int, fill: int = 0) -> np.ndarray:
    """A [B, T] mask of real cache columns with columns of `fill` added at the end up to `width` (0: masked)."""
    missing = width - valid.shape[1]
    if missing <= 0:
        return valid
    return np.concatenate([valid, np.full((len(valid), missing), fill, dtype=valid.dtype)], axis=1)
