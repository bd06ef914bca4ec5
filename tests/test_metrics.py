"""The package's local ``evaluate`` modules load by path with no Hub access and give hand-computed values; the SQuAD
modules follow the official v1.1/v2.0 scoring (normalisation, EM, token F1, no-answer handling, best thresholds)."""

import pytest

from hfpipe.tasks import load_metric


def _ref(qid, *texts):
    return {"id": qid, "answers": {"text": list(texts), "answer_start": [0] * len(texts)}}


def test_squad_normalisation_and_token_f1():
    from hfpipe.metrics.squad import squad
    assert squad.normalize_answer("  The Cat!  ") == "cat"
    assert squad.normalize_answer("an apple, a pear; theatre") == "apple pear theatre"  # 'the' only as a word
    # pred tokens quick brown fox vs gold quick fox jumps: 2 common -> P = R = 2/3
    assert squad.f1_score("the quick brown fox", "quick fox jumps") == pytest.approx(2 / 3)
    assert squad.f1_score("", "cat") == 0.0


def test_squad_v1_exact_match_and_f1():
    squad = load_metric("squad")
    preds = [{"id": "a", "prediction_text": "Paris"}, {"id": "b", "prediction_text": "in the year 1990"}]
    refs = [_ref("a", "paris", "Paris, France"), _ref("b", "1990")]
    out = squad.compute(predictions=preds, references=refs)
    # a: EM 1, F1 1 (max over gold answers); b: EM 0, F1 = 2 * (1/3 * 1) / (1/3 + 1) = 0.5
    assert out == pytest.approx({"exact_match": 50.0, "f1": 75.0})


def test_squad_v2_null_answers_and_best_thresholds():
    squad_v2 = load_metric("squad_v2")
    refs = [_ref("q1", "Paris"), _ref("q2"), _ref("q3", "the blue whale"), _ref("q4")]
    texts = {"q1": "", "q2": "", "q3": "whale", "q4": "something"}
    na = {"q1": 0.9, "q2": 0.8, "q3": 0.1, "q4": 0.7}
    preds = [{"id": k, "prediction_text": v, "no_answer_probability": na[k]} for k, v in texts.items()]
    out = squad_v2.compute(predictions=preds, references=refs)
    # exact: q2 only (both empty); f1: q2 = 1, q3 = 2 * (1 * 1/2) / (1 + 1/2) = 2/3
    assert out["exact"] == pytest.approx(25.0) and out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 4)
    assert out["HasAns_total"] == 2 and out["NoAns_total"] == 2 and out["total"] == 4
    assert out["HasAns_exact"] == 0.0 and out["HasAns_f1"] == pytest.approx(100 / 3)
    assert out["NoAns_exact"] == 50.0 and out["NoAns_f1"] == 50.0
    # official find_best_thresh: start at 2 (no-answer count), walk by na_prob: q3 +2/3 (f1) / +0 (exact), q4 -1, ...
    assert out["best_exact"] == pytest.approx(50.0) and out["best_exact_thresh"] == 0.0
    assert out["best_f1"] == pytest.approx(100 * (2 + 2 / 3) / 4) and out["best_f1_thresh"] == pytest.approx(0.1)
    # with a threshold, q4 (0.7 > 0.5) becomes a correct "no answer"; q1/q2 are "" already
    thr = squad_v2.compute(predictions=preds, references=refs, no_answer_threshold=0.5)
    assert thr["exact"] == pytest.approx(50.0) and thr["f1"] == pytest.approx(100 * (2 + 2 / 3) / 4)


def test_accuracy_and_f1():
    p, y = [0, 1, 1, 0], [0, 1, 0, 0]
    assert load_metric("accuracy").compute(predictions=p, references=y) == {"accuracy": 0.75}
    f1 = load_metric("f1")
    assert f1.compute(predictions=p, references=y)["f1"] == pytest.approx(2 / 3)  # tp 1, fp 1, fn 0
    # class 0: P 1, R 2/3 -> 0.8; class 1: 2/3
    assert f1.compute(predictions=p, references=y, average="macro")["f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_seqeval_entity_scores():
    seqeval = load_metric("seqeval")
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    preds = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O"]]
    out = seqeval.compute(predictions=preds, references=refs)
    # 3 gold entities, 2 predicted, both right
    assert out["overall_precision"] == 1.0 and out["overall_recall"] == pytest.approx(2 / 3)
    assert out["overall_f1"] == pytest.approx(0.8) and out["overall_accuracy"] == pytest.approx(5 / 6)
    assert out["PER"]["f1"] == 1.0 and out["LOC"]["recall"] == 0.0 and out["LOC"]["number"] == 1


def test_unknown_metric_lists_the_local_ones():
    with pytest.raises(FileNotFoundError, match="squad_v2"):
        load_metric("bleurt")
