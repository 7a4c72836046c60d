"""Hugging Face (THUDM layout) <-> Paddle checkpoint conversion for the three ChatGLM generations.

Streamed tensor by tensor: an input tensor is read (memory-mapped safetensors without torch, or a `.bin` shard
through `torch.load(weights_only=True, mmap=True)`, which never executes pickled code), renamed, transposed if it
is a Linear weight, cast, and added to the output shard being filled; a full shard is written and dropped. Peak
memory stays near one output shard plus one tensor, not the whole model. Names and shapes are validated against
the model the config describes before anything is written, every missing or unexpected tensor is named, and the
output folder is staged and renamed into place, so a failed conversion never leaves a partial folder.
"""
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np

from glm_tune.errors import GlmTuneError, one_line
from glm_tune.glm_family import GENERATION_KEY, detect_generation, get_generation
from glm_tune.conversion.hf_layout import (SAFETENSORS_INDEX, _PADDLE_PREFIX, SafetensorsShards,
                                           hf_config_from_paddle, hf_tokenizer_config, needs_transpose,
                                           paddle_to_hf_name, parse_size)
from glm_tune.conversion.safetensors_io import numpy_dtype
from glm_tune.safe_output import atomic_folder, check_output_dir

logger = logging.getLogger(__name__)

PADDLE_WEIGHTS = "model_state.pdparams"
PADDLE_INDEX = "model_state.pdparams.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


class ConversionError(GlmTuneError):
    """The input cannot be converted as asked; nothing was written."""


# ------------------------------------------------------------------------------------------ HF side


def read_weight_map(index: Path) -> dict:
    """name -> shard file of a sharded checkpoint's index JSON."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8-sig"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise ConversionError(f"{index} is not a valid shard index ({err}); restore it from the checkpoint's "
                              "download") from None
    return weight_map


def load_paddle_file(path, **kwargs):
    """paddle.load of one weights file, with a one-line error for a truncated or foreign file."""
    import paddle

    try:
        return paddle.load(str(path), **kwargs)
    except (EOFError, pickle.UnpicklingError, ValueError, UnicodeDecodeError, RuntimeError, MemoryError) as err:
        raise ConversionError(f"{path} cannot be read ({one_line(err)[:100] or type(err).__name__}): the "
                              "file is truncated or not a Paddle checkpoint; save or download it again") from None


def save_paddle_file(state: dict, path) -> None:
    """paddle.save of a flat name -> tensor (or numpy array) dict, in the same pickle format, without its memory
    cost: paddle.save's pickler keeps every tensor's serialized bytes in its memo until the whole file is written,
    so saving a 2 GB shard held it three times over (measured: 1 GiB of tensors peaked 1.9 GiB higher while
    saved). Here the memo is off (a flat dict has nothing to share) and each tensor's bytes live only while they
    are written. paddle.load and PaddleNLP's from_pretrained read the file as they read paddle.save's."""
    import copyreg

    from paddle.base import core
    from paddle.base.framework import EagerParamBase

    def reduce_tensor(tensor):  # as paddle.save's reduce_varbase: a (name, ndarray) tuple paddle.load turns back
        return (tuple, ((tensor.name, np.array(tensor.cpu())),))

    with open(path, "wb") as f:
        pickler = pickle.Pickler(f, protocol=4)
        pickler.fast = True
        pickler.dispatch_table = copyreg.dispatch_table.copy()
        pickler.dispatch_table[core.eager.Tensor] = reduce_tensor
        pickler.dispatch_table[EagerParamBase] = reduce_tensor
        pickler.dump(state)


def read_checkpoint_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as err:
        raise ConversionError(f"{folder / 'config.json'} cannot be read ({err})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{folder / 'config.json'} is not a JSON object")
    return config


class HFWeights:
    """Tensor names, shapes and values of a Hugging Face checkpoint folder, one tensor at a time."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.files = self._weight_files()
        self.kind = "safetensors" if self.files[0].suffix == ".safetensors" else "bin"
        self._where, self._shapes, self._dtypes, self._open = {}, {}, {}, {}
        for path in self.files:
            for name, shape, dtype in self._scan(path):
                self._where[name], self._shapes[name], self._dtypes[name] = path, shape, dtype

    def _weight_files(self):
        for index in (SAFETENSORS_INDEX, BIN_INDEX):
            if (self.folder / index).is_file():
                weight_map = read_weight_map(self.folder / index)
                files = sorted({self.folder / f for f in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise ConversionError(f"{self.folder / index} lists shard files that are missing: {missing}")
                return files
        for single in ("model.safetensors", BIN_WEIGHTS):
            if (self.folder / single).is_file():
                return [self.folder / single]
        raise ConversionError(f"{self.folder} has no Hugging Face weights (model.safetensors, "
                              f"model-0000K-of-0000N.safetensors + {SAFETENSORS_INDEX}, or pytorch_model*.bin)")

    def _scan(self, path):
        if self.kind == "safetensors":
            from glm_tune.conversion.safetensors_io import DTYPES, SafetensorsReader

            reader = SafetensorsReader(path)
            self._open[path] = reader
            return [(n, reader.shape(n), np.dtype(DTYPES[reader.dtype(n)])) for n in reader.keys()]
        import ml_dtypes
        import torch

        state = self._load_bin(path)
        return [(n, list(t.shape), np.dtype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else
                 torch.empty(0, dtype=t.dtype).numpy().dtype) for n, t in state.items()]

    def _load_bin(self, path):
        if path not in self._open:
            import torch

            # weights_only refuses anything but tensors and plain containers: no pickled code runs.
            try:
                self._open = {path: torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)}
            except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
                raise ConversionError(f"{path} cannot be read ({one_line(err)[:100]}): the file is "
                                      "truncated or not a PyTorch checkpoint; download it again") from None
        return self._open[path]

    def names(self):
        return list(self._where)

    def shape(self, name):
        return self._shapes[name]

    def dtype(self, name) -> np.dtype:
        """The numpy dtype `get(name)` returns (bfloat16 as ml_dtypes.bfloat16)."""
        return self._dtypes[name]

    def get(self, name) -> np.ndarray:
        path = self._where[name]
        if self.kind == "safetensors":
            return self._open[path].get(name)
        import ml_dtypes
        import torch

        tensor = self._load_bin(path)[name]
        if tensor.dtype == torch.bfloat16:
            return tensor.float().numpy().astype(ml_dtypes.bfloat16)
        return tensor.numpy().copy()

    def describe(self) -> str:
        how = ("safetensors, memory-mapped, without torch" if self.kind == "safetensors"
               else "pytorch .bin through torch.load(weights_only=True, mmap=True)")
        return f"{len(self.files)} file(s) of {how}"


def paddle_config_from_hf(hf: dict, model_type: str) -> dict:
    """PaddleNLP config.json for THUDM's Hugging Face config.json."""
    generation = get_generation(model_type)
    if model_type == "chatglm":
        keys = ["vocab_size", "hidden_size", "num_attention_heads", "inner_hidden_size", "max_sequence_length",
                "layernorm_epsilon", "bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id",
                "gmask_token_id", "position_encoding_2d", "pre_seq_len", "prefix_projection", "quantization_bit"]
        out = {k: hf[k] for k in keys if k in hf}
        out.update(num_hidden_layers=hf["num_layers"], architectures=["ChatGLMForCausalLM"])
    else:
        keys = ["add_bias_linear", "add_qkv_bias", "apply_query_key_layer_scaling", "attention_dropout",
                "apply_residual_connection_post_layernorm", "attention_softmax_in_fp32", "bias_dropout_fusion",
                "ffn_hidden_size", "fp32_residual_connection", "hidden_dropout", "hidden_size", "kv_channels",
                "layernorm_epsilon", "num_attention_heads", "post_layer_norm", "rmsnorm", "eos_token_id",
                "pad_token_id", "rope_ratio"]
        out = {k: hf[k] for k in keys if k in hf}
        groups = hf.get("multi_query_group_num", hf["num_attention_heads"])
        out.update(num_hidden_layers=hf["num_layers"], vocab_size=hf["padded_vocab_size"],
                   max_sequence_length=hf["seq_length"], architectures=["ChatGLMv2ForCausalLM"],
                   multi_query_group_num=groups if hf.get("multi_query_attention", True) else hf["num_attention_heads"])
    out.update(model_type=generation.paddle_model_type, dtype=hf.get("torch_dtype", "float32"),
               **{GENERATION_KEY: model_type})
    return out


def hf_to_paddle_name(name: str, paddle_model_type: str) -> str:
    if name == "lm_head.weight":
        return "lm_head.decoder_weight"
    if not name.startswith("transformer."):
        raise KeyError(name)
    return _PADDLE_PREFIX[paddle_model_type] + name[len("transformer."):]


# ------------------------------------------------------------------------------------------ helpers


def _paddle_config(config_dict: dict, model_type: str):
    config_class, _, _ = get_generation(model_type).classes()
    return config_class.from_dict(dict(config_dict))


def expected_shapes(config, model_type: str) -> dict:
    """Paddle parameter name -> shape for the model `config` describes, without allocating it."""
    import paddle

    _, model_class, _ = get_generation(model_type).classes()
    with paddle.LazyGuard():
        model = model_class(config)
    return {name: list(p.shape) for name, p in model.state_dict().items()}


def _as_saved_tensor(name: str, array: np.ndarray, dtype: str) -> tuple:
    """What paddle.save writes for a tensor, (name, ndarray), which paddle.load turns back into a tensor; bfloat16
    is carried as its uint16 bits, as Paddle does. Built from numpy without a Paddle copy (the casts round as
    Paddle's do: to nearest, ties to even)."""
    array = array.astype(numpy_dtype(dtype), copy=False)
    return (name, array.view(np.uint16) if dtype == "bfloat16" else array)


def _to_numpy(tensor, dtype: str = None) -> np.ndarray:
    import ml_dtypes

    dtype = dtype or str(tensor.dtype).replace("paddle.", "")
    if dtype == "bfloat16":
        return tensor.astype("float32").numpy().astype(ml_dtypes.bfloat16)
    return tensor.astype(dtype).numpy()


def _check(mapped: dict, expected: dict, tied: set) -> None:
    """mapped: paddle name -> (source name, shape after transpose)."""
    missing = sorted(n for n in expected if n not in mapped and n not in tied)
    unexpected = sorted(src for n, (src, _) in mapped.items() if n not in expected)
    wrong = sorted(f"{src} {shape} (the config needs {expected[n]})" for n, (src, shape) in mapped.items()
                   if n in expected and list(shape) != expected[n])
    if missing or unexpected or wrong:
        parts = [f"missing tensors {missing}"] * bool(missing) + [f"unexpected tensors {unexpected}"] * bool(
            unexpected) + [f"wrong shapes: {wrong}"] * bool(wrong)
        raise ConversionError("checkpoint does not match its config.json: " + "; ".join(parts))


# ------------------------------------------------------------------------------------------ HF -> Paddle


def convert_hf_to_paddle(input_dir, output_dir, model_type: str = None, dtype: str = None,
                         max_shard_size="2GB", replace: bool = True, overwrite: bool = False) -> Path:
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_output_dir(output_dir, "convert_checkpoint", inputs={"--input_dir": input_dir}, overwrite=overwrite)
    if (input_dir / PADDLE_WEIGHTS).is_file() or (input_dir / PADDLE_INDEX).is_file():
        raise ConversionError(f"{input_dir} is already a Paddle checkpoint; to write it in the Hugging Face layout "
                              "pass --to hf")
    model_type = model_type or detect_generation(input_dir)
    generation = get_generation(model_type)
    hf_config = read_checkpoint_config(input_dir)
    needed = ["num_layers", "hidden_size", "num_attention_heads"] + (["padded_vocab_size", "seq_length"]
                                                                      if model_type != "chatglm" else ["vocab_size"])
    missing = [k for k in needed if k not in hf_config]
    if missing:
        raise ConversionError(f"{input_dir / 'config.json'} lacks {', '.join(missing)}: it is not THUDM's "
                              f"{model_type} config.json (is the folder a Paddle checkpoint? then pass --to hf)")
    config_dict = paddle_config_from_hf(hf_config, model_type)
    dtype = dtype or config_dict["dtype"]
    config_dict["dtype"] = dtype
    weights = HFWeights(input_dir)
    logger.info("reading %s from %s", weights.describe(), input_dir)

    ptype = generation.paddle_model_type
    mapped = {}
    for name in weights.names():
        try:
            target = hf_to_paddle_name(name, ptype)
        except KeyError:
            target = name  # reported as unexpected below
        shape = weights.shape(name)
        mapped[target] = (name, shape[::-1] if needs_transpose(target, len(shape)) else shape)
    tied = {"lm_head.decoder_weight"} if model_type == "chatglm" else set()
    _check(mapped, expected_shapes(_paddle_config(config_dict, model_type), model_type), tied)

    # replace=False: under a launcher every rank converts into the same cache; the first one to finish wins.
    with atomic_folder(output_dir, "convert_checkpoint", overwrite, {"--input_dir": input_dir},
                       replace=replace) as staging:
        limit, shard, size, shards = parse_size(max_shard_size), {}, 0, []

        def flush():
            nonlocal shard, size
            if shard:
                path = staging / f"shard-{len(shards):05d}.tmp"
                save_paddle_file(shard, path)
                shards.append((path, list(shard)))
                shard, size = {}, 0

        for target, (name, _) in mapped.items():
            if model_type == "chatglm" and target == "lm_head.decoder_weight":
                continue  # tied to the word embeddings in PaddleNLP's ChatGLM; saved once
            array = weights.get(name)
            if needs_transpose(target, array.ndim):
                array = np.ascontiguousarray(array.T)  # rebinding frees the read copy: one tensor held twice
            saved = _as_saved_tensor(target, array, dtype)
            del array
            if shard and size + saved[1].nbytes > limit:
                flush()
            shard[target] = saved
            size += saved[1].nbytes
        flush()
        _name_paddle_shards(staging, shards)
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2, ensure_ascii=False), encoding="utf-8")
        _copy_tokenizer_to_paddle(input_dir, staging, model_type)
    return output_dir


def _name_paddle_shards(staging: Path, shards: list) -> None:
    if len(shards) == 1:
        os.replace(shards[0][0], staging / PADDLE_WEIGHTS)
        return
    weight_map = {}
    for i, (path, names) in enumerate(shards, start=1):
        file_name = f"model_state-{i:05d}-of-{len(shards):05d}.pdparams"
        os.replace(path, staging / file_name)
        weight_map.update({n: file_name for n in names})
    total = sum((staging / f).stat().st_size for f in set(weight_map.values()))
    (staging / PADDLE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2), encoding="utf-8")


def _copy_tokenizer_to_paddle(input_dir: Path, staging: Path, model_type: str) -> None:
    generation = get_generation(model_type)
    vocab = input_dir / generation.vocab_file
    if not vocab.is_file():
        raise ConversionError(f"{input_dir} has no {generation.vocab_file} (the SentencePiece model of the tokenizer)")
    shutil.copy2(vocab, staging / generation.vocab_file)
    hf_tok = {}
    if (input_dir / "tokenizer_config.json").is_file():
        hf_tok = json.loads((input_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = {"tokenizer_class": generation.tokenizer_class, "padding_side": "left"}
    if model_type == "chatglm":
        tok.update(num_image_tokens=hf_tok.get("num_image_tokens", 0), bos_token="<sop>", eos_token="<eop>",
                   end_token="</s>", mask_token="[MASK]", gmask_token="[gMASK]", pad_token="<pad>", unk_token="<unk>")
    elif "chat_template" in hf_tok:
        tok["chat_template"] = hf_tok["chat_template"]
    (staging / "tokenizer_config.json").write_text(json.dumps(tok, indent=2, ensure_ascii=False), encoding="utf-8")


# ------------------------------------------------------------------------------------------ Paddle -> HF


def _paddle_shard_files(input_dir: Path) -> list:
    if (input_dir / PADDLE_INDEX).is_file():
        weight_map = read_weight_map(input_dir / PADDLE_INDEX)
        return [input_dir / f for f in sorted(set(weight_map.values()))]
    if (input_dir / PADDLE_WEIGHTS).is_file():
        return [input_dir / PADDLE_WEIGHTS]
    if list(input_dir.glob("model_state.tp*.pdparams")):
        raise ConversionError(f"{input_dir} holds tensor-parallel shards; merge them first: "
                              f"python tools/merge_tp_shards.py {input_dir} MERGED_DIR")
    hint = "; it is in the Hugging Face layout: convert it with --to paddle" if is_hf_checkpoint(input_dir) else ""
    raise ConversionError(f"{input_dir} has no {PADDLE_WEIGHTS} or {PADDLE_INDEX}{hint}")


def convert_paddle_to_hf(input_dir, output_dir, model_type: str = None, dtype: str = None,
                         max_shard_size="2GB", overwrite: bool = False) -> Path:
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_output_dir(output_dir, "convert_checkpoint", inputs={"--input_dir": input_dir}, overwrite=overwrite)
    model_type = model_type or detect_generation(input_dir)
    generation = get_generation(model_type)
    files = _paddle_shard_files(input_dir)
    config_class, _, _ = generation.classes()
    config = config_class.from_pretrained(str(input_dir))
    expected = expected_shapes(config, model_type)
    tied = {"lm_head.decoder_weight"} if model_type == "chatglm" else set()
    ptype = generation.paddle_model_type

    # The output files are planned from the config's shapes once the first tensor gives the dtype; every input
    # tensor is then written straight to its place, so only the Paddle file being read is held (PaddleNLP's shards
    # are pickles, read whole).
    hf_name = {name: paddle_to_hf_name(name, ptype) for name in expected}
    with atomic_folder(output_dir, "convert_checkpoint", overwrite, {"--input_dir": input_dir}) as staging:
        shards, seen, written, out_dtype = None, {}, set(), dtype
        for path in files:
            state = load_paddle_file(path)
            arrived = {name: (name, list(tensor.shape)) for name, tensor in state.items()}
            _check(arrived, {n: expected[n] for n in arrived if n in expected}, set())  # unexpected, wrong shapes
            seen.update(arrived)
            for name in list(state):
                tensor = state.pop(name)
                tensor_dtype = str(tensor.dtype).replace("paddle.", "")
                if shards is None:
                    out_dtype = out_dtype or tensor_dtype
                    plan = [(hf_name[n], shape[::-1] if needs_transpose(n, len(shape)) else shape,
                             numpy_dtype(out_dtype))
                            for n, shape in expected.items()]
                    shards = SafetensorsShards(staging, plan, max_shard_size)
                elif not dtype and tensor_dtype != out_dtype:
                    raise ConversionError(f"{path}: {name} is {tensor_dtype} but earlier tensors are {out_dtype}; "
                                          f"pass --dtype to write the checkpoint in one dtype")
                array = _to_numpy(tensor, out_dtype)
                del tensor
                # v1 ties lm_head to the word embeddings: PaddleNLP may save the one tensor under both names.
                for target in [name] + [t for t in tied if name.endswith("word_embeddings.weight")]:
                    if target not in written:
                        shards.write(hf_name[target], array.T if needs_transpose(target, array.ndim) else array)
                        written.add(target)
                del array
            del state
        _check(seen, expected, tied)
        shards.close()
        hf_config = hf_config_from_paddle(config, model_type, out_dtype)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2, ensure_ascii=False), encoding="utf-8")
        (staging / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(model_type), indent=2,
                                                                  ensure_ascii=False), encoding="utf-8")
        shutil.copy2(input_dir / generation.vocab_file, staging / generation.vocab_file)
    return output_dir


def is_hf_checkpoint(folder) -> bool:
    """A folder in THUDM's Hugging Face layout (HF weights, no Paddle weights)."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / PADDLE_WEIGHTS).exists() or (folder / PADDLE_INDEX).exists():
        return False
    return any((folder / n).exists() for n in ("model.safetensors", SAFETENSORS_INDEX, BIN_WEIGHTS, BIN_INDEX))


