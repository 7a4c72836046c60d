"""ADGEN scores for MindFormers' generation eval computed by the suite's `utils.compute_metrics` (THUDM's
definition), so MindSpore and Paddle runs report comparable numbers.

MindFormers 1.9's `ADGENMetric` drops a sample whose prediction is empty (`continue` before scoring), so a model
that answers nothing to half the prompts is scored on the other half only; THUDM's evaluation, and this metric,
score such a sample 0. The pairs are kept so the launcher can write them next to the scores.
"""
from typing import Dict, List

from utils import compute_metrics


class SuiteADGENMetric:
    """The interface MindFormers' generate-eval loop calls: clear(), update(predictions, labels), eval()."""

    def __init__(self):
        self.predictions: List[str] = []
        self.labels: List[str] = []
        self.result: Dict[str, float] = {}

    def clear(self):
        self.predictions, self.labels, self.result = [], [], {}

    def update(self, predictions, labels):
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        self.predictions.extend(predictions)
        self.labels.extend(labels)

    def eval(self) -> Dict[str, float]:
        self.result = compute_metrics(self.predictions, self.labels)
        return self.result
