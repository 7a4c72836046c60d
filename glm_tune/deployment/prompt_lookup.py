"""Speculative decoding without a draft model (prompt lookup): answers copy spans of their prompt (ADGEN's
attributes, names, numbers, tool arguments), so the tokens that followed the last earlier occurrence of the
answer's latest n-gram are proposed as drafts, and one engine call over [next token, drafts...] verifies them all:
a step over a few tokens costs about as much as a step over one while reading the weights dominates.

Greedy only: a draft is kept while it equals the argmax of the logits before it, so the answer is the one plain
greedy decoding gives, token for token (the model's own choice after the last kept draft comes free with it).
"""
from typing import List, Sequence, Tuple

import numpy as np

MAX_NGRAM = 3   # the longest answer tail looked up in prompt + answer; shorter ones are tried when it is not found
MIN_NGRAM = 1


def propose_drafts(sequence: Sequence[int], count: int, max_ngram: int = MAX_NGRAM,
                   min_ngram: int = MIN_NGRAM) -> List[int]:
    """Up to `count` tokens that followed the most recent earlier occurrence of `sequence`'s last n-gram (the
    longest n from max_ngram down to min_ngram that occurs earlier), or [] when none does."""
    if count <= 0 or len(sequence) < min_ngram + 1:
        return []
    ids = np.asarray(sequence, dtype="int64")
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        tail = ids[-n:]
        # start i of each earlier window ids[i:i+n] equal to the tail (the tail itself excluded)
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        starts = np.flatnonzero((windows == tail).all(axis=1))
        starts = starts[starts + n < len(ids)]
        if len(starts):
            follow = int(starts[-1]) + n
            return ids[follow:follow + count].tolist()
    return []


def accept_greedy(logits: np.ndarray, drafts: Sequence[int]) -> Tuple[int, int]:
    """(kept, next): how many drafts equal the greedy choice before them, and the greedy token after the last kept
    one. `logits` [len(drafts) + 1, V] are those of the step's positions: the token fed first, then each draft."""
    chosen = logits.argmax(-1)
    kept = 0
    while kept < len(drafts) and int(chosen[kept]) == int(drafts[kept]):
        kept += 1
    return kept, int(chosen[kept])
