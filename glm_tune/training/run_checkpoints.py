"""Which checkpoints belong to a training run, and which of them are complete.

A run's `--output_dir` carries an ownership marker with the run's identity (the model, data and settings that
decide its trajectory). A reused folder whose marker names another run is refused (or, with
`--overwrite_output_dir True`, that run's checkpoints are dropped), so `--resume_from_checkpoint auto` never
continues someone else's run. Each checkpoint gets `checkpoint_complete.json` written last, listing every file
and its size; `auto` takes the newest checkpoint whose files all match and names the ones it skipped (what a
`kill -9` during a save leaves behind). Framework-free.
"""
import json
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

from glm_tune.safe_output import OutputRefused, check_target_folder, folder_is_empty, read_owner

COMMAND = "finetune_generation"
COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoints(output_dir) -> List[Path]:
    """checkpoint-N folders of `output_dir`, newest (highest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_step(folder) -> int:
    return int(CHECKPOINT_PATTERN.match(Path(folder).name).group(1))


def mark_complete(folder, train_loss_sum: float = None) -> None:
    """Write the completion marker last: the checkpoint counts only once every file it lists is whole. It also
    keeps the sum of the training losses up to this step, which PaddleNLP's checkpoint lacks, so a resumed run
    reports the mean over all its steps."""
    from glm_tune.safe_output import atomic_write_json

    folder = Path(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != COMPLETE_MARKER}
    atomic_write_json(folder / COMPLETE_MARKER, {"files": files, "train_loss_sum": train_loss_sum})


def train_loss_sum(folder) -> Optional[float]:
    """The training-loss sum a checkpoint's marker keeps (None for checkpoints written before it did)."""
    try:
        value = json.loads((Path(folder) / COMPLETE_MARKER).read_text(encoding="utf-8")).get("train_loss_sum")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def incomplete_reason(folder) -> Optional[str]:
    """Why `folder` cannot be resumed from, or None when every file its marker lists is there at its size."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {COMPLETE_MARKER} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {COMPLETE_MARKER}"
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were saved"
    return None


def latest_complete(output_dir) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """(newest complete checkpoint or None, [(skipped checkpoint, why)])."""
    skipped = []
    for folder in checkpoints(output_dir):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    return None, skipped


def check_resumable(path) -> Path:
    """An explicit --resume_from_checkpoint: a complete checkpoint-N folder of a run."""
    folder = Path(path)
    if not folder.is_dir():
        raise OutputRefused(f"--resume_from_checkpoint {path} is not a folder; pass a checkpoint-N folder of an "
                            "earlier run, or auto for the newest one in --output_dir")
    if not (folder / TRAINER_STATE).is_file():
        raise OutputRefused(f"--resume_from_checkpoint {path} is not a training checkpoint (no {TRAINER_STATE}); "
                            "to start from a model folder pass it as --model_name_or_path, to resume pass a "
                            "checkpoint-N folder or auto")
    reason = incomplete_reason(folder)
    if reason is not None and (folder / COMPLETE_MARKER).exists():
        raise OutputRefused(f"--resume_from_checkpoint {path} is incomplete ({reason}); pass an earlier "
                            "checkpoint-N, or auto to take the newest complete one")
    return folder


def claim_output_dir(output_dir, run: dict, inputs: dict, overwrite: bool) -> str:
    """Check, without changing anything, that this run may write `output_dir`: returns "new", "same_run" or
    "foreign" (an earlier run's checkpoints are there and --overwrite_output_dir allows dropping them, which
    `drop_checkpoints` does once every other check has passed). Raises OutputRefused otherwise."""
    path = check_target_folder(output_dir, "--output_dir", inputs)
    if not path.is_dir() or folder_is_empty(path):
        return "new"
    owner = read_owner(path)
    if owner is not None and owner.get("command") == COMMAND and owner.get("run") == run:
        return "same_run"
    foreign = checkpoints(path)
    if overwrite:
        return "foreign" if foreign else "new"
    if owner is None or owner.get("command") != COMMAND:
        raise OutputRefused(f"--output_dir {output_dir} already exists and was not written by "
                            "finetune_generation.py; nothing was changed. Choose a new folder, or pass "
                            "--overwrite_output_dir True to write into it")
    if foreign:
        earlier = owner.get("run") or {}
        changed = sorted(k for k in set(run) | set(earlier) if run.get(k) != earlier.get(k))
        raise OutputRefused(
            f"--output_dir {output_dir} holds checkpoints of another run ({', '.join(p.name for p in foreign)}; "
            f"it differs in {', '.join(changed)}); nothing was changed. Choose a new folder, or pass "
            "--overwrite_output_dir True to drop that run's checkpoints")
    return "new"


def drop_checkpoints(output_dir) -> List[Path]:
    """Remove an earlier run's checkpoint-N folders (asked for with --overwrite_output_dir)."""
    dropped = checkpoints(output_dir)
    for folder in dropped:
        shutil.rmtree(folder, ignore_errors=True)  # every rank may get here; the first one removes
    return dropped


def run_identity(model_args, data_args, training_args, generation: str) -> dict:
    """What decides a run's trajectory: checkpoints of a run with another identity are not resumed."""
    def where(path):
        return str(Path(path).expanduser().resolve()) if path and Path(path).exists() else path

    return {
        "model": where(model_args.model_name_or_path), "task": where(data_args.task_name_or_path),
        "generation": generation, "lora": bool(model_args.lora), "lora_rank": model_args.lora_rank,
        "lora_alpha": model_args.lora_alpha, "prefix_tuning": bool(model_args.prefix_tuning),
        "num_prefix_tokens": model_args.num_prefix_tokens, "src_length": data_args.src_length,
        "tgt_length": data_args.tgt_length, "seed": training_args.seed,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "tensor_parallel_degree": training_args.requested_tensor_parallel_degree,
    }
