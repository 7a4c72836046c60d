"""Batching: left-padded ids with the positions and attention masks each ChatGLM generation expects."""
from typing import List

import numpy as np

from glm_tune.data.examples import IGNORE_INDEX


def chatglm_position_ids(input_ids: List[int], gmask_id: int, bos_id: int) -> np.ndarray:
    """ChatGLM-6B's 2-D positions [2, L]: absolute positions that stop at [gMASK] for the answer, and block
    positions 1, 2, … counting from <sop>."""
    length = len(input_ids)
    context = input_ids.index(bos_id) if bos_id in input_ids else length
    mask_pos = input_ids.index(gmask_id) if gmask_id in input_ids else context - 1
    position = np.arange(length, dtype="int64")
    position[context:] = mask_pos
    block = np.concatenate([np.zeros(context, "int64"), np.arange(1, length - context + 1, dtype="int64")])
    return np.stack([position, block])


def chatglm_attention_mask(input_ids: List[int], bos_id: int) -> np.ndarray:
    """ChatGLM-6B's [1, L, L] mask (1 = may attend): the prompt is seen bidirectionally, the answer causally."""
    length = len(input_ids)
    context = input_ids.index(bos_id) if bos_id in input_ids else length
    mask = np.tril(np.ones((length, length), dtype="int64"))
    mask[:, :context] = 1
    return mask[None]


class DataCollator:
    """Left-pads a list of features into a batch with the masks and positions the generation expects.

    v1: `position_ids` [B, 2, L] and a 4-D `attention_mask` [B, 1, L, L]; v2/v3: a 2-D `attention_mask`
    [B, L] (1 = token) and `position_ids` [B, L] that start at 0 on the first real token, so a padded row gets
    exactly the positions it would get alone (THUDM/ChatGLM-6B #841, #648 are what happens otherwise).
    """

    def __init__(self, tokenizer, generation: str, pad_to_multiple_of: int = None):
        self.tokenizer = tokenizer
        self.generation = generation
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: List[dict]) -> dict:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_id = self.tokenizer.pad_token_id
        batch = {"input_ids": [], "attention_mask": [], "position_ids": []}
        has_labels = "labels" in features[0] and len(features[0]["labels"]) == len(features[0]["input_ids"])
        if has_labels:
            batch["labels"] = []
        for f in features:
            ids = list(f["input_ids"])
            pad = length - len(ids)
            batch["input_ids"].append([pad_id] * pad + ids)
            if has_labels:
                batch["labels"].append([IGNORE_INDEX] * pad + list(f["labels"]))
            if self.generation == "chatglm":
                tok = self.tokenizer
                mask = np.pad(chatglm_attention_mask(ids, tok.bos_token_id), [(0, 0), (pad, 0), (pad, 0)])
                pos = np.pad(chatglm_position_ids(ids, tok.gmask_token_id, tok.bos_token_id), [(0, 0), (pad, 0)])
            else:
                mask = np.array([0] * pad + [1] * len(ids), dtype="int64")
                pos = np.array([0] * pad + list(range(len(ids))), dtype="int64")
            batch["attention_mask"].append(mask)
            batch["position_ids"].append(pos)
        return {k: np.asarray(v, dtype="int64") for k, v in batch.items()}
