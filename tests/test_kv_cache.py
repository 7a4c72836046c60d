"""The host-side KV cache of the exported engine: columns written in place, grown by chunks, rows selected and
batches merged without moving any row's columns."""
import numpy as np
import pytest

from glm_tune.deployment.kv_cache import CHUNK, KVCache, widen


def columns(batch, count, start, time_axis, heads=2, dim=3):
    """Distinct values per (row, column): row * 1000 + column, so a moved column is seen."""
    values = np.arange(start, start + count, dtype="float32")[None, :] + 1000 * np.arange(batch)[:, None]
    if time_axis == 2:
        return np.broadcast_to(values[:, None, :, None], (batch, heads, count, dim)).copy()
    return np.broadcast_to(values.T[:, :, None, None], (count, batch, heads, dim)).copy()


def column_values(cache, layer=0):
    """[B, capacity] of one buffer (the value at head 0, dim 0)."""
    buffer = cache.buffers[layer]
    return buffer[:, 0, :, 0] if cache.time_axis == 2 else buffer[:, :, 0, 0].T


@pytest.mark.parametrize("time_axis", [0, 2])
def test_append_writes_after_length_and_grows_by_chunks(time_axis):
    cache = KVCache.empty(2, 3, 2, 3, "float32", time_axis)
    assert cache.capacity == 0 and cache.length == 0
    cache.append([columns(3, 5, 0, time_axis)] * 4)  # a prefill of 5 columns
    assert (cache.length, cache.capacity) == (5, CHUNK)
    first = cache.buffers[0]
    for step in range(5, CHUNK):
        cache.append([columns(3, 1, step, time_axis)] * 4)
    assert cache.buffers[0] is first  # written in place while there is room
    cache.append([columns(3, 1, CHUNK, time_axis)] * 4)
    assert (cache.length, cache.capacity) == (CHUNK + 1, 2 * CHUNK)
    values = column_values(cache)
    np.testing.assert_array_equal(values[:, :CHUNK + 1], columns(3, CHUNK + 1, 0, 2)[:, 0, :, 0])
    assert not values[:, CHUNK + 1:].any()  # the unused tail is zeros


@pytest.mark.parametrize("time_axis", [0, 2])
def test_select_keeps_rows_and_drops_leading_columns(time_axis):
    cache = KVCache.empty(1, 4, 2, 3, "float32", time_axis)
    cache.append([columns(4, 10, 0, time_axis)] * 2)
    kept = cache.select([3, 1], start=4)
    assert (kept.length, kept.capacity) == (6, CHUNK)
    expected = columns(4, 10, 0, 2)[[3, 1], 0, 4:, 0]
    np.testing.assert_array_equal(column_values(kept)[:, :6], expected)
    assert not column_values(kept)[:, 6:].any()


@pytest.mark.parametrize("time_axis", [0, 2])
def test_merge_keeps_each_rows_columns_and_writes_after_the_longer(time_axis):
    long, short = KVCache.empty(1, 2, 2, 3, "float32", time_axis), KVCache.empty(1, 1, 2, 3, "float32", time_axis)
    long.append([columns(2, 70, 0, time_axis)] * 2)
    short.append([columns(1, 3, 500, time_axis)] * 2)
    merged = long.merge(short)
    assert (merged.length, merged.capacity) == (70, 2 * CHUNK)
    values = column_values(merged)
    np.testing.assert_array_equal(values[:2, :70], columns(2, 70, 0, 2)[:, 0, :, 0])
    np.testing.assert_array_equal(values[2, :3], [500, 501, 502])
    assert not values[2, 3:].any()
    merged.append([columns(3, 1, 900, time_axis)] * 2)
    np.testing.assert_array_equal(column_values(merged)[:, 70], [900, 1900, 2900])


def test_append_refuses_a_wrong_tensor_count():
    cache = KVCache.empty(2, 1, 2, 3, "float32", 2)
    with pytest.raises(ValueError, match="returned 2 key/value tensors for 4 cache buffers"):
        cache.append([columns(1, 1, 0, 2)] * 2)


def test_widen_masks_added_columns():
    valid = np.array([[0, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(widen(valid, 5), [[0, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    assert widen(valid, 3) is valid
