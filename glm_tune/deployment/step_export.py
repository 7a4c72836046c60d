"""Writing an export: the target folder's rules, the model loaded for it, and the step graph saved as Paddle,
ONNX and its quantized copies with the description (export_format.py) into one staged folder."""
import gc
import logging
from pathlib import Path

import paddle

from glm_tune.deployment.export_format import describe, description_name, onnx_file_name, paddle_files
from glm_tune.deployment.onnx_export import INLINE_LIMIT, convert_to_onnx, quantize_weights
from glm_tune.deployment.step_model import GenerationStep, input_specs
from glm_tune.model_loading import ConfigurationError, check_adapter_flags, load_checkpoint, locate_checkpoint
from glm_tune.safe_output import (OutputRefused, atomic_folder, atomic_write_json, check_target_folder, folder_is_empty,
                                  folder_listing, read_owner)

COMMAND = "export_generation_model"
DEFAULT_PREFIX = "chatglm"

logger = logging.getLogger("export_generation_model")


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
    """[generation, model, tokenizer] with a LoRA folded into the weights: the graph stays the base graph."""
    check_adapter_flags(model_args)
    if model_args.prefix_path:
        raise ConfigurationError("exporting prefix-tuned models is not supported; export the base model or a "
                                 "LoRA / full fine-tune")
    checkpoint = locate_checkpoint(model_args)
    model, tokenizer = load_checkpoint(checkpoint, dtype=dtype, low_memory=True, merge_lora=True, use_cache=True)
    model.eval()
    return [checkpoint.generation, model, tokenizer]


def export(loaded: list, output_path, dtype: str, data_args, overwrite: bool = False, onnx: bool = False,
           quantizations=(), onnx_inline_bytes: int = INLINE_LIMIT, block_size: int = None) -> Path:
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
        formats = {"paddle": {"files": paddle_files(prefix)}}
        if onnx:
            formats["onnx"] = convert_to_onnx(staging / prefix, staging / onnx_file_name(prefix), onnx_inline_bytes)
            for quantization in quantizations:
                logger.info("quantizing the ONNX graph's weights to %s", quantization)
                formats[f"onnx-{quantization}"] = quantize_weights(
                    staging / onnx_file_name(prefix), staging / onnx_file_name(prefix, quantization), quantization,
                    onnx_inline_bytes, block_size)
        tokenizer.save_pretrained(str(staging))
        config.save_pretrained(str(staging))
        atomic_write_json(staging / description_name(prefix),
                          describe(generation, config, tokenizer, dtype, data_args, formats))
    files = [f"{prefix}.json / .pdiparams"] + [f"{f['file']}" + (f" + {f['data']['file']}" if "data" in f else "")
                                               for key, f in formats.items() if key != "paddle"]
    logger.info("exported %s step graph to %s: %s", generation, output_path.parent, ", ".join(files))
    return output_path
