"""How the next token is chosen: one `Sampling` and one `choose_next` for predict, infer and serve.

Framework-free (numpy): the server and the exported engines use it without paddle. PaddleNLP's `generate` (the
dygraph predictor) takes the same settings through `generate_kwargs`.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np


@dataclass
class Sampling:
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: Optional[int] = None
    # OpenAI's penalties: each token's logit lowers by frequency x its count in the answer so far, and by presence
    # once it has appeared (before the greedy choice or sampling)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @classmethod
    def from_arguments(cls, gen_args) -> "Sampling":
        """The commands' --decode_strategy, --temperature, --top_p, --top_k (argument.GenerateArgument)."""
        return cls(greedy=gen_args.decode_strategy != "sampling", temperature=gen_args.temperature,
                   top_p=gen_args.top_p, top_k=gen_args.top_k)

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty)

    def generate_kwargs(self) -> dict:
        """The same settings as PaddleNLP's generate takes them."""
        return {"decode_strategy": "greedy_search" if self.greedy else "sampling", "top_k": self.top_k,
                "top_p": self.top_p, "temperature": self.temperature}


def choose_next(row: np.ndarray, rng: np.random.RandomState, sampling: Sampling, answer: Sequence[int] = ()) -> int:
    """The next token after one position's logits [V]: OpenAI's penalties for the answer so far, then the greedy
    argmax or a draw with temperature, top-k and top-p."""
    if sampling.penalized:
        row = penalize(row, answer, sampling)
    if sampling.greedy:
        return int(row.argmax())
    ids, probs = token_probabilities(row, sampling)
    return int(ids[rng.choice(len(ids), p=probs)])


def token_probabilities(row: np.ndarray, sampling: Sampling):
    """(ids, probabilities) sampling draws from for one row of logits: temperature, then the top-k most likely,
    then the smallest set reaching top-p."""
    row = row.astype("float64") / max(sampling.temperature, 1e-6)
    order = np.argsort(-row)
    if sampling.top_k and sampling.top_k > 0:
        order = order[:sampling.top_k]
    probs = np.exp(row[order] - row[order].max())
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p) + 1) if sampling.top_p < 1.0 else len(order)
    return order[:keep], probs[:keep] / probs[:keep].sum()


def penalize(logits: np.ndarray, answer: List[int], sampling: Sampling) -> np.ndarray:
    """One row's logits with OpenAI's frequency and presence penalties for the answer's tokens so far."""
    ids, counts = np.unique(np.asarray(answer, dtype="int64"), return_counts=True)
    logits = logits.astype("float32", copy=True)
    logits[ids] -= sampling.frequency_penalty * counts + sampling.presence_penalty
    return logits
