"""Export a ChatGLM (v1/v2/v3) as a static step graph with an explicit KV cache, for the C++ inference engine.

    python export_generation_model.py --model_name_or_path ./checkpoints/chatglm2_sft --output_path ./checkpoints/infer/chatglm
    python export_generation_model.py --model_name_or_path BASE --lora_path LORA_OUT --output_path OUT/chatglm

Writes OUT/chatglm.json + OUT/chatglm.pdiparams (the step graph, see step_model.py), the tokenizer files and
OUT/chatglm.generation.json (inputs, outputs, cache layout and generation defaults) into OUT's folder;
`infer_generation.py --model_path OUT_FOLDER --model_prefix chatglm` runs it.
"""
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import paddle
from paddlenlp.trainer import PdArgumentParser

from argument import DataArgument, ModelArgument
from glm_family import NotAChatGLMCheckpoint
from model_loading import (ConfigurationError, apply_lora, load_model, load_tokenizer, resolve_checkpoint,
                           resolve_generation)
from step_model import GenerationStep, cache_shape, input_specs
from utils import atomic_write_json, quiet_library_logs

logger = logging.getLogger("export_generation_model")


@dataclass
class ExportArgument:
    output_path: str = field(default="./checkpoints/infer/chatglm", metadata={
        "help": "Folder and file prefix of the exported graph: DIR/PREFIX.json, DIR/PREFIX.pdiparams."})
    dtype: str = field(default="float32", metadata={"help": "Weights and cache dtype: float32, float16 or bfloat16 "
                                                            "(half precision needs a GPU engine)."})


def load_for_export(model_args, dtype: str):
    generation = resolve_generation(model_args.model_name_or_path, model_args.model_type)
    model_args.model_name_or_path = resolve_checkpoint(model_args.model_name_or_path, generation)
    model = load_model(model_args.model_name_or_path, generation, dtype=dtype, use_cache=True)
    if model_args.lora_path:
        model = apply_lora(model, generation, model_args.lora_rank, model_args.lora_alpha, model_args.lora_path)
        model.merge()  # fold the adapters into the weights: the graph stays the base graph
        model = model.model
    elif model_args.prefix_path:
        raise ConfigurationError("exporting prefix-tuned models is not supported; export the base model or a "
                                 "LoRA / full fine-tune")
    model.eval()
    return generation, model, load_tokenizer(model_args.model_name_or_path, generation)


def describe(generation: str, config, tokenizer, dtype: str, data_args) -> dict:
    layers, heads, dim = cache_shape(config, generation)
    return {
        "format": "glm-tune step graph v1",
        "generation": generation,
        "dtype": dtype,
        "inputs": [s.name for s in input_specs(config, generation, dtype)],
        "outputs": ["next_logits", "cache_k", "cache_v"],
        "cache": {"layers": layers, "kv_heads": heads, "head_dim": dim, "layout": "[layers, past, batch, heads, dim]"},
        "vocab_size": config.vocab_size,
        "max_sequence_length": config.max_sequence_length,
        "defaults": {"src_length": data_args.src_length, "max_new_tokens": data_args.tgt_length,
                     "decode_strategy": "greedy_search", "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
    }


def export(model, generation: str, tokenizer, output_path, dtype: str, data_args) -> Path:
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    step = GenerationStep(model, generation)
    step.eval()
    static = paddle.jit.to_static(step, input_spec=input_specs(model.config, generation, dtype), full_graph=True)
    paddle.jit.save(static, str(output_path))
    tokenizer.save_pretrained(str(output_path.parent))
    model.config.save_pretrained(str(output_path.parent))
    info = describe(generation, model.config, tokenizer, dtype, data_args)
    atomic_write_json(output_path.parent / f"{output_path.name}.generation.json", info)
    return output_path


def main(argv=None) -> Path:
    parser = PdArgumentParser((ModelArgument, DataArgument, ExportArgument))
    model_args, data_args, export_args = parser.parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_library_logs()
    generation, model, tokenizer = load_for_export(model_args, export_args.dtype)
    out = export(model, generation, tokenizer, export_args.output_path, export_args.dtype, data_args)
    logger.info("exported %s step graph to %s.json / .pdiparams", generation, out)
    return out


if __name__ == "__main__":
    try:
        main()
    except (ConfigurationError, NotAChatGLMCheckpoint) as err:
        sys.exit(f"error: {err}")
