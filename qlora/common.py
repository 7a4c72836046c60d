"""Shared by the qlora scripts: loading (quantized) models and tokenizers, prompts in the main suite's formats,
and streaming generation. Framework-free pieces (record readers, prompt formats, metrics) are imported from the
main suite's data.py / utils.py / glm_tune/glm_family.py, which import no deep-learning framework."""
import json
import threading
from pathlib import Path

import torch

from data import Example, get_prompt_format  # framework-free
from glm_tune.glm_family import detect_generation

STOP_COMMANDS = {"chatglm3": ("<|user|>", "<|observation|>")}


def has_remote_code(folder) -> bool:
    """THUDM's own folders ship modeling/tokenizer code (config auto_map); GLM-layout folders do not."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return "auto_map" in config


def model_generation(folder) -> str:
    generation = detect_generation(folder)
    if generation == "chatglm":
        raise SystemExit("error: the qlora path serves ChatGLM2/ChatGLM3; ChatGLM-6B (v1) is served by the main suite")
    return generation


def load_tokenizer(folder):
    if has_remote_code(folder):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    from glm_tokenizer import ChatGLMSPTokenizer

    return ChatGLMSPTokenizer.from_pretrained(folder)


def quantization_config(bits: int):
    """bitsandbytes settings for --bits: 4 = NF4 with double quantization (QLoRA), 8 = LLM.int8, 16 = none."""
    if bits == 16:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise SystemExit(f"error: --bits must be 4, 8 or 16, got {bits}")


def load_model(folder, bits: int = 16, fp16: bool = False, local_files_only: bool = True):
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if fp16 else torch.float32
    kwargs = dict(dtype=dtype, trust_remote_code=has_remote_code(folder), local_files_only=local_files_only)
    quant = quantization_config(bits)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map="auto" if torch.cuda.is_available() else "cpu")
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def prompt_ids(tokenizer, generation: str, query: str, history=(), src_length: int = None):
    return get_prompt_format(generation, tokenizer).prompt_ids(query, list(history), src_length)


def stop_ids(tokenizer, generation: str) -> list:
    return [tokenizer.eos_token_id] + [tokenizer.get_command(t) for t in STOP_COMMANDS.get(generation, ())]


def stream_chat(model, tokenizer, generation: str, query: str, history=(), max_new_tokens: int = 256,
                do_sample: bool = False, temperature: float = 0.95, top_p: float = 0.7):
    """Yield the answer in text chunks as it is generated (greedy by default)."""
    from transformers import TextIteratorStreamer

    ids = torch.tensor([prompt_ids(tokenizer, generation, query, history)])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                  eos_token_id=stop_ids(tokenizer, generation), pad_token_id=tokenizer.pad_token_id,
                  do_sample=do_sample, streamer=streamer)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    worker = threading.Thread(target=model.generate, kwargs=kwargs, daemon=True)
    worker.start()
    first = True
    for chunk in streamer:
        if first:  # ChatGLM3 opens its answer with a newline (its metadata line)
            chunk, first = chunk.lstrip("\n"), not chunk.strip("\n")
        if chunk:
            yield chunk
    worker.join()


def chat(model, tokenizer, generation, query, history=(), max_new_tokens=256) -> str:
    return "".join(stream_chat(model, tokenizer, generation, query, history, max_new_tokens)).strip()


__all__ = ["Example", "chat", "load_model", "load_tokenizer", "model_generation", "prompt_ids", "stream_chat"]
