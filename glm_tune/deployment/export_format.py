"""The export format: what export_generation_model.py writes into its folder and what the engines read back.

One export folder holds, for a prefix PREFIX:
  PREFIX.json + PREFIX.pdiparams      the Paddle step graph (always)
  PREFIX.onnx [+ PREFIX.onnx.data]    the same graph for ONNX Runtime (its weights in the data file past
                                      --onnx_inline_mb); PREFIX.int8.onnx, PREFIX.int4.onnx the quantized copies
  PREFIX.generation.json              the description below: format version, generation, dtype, the graph's inputs
                                      and outputs, the cache layout, the formats written (with their data files),
                                      and the generation defaults
  config.json, tokenizer files        the model's config and tokenizer
The step graph's inputs and outputs are described in step_model.py; `StepFeeds` (step_feeds.py) builds them.
"""
import json
from pathlib import Path

from glm_tune.deployment.step_feeds import TIME_AXIS, cache_names, cache_shape
from glm_tune.errors import GlmTuneError, one_line

STEP_GRAPH_FORMAT = "glm-tune step graph v3"
EARLIER_FORMATS = {"glm-tune step graph v1": "it returned the whole cache at every step",
                   "glm-tune step graph v2": "it returned the last position's logits only, so no speculative step "
                                             "can be verified"}


def description_name(prefix: str) -> str:
    return f"{prefix}.generation.json"


def paddle_files(prefix: str) -> list:
    """The Paddle graph and its weights."""
    return [f"{prefix}.json", f"{prefix}.pdiparams"]


def onnx_file_name(prefix: str, quantization: str = None) -> str:
    return f"{prefix}.{quantization}.onnx" if quantization else f"{prefix}.onnx"


def describe(generation: str, config, tokenizer, dtype: str, defaults, formats: dict) -> dict:
    """PREFIX.generation.json's content. `defaults` carries src_length and tgt_length (the export's
    LengthArgument); `formats` maps each graph written (paddle, onnx, onnx-int8, ...) to its files."""
    layers, heads, dim = cache_shape(config, generation)
    return {
        "format": STEP_GRAPH_FORMAT,
        "formats": formats,
        "generation": generation,
        "dtype": dtype,
        "inputs": ["input_ids", "position_ids", "attention_mask", "num_logits"] + cache_names(layers),
        "outputs": ["logits"] + cache_names(layers, "new"),
        "cache": {"layers": layers, "kv_heads": heads, "head_dim": dim, "time_axis": TIME_AXIS[generation],
                  "layout": "one key and one value per layer, each " + (
                      "[columns, batch, heads, dim]" if TIME_AXIS[generation] == 0 else "[batch, heads, columns, dim]"),
                  "outputs": "the step's new columns only; the caller keeps the cache"},
        "vocab_size": config.vocab_size,
        "max_sequence_length": config.max_sequence_length,
        "defaults": {"src_length": defaults.src_length, "max_new_tokens": defaults.tgt_length,
                     "decode_strategy": "greedy_search", "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
    }


class EngineError(GlmTuneError):
    """The exported model or the requested backend cannot be used; the message says what to do."""


DESCRIPTION_KEYS = ("generation", "dtype", "defaults")


def read_description(model_path, model_prefix: str) -> dict:
    """PREFIX.generation.json of an export: what the graph holds and its generation defaults."""
    folder = Path(model_path)
    if not folder.is_dir():
        raise EngineError(f"--model_path {model_path} is not a folder; pass the folder export_generation_model.py "
                          "wrote (the folder part of its --output_path)")
    path = folder / description_name(model_prefix)
    if not path.is_file():
        found = sorted(p.name[:-len(".generation.json")] for p in folder.glob("*.generation.json"))
        hint = f" (this folder holds --model_prefix {', '.join(found)})" if found else ""
        raise EngineError(f"{path} not found{hint}: export the model first with export_generation_model.py "
                          f"--output_path {folder / model_prefix}")
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
        missing = [k for k in DESCRIPTION_KEYS if k not in info]
        defaults = info["defaults"] if not missing else {}
        missing += [f"defaults.{k}" for k in ("src_length", "max_new_tokens") if k not in defaults]
    except (ValueError, TypeError, OSError) as err:
        raise EngineError(f"{path} is not a valid export description ({one_line(err)[:80]}); export the model "
                          "again") from None
    if missing:
        raise EngineError(f"{path} lacks {', '.join(missing)}; export the model again")
    if info.get("format") != STEP_GRAPH_FORMAT:
        why = EARLIER_FORMATS.get(info.get("format"), "a format this version does not know")
        raise EngineError(f"{path} describes a step graph from an earlier glm-tune ({info.get('format')!r}, not "
                          f"{STEP_GRAPH_FORMAT!r}: {why}); export the model again")
    return info


FORMAT_OF = {("onnxruntime", "fp32"): "onnx", ("onnxruntime", "int8"): "onnx-int8",
             ("onnxruntime", "int4"): "onnx-int4", ("paddle", "fp32"): "paddle", ("fastdeploy", "fp32"): "paddle"}
EXPORT_FLAGS = {"onnx": "--onnx True", "onnx-int8": "--quantize int8", "onnx-int4": "--quantize int4",
                "paddle": ""}


def check_export_folder(model_path, model_prefix: str, generation: str, backend: str = "paddle",
                        precision: str = "fp32", formats: dict = None) -> None:
    """The graph, its weights and the tokenizer are all there before the engine is built."""
    from glm_tune.model_loading import check_tokenizer_file

    base, data = Path(model_path) / model_prefix, None
    if backend == "onnxruntime":
        needed = [(onnx_file_name(model_prefix, None if precision == "fp32" else precision), "ONNX graph")]
        # a graph past --onnx_inline_mb keeps its weights in a data file beside it
        data = (formats or {}).get(FORMAT_OF[(backend, precision)], {}).get("data")
        if data:
            needed.append((data["file"], "weights of the ONNX graph"))
    else:
        needed = list(zip(paddle_files(model_prefix), ("graph", "weights")))
    for name, what in needed:
        if not (Path(model_path) / name).is_file():
            raise EngineError(f"{Path(model_path) / name} (the exported {what}) is missing; export the model again "
                              f"with export_generation_model.py --output_path {base}")
    if data:
        size = (Path(model_path) / data["file"]).stat().st_size
        if size != data["bytes"]:
            raise EngineError(f"{Path(model_path) / data['file']} holds {size} bytes, the export wrote "
                              f"{data['bytes']}: it is truncated or from another export; export the model again "
                              f"with export_generation_model.py --output_path {base}")
    if not (Path(model_path) / "config.json").is_file():
        raise EngineError(f"{model_path} has no config.json; export the model again")
    try:
        check_tokenizer_file(model_path, generation)
    except GlmTuneError as err:
        raise EngineError(f"{err} (or export the model again)") from None
