"""ADGEN metrics as THUDM defines them (ROUGE-1/2/L on jieba words, character BLEU-4), tool-call scores and
teacher-forced token accuracy. Framework-free: the siblings (qlora/, ascend/) score with this same code."""
import json
import logging
from typing import Dict, List

import numpy as np

from glm_tune.data.examples import IGNORE_INDEX
from glm_tune.data.tool_calls import parse_tool_call


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


def score_answers(preds: List[str], references: List[str]) -> Dict[str, float]:
    """What generation-based evaluation reports: for references that are ChatGLM3 tool calls, `tool-name-acc` (the
    generated call names the same tool) and `tool-args-em` (same tool and JSON-equal arguments), in percent;
    ROUGE-1/2/L and BLEU-4 (`compute_metrics`) on the plain answers."""
    calls = [parse_tool_call(ref) for ref in references]
    plain = [(p, r) for p, r, call in zip(preds, references, calls) if call is None]
    scores = compute_metrics(*map(list, zip(*plain))) if plain else {}
    expected = [(parse_tool_call(p), call) for p, call in zip(preds, calls) if call is not None]
    if expected:
        names = [got is not None and got[0] == want[0] for got, want in expected]
        same = [ok and _as_json(got[1]) == _as_json(want[1]) for ok, (got, want) in zip(names, expected)]
        scores.update({"tool-name-acc": 100.0 * float(np.mean(names)), "tool-args-em": 100.0 * float(np.mean(same)),
                       "tool-calls": float(len(expected))})
    return scores


def _as_json(arguments: dict):
    """Arguments as JSON would carry them (tuples become lists), for comparison."""
    return json.loads(json.dumps(arguments, sort_keys=True, default=str))


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
