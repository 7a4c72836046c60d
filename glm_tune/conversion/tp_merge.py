"""Merge a tensor-parallel checkpoint (`model_state.tp0K.pdparams` shards) into one single-shard checkpoint.

Everything is checked before anything is written: the shard files against the config's
tensor_parallel_degree (none missing, none extra), every tensor present in every shard, and every merged shape
against the single-process model built from the same config. The output folder is staged next to the target and
renamed into place, so a refused or failed merge leaves the target as it was (PaddleNLP #6137 is what happens when a
merged file silently misses tensors).
"""
import json
import re
import shutil
from pathlib import Path

import numpy as np

from glm_tune.errors import GlmTuneError
from glm_tune.glm_family import detect_generation, get_generation
from glm_tune.safe_output import atomic_folder, check_output_dir

MERGE_COMMAND = "merge_tp_shards"  # offline and under the launcher: one kind of output
SHARD_PATTERN = re.compile(r"^model_state\.tp(\d+)\.pdparams$")
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "ice_text.model",
                   "added_tokens.json", "generation_config.json")


class ShardMergeError(GlmTuneError):
    """The shards cannot be merged into the model their config describes; nothing was written."""


def shard_files(checkpoint_dir: Path, degree: int) -> list:
    found = {int(m.group(1)): p for p in checkpoint_dir.iterdir() if (m := SHARD_PATTERN.match(p.name))}
    expected = set(range(degree))
    missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
    if missing or extra:
        raise ShardMergeError(
            f"{checkpoint_dir}: config.json says tensor_parallel_degree={degree}, so shards tp00..tp{degree - 1:02d} "
            f"are expected; missing {[f'tp{r:02d}' for r in missing]}, unexpected {[f'tp{r:02d}' for r in extra]}")
    return [found[r] for r in range(degree)]


def single_process_shapes(config, generation: str) -> dict:
    """Parameter shapes of the single-process model the shards came from, without allocating its weights."""
    from glm_tune.conversion.checkpoint_convert import expected_shapes

    single = config.__class__.from_dict({**config.to_dict(), "tensor_parallel_degree": 1, "tensor_parallel_rank": 0})
    return expected_shapes(single, generation)


def merge_state_dicts(shards: list, config, generation: str) -> dict:
    _, model_class, _ = get_generation(generation).classes()
    merge_fns = model_class._get_tensor_parallel_mappings(config, is_split=False)
    prefix = model_class.base_model_prefix + "."
    names = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            diff = sorted(set(names) ^ set(shard))
            raise ShardMergeError(f"shard tp{rank:02d} holds other tensors than tp00: {diff[:5]}")
    merged = {}
    for name in names:
        parts = [np.asarray(shard[name].numpy() if hasattr(shard[name], "numpy") else shard[name]) for shard in shards]
        fn = merge_fns.get(name) or merge_fns.get(name[len(prefix):] if name.startswith(prefix) else name)
        merged[name] = fn(parts) if fn is not None else parts[0]
    return merged


def check_shapes(merged: dict, expected: dict) -> None:
    problems = [f"{n}: merged {list(a.shape)} but the model needs {expected[n]}"
                for n, a in merged.items() if n in expected and list(a.shape) != expected[n]]
    # Tied or derived weights (v1's lm_head) are not saved; anything else the model needs must be there.
    missing = [n for n in expected if n not in merged and not n.startswith("lm_head.")]
    unknown = [n for n in merged if n not in expected]
    if problems or missing or unknown:
        raise ShardMergeError("; ".join(problems + [f"missing {missing}"] * bool(missing) +
                                        [f"unexpected {unknown}"] * bool(unknown)))


def merge_tp_shards(checkpoint_dir, output_dir, overwrite: bool = False, flag: str = "output_dir") -> Path:
    """Merge the shards in `checkpoint_dir` into a single-shard checkpoint (weights, config, tokenizer) at
    `output_dir`. Raises ShardMergeError before writing anything when the shards do not fit the config."""
    from glm_tune.conversion.checkpoint_convert import ConversionError, load_paddle_file, save_paddle_file

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if not checkpoint_dir.is_dir():
        raise ShardMergeError(f"{checkpoint_dir} is not a folder; pass the checkpoint folder holding "
                              "model_state.tp0K.pdparams and config.json")
    generation = detect_generation(checkpoint_dir)
    config_class, _, _ = get_generation(generation).classes()
    config = config_class.from_pretrained(str(checkpoint_dir))
    degree = int(getattr(config, "tensor_parallel_degree", 1) or 1)
    if degree <= 1:
        raise ShardMergeError(f"{checkpoint_dir}/config.json has tensor_parallel_degree={degree}: nothing to merge")
    files = shard_files(checkpoint_dir, degree)
    check_output_dir(output_dir, MERGE_COMMAND, flag, {"checkpoint": checkpoint_dir}, overwrite)
    shards = []
    for path in files:
        try:
            shards.append(load_paddle_file(path, return_numpy=True))
        except ConversionError as err:
            raise ShardMergeError(str(err)) from None
    merged = merge_state_dicts(shards, config, generation)
    del shards  # the merged tensors are new arrays or share the first shard's
    check_shapes(merged, single_process_shapes(config, generation))

    with atomic_folder(output_dir, MERGE_COMMAND, overwrite, {"checkpoint": checkpoint_dir}, flag) as staging:
        save_paddle_file(merged, staging / "model_state.pdparams")
        config_dict = json.loads((checkpoint_dir / "config.json").read_text(encoding="utf-8"))
        config_dict.update(tensor_parallel_degree=1, tensor_parallel_rank=0)
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2, ensure_ascii=False), encoding="utf-8")
        for name in TOKENIZER_FILES:
            if (checkpoint_dir / name).is_file():
                shutil.copy2(checkpoint_dir / name, staging / name)
    return output_dir
