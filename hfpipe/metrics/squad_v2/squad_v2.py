"""SQuAD v2.0 scoring as a local ``evaluate`` module, computed exactly as the official ``evaluate-v2.0.py``.

Normalisation as in v1.1; gold answers that normalise to "" are dropped and a question left with none is
unanswerable (its only gold answer is ""). EM and F1 per question are the maxima over the gold answers, where F1 of
an empty prediction or an empty gold answer is 1 when both are empty, else 0. A prediction whose
``no_answer_probability`` exceeds ``no_answer_threshold`` (default 1.0: never) counts as "". Reports ``exact``,
``f1``, ``total``, the ``HasAns_*``/``NoAns_*`` splits, and ``best_exact``/``best_f1`` with the no-answer probability
thresholds that maximise them. Same inputs as the Hub's ``squad_v2``.
"""

from collections import Counter

import datasets
import evaluate

from hfpipe.metrics.squad.squad import PREDICTION, REFERENCE, normalize_answer  # v2.0 normalises as v1.1

_KWARGS = """
predictions: list of {"id": str, "prediction_text": str, "no_answer_probability": float}.
references: list of {"id": str, "answers": {"text": list of str, "answer_start": list of int}}.
no_answer_threshold: float (default 1.0).
Returns exact, f1, total, HasAns_exact, HasAns_f1, HasAns_total, NoAns_exact, NoAns_f1, NoAns_total, best_exact,
best_exact_thresh, best_f1, best_f1_thresh (scores in 0-100).
"""


def get_tokens(s: str) -> list:
    return normalize_answer(s).split() if s else []


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
    common = Counter(gold_toks) & Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # if either is no-answer, F1 is 1 if they agree, 0 otherwise
        return float(gold_toks == pred_toks)
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def get_raw_scores(gold: dict, preds: dict):
    exact, f1 = {}, {}
    for qid, answers in gold.items():
        gold_answers = [a for a in answers if normalize_answer(a)] or [""]
        if qid not in preds:
            continue
        a_pred = preds[qid]
        exact[qid] = max(compute_exact(a, a_pred) for a in gold_answers)
        f1[qid] = max(compute_f1(a, a_pred) for a in gold_answers)
    return exact, f1


def apply_no_ans_threshold(scores: dict, na_probs: dict, qid_to_has_ans: dict, thresh: float) -> dict:
    return {qid: (float(not qid_to_has_ans[qid]) if na_probs[qid] > thresh else s) for qid, s in scores.items()}


def make_eval_dict(exact: dict, f1: dict, qid_list=None) -> dict:
    if qid_list is None:
        total = len(exact)
        return {"exact": 100.0 * sum(exact.values()) / total, "f1": 100.0 * sum(f1.values()) / total, "total": total}
    total = len(qid_list)
    return {"exact": 100.0 * sum(exact[k] for k in qid_list) / total,
            "f1": 100.0 * sum(f1[k] for k in qid_list) / total, "total": total}


def find_best_thresh(preds: dict, scores: dict, na_probs: dict, qid_to_has_ans: dict):
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = best_score = num_no_ans
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        cur_score += diff
        if cur_score > best_score:
            best_score, best_thresh = cur_score, na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def score(preds: dict, gold: dict, na_probs: dict | None = None, no_answer_threshold: float = 1.0) -> dict:
    """``preds``: id -> text; ``gold``: id -> list of gold texts (empty: unanswerable); ``na_probs``: id -> p."""
    na_probs = na_probs or {k: 0.0 for k in preds}
    qid_to_has_ans = {qid: bool(answers) for qid, answers in gold.items()}  # official: bool(qa["answers"])
    has_ans = [k for k, v in qid_to_has_ans.items() if v]
    no_ans = [k for k, v in qid_to_has_ans.items() if not v]
    exact_raw, f1_raw = get_raw_scores(gold, preds)
    exact = apply_no_ans_threshold(exact_raw, na_probs, qid_to_has_ans, no_answer_threshold)
    f1 = apply_no_ans_threshold(f1_raw, na_probs, qid_to_has_ans, no_answer_threshold)
    out = make_eval_dict(exact, f1)
    for prefix, ids in (("HasAns", has_ans), ("NoAns", no_ans)):
        if ids:
            for k, v in make_eval_dict(exact, f1, ids).items():
                out[f"{prefix}_{k}"] = v
    best_exact, exact_thresh = find_best_thresh(preds, exact_raw, na_probs, qid_to_has_ans)
    best_f1, f1_thresh = find_best_thresh(preds, f1_raw, na_probs, qid_to_has_ans)
    out.update({"best_exact": best_exact, "best_exact_thresh": exact_thresh, "best_f1": best_f1,
                "best_f1_thresh": f1_thresh})
    return out


class SquadV2(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="SQuAD v2.0 exact match and F1 with unanswerable questions (official scoring).",
            citation="Rajpurkar et al., Know What You Don't Know: Unanswerable Questions for SQuAD, 2018.",
            inputs_description=_KWARGS,
            features=datasets.Features({
                "predictions": {**PREDICTION, "no_answer_probability": datasets.Value("float32")},
                "references": REFERENCE}),
        )

    def _compute(self, predictions, references, no_answer_threshold=1.0):
        preds = {p["id"]: p["prediction_text"] for p in predictions}
        na_probs = {p["id"]: float(p["no_answer_probability"]) for p in predictions}
        gold = {r["id"]: list(r["answers"]["text"]) for r in references}
        return score(preds, gold, na_probs, no_answer_threshold)
