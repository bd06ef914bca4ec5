"""Extractive question answering (SQuAD v1.1 and v2.0 formats), written as library functions after transformers'
``run_qa.py``/``utils_qa.py``.

A (question, context) pair longer than ``max_seq_length`` becomes several *features*: windows over the context that
overlap by ``doc_stride`` tokens (``return_overflowing_tokens``), each padded to ``max_seq_length``. Training labels
are the token positions of the answer inside a window, or the ``[CLS]`` index when the window does not contain the
whole answer (or the question has none, SQuAD v2). For evaluation each feature keeps its example id and an offset
mapping restricted to context tokens; post-processing takes the ``n_best_size`` start and end logits of every
feature, keeps spans inside the context no longer than ``max_answer_length`` tokens, maps the best one back to a
character span of the context, and (v2) answers "" when the null score beats the best span by more than
``null_score_diff_threshold``. Exact match and F1 come from the package's ``squad``/``squad_v2`` modules, which
follow the official scoring scripts.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from transformers import AutoModelForQuestionAnswering

from hfpipe.tasks.base import TaskDataArguments, load_metric, load_raw_splits


@dataclass
class QADataArguments(TaskDataArguments):
    version_2_with_negative: bool = field(default=False, metadata={"help": "SQuAD v2: some questions have no "
                                          "answer (empty answers); null predictions are allowed."})
    doc_stride: int = field(default=128, metadata={"help": "Tokens of overlap between the windows of a long "
                            "context."})
    n_best_size: int = field(default=20, metadata={"help": "Start/end candidates per feature in post-processing."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer, in tokens."})
    null_score_diff_threshold: float = field(default=0.0, metadata={"help": "v2: answer null when null score - best "
                                             "span score > this."})
    question_column: str = field(default="question", metadata={"help": "Question column."})
    context_column: str = field(default="context", metadata={"help": "Context column."})
    answer_column: str = field(default="answers", metadata={"help": "Answers column ({'text': [...], "
                                "'answer_start': [...]}, SQuAD format)."})
    data_field: str | None = field(default=None, metadata={"help": "json files only: the key holding the list of "
                                   "examples (e.g. 'data' for a flattened SQuAD export)."})


def _pad_on_right(tokenizer) -> bool:
    return tokenizer.padding_side == "right"


def _tokenize(tokenizer, questions, contexts, max_seq_length: int, doc_stride: int):
    if doc_stride >= max_seq_length - 2:
        raise ValueError(f"doc_stride={doc_stride} must be smaller than max_seq_length={max_seq_length} (minus "
                         f"special tokens); use e.g. --doc_stride {max_seq_length // 4}.")
    right = _pad_on_right(tokenizer)
    questions = [q.lstrip() for q in questions]  # leading spaces waste tokens and break truncation
    return tokenizer(questions if right else contexts, contexts if right else questions,
                     truncation="only_second" if right else "only_first", max_length=max_seq_length,
                     stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                     padding="max_length")


def prepare_train_features(examples: dict, tokenizer, max_seq_length: int, doc_stride: int,
                           question_column: str = "question", context_column: str = "context",
                           answer_column: str = "answers") -> dict:
    """Batched ``datasets.map`` function: windows with ``start_positions``/``end_positions`` (the ``[CLS]`` index
    when the window does not hold the whole answer or there is none)."""
    enc = _tokenize(tokenizer, examples[question_column], examples[context_column], max_seq_length, doc_stride)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    context_index = 1 if _pad_on_right(tokenizer) else 0
    starts, ends = [], []
    for i, offsets in enumerate(offsets_all):
        ids = enc["input_ids"][i]
        cls_index = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        seq_ids = enc.sequence_ids(i)
        answers = examples[answer_column][sample_map[i]]
        if len(answers["answer_start"]) == 0:
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        first = seq_ids.index(context_index)
        last = len(seq_ids) - 1 - seq_ids[::-1].index(context_index)
        if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        s = first
        while s <= last and offsets[s][0] <= start_char:
            s += 1
        e = last
        while e >= first and offsets[e][1] >= end_char:
            e -= 1
        starts.append(s - 1)
        ends.append(e + 1)
    enc["start_positions"] = starts
    enc["end_positions"] = ends
    return enc


def prepare_eval_features(examples: dict, tokenizer, max_seq_length: int, doc_stride: int,
                          question_column: str = "question", context_column: str = "context",
                          id_column: str = "id") -> dict:
    """Batched ``datasets.map`` function: windows with ``example_id`` and an ``offset_mapping`` that is ``None``
    outside the context, for :func:`postprocess_qa_predictions`."""
    enc = _tokenize(tokenizer, examples[question_column], examples[context_column], max_seq_length, doc_stride)
    sample_map = enc.pop("overflow_to_sample_mapping")
    context_index = 1 if _pad_on_right(tokenizer) else 0
    enc["example_id"] = []
    for i in range(len(enc["input_ids"])):
        seq_ids = enc.sequence_ids(i)
        enc["example_id"].append(examples[id_column][sample_map[i]])
        enc["offset_mapping"][i] = [o if seq_ids[k] == context_index else None
                                    for k, o in enumerate(enc["offset_mapping"][i])]
    return enc


def postprocess_qa_predictions(examples, features, predictions, version_2_with_negative: bool = False,
                               n_best_size: int = 20, max_answer_length: int = 30,
                               null_score_diff_threshold: float = 0.0, context_column: str = "context",
                               return_scores: bool = False, nbest: dict | None = None):
    """Map per-feature ``(start_logits, end_logits)`` to one answer text per example id.

    ``examples``: rows with ``id`` and the context; ``features``: rows with ``example_id`` and ``offset_mapping``
    (``None`` outside the context), in the order of ``predictions``. Returns ``{id: text}`` (``""`` = no answer,
    v2 only), and with ``return_scores`` also ``{id: null score - best span score}`` (v2's no-answer evidence).
    ``nbest`` (a dict) receives ``{id: [{"text", "score", "start_logit", "end_logit", "probability"}, ...]}``, the
    n-best list ``run_qa.py`` writes to ``eval_nbest_predictions.json``."""
    start_all, end_all = predictions
    if len(start_all) != len(features):
        raise ValueError(f"got {len(start_all)} predictions for {len(features)} features; predictions must be one "
                         "per feature, in feature order.")
    features_per_example = collections.defaultdict(list)
    example_ids = features["example_id"] if hasattr(features, "column_names") else [f["example_id"] for f in features]
    offsets_all = features["offset_mapping"] if hasattr(features, "column_names") else \
        [f["offset_mapping"] for f in features]
    for i, eid in enumerate(example_ids):
        features_per_example[eid].append(i)
    answers, score_diff = collections.OrderedDict(), {}
    for example in examples:
        context = example[context_column]
        min_null = None
        candidates = []
        for fi in features_per_example[example["id"]]:
            start_logits, end_logits = start_all[fi], end_all[fi]
            offsets = offsets_all[fi]
            null = float(start_logits[0] + end_logits[0])
            if min_null is None or null < min_null:  # the least confident feature speaks for "no answer"
                min_null = null
            starts = np.argsort(start_logits)[-1:-n_best_size - 1:-1].tolist()
            ends = np.argsort(end_logits)[-1:-n_best_size - 1:-1].tolist()
            for s in starts:
                for e in ends:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None \
                            or len(offsets[s]) < 2 or len(offsets[e]) < 2:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    candidates.append((float(start_logits[s] + end_logits[e]), offsets[s][0], offsets[e][1],
                                       float(start_logits[s]), float(end_logits[e])))
        candidates.sort(key=lambda c: c[0], reverse=True)
        candidates = candidates[:n_best_size]
        best = candidates[0] if candidates else None
        if nbest is not None:
            scores = np.array([c[0] for c in candidates]) if candidates else np.zeros(0)
            probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum() if candidates else scores
            nbest[example["id"]] = [{"text": context[c[1]:c[2]], "score": c[0], "start_logit": c[3],
                                     "end_logit": c[4], "probability": float(pr)} for c, pr in zip(candidates, probs)]
        if not version_2_with_negative:
            answers[example["id"]] = context[best[1]:best[2]] if best is not None else ""
            continue
        best_score = best[0] if best is not None else -np.inf
        diff = (min_null if min_null is not None else 0.0) - best_score
        score_diff[example["id"]] = float(diff)
        answers[example["id"]] = "" if best is None or diff > null_score_diff_threshold else context[best[1]:best[2]]
    return (answers, score_diff) if return_scores else answers


class QuestionAnsweringTask:
    auto_class = AutoModelForQuestionAnswering

    def __init__(self, data_args: QADataArguments | None = None):
        self.args = data_args or QADataArguments()
        self.eval_examples = None

    def load_raw(self):
        default = "qa_v2" if self.args.version_2_with_negative else "qa"
        raw = load_raw_splits(self.args, default, field_name=self.args.data_field)
        for name, split in raw.items():
            missing = [c for c in ("id", self.args.question_column, self.args.context_column) if c not in
                       split.column_names]
            if missing:
                raise ValueError(f"{name} split has no {missing} columns (columns: {split.column_names}); QA data "
                                 "needs SQuAD-format rows: id, question, context, answers {text, answer_start}.")
        return raw

    def model_kwargs(self, raw) -> dict:
        return {}

    def prepare(self, tokenizer, raw, max_seq_length: int):
        a = self.args
        # --doc_stride defaults to 128 (for 384-token windows); shorter windows get a quarter of their length
        stride = max_seq_length // 4 if a.doc_stride >= max_seq_length - 2 else a.doc_stride
        cols = dict(question_column=a.question_column, context_column=a.context_column)
        train = raw["train"].map(prepare_train_features, batched=True, remove_columns=raw["train"].column_names,
                                 fn_kwargs=dict(tokenizer=tokenizer, max_seq_length=max_seq_length, doc_stride=stride,
                                                answer_column=a.answer_column, **cols),
                                 num_proc=a.preprocessing_num_workers, desc="train windows")
        self.eval_examples = raw["validation"]
        evald = raw["validation"].map(prepare_eval_features, batched=True,
                                      remove_columns=raw["validation"].column_names,
                                      fn_kwargs=dict(tokenizer=tokenizer, max_seq_length=max_seq_length,
                                                     doc_stride=stride, **cols),
                                      num_proc=a.preprocessing_num_workers, desc="eval windows")
        return train, evald

    def compute_metrics(self, eval_ds) -> Callable:
        """Closure over the eval features and examples: n-best post-processing, then EM/F1 (squad or squad_v2)."""
        if self.eval_examples is None:
            raise ValueError("call prepare() before compute_metrics(): post-processing needs the eval examples.")
        return qa_metrics(self.eval_examples, eval_ds, self.args, getattr(self, "output_dir", None))

    def predictions_to_json(self, predictions, dataset) -> dict:
        """``--do_predict``'s file: ``{id: answer text}`` of the predicted split (``prepare`` kept its examples)."""
        a = self.args
        return postprocess_qa_predictions(self.eval_examples, dataset, predictions, a.version_2_with_negative,
                                          a.n_best_size, a.max_answer_length, a.null_score_diff_threshold,
                                          a.context_column)


def qa_metrics(examples, features, args: QADataArguments, output_dir: str | None = None) -> Callable:
    """EM/F1 of the eval predictions; with ``output_dir``, also ``eval_predictions.json`` (``{id: text}``) and
    ``eval_nbest_predictions.json`` there, as ``run_qa.py`` writes them."""
    v2 = args.version_2_with_negative
    metric = load_metric("squad_v2" if v2 else "squad")
    answer_column = args.answer_column
    references = [{"id": ex["id"], "answers": {"text": list(ex[answer_column]["text"]),
                                               "answer_start": list(ex[answer_column]["answer_start"])}}
                  for ex in examples]
    columns = ["example_id", "offset_mapping"]
    features = features.select_columns(columns) if hasattr(features, "select_columns") else features
    examples = examples.select_columns(["id", args.context_column]) if hasattr(examples, "select_columns") else examples

    def compute(pred) -> dict:
        preds = pred.predictions
        if not isinstance(preds, (tuple, list)) or len(preds) != 2:
            raise ValueError("QA predictions must be (start_logits, end_logits).")
        nbest: dict = {}
        answers, diffs = postprocess_qa_predictions(
            examples, features, preds, version_2_with_negative=v2, n_best_size=args.n_best_size,
            max_answer_length=args.max_answer_length, null_score_diff_threshold=args.null_score_diff_threshold,
            context_column=args.context_column, return_scores=True, nbest=nbest)
        if output_dir:  # the one rank that computes metrics writes them (json is rewritten, never half-written)
            os.makedirs(output_dir, exist_ok=True)
            for name, obj in (("eval_predictions.json", answers), ("eval_nbest_predictions.json", nbest)):
                tmp = os.path.join(output_dir, f".{name}.tmp")
                with open(tmp, "w") as f:
                    json.dump(obj, f, indent=2)
                os.replace(tmp, os.path.join(output_dir, name))
        if v2:
            formatted = [{"id": k, "prediction_text": v, "no_answer_probability": 0.0} for k, v in answers.items()]
        else:
            formatted = [{"id": k, "prediction_text": v} for k, v in answers.items()]
        return metric.compute(predictions=formatted, references=references)

    return compute
