"""seqeval (entity-level precision, recall, F1 of BIO/IOBES tag sequences) as a local ``evaluate`` module; same
output as the Hub's ``seqeval``: one dict per entity type (precision, recall, f1, number) plus ``overall_precision``,
``overall_recall``, ``overall_f1`` (micro over entities) and ``overall_accuracy`` (token accuracy)."""

import datasets
import evaluate
from seqeval.metrics import accuracy_score, classification_report

_KWARGS = """
predictions: list of list of str tags. references: list of list of str tags (same lengths).
suffix: tags like PER-B instead of B-PER. scheme: IOB1 | IOB2 | IOE1 | IOE2 | IOBES | BILOU (strict mode when set).
mode: "strict" or None. sample_weight, zero_division: passed to seqeval.
"""


class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Entity-level precision/recall/F1 of sequence labelling (seqeval).",
            citation="Nakayama, seqeval: A Python framework for sequence labeling evaluation, 2018.",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string", id="label")),
                                        "references": datasets.Sequence(datasets.Value("string", id="label"))}),
        )

    def _compute(self, predictions, references, suffix=False, scheme=None, mode=None, sample_weight=None,
                 zero_division="warn"):
        if scheme is not None:
            import importlib

            scheme = getattr(importlib.import_module("seqeval.scheme"), scheme)
        report = classification_report(y_true=references, y_pred=predictions, suffix=suffix, output_dict=True,
                                       scheme=scheme, mode=mode, sample_weight=sample_weight,
                                       zero_division=zero_division)
        report.pop("macro avg")
        report.pop("weighted avg")
        overall = report.pop("micro avg")
        scores = {kind: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
                         "number": int(v["support"])} for kind, v in report.items()}
        scores["overall_precision"] = float(overall["precision"])
        scores["overall_recall"] = float(overall["recall"])
        scores["overall_f1"] = float(overall["f1-score"])
        scores["overall_accuracy"] = float(accuracy_score(y_true=references, y_pred=predictions))
        return scores
