"""Batched generation shared by evaluation, predict_generation.py and the exported-engine checks.

Prompts are left-padded by data.DataCollator, which gives every row the positions and masks it would get on its
own, so a batch generates exactly what one-by-one generation does (the bug THUDM/ChatGLM-6B #841 and #648
report). Decoding stops at the end-of-answer token; ChatGLM3 also stops at the next role token.
"""
from typing import List

import numpy as np

from glm_tune.data.collator import DataCollator

# ChatGLM3 ends an answer with eos or by opening the next turn.
_STOP_COMMANDS = {"chatglm3": ("<|user|>", "<|observation|>")}


def stop_token_ids(tokenizer, generation: str) -> set:
    ids = {tokenizer.eos_token_id}
    ids.update(tokenizer.get_command(t) for t in _STOP_COMMANDS.get(generation, ()))
    return ids


def cut_at_stop(ids, stop_ids: set) -> List[int]:
    out = []
    for token in ids:
        if int(token) in stop_ids:
            break
        out.append(int(token))
    return out


def generate_ids(model, tokenizer, generation: str, prompts: List[List[int]], max_new_tokens: int,
                 batch_size: int = 8, decode_strategy: str = "greedy_search", top_k: int = 1,
                 top_p: float = 1.0, temperature: float = 1.0) -> List[List[int]]:
    """New token ids for each prompt (in input order), cut before the first stop token."""
    import paddle  # here, not at the top: the server and the ONNX Runtime engine use the text helpers without paddle

    collator = DataCollator(tokenizer, generation)
    stops = stop_token_ids(tokenizer, generation)
    results = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = collator([{"input_ids": p} for p in prompts[start:start + batch_size]])
        inputs = {k: paddle.to_tensor(v) for k, v in batch.items()}
        sampling = {"top_k": top_k, "top_p": top_p, "temperature": temperature} if decode_strategy == "sampling" else {}
        with paddle.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                decode_strategy=decode_strategy,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                **sampling,
            )
        ids = output[0].numpy() if isinstance(output, (tuple, list)) else np.asarray(output)
        results.extend(cut_at_stop(row, stops) for row in ids)
    return results


def decode_text(tokenizer, ids: List[int]) -> str:
    """The ids' text as generated. Ids in the model's padded vocabulary tail (65024 rows for a 64798-token
    tokenizer) have no text and are dropped."""
    known = [int(i) for i in ids if 0 <= int(i) < tokenizer.vocab_size]
    return tokenizer.decode(known, skip_special_tokens=True)


def decode_answer(tokenizer, ids: List[int]) -> str:
    """Answer text: `decode_text` without surrounding whitespace (ChatGLM3's answers open with a newline, the end
    of its empty metadata line), nor the U+FFFD of a character whose bytes were cut off by the token limit."""
    return decode_text(tokenizer, ids).strip().rstrip("\ufffd").rstrip()
