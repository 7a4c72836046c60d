"""compute_metrics against values worked out by hand, THUDM's definition (jieba + rouge_chinese + nltk)."""
import math

import jieba
import numpy as np
import pytest

from utils import compute_metrics, token_accuracy


def test_identical_text_scores_100():
    assert compute_metrics(["这款衬衫白色调清爽干净。"], ["这款衬衫白色调清爽干净。"]) == {
        "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}


def test_prediction_longer_than_reference():
    # jieba: 我/爱/北京/天安门 vs 我/爱/北京. ROUGE-1: P=3/4, R=1 -> F=6/7; ROUGE-2: P=2/3, R=1 -> F=4/5;
    # ROUGE-L: LCS 3 -> 6/7. BLEU-4 on characters: p1..p4 = 4/7, 3/6, 2/5, 1/4, brevity penalty 1.
    assert list(jieba.cut("我爱北京天安门")) == ["我", "爱", "北京", "天安门"]
    got = compute_metrics(["我爱北京天安门"], ["我爱北京"])
    bleu = (4 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert got == pytest.approx({"rouge-1": 85.7143, "rouge-2": 80.0, "rouge-l": 85.7143,
                                 "bleu-4": round(bleu * 100, 4)}, abs=1e-9)
    assert got["bleu-4"] == pytest.approx(41.1134, abs=1e-4)


def test_smoothing_method3_on_missing_ngrams():
    # Characters 白色上衣好看 vs 白色裙子好看: p1=4/6, p2=2/5; no 3- or 4-gram matches, which method3 replaces
    # by 1/(2^k * count): p3 = 1/(2*4), p4 = 1/(4*3). Words: 白色/上衣/好看 vs 白色/裙子/好看.
    assert list(jieba.cut("白色上衣好看")) == ["白色", "上衣", "好看"]
    got = compute_metrics(["白色上衣好看"], ["白色裙子好看"])
    bleu = math.exp(0.25 * (math.log(4 / 6) + math.log(2 / 5) + math.log(1 / 8) + math.log(1 / 12)))
    assert got == pytest.approx({"rouge-1": 66.6667, "rouge-2": 0.0, "rouge-l": 66.6667,
                                 "bleu-4": round(bleu * 100, 4)}, abs=1e-9)


def test_empty_predictions_score_zero_and_average_per_sample():
    same = "这款衬衫白色调清爽干净。"
    got = compute_metrics(["", "   ", same], ["这款衬衫很好看", "你好", same])
    # Two zero samples and one perfect one: the mean of per-sample scores.
    assert got == pytest.approx({"rouge-1": 100 / 3, "rouge-2": 100 / 3, "rouge-l": 100 / 3, "bleu-4": 100 / 3})


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        compute_metrics(["a", "b"], ["a"])


def test_token_accuracy_counts_label_positions_only():
    logits = np.zeros((1, 4, 5))
    logits[0, np.arange(4), [1, 2, 3, 4]] = 1.0  # predicts 1, 2, 3, 4
    labels = np.array([[-100, 2, 0, 4]])  # 2 of the 3 label positions right
    assert token_accuracy(logits, labels) == pytest.approx(2 / 3)
    assert token_accuracy(logits, np.full((1, 4), -100)) == 0.0
