"""Export a ChatGLM (v1/v2/v3) as a static step graph with an explicit KV cache, for the C++ inference engine.

    python export_generation_model.py --model_name_or_path ./checkpoints/chatglm2_sft --output_path ./checkpoints/infer/chatglm
    python export_generation_model.py --model_name_or_path BASE --lora_path LORA_OUT --output_path OUT/chatglm

Writes OUT/chatglm.json + OUT/chatglm.pdiparams (the step graph, see step_model.py), the tokenizer files and
OUT/chatglm.generation.json (inputs, outputs, cache layout and generation defaults) into OUT's folder;
`infer_generation.py --model_path OUT_FOLDER --model_prefix chatglm` runs it.
"""
from glm_tune import console

console.quiet_startup()  # called before the imports below: paddle prints its start-up warnings while it loads

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from argument import LengthArgument, ModelArgument, comma_list, parse_dataclasses, require_flag
from glm_tune.deployment.onnx_export import BLOCK_CHOICES, INLINE_LIMIT, MAX_INLINE, QUANTIZATIONS
from glm_tune.deployment.step_export import export, export_target, load_for_export
from glm_tune.errors import run_cli


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
                "onnxruntime MatMulNBits, symmetric). The embedding stays float32."})
    quantize_block_size: Optional[int] = field(default=None, metadata={
        "help": "Weights per scale of --quantize: 16, 32, 64, 128 or 256. Default 128 for int8 and int4 "
                "(onnxruntime's and GPTQ's usual group; the kernel reads it 1.17x (int8) and 1.35x (int4) as fast "
                "as blocks of 32); 32 is chatglm.cpp's q4_0 block."})
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
        require_flag(self.quantize_block_size in (None, *BLOCK_CHOICES),
                     f"--quantize_block_size {self.quantize_block_size}: choose one of {BLOCK_CHOICES}")
        require_flag(0 <= self.onnx_inline_mb <= MAX_INLINE // 2 ** 20,
                     f"--onnx_inline_mb {self.onnx_inline_mb} must be between 0 and {MAX_INLINE // 2 ** 20} "
                     "(protobuf's 2 GiB, less room for the graph itself)")
        require_flag(self.dtype == "float32" or not (self.onnx or self.quantizations),
                     "the ONNX export runs on CPU in float32: pass --onnx False with --dtype float16/bfloat16")


# The flags this command takes, in --help's order (tools/flag_reference.py documents them in docs/flags.md).
ARGUMENT_GROUPS = (ModelArgument, LengthArgument, ExportArgument)


def main(argv=None) -> Path:
    console.setup_logging(console.verbose_requested(argv))  # before parsing: PaddleNLP logs while it parses
    model_args, data_args, export_args = parse_dataclasses(ARGUMENT_GROUPS, argv)
    target = export_target(export_args.output_path, model_args, export_args.overwrite)
    return export(list(load_for_export(model_args, export_args.dtype)), target, export_args.dtype, data_args,
                  export_args.overwrite, export_args.onnx, export_args.quantizations,
                  export_args.onnx_inline_mb * 2 ** 20, export_args.quantize_block_size)


if __name__ == "__main__":
    run_cli(main)
