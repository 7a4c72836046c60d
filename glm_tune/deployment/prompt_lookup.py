"""Speculative decoding without a draft model (prompt lookup): answers copy spans of their prompt (ADGEN's
attributes, names, numbers, tool arguments), so the tokens that followed the last earlier occurrence of the
answer's latest n-gram are proposed as drafts, and one engine call over [next token, drafts...] verifies them all:
a step over a few tokens costs about as much as a step over one while reading the weights dominates.

Greedy rows keep a draft while it equals the argmax before it, so the answer is plain greedy decoding's, token for
token (the model's own choice after the last kept draft comes free with it); sampled rows keep drafts by the
speculative-sampling rule, which leaves each token's distribution what one-step sampling gives (`accept_drafts`).
"""
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import numpy as np

from glm_tune.sampling import Sampling, choose_next, penalize, token_probabilities

MAX_NGRAM = 3   # the longest answer tail looked up in prompt + answer; shorter ones are tried when it is not found
MIN_NGRAM = 2   # a lone repeated token (a comma, a separator) predicted the next one too rarely to pay


class PromptLookup:
    """Where each token occurs in one request's prompt + answer, kept up to date as the answer grows, so a lookup
    costs the last token's earlier occurrences, not a scan of the sequence (at a tiny model's ~0.1 ms a token a
    scan per step was a measurable share). After a step whose drafts were all rejected, drafting pauses for 1, 2,
    4 … steps (reset by a kept draft): an answer that copies nothing costs almost nothing extra."""

    def __init__(self, prompt: Sequence[int]):
        self.sequence: List[int] = []
        self.where: Dict[int, List[int]] = defaultdict(list)
        self.misses, self.pause = 0, 0
        self.extend(prompt)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.where[int(token)].append(len(self.sequence))
            self.sequence.append(int(token))

    def propose(self, count: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> List[int]:
        """Up to `count` tokens that followed the most recent earlier occurrence of the sequence's last n-gram
        (the longest n from max_ngram down to min_ngram that occurs earlier), or []."""
        if self.pause > 0:
            self.pause -= 1
            return []
        sequence, size = self.sequence, len(self.sequence)
        if count <= 0 or size < min_ngram + 1:
            return []
        earlier = self.where[sequence[-1]][:-1]  # ends of windows equal to the tail in their last token
        for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
            tail = sequence[-n:]
            for end in reversed(earlier):
                if end >= n - 1 and sequence[end - n + 1:end + 1] == tail:
                    return sequence[end + 1:end + 1 + count]
        return []

    def verified(self, drafted: int, kept: int) -> None:
        """What the model made of the last drafts: none kept pauses drafting (longer each time), any resets."""
        if drafted and not kept:
            self.misses = min(self.misses + 1, 5)
            self.pause = 2 ** (self.misses - 1)
        elif kept:
            self.misses = self.pause = 0


def propose_drafts(sequence: Sequence[int], count: int, max_ngram: int = MAX_NGRAM,
                   min_ngram: int = MIN_NGRAM) -> List[int]:
    """`PromptLookup(sequence).propose(count)`: the drafts for a sequence seen once."""
    return PromptLookup(sequence).propose(count, max_ngram, min_ngram)


def accept_drafts(logits: np.ndarray, drafts: Sequence[int], rng, sampling: Sampling,
                  answer: Sequence[int] = ()) -> Tuple[int, int]:
    """(kept, next): how many drafts the step keeps, and the token chosen after the last kept one. `logits`
    [len(drafts) + 1, V] are those of the step's positions (the token fed first, then each draft); `answer` is the
    answer so far (for the penalties).

    Greedy: a draft is kept while it equals the greedy choice before it, so the answer is plain greedy decoding's.
    Sampling: the speculative-sampling rule for a draft proposed with certainty (Leviathan et al. 2023, with the
    draft distribution a point mass): draft d is kept with probability p(d), else the next token is drawn from p
    without d, renormalized; after the last kept draft the next token is drawn from p. Each token is then
    distributed exactly as when sampled one step at a time."""
    for position, draft in enumerate(drafts):
        before = list(answer) + list(drafts[:position])
        if sampling.greedy:
            best = choose_next(logits[position], rng, sampling, before)
            if best != int(draft):
                return position, best
            continue
        row = penalize(logits[position], before, sampling) if sampling.penalized else logits[position]
        ids, probs = token_probabilities(row, sampling)
        if rng.random_sample() < float(probs[ids == int(draft)].sum()):
            continue
        rest = np.where(ids == int(draft), 0.0, probs)
        return position, int(ids[rng.choice(len(ids), p=rest / rest.sum())])
    return len(drafts), choose_next(logits[len(drafts)], rng, sampling, list(answer) + list(drafts))
