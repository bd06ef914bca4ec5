"""Which examples each optimizer step trains on, and how rows become the pipeline's fixed-shape batches.

The one idea: **every rank can compute every global batch**. The sampler is a pure function of ``(seed, epoch,
step)``, so each rank derives the same global batch, takes its data-parallel slice (keyed on the engine's DP rank,
not the global rank), and the loss normaliser (label tokens of the *whole* global batch,
``hfpipe.core.batches.micro_batches``) is the same on every replica -- which also makes the data position a function
of the step, so resuming is exact. Every batch has the first batch's shape: the pipeline reuses buffers sized for it.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


def epoch_order(num_examples: int, seed: int, epoch: int, strategy: str = "random") -> list[int]:
    """The example order of ``epoch``: a permutation seeded by ``seed + epoch`` (identical on every rank)."""
    if strategy == "sequential":
        return list(range(num_examples))
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=g).tolist()


class GlobalBatches:
    """The example indices of the global batch of every optimizer step, as a function of the step alone."""

    def __init__(self, num_examples: int, global_batch_size: int, seed: int, strategy: str = "random"):
        self.num_examples, self.global_batch_size = num_examples, global_batch_size
        self.seed, self.strategy = seed, strategy
        self.steps_per_epoch = num_examples // global_batch_size
        self._cache: dict[int, list[int]] = {}  # the current epoch's order only

    def __call__(self, step: int) -> list[int]:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: epoch_order(self.num_examples, self.seed, epoch, self.strategy)}
        return self._cache[epoch][b * self.global_batch_size:(b + 1) * self.global_batch_size]


class FixedLengthCollator:
    """Pads ``input_ids``/``attention_mask``/``token_type_ids`` (and token-level labels, with -100) to
    ``max_length`` and stacks with ``transformers.default_data_collator``; longer rows are an error."""

    def __init__(self, max_length: int, pad_token_id: int = 0, token_level_labels: tuple[str, ...] = ()):
        self.max_length = max_length
        self.pad = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        self.pad.update({k: -100 for k in token_level_labels})

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        from transformers import default_data_collator

        out = []
        for f in features:
            f = dict(f)
            for key, value in self.pad.items():
                seq = f.get(key)
                if seq is None or not hasattr(seq, "__len__"):
                    continue
                seq = seq.tolist() if hasattr(seq, "tolist") else list(seq)
                if len(seq) > self.max_length:
                    raise ValueError(f"{key} has {len(seq)} tokens > max_seq_length={self.max_length}; truncate when "
                                     f"tokenizing (truncation=True, max_length={self.max_length}) or raise "
                                     "--max_seq_length.")
                f[key] = seq + [value] * (self.max_length - len(seq))
            out.append(f)
        return default_data_collator(out)


class Collate:
    """Dataset rows -> one batch dict of the pipeline's columns, every batch of one shape."""

    def __init__(self, pipe, collator: Callable):
        self.pipe, self.collator = pipe, collator
        self.shape = None

    def columns(self, dataset, with_labels: bool) -> list[str]:
        names = list(self.pipe.input_names) + (list(self.pipe.label_names) if with_labels else [])
        if with_labels and "labels" in names:
            names += ["label", "label_ids"]  # default_data_collator renames both to "labels"
        cols = getattr(dataset, "column_names", None)
        return [n for n in names if cols is None or n in cols]

    def __call__(self, dataset, indices, with_labels: bool = True) -> dict[str, torch.Tensor]:
        cols = self.columns(dataset, with_labels)
        batch = self.collator([{k: v for k, v in dataset[int(i)].items() if k in cols} for i in indices])
        if "label" in batch and "labels" not in batch:
            batch["labels"] = batch.pop("label")
        shape = tuple(batch["input_ids"].shape[1:])
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise ValueError(f"batch shape {shape} differs from the first batch's {self.shape}; the pipeline reuses "
                             "buffers sized for the first shape -- pad every batch to --max_seq_length (the default "
                             "collator does).")
        return batch

    @contextlib.contextmanager
    def own_shape(self):
        """Batches of another shape inside (evaluation micro-batches may differ from training's); the training shape
        is restored afterwards."""
        saved, self.shape = self.shape, None
        try:
            yield
        finally:
            self.shape = saved


def input_tensor(batch: dict, name: str, input_names) -> torch.Tensor:
    """Input ``name`` of ``batch``; a missing attention mask / token type ids are all ones / zeros."""
    if name in batch:
        return batch[name]
    if name == "attention_mask":
        return torch.ones_like(batch["input_ids"])
    if name == "token_type_ids":
        return torch.zeros_like(batch["input_ids"])
    raise KeyError(f"the eval batch has no {name!r}; the pipeline's first stage needs {input_names}.")
