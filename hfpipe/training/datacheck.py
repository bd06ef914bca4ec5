"""Tokenised data checked against the model before the first step.

A token id >= the vocabulary, a class label >= ``num_labels`` or a sequence longer than the model's positions fails
deep inside a forward as an index error (on a GPU, as a device-side assert that names nothing), on one stage, after
the pipeline has started; an empty split trains zero steps. Each is found here from the columns alone (a vectorised
pass with numpy over what the collator will read), with one line naming the split, the column, the offending value
and the fix. Hand-written because neither ``datasets`` nor transformers checks data against a model config.
"""

from __future__ import annotations

import numpy as np

#: labels the losses ignore (HF's ``ignore_index``)
IGNORE = -100


class DataError(ValueError):
    """Data that the model cannot take; the message names the split, the column, the value and the fix."""


def _column(dataset, name):
    if hasattr(dataset, "column_names"):
        return dataset[name] if name in dataset.column_names else None
    rows = list(dataset)
    return [r[name] for r in rows] if rows and name in rows[0] else None


def _flat(values) -> np.ndarray:
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    if np.ndim(values[0]) == 0:
        return np.asarray(values)
    return np.concatenate([np.asarray(v).reshape(-1) for v in values]) if len(values) else np.zeros(0)


def position_limit(model) -> int | None:
    """The longest input ``model`` (an HF model, e.g. the meta model) can take: its ``max_position_embeddings``
    when it has a learned or fixed position table (an ``nn.Embedding`` named ``*position*``: BERT, GPT-2, OPT,
    BART...); ``None`` for rotary or relative positions (Llama, T5), which have no table to index past."""
    import torch.nn as nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and "position" in name.rsplit(".", 1)[-1]:
            return getattr(model.config, "max_position_embeddings", None)
    return None


def check_dataset(dataset, config, *, split: str, num_labels: int | None = None, label_column: str = "labels",
                  max_positions: int | None = None) -> None:
    """Raise :class:`DataError` when ``dataset`` (tokenised: ``input_ids`` and optional labels) cannot feed the
    model of ``config``: no examples, token ids outside the vocabulary, sequences longer than ``max_positions``
    (:func:`position_limit`), class labels outside ``[0, num_labels)`` (``IGNORE`` allowed; ``num_labels`` None:
    not a classification head)."""
    if dataset is None:
        return
    if len(dataset) == 0:
        raise DataError(f"the {split} split has no examples; check --{split}_file / the dataset (a header-only CSV "
                        "has none) or leave the split out.")
    ids = _column(dataset, "input_ids")
    if ids is not None:
        lengths = np.asarray([len(x) for x in ids])
        flat = _flat(ids)
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and flat.size and (flat.max() >= vocab or flat.min() < 0):
            bad = int(flat.max() if flat.max() >= vocab else flat.min())
            row = next(r for r, x in enumerate(ids) if bad in list(x))
            raise DataError(f"{split} example {row}: token id {bad} is outside the model's vocabulary "
                            f"(vocab_size={vocab}); tokenise with the model's own tokenizer (or resize the "
                            "embeddings after adding tokens).")
        if max_positions and lengths.size and lengths.max() > max_positions:
            row = int(lengths.argmax())
            raise DataError(f"{split} example {row} has {int(lengths.max())} tokens, more than the model's "
                            f"{max_positions} positions (max_position_embeddings); truncate when tokenising "
                            "(truncation=True) or lower --max_seq_length.")
    if num_labels is not None:
        labels = _column(dataset, label_column)
        if labels is not None:
            flat = _flat(labels)
            flat = flat[flat != IGNORE] if flat.size else flat
            if flat.size and np.issubdtype(flat.dtype, np.integer) and (flat.min() < 0 or flat.max() >= num_labels):
                bad = int(flat.max() if flat.max() >= num_labels else flat.min())
                raise DataError(f"{split} split: label {bad} in column {label_column!r} is outside the "
                                f"{num_labels} classes of the model's head (0..{num_labels - 1}, or {IGNORE} to "
                                "ignore); set --num_labels / the label list to cover every class, or fix the data.")
