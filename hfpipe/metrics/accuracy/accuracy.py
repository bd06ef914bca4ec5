"""Accuracy as a local ``evaluate`` module (scikit-learn; no download): the fraction of predictions equal to the
references, optionally weighted (``sample_weight``) or as a count (``normalize=False``). Same contract as the Hub's
``accuracy``; load it with ``evaluate.load(os.path.join(os.path.dirname(hfpipe.__file__), "metrics", "accuracy"))``."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_KWARGS = """
predictions: list of int. references: list of int. normalize: fraction (default True) or count.
sample_weight: optional list of float.
Returns {"accuracy": float}.
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy: correct predictions / all predictions.", citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return {"accuracy": float(accuracy_score(references, predictions, normalize=normalize,
                                                 sample_weight=sample_weight))}
