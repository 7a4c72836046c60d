"""Merge a tensor-parallel checkpoint into one single-shard checkpoint, offline (no launcher, no model run).

    python tools/merge_tp_shards.py CHECKPOINT_WITH_SHARDS OUTPUT_DIR

Refuses, before writing anything, a missing or extra shard, or shapes that do not fit the config.
"""
import argparse
import sys

from glm_tune import console

console.quiet_startup()  # called before the imports below: paddle prints its start-up warnings while it loads

from glm_tune.errors import run_cli
from glm_tune.conversion.tp_merge import merge_tp_shards


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", help="folder with config.json and model_state.tp0K.pdparams shards")
    parser.add_argument("output_dir", help="folder to write the merged checkpoint to (made on success; an existing "
                                           "one only if an earlier merge wrote it, or with --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output_dir that no merge wrote")
    console.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    console.setup_logging(args.verbose)
    out = merge_tp_shards(args.checkpoint_dir, args.output_dir, args.overwrite)
    print(f"merged into {out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
