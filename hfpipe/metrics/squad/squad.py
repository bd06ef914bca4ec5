"""SQuAD v1.1 exact match and F1 as a local ``evaluate`` module, computed exactly as the official
``evaluate-v1.1.py``: answers are normalised (lower case, punctuation removed, articles a/an/the removed, whitespace
collapsed), EM is string equality after normalisation, F1 is the token-overlap F1 of the normalised answers, each
the maximum over the gold answers, averaged over the questions and scaled to 0-100. Same inputs as the Hub's
``squad``: predictions ``[{"id", "prediction_text"}]``, references ``[{"id", "answers": {"text", "answer_start"}}]``.
"""

import re
import string
from collections import Counter

import datasets
import evaluate

_KWARGS = """
predictions: list of {"id": str, "prediction_text": str}.
references: list of {"id": str, "answers": {"text": list of str, "answer_start": list of int}}.
Returns {"exact_match": float, "f1": float} in 0-100.
"""


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official v1.1)."""
    s = s.lower()
    exclude = set(string.punctuation)
    s = "".join(ch for ch in s if ch not in exclude)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction: str, ground_truths) -> float:
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def score(predictions: dict, references: dict) -> dict:
    """``predictions``: id -> text; ``references``: id -> list of gold texts. Questions without a prediction count
    as wrong, as in the official script."""
    f1 = exact_match = 0.0
    for qid, ground_truths in references.items():
        if qid not in predictions:
            continue
        prediction = predictions[qid]
        exact_match += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
    total = len(references)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


#: the SQuAD schema of one prediction and one reference (v2.0 adds ``no_answer_probability`` to predictions)
PREDICTION = {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")}
REFERENCE = {"id": datasets.Value("string"),
             "answers": datasets.Sequence({"text": datasets.Value("string"), "answer_start": datasets.Value("int32")})}


class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="SQuAD v1.1 exact match and F1 (official scoring).",
            citation="Rajpurkar et al., SQuAD: 100,000+ Questions for Machine Comprehension of Text, 2016.",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": PREDICTION, "references": REFERENCE}),
        )

    def _compute(self, predictions, references):
        preds = {p["id"]: p["prediction_text"] for p in predictions}
        refs = {r["id"]: list(r["answers"]["text"]) for r in references}
        return score(preds, refs)
