"""THUDM's Hugging Face checkpoint layout for the three ChatGLM generations, read and written without torch.

The Paddle and Hugging Face checkpoints hold the same tensors under other names: the Paddle prefix
(`chatglm.transformer.` / `chatglm_v2.`) becomes `transformer.`, v1's `lm_head.decoder_weight` becomes
`lm_head.weight`, and every Linear weight is stored transposed (Paddle keeps [in, out], torch [out, in]).
Fused query_key_value tensors keep their column order in both layouts, so no splitting is needed.
"""
import json
import re
from pathlib import Path

import numpy as np

from glm_tune.glm_family import GENERATION_KEY, get_generation

SAFETENSORS_INDEX = "model.safetensors.index.json"
_PADDLE_PREFIX = {"chatglm": "chatglm.transformer.", "chatglm_v2": "chatglm_v2."}
# Names whose tensors are not Linear weights: same orientation in both layouts.
_UNTRANSPOSED = re.compile(r"(word_embeddings\.weight|lm_head\.decoder_weight|inv_freq)$")
_HF_NAME_OR_PATH = {"chatglm": "THUDM/chatglm-6b", "chatglm2": "THUDM/chatglm2-6b", "chatglm3": "THUDM/chatglm3-6b"}


def paddle_to_hf_name(name: str, paddle_model_type: str) -> str:
    if name == "lm_head.decoder_weight":
        return "lm_head.weight"
    prefix = _PADDLE_PREFIX[paddle_model_type]
    if not name.startswith(prefix):
        raise KeyError(f"unexpected Paddle tensor name {name!r} (expected prefix {prefix!r})")
    return "transformer." + name[len(prefix):]


def needs_transpose(paddle_name: str, ndim: int) -> bool:
    return ndim == 2 and not _UNTRANSPOSED.search(paddle_name)


def hf_config_from_paddle(config, model_type: str, dtype: str = "float32") -> dict:
    """config.json in THUDM's Hugging Face naming for a PaddleNLP ChatGLM config."""
    common = {
        "_name_or_path": _HF_NAME_OR_PATH[model_type],
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "torch_dtype": dtype,
        GENERATION_KEY: model_type,
    }
    if model_type == "chatglm":
        keys = ["vocab_size", "hidden_size", "num_attention_heads", "inner_hidden_size", "max_sequence_length",
                "layernorm_epsilon", "bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id",
                "gmask_token_id", "position_encoding_2d", "pre_seq_len", "prefix_projection", "quantization_bit"]
        out = {k: getattr(config, k) for k in keys}
        out.update(num_layers=config.num_hidden_layers, use_cache=True)
    else:
        keys = ["add_bias_linear", "add_qkv_bias", "apply_query_key_layer_scaling",
                "apply_residual_connection_post_layernorm", "attention_dropout", "attention_softmax_in_fp32",
                "bias_dropout_fusion", "ffn_hidden_size", "fp32_residual_connection", "hidden_dropout",
                "hidden_size", "kv_channels", "layernorm_epsilon", "multi_query_group_num",
                "num_attention_heads", "post_layer_norm", "rmsnorm", "eos_token_id", "pad_token_id"]
        out = {k: getattr(config, k) for k in keys}
        out.update(
            multi_query_attention=True,
            num_layers=config.num_hidden_layers,
            original_rope=True,
            padded_vocab_size=config.vocab_size,
            seq_length=config.max_sequence_length,
            tie_word_embeddings=False,
            use_cache=True,
        )
        if getattr(config, "rope_ratio", None) is not None:
            out["rope_ratio"] = config.rope_ratio
    return {**common, **out}


def parse_size(size) -> int:
    """'200KB' / '2GB' / 1024 -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", str(size).upper())
    if not match:
        raise ValueError(f"cannot read size {size!r}; write it like 200KB, 5MB or 2GB")
    unit = {None: 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[match.group(2)]
    return int(float(match.group(1)) * unit)


class SafetensorsShards:
    """A Hugging Face checkpoint's weight files, planned from (name, shape, dtype) before any tensor is read: one
    model.safetensors, or numbered shards of at most `max_shard_size` plus the index Hugging Face reads. Tensors
    are then written one at a time, in any order (`write`), so a conversion holds only the tensor at hand;
    `close()` refuses a checkpoint with a tensor missing and returns the file names written."""

    def __init__(self, output_dir, plan, max_shard_size=None, metadata=None):
        from glm_tune.conversion.safetensors_io import SafetensorsFileWriter, tensor_nbytes

        self.output_dir = Path(output_dir)
        limit = parse_size(max_shard_size) if max_shard_size else None
        shards, current, current_size = [], [], 0
        for name, shape, dtype in plan:
            nbytes = tensor_nbytes(shape, dtype)
            if limit and current and current_size + nbytes > limit:
                shards.append(current)
                current, current_size = [], 0
            current.append((name, tuple(shape), np.dtype(dtype)))
            current_size += nbytes
        shards.append(current)
        self.total_size = sum(tensor_nbytes(shape, dtype) for _, shape, dtype in plan)
        self.files = (["model.safetensors"] if len(shards) == 1 else
                      [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
        metadata = {"format": "pt", **(metadata or {})}
        self._writers, self._file_of = [], {}
        for file_name, shard in zip(self.files, shards):
            self._writers.append(SafetensorsFileWriter(self.output_dir / file_name, shard, metadata))
            self._file_of.update({name: len(self._writers) - 1 for name, _, _ in shard})

    def write(self, name: str, array: np.ndarray) -> None:
        self._writers[self._file_of[name]].write(name, array)

    def close(self) -> list:
        for writer in self._writers:
            writer.close()
        if len(self.files) == 1:
            return list(self.files)
        weight_map = {name: self.files[i] for name, i in self._file_of.items()}
        with open(self.output_dir / SAFETENSORS_INDEX, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, f, indent=2)
        return self.files + [SAFETENSORS_INDEX]


def write_safetensors_shards(tensors: dict, output_dir: Path, max_shard_size=None, metadata=None) -> list:
    """Write `tensors` (name -> numpy array) as one model.safetensors or as numbered shards plus the index
    file Hugging Face reads. Returns the file names written."""
    shards = SafetensorsShards(output_dir, [(n, a.shape, a.dtype) for n, a in tensors.items()], max_shard_size,
                               metadata)
    for name, array in tensors.items():
        shards.write(name, array)
    return shards.close()


def hf_tokenizer_config(model_type: str) -> dict:
    """tokenizer_config.json as THUDM ships it (minus its remote-code auto_map, which this project lacks)."""
    if model_type == "chatglm":
        return {"tokenizer_class": "ChatGLMTokenizer", "bos_token": "<sop>", "eos_token": "<eop>",
                "end_token": "</s>", "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>",
                "unk_token": "<unk>", "padding_side": "left", "num_image_tokens": 0, "remove_space": False,
                "do_lower_case": False}
    out = {"tokenizer_class": "ChatGLMTokenizer", "padding_side": "left", "remove_space": False,
           "do_lower_case": False, "clean_up_tokenization_spaces": False}
    if model_type == "chatglm3":
        out["chat_template"] = "{% for message in messages %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endfor %}"
    return out


def save_hf_checkpoint(model, tokenizer, model_type: str, output_dir, max_shard_size=None, value_of=None,
                       dtype: str = "float32") -> list:
    """Write `model` (a PaddleNLP ChatGLM) and its tokenizer in THUDM's Hugging Face layout, in `dtype` (float32,
    or float16 / bfloat16 as THUDM ships them), tensors in name order, one at a time. `value_of(name, tensor)`
    gives a tensor's fp32 value instead of reading it: with it the model may be built under `paddle.LazyGuard` (no
    weights in memory) and each value made as it is written."""
    from glm_tune.conversion.safetensors_io import numpy_dtype

    output_dtype = numpy_dtype(dtype)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    generation = get_generation(model_type)
    state = model.state_dict()
    names = sorted(state)

    def hf_shape(name):
        shape = list(state[name].shape)
        return shape[::-1] if needs_transpose(name, len(shape)) else shape

    hf_names = {name: paddle_to_hf_name(name, generation.paddle_model_type) for name in names}
    shards = SafetensorsShards(output_dir, [(hf_names[n], hf_shape(n), output_dtype) for n in names], max_shard_size)
    # Tied names (v1's lm_head and word embeddings) share one tensor, written once its last name is reached.
    aliases = {}
    for name in names:
        aliases.setdefault(id(state[name]), []).append(name)
    for name in names:
        array = value_of(name, state[name]) if value_of else state[name].astype("float32").numpy()
        array = array.astype(output_dtype, copy=False)  # rounds to nearest even, as torch and Paddle do
        tied = aliases[id(state[name])]
        if tied[-1] != name:
            continue  # value_of is still called: its draws follow the name order
        for alias in tied:
            shards.write(hf_names[alias], array.T if needs_transpose(alias, array.ndim) else array)
        del array
    files = shards.close()
    with open(output_dir / "config.json", "w", encoding="utf-8") as f:
        json.dump(hf_config_from_paddle(model.config, model_type, dtype), f, indent=2, ensure_ascii=False)
    with open(output_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(hf_tokenizer_config(model_type), f, indent=2, ensure_ascii=False)
    with open(tokenizer.vocab_file, "rb") as src, open(output_dir / generation.vocab_file, "wb") as dst:
        dst.write(src.read())
    return files + ["config.json", "tokenizer_config.json", generation.vocab_file]
