"""Peak memory of a Hugging Face -> Paddle conversion against the size of the weights, same run.

    python bench/convert_memory.py                       # mid ChatGLM2: 4 layers, hidden 512, vocab 65024 (~185 MB fp32)
    python bench/convert_memory.py --hidden_size 1024 --num_layers 8 --shard_size 64MB

Builds the model in the Hugging Face layout (sharded), then runs in separate processes (peak RSS is per process):
the baseline (imports and nothing else) and the conversion with the given output shard size. Prints the peak RSS
of each, the conversion's increase over the baseline, and that increase relative to the weights and to one shard.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from memory import peak_rss_mb


def child(args) -> None:
    from glm_tune.conversion import checkpoint_convert
    from glm_tune.glm_family import get_generation

    get_generation("chatglm2").classes()  # the baseline pays the same imports (paddlenlp, paddle)

    if args.mode == "convert":
        checkpoint_convert.convert_hf_to_paddle(args.input_dir, args.output_dir, max_shard_size=args.shard_size)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=512, help="model width")
    parser.add_argument("--num_layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--vocab_size", type=int, default=65024, help="output rows")
    parser.add_argument("--shard_size", default="128MB", help="input and output shard size")
    parser.add_argument("--work_dir", default="build/bench/convert", help="scratch folder")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--input_dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        child(args)
        return
    from glm_tune.conversion.hf_layout import parse_size
    from tools.make_tiny_model import make_tiny_model

    work = Path(args.work_dir)
    sizes = {"hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_attention_heads": 8,
             "ffn_hidden_size": 2 * args.hidden_size, "vocab_size": args.vocab_size}
    hf = make_tiny_model("chatglm2", work / "hf", fmt="hf", sizes=sizes, max_shard_size=args.shard_size)
    weights = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 2**20
    largest = args.vocab_size * args.hidden_size * 4 / 2**20  # the embedding / output projection, fp32
    rss = {}
    for mode in ("baseline", "convert"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--input_dir", str(hf), "--output_dir",
                              str(work / "paddle"), "--shard_size", args.shard_size],
                             check=True, capture_output=True, text=True).stdout
        rss[mode] = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
    increase = rss["convert"] - rss["baseline"]
    shard = parse_size(args.shard_size) / 2**20
    print(f"weights {weights:.0f} MB in {len(list(hf.glob('*.safetensors')))} files, shard size {shard:.0f} MB, "
          f"largest tensor {largest:.0f} MB")
    print(f"peak RSS: baseline {rss['baseline']:.0f} MB, conversion {rss['convert']:.0f} MB, "
          f"increase {increase:.0f} MB = {increase / weights:.2f}x the weights, "
          f"{increase / (shard + largest):.2f}x (one shard + the largest tensor)")


if __name__ == "__main__":
    main()
