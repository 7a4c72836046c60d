"""Shared helpers as the commands, the siblings and users import them: the ADGEN metrics and token accuracy.

The code lives in `glm_tune/metrics.py` (the library imports it from there, never from this file).
"""
from glm_tune.data.examples import IGNORE_INDEX
from glm_tune.metrics import compute_metrics, score_answers, token_accuracy

__all__ = ["IGNORE_INDEX", "compute_metrics", "score_answers", "token_accuracy"]
