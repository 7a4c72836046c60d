"""Convert ChatGLM checkpoints between THUDM's Hugging Face layout and this suite's Paddle layout.

    python tools/convert_checkpoint.py --model_type chatglm2 --input_dir ./chatglm2-6b --output_dir ./checkpoints/chatglm2-6b
    python tools/convert_checkpoint.py --input_dir ./checkpoints/chatglm2_sft --output_dir ./chatglm2-sft-hf --to hf
    python tools/convert_checkpoint.py --input_dir HF_DIR --output_dir OUT --dtype bfloat16 --max_shard_size 5GB

Reads safetensors without torch, `.bin` only through torch.load(weights_only=True), and logs which it did.
Streams tensor by tensor (peak memory near one output shard), validates names and shapes against the config,
names every missing or unexpected tensor, and never leaves a partial output folder.
"""
import argparse
import logging
from pathlib import Path

from glm_tune import console

console.quiet_startup()  # called before the imports below: paddle prints its start-up warnings while it loads

from glm_tune.conversion.checkpoint_convert import (ConversionError, convert_hf_to_paddle,
                                                     convert_paddle_to_hf)
from glm_tune.errors import run_cli


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", choices=["chatglm", "chatglm2", "chatglm3"], default=None,
                        help="generation; read from the folder when omitted")
    parser.add_argument("--input_dir", required=True, help="checkpoint folder to convert")
    parser.add_argument("--output_dir", required=True,
                        help="folder to write (made on success; an existing one only if an earlier conversion wrote "
                             "it, or with --overwrite)")
    parser.add_argument("--to", choices=["paddle", "hf", "glm"], default="paddle",
                        help="paddle: Hugging Face -> Paddle (default); hf: Paddle -> Hugging Face; glm: THUDM "
                             "ChatGLM2/3 Hugging Face -> transformers' GLM layout (for qlora/, no remote code)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="output dtype (default: the input's)")
    parser.add_argument("--max_shard_size", default="2GB", help="largest output file, e.g. 2GB or 500MB")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output_dir that this command did not write")
    console.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    console.setup_logging(args.verbose)
    if not Path(args.input_dir).is_dir():
        raise ConversionError(f"--input_dir {args.input_dir} is not a folder; pass the checkpoint folder to convert")
    if args.to == "glm":
        from glm_tune.conversion.hf_glm import save_glm_checkpoint

        out = save_glm_checkpoint(args.input_dir, args.output_dir, args.max_shard_size, args.overwrite)
    else:
        convert = convert_hf_to_paddle if args.to == "paddle" else convert_paddle_to_hf
        out = convert(args.input_dir, args.output_dir, args.model_type, args.dtype, args.max_shard_size,
                      overwrite=args.overwrite)
    logging.info("wrote %s", out)
    return out


if __name__ == "__main__":
    run_cli(main)
