"""Sequence classification: single sentences or sentence pairs, classification or regression.

The task reads which columns hold text (``sentence``; ``sentence1/sentence2``, ``premise/hypothesis``,
``question/sentence``, ... or ``--text_column/--text_pair_column``) and what the label is: strings or a ``ClassLabel``
give classes (``id2label`` saved into the exported config), integers give ``max + 1`` classes, floats give
regression (``num_labels == 1``, ``problem_type="regression"``: transformers' MSE loss). Metrics: accuracy and F1
(binary, or macro over >2 classes) from the package's local ``evaluate`` modules; MSE, Pearson and Spearman for
regression.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from transformers import AutoModelForSequenceClassification

from hfpipe.tasks.base import TaskDataArguments, load_metric, load_raw_splits

PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "sentence"),
                ("question1", "question2"), ("text_a", "text_b"))
SINGLE_COLUMNS = ("sentence", "text", "content", "review")
LABEL_COLUMNS = ("label", "labels", "score")


@dataclass
class ClassificationDataArguments(TaskDataArguments):
    text_column: str | None = field(default=None, metadata={"help": "Column of the (first) text; default: found "
                                    "among sentence1/premise/question/sentence/text/..."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Column of the second text of a pair; "
                                         "default: the partner of a known pair (sentence2, hypothesis, ...)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column; default label/labels/score."})
    regression: bool | None = field(default=None, metadata={"help": "Force regression (num_labels=1); default: "
                                    "when the labels are floats."})


def find_columns(columns, text: str | None = None, pair: str | None = None, label: str | None = None):
    """``(text, pair or None, label)`` column names of a dataset with ``columns``."""
    columns = list(columns)
    for given, what in ((text, "--text_column"), (pair, "--text_pair_column"), (label, "--label_column")):
        if given is not None and given not in columns:
            raise ValueError(f"{what} {given!r} is not a column of the data; columns: {columns}.")
    if text is None:
        for a, b in PAIR_COLUMNS:
            if a in columns and b in columns:
                text, pair = a, pair or b
                break
        else:
            text = next((c for c in SINGLE_COLUMNS if c in columns), None)
    if text is None:
        raise ValueError(f"no text column among {columns}; name it with --text_column (and --text_pair_column for "
                         "sentence pairs).")
    if label is None:
        label = next((c for c in LABEL_COLUMNS if c in columns), None)
    return text, pair, label


class SequenceClassificationTask:
    auto_class = AutoModelForSequenceClassification

    def __init__(self, data_args: ClassificationDataArguments | None = None):
        self.args = data_args or ClassificationDataArguments()
        self.label_list: list | None = None
        self.is_regression = False

    def load_raw(self):
        return load_raw_splits(self.args, "classification")

    def _inspect(self, raw) -> None:
        import datasets

        split = raw["train"] if "train" in raw else raw["validation"]
        self.text, self.pair, self.label = find_columns(split.column_names, self.args.text_column,
                                                        self.args.text_pair_column, self.args.label_column)
        if self.label is None:
            raise ValueError(f"no label column among {split.column_names}; name it with --label_column.")
        feature = split.features[self.label]
        if isinstance(feature, datasets.ClassLabel):
            self.label_list = list(feature.names)
        else:
            values = [v for s in raw.values() if self.label in s.column_names for v in s[self.label]]
            is_float = feature.dtype.startswith("float")
            self.is_regression = self.args.regression if self.args.regression is not None else is_float
            if self.is_regression:
                self.label_list = None
            elif isinstance(values[0], str):
                self.label_list = sorted(set(values))
            else:
                self.label_list = list(range(int(max(values)) + 1))

    def model_kwargs(self, raw) -> dict:
        self._inspect(raw)
        if self.is_regression:
            return {"num_labels": 1, "problem_type": "regression"}
        names = [str(x) for x in self.label_list]
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)}, "problem_type": "single_label_classification"}

    def encode(self, tokenizer, dataset, max_seq_length: int):
        """Tokenize (pairs as ``[CLS] a [SEP] b [SEP]``), pad to ``max_seq_length``, labels as ids (or floats)."""
        import datasets

        if not hasattr(self, "text"):
            self._inspect({"train": dataset})
        strings = self.label_list is not None and isinstance(self.label_list[0], str) and \
            not isinstance(dataset.features.get(self.label), datasets.ClassLabel)
        index = {v: i for i, v in enumerate(self.label_list)} if strings else None

        def fn(batch):
            second = batch[self.pair] if self.pair else None
            enc = tokenizer(batch[self.text], second, truncation=True, max_length=max_seq_length,
                            padding="max_length")
            if self.label in batch:
                if self.is_regression:
                    enc["labels"] = [float(v) for v in batch[self.label]]
                else:
                    enc["labels"] = [int(v) if index is None else index[v] for v in batch[self.label]]
            return enc

        return dataset.map(fn, batched=True, remove_columns=dataset.column_names,
                           num_proc=self.args.preprocessing_num_workers, desc="tokenize")

    def prepare(self, tokenizer, raw, max_seq_length: int):
        if not hasattr(self, "text"):
            self._inspect(raw)
        return self.encode(tokenizer, raw["train"], max_seq_length), \
            self.encode(tokenizer, raw["validation"], max_seq_length)

    def predictions_to_json(self, predictions, dataset) -> list:
        """``--do_predict``'s file: one label name (a float for regression) per example."""
        logits = predictions[0] if isinstance(predictions, tuple) else predictions
        if self.is_regression:
            return [float(v) for v in np.asarray(logits).reshape(-1)]
        return [str(self.label_list[i]) for i in np.argmax(logits, axis=-1)]

    def compute_metrics(self, eval_ds=None) -> Callable:
        return classification_metrics(self.is_regression, None if self.label_list is None else len(self.label_list))


def classification_metrics(is_regression: bool, num_labels: int | None) -> Callable:
    """``compute_metrics(EvalPrediction)``: accuracy + F1 (binary for 2 classes, else macro), or MSE/Pearson/Spearman."""
    if is_regression:
        def regression(pred) -> dict:
            from scipy.stats import pearsonr, spearmanr

            p = np.asarray(pred.predictions, dtype=np.float64).reshape(-1)
            y = np.asarray(pred.label_ids, dtype=np.float64).reshape(-1)
            return {"mse": float(np.mean((p - y) ** 2)), "pearson": float(pearsonr(p, y)[0]),
                    "spearmanr": float(spearmanr(p, y)[0])}
        return regression

    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def classify(pred) -> dict:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        p = np.argmax(logits, axis=-1)
        y = np.asarray(pred.label_ids).reshape(-1)
        out = accuracy.compute(predictions=p, references=y)
        average = "binary" if num_labels == 2 else "macro"
        out.update(f1.compute(predictions=p, references=y, average=average))
        return out

    return classify
