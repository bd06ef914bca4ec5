"""Token classification (NER): word-level tags aligned to sub-word tokens, scored with seqeval.

Data has a list of words (``tokens``/``words``) and a list of tags per example (``ner_tags``/``tags``/``labels``;
strings or a ``Sequence(ClassLabel)``). The fast tokenizer's ``word_ids()`` says which word each sub-token came
from; by default only a word's first sub-token carries its tag and the rest get -100 (ignored by the loss and the
metric), with ``--label_all_tokens`` every sub-token does (a ``B-`` tag continues as ``I-``), as in transformers'
``run_ner.py``. Special tokens and padding are always -100. seqeval scores entity spans (precision, recall, F1)
plus token accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from transformers import AutoModelForTokenClassification

from hfpipe.tasks.base import TaskDataArguments, load_metric, load_raw_splits

WORD_COLUMNS = ("tokens", "words")
TAG_COLUMNS = ("ner_tags", "tags", "labels", "label")


@dataclass
class NERDataArguments(TaskDataArguments):
    text_column: str | None = field(default=None, metadata={"help": "Column with the list of words (default "
                                    "tokens/words)."})
    label_column: str | None = field(default=None, metadata={"help": "Column with the list of tags (default "
                                     "ner_tags/tags/labels)."})
    label_all_tokens: bool = field(default=False, metadata={"help": "Tag every sub-token of a word, not only the "
                                   "first (B- continues as I-)."})
    return_entity_level_metrics: bool = field(default=False, metadata={"help": "Also report per-entity-type "
                                              "precision/recall/F1."})


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int], label_all_tokens: bool = False,
                 b_to_i: Sequence[int] | None = None) -> list[int]:
    """Token labels from word labels: -100 for special/padding tokens, the word's label on its first sub-token, and
    on later sub-tokens -100 (or, with ``label_all_tokens``, the label mapped by ``b_to_i``: B-X -> I-X)."""
    out, previous = [], None
    for w in word_ids:
        if w is None:
            out.append(-100)
        elif w != previous:
            out.append(int(word_labels[w]))
        else:
            lab = int(word_labels[w])
            out.append((b_to_i[lab] if b_to_i is not None else lab) if label_all_tokens else -100)
        previous = w
    return out


def b_to_i_map(label_list: Sequence[str]) -> list[int]:
    """Index of ``I-X`` for each ``B-X`` (identity for every other label)."""
    out = []
    for i, name in enumerate(label_list):
        partner = "I-" + name[2:] if name.startswith("B-") else None
        out.append(label_list.index(partner) if partner in label_list else i)
    return out


class TokenClassificationTask:
    auto_class = AutoModelForTokenClassification

    def __init__(self, data_args: NERDataArguments | None = None):
        self.args = data_args or NERDataArguments()
        self.label_list: list[str] | None = None

    def load_raw(self):
        return load_raw_splits(self.args, "ner")

    def _inspect(self, raw) -> None:
        import datasets

        split = raw["train"] if "train" in raw else raw["validation"]
        cols = split.column_names
        self.words = self.args.text_column or next((c for c in WORD_COLUMNS if c in cols), None)
        self.tags = self.args.label_column or next((c for c in TAG_COLUMNS if c in cols), None)
        if self.words not in cols or self.tags not in cols:
            raise ValueError(f"NER data needs a words column and a tags column; found {cols}; name them with "
                             "--text_column and --label_column.")
        feature = split.features[self.tags]
        inner = getattr(feature, "feature", None)
        if isinstance(inner, datasets.ClassLabel):
            self.label_list, self.tags_are_ids = list(inner.names), True
        else:
            seen = {t for s in raw.values() if self.tags in s.column_names for row in s[self.tags] for t in row}
            if all(isinstance(t, str) for t in seen):
                # O first, then each entity type's B- before its I-
                self.label_list = sorted(seen, key=lambda t: (t != "O", t[2:], t[:2]))
                self.tags_are_ids = False
            else:
                raise ValueError(f"--label_column {self.tags!r} holds integer tags without names; give the tags as "
                                 "strings (B-PER, I-PER, O, ...) or as a Sequence(ClassLabel) feature.")

    def model_kwargs(self, raw) -> dict:
        self._inspect(raw)
        return {"num_labels": len(self.label_list), "id2label": dict(enumerate(self.label_list)),
                "label2id": {n: i for i, n in enumerate(self.label_list)}}

    def encode(self, tokenizer, dataset, max_seq_length: int):
        if self.label_list is None:
            self._inspect({"train": dataset})
        index = {n: i for i, n in enumerate(self.label_list)}
        b_to_i = b_to_i_map(self.label_list)

        def fn(batch):
            enc = tokenizer(batch[self.words], is_split_into_words=True, truncation=True, max_length=max_seq_length,
                            padding="max_length")
            labels = []
            for i, tags in enumerate(batch[self.tags]):
                ids = tags if self.tags_are_ids else [index[t] for t in tags]
                labels.append(align_labels(enc.word_ids(i), ids, self.args.label_all_tokens, b_to_i))
            enc["labels"] = labels
            return enc

        return dataset.map(fn, batched=True, remove_columns=dataset.column_names,
                           num_proc=self.args.preprocessing_num_workers, desc="tokenize")

    def prepare(self, tokenizer, raw, max_seq_length: int):
        if self.label_list is None:
            self._inspect(raw)
        return self.encode(tokenizer, raw["train"], max_seq_length), \
            self.encode(tokenizer, raw["validation"], max_seq_length)

    def predictions_to_json(self, predictions, dataset) -> list:
        """``--do_predict``'s file: the tag of each labelled (first sub-token) position of each example."""
        logits = predictions[0] if isinstance(predictions, tuple) else predictions
        ids = np.argmax(logits, axis=-1)
        cols = getattr(dataset, "column_names", [])
        keep = dataset["labels"] if "labels" in cols else dataset["attention_mask"]
        return [[self.label_list[p] for p, k in zip(row, mask) if (k != -100 if "labels" in cols else k)]
                for row, mask in zip(ids.tolist(), keep)]

    def compute_metrics(self, eval_ds=None) -> Callable:
        return ner_metrics(self.label_list, self.args.return_entity_level_metrics)


def ner_metrics(label_list: Sequence[str], entity_level: bool = False) -> Callable:
    """``compute_metrics(EvalPrediction)``: argmax per token, positions with label -100 dropped, seqeval."""
    seqeval = load_metric("seqeval")

    def compute(pred) -> dict:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        predictions = np.argmax(logits, axis=-1)
        labels = np.asarray(pred.label_ids)
        true_p = [[label_list[p] for p, lab in zip(row_p, row_l) if lab != -100]
                  for row_p, row_l in zip(predictions, labels)]
        true_l = [[label_list[lab] for lab in row_l if lab != -100] for row_l in labels]
        res = seqeval.compute(predictions=true_p, references=true_l, zero_division=0)
        out = {"precision": res["overall_precision"], "recall": res["overall_recall"], "f1": res["overall_f1"],
               "accuracy": res["overall_accuracy"]}
        if entity_level:
            for kind, vals in res.items():
                if isinstance(vals, dict):
                    out.update({f"{kind}_{k}": v for k, v in vals.items() if k != "number"})
        return out

    return compute
