"""Merge a tensor-parallel checkpoint into one single-shard checkpoint, offline (no launcher, no model run).

    python tools/merge_tp_shards.py CHECKPOINT_WITH_SHARDS OUTPUT_DIR

Refuses, before writing anything, a missing or extra shard, or shapes that do not fit the config.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tp_merge import ShardMergeError, merge_tp_shards  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", help="folder with config.json and model_state.tp0K.pdparams shards")
    parser.add_argument("output_dir", help="folder to write the merged checkpoint to (replaced only on success)")
    args = parser.parse_args(argv)
    try:
        out = merge_tp_shards(args.checkpoint_dir, args.output_dir)
    except ShardMergeError as err:
        sys.exit(f"error: {err}")
    print(f"merged into {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
