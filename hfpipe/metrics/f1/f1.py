"""F1 as a local ``evaluate`` module (scikit-learn ``f1_score``; no download). Same contract as the Hub's ``f1``:
``average`` is "binary" (default, with ``pos_label``), "micro", "macro", "weighted" or None (per-class list)."""

import datasets
import evaluate
from sklearn.metrics import f1_score

_KWARGS = """
predictions: list of int. references: list of int. labels: classes to include. pos_label: positive class for
average="binary" (default 1). average: binary | micro | macro | weighted | samples | None. sample_weight: optional.
Returns {"f1": float} (a list with average=None).
"""


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 = 2 * precision * recall / (precision + recall).", citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        score = f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average,
                         sample_weight=sample_weight, zero_division=0)
        return {"f1": score.tolist() if getattr(score, "size", 1) > 1 else float(score)}
