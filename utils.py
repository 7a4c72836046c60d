"""Shared helpers: ADGEN metrics as THUDM defines them, token accuracy, logging and atomic file writes."""
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List

import numpy as np

IGNORE_INDEX = -100


def _rouge_f(hypothesis: List[str], reference: List[str]) -> Dict[str, float]:
    """rouge_chinese F-scores ×100 of two word lists; 0 when either side has no words (rouge_chinese raises
    on empty input, THUDM's ChatGLM2 evaluation scores such pairs 0)."""
    from rouge_chinese import Rouge

    if not " ".join(hypothesis).split() or not " ".join(reference).split():
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    scores = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    return {k: round(v["f"] * 100, 4) for k, v in scores.items()}


def compute_metrics(preds: List[str], labels: List[str]) -> Dict[str, float]:
    """ROUGE-1/2/L and BLEU-4 on a 0–100 scale, exactly as THUDM's ChatGLM P-Tuning evaluation (ptuning/main.py)
    computes the ADGEN numbers THUDM and MindFormers publish: jieba words for ROUGE (rouge_chinese F-score),
    characters for BLEU-4 (nltk, smoothing method3), each rounded to 4 places per sample, then averaged."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if len(preds) != len(labels):
        raise ValueError(f"compute_metrics got {len(preds)} predictions for {len(labels)} labels")
    if not preds:
        raise ValueError("compute_metrics needs at least one prediction")
    jieba.setLogLevel(logging.WARNING)
    smoothing = SmoothingFunction().method3
    scores = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(preds, labels):
        for key, value in _rouge_f(list(jieba.cut(pred)), list(jieba.cut(label))).items():
            scores[key].append(value)
        if pred.strip() and label.strip():
            bleu = sentence_bleu([list(label)], list(pred), smoothing_function=smoothing)
        else:
            bleu = 0.0
        scores["bleu-4"].append(round(bleu * 100, 4))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def token_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Teacher-forced accuracy: share of label positions (labels != -100) where the predicted id is the label.
    `predictions` are ids or logits (argmax taken); `labels` are already shifted, as data.py makes them."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(-1)
    mask = labels != IGNORE_INDEX
    if not mask.any():
        return 0.0
    return float((predictions[mask] == labels[mask]).mean())


def atomic_write_text(path, text: str) -> None:
    """Write `text` to `path` so a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_folder(output_dir, command: str, overwrite: bool = False, inputs: dict = None,
                  flag: str = "--output_dir", replace: bool = True, overwrite_flag: str = "--overwrite True",
                  details: dict = None):
    """Yield a private staging folder beside `output_dir`; when the block succeeds it becomes `output_dir`,
    marked as written by `command` (with `details`). `output_guard.check_output_dir` decides first (and again just before the
    swap) whether `output_dir` may be replaced: absent, empty, written by `command` before, or `overwrite`.
    With replace=False an `output_dir` that exists by then (another process made it first) is kept and the
    staging folder dropped. When the block raises, the staging folder is removed and `output_dir` is left as
    it was: never a half-written folder, never a folder the command was not told to replace."""
    from output_guard import check_output_dir, write_owner

    def allowed():
        check_output_dir(output_dir, command, flag, inputs, overwrite, overwrite_flag)

    allowed()
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging.", dir=output_dir.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a model folder is meant to be shared
    old = None
    try:
        yield staging
        write_owner(staging, command, **(details or {}))
        if output_dir.exists():
            if not replace:
                return
            allowed()
            old = output_dir.with_name(f".{output_dir.name}.replaced.{os.getpid()}")
            os.replace(output_dir, old)
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
