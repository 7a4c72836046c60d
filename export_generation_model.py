"""Export a ChatGLM (v1/v2/v3) as a static step graph with an explicit KV cache, for the C++ inference engine.

    python export_generation_model.py --model_name_or_path ./checkpoints/chatglm2_sft --output_path ./checkpoints/infer/chatglm
    python export_generation_model.py --model_name_or_path BASE --lora_path LORA_OUT --output_path OUT/chatglm

Writes OUT/chatglm.json + OUT/chatglm.pdiparams (the step graph, see step_model.py), the tokenizer files and
OUT/chatglm.generation.json (inputs, outputs, cache layout and generation defaults) into OUT's folder;
`infer_generation.py --model_path OUT_FOLDER --model_prefix chatglm` runs it.
"""
from glm_tune import console

console.quiet_startup()  # called before the imports below: paddle prints its start-up warnings while it loads

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import paddle

from argument import LengthArgument, ModelArgument, comma_list, parse_dataclasses, require_flag
from glm_tune.errors import run_cli
from glm_tune.model_loading import (ConfigurationError, apply_lora, check_adapter_flags, load_model, load_tokenizer,
                                    resolve_generation, resolve_model_folder)
from glm_tune.safe_output import OutputRefused, check_target_folder, folder_is_empty, folder_listing, read_owner
from glm_tune.deployment.onnx_export import (INLINE_LIMIT, MAX_INLINE, QUANTIZATIONS, convert_to_onnx, onnx_file_name,
                                             quantize_weights)
from glm_tune.deployment.step_model import (STEP_GRAPH_FORMAT, TIME_AXIS, GenerationStep, cache_names, cache_shape,
                                            input_specs)
from glm_tune.safe_output import atomic_folder, atomic_write_json

COMMAND = "export_generation_model"
DEFAULT_PREFIX = "chatglm"

logger = logging.getLogger("export_generation_model")


@dataclass
class ExportArgument:
    output_path: str = field(default="./checkpoints/infer/chatglm", metadata={
        "help": "Folder and file prefix of the exported graph: DIR/PREFIX.json, DIR/PREFIX.pdiparams."})
    dtype: str = field(default="float32", metadata={"help": "Weights and cache dtype: float32, float16 or bfloat16 "
                                                            "(half precision needs a GPU engine)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing folder at --output_path's folder "
                                                             "that this command did not write (an earlier export "
                                                             "with the same prefix is replaced without it)."})
    onnx: bool = field(default=True, metadata={"help": "Also write the step graph as ONNX (PREFIX.onnx, paddle2onnx) "
                                                       "for infer_generation.py --backend onnxruntime."})
    quantize: Optional[str] = field(default=None, metadata={
        "help": "Also write weight-only quantized ONNX copies: int8, int4 or int8,int4 (PREFIX.int8.onnx, "
                "onnxruntime MatMulNBits, blocks of 32, symmetric). The embedding stays float32."})
    onnx_inline_mb: int = field(default=INLINE_LIMIT // 2 ** 20, metadata={
        "help": "An ONNX graph whose weights pass this many MiB keeps them in its own data file (PREFIX.onnx.data, "
                "PREFIX.int8.onnx.data, ...), written one tensor at a time and mapped by ONNX Runtime: protobuf caps "
                "a graph file at 2 GiB (a 6B model passes it even in int4), and a large inline graph costs twice "
                "its size in memory to write and to load. 0 writes every graph that way; at most 1800."})

    def __post_init__(self):
        require_flag(self.dtype in ("float32", "float16", "bfloat16"),
                     f"--dtype {self.dtype!r}: choose float32, float16 or bfloat16")
        self.quantizations = comma_list(self.quantize)
        unknown = [q for q in self.quantizations if q not in QUANTIZATIONS]
        require_flag(not unknown, f"--quantize {self.quantize!r}: choose from {', '.join(QUANTIZATIONS)} "
                                  "(comma-separated for several)")
        require_flag(self.onnx or not self.quantizations, "--quantize needs the ONNX graph: drop --onnx False")
        require_flag(0 <= self.onnx_inline_mb <= MAX_INLINE // 2 ** 20,
                     f"--onnx_inline_mb {self.onnx_inline_mb} must be between 0 and {MAX_INLINE // 2 ** 20} "
                     "(protobuf's 2 GiB, less room for the graph itself)")
        require_flag(self.dtype == "float32" or not (self.onnx or self.quantizations),
                     "the ONNX export runs on CPU in float32: pass --onnx False with --dtype float16/bfloat16")


def export_target(output_path: str, model_args, overwrite: bool) -> Path:
    """DIR/PREFIX from --output_path (DIR/ alone means DIR/chatglm). The folder holds one export only: its
    config and tokenizer files belong to that export, so a second model with another prefix is refused."""
    if str(output_path).endswith(("/", "\\")):
        target = Path(output_path) / DEFAULT_PREFIX
        logger.info("--output_path %s is a folder: writing %s.json / .pdiparams", output_path, target)
    elif Path(output_path).is_dir():
        raise OutputRefused(f"--output_path {output_path} is an existing folder; pass FOLDER/PREFIX (e.g. "
                            f"{Path(output_path) / DEFAULT_PREFIX}) or end it with / to use the prefix "
                            f"{DEFAULT_PREFIX}")
    else:
        target = Path(output_path)
    folder = check_target_folder(target.parent, "--output_path's folder",
                                 {"--model_name_or_path": model_args.model_name_or_path,
                                  "--lora_path": model_args.lora_path})
    owner = read_owner(folder) or {}
    if folder.is_dir() and not folder_is_empty(folder) and owner.get("command") != COMMAND:
        # An export replaces its whole folder; --overwrite may replace another export, never anything else.
        raise OutputRefused(f"--output_path's folder {folder} holds files no export wrote ({folder_listing(folder)}); "
                            "an export replaces its whole folder, so it never writes into such a folder, --overwrite "
                            f"or not. Nothing was changed: export into a new or empty folder, such as "
                            f"{folder / 'export' / target.name}")
    if owner.get("command") == COMMAND and owner.get("prefix") != target.name and not overwrite:
        raise OutputRefused(f"{folder} already holds the export {owner.get('prefix')!r}, whose config and tokenizer "
                            f"files an export {target.name!r} would replace; export into another folder, or pass "
                            "--overwrite to replace that export")
    return target


def load_for_export(model_args, dtype: str):
    check_adapter_flags(model_args)
    generation = resolve_generation(model_args.model_name_or_path, model_args.model_type)
    if model_args.prefix_path:
        raise ConfigurationError("exporting prefix-tuned models is not supported; export the base model or a "
                                 "LoRA / full fine-tune")
    resolve_model_folder(model_args, generation)
    model = load_model(model_args.model_name_or_path, generation, dtype=dtype, low_memory=True, use_cache=True)
    if model_args.lora_path:
        model = apply_lora(model, generation, lora_path=model_args.lora_path)
        model.merge()  # fold the adapters into the weights: the graph stays the base graph
        model = model.model
    model.eval()
    return generation, model, load_tokenizer(model_args.model_name_or_path, generation)


def describe(generation: str, config, tokenizer, dtype: str, data_args, formats: dict) -> dict:
    layers, heads, dim = cache_shape(config, generation)
    return {
        "format": STEP_GRAPH_FORMAT,
        "formats": formats,
        "generation": generation,
        "dtype": dtype,
        "inputs": ["input_ids", "position_ids", "attention_mask"] + cache_names(layers),
        "outputs": ["next_logits"] + cache_names(layers, "new"),
        "cache": {"layers": layers, "kv_heads": heads, "head_dim": dim, "time_axis": TIME_AXIS[generation],
                  "layout": "one key and one value per layer, each " + (
                      "[columns, batch, heads, dim]" if TIME_AXIS[generation] == 0 else "[batch, heads, columns, dim]"),
                  "outputs": "the step's new columns only; the caller keeps the cache"},
        "vocab_size": config.vocab_size,
        "max_sequence_length": config.max_sequence_length,
        "defaults": {"src_length": data_args.src_length, "max_new_tokens": data_args.tgt_length,
                     "decode_strategy": "greedy_search", "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
    }


def export(loaded: list, output_path, dtype: str, data_args, overwrite: bool = False, onnx: bool = False,
           quantizations=(), onnx_inline_bytes: int = INLINE_LIMIT) -> Path:
    """Write the step graph (Paddle, and ONNX with its quantized copies when asked), config, tokenizer and
    description into a staging folder renamed over output_path's folder: a failed export leaves it as it was.
    `loaded` is load_for_export's [generation, model, tokenizer]; the model is taken out of it, so once the Paddle
    graph is saved nothing holds the weights while the ONNX graphs are made from the saved file."""
    generation, model, tokenizer = loaded
    loaded.clear()
    output_path, prefix, config = Path(output_path), Path(output_path).name, model.config
    step = GenerationStep(model, generation)
    step.eval()
    static = paddle.jit.to_static(step, input_spec=input_specs(config, generation, dtype), full_graph=True)
    with atomic_folder(output_path.parent, COMMAND, overwrite, flag="--output_path's folder",
                       details={"prefix": prefix}) as staging:
        paddle.jit.save(static, str(staging / prefix))
        del model, step, static  # the weights are in PREFIX.pdiparams now
        gc.collect()
        formats = {"paddle": {"files": [f"{prefix}.json", f"{prefix}.pdiparams"]}}
        if onnx:
            formats["onnx"] = convert_to_onnx(staging / prefix, staging / onnx_file_name(prefix), onnx_inline_bytes)
            for quantization in quantizations:
                logger.info("quantizing the ONNX graph's weights to %s", quantization)
                formats[f"onnx-{quantization}"] = quantize_weights(
                    staging / onnx_file_name(prefix), staging / onnx_file_name(prefix, quantization), quantization,
                    onnx_inline_bytes)
        tokenizer.save_pretrained(str(staging))
        config.save_pretrained(str(staging))
        info = describe(generation, config, tokenizer, dtype, data_args, formats)
        atomic_write_json(staging / f"{prefix}.generation.json", info)
    files = [f"{prefix}.json / .pdiparams"] + [f"{f['file']}" + (f" + {f['data']['file']}" if "data" in f else "")
                                               for key, f in formats.items() if key != "paddle"]
    logger.info("exported %s step graph to %s: %s", generation, output_path.parent, ", ".join(files))
    return output_path


def main(argv=None) -> Path:
    console.setup_logging(console.verbose_requested(argv))  # before parsing: PaddleNLP logs while it parses
    model_args, data_args, export_args = parse_dataclasses((ModelArgument, LengthArgument, ExportArgument), argv)
    target = export_target(export_args.output_path, model_args, export_args.overwrite)
    return export(list(load_for_export(model_args, export_args.dtype)), target, export_args.dtype, data_args,
                  export_args.overwrite, export_args.onnx, export_args.quantizations,
                  export_args.onnx_inline_mb * 2 ** 20)


if __name__ == "__main__":
    run_cli(main)
