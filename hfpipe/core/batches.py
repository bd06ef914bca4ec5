"""The batch format of an hfpipe pipeline, and splitting a global batch into micro-batches.

DeepSpeed feeds ``batch[0]`` to the first stage and ``batch[1]`` to the loss on the last stage. For hfpipe these
are ``inputs = (input_ids, attention_mask, *extra_inputs)`` (``pipe.input_names``; BERT adds ``token_type_ids``)
and ``labels = (*label_tensors, norm)`` (``pipe.label_names``: ``labels``, or ``start_positions, end_positions``
for QA). ``norm`` makes the loss of every micro-batch ``sum / norm`` so that DeepSpeed's average over micro-batches
and data-parallel replicas equals HF's mean over all label tokens of the global batch (see ``hfpipe.core.heads``).
"""

from __future__ import annotations

from typing import Mapping

import torch

from hfpipe.core.heads import HeadSpec, head_named


def micro_batches(batch: Mapping[str, torch.Tensor], pipe, num_micro_batches: int, dp_rank: int = 0,
                  dp_size: int = 1) -> list[tuple[tuple, tuple]]:
    """Split a *global* batch (dict of ``[B, ...]`` tensors) into this data-parallel rank's micro-batches.

    Rank ``r`` takes examples ``[r*B/dp, (r+1)*B/dp)``, cut into ``num_micro_batches`` equal micro-batches. The
    ``norm`` is computed over the whole global batch, so the pipeline loss equals ``model(**batch).loss``.
    """
    head, input_names = pipe.head, pipe.input_names
    ids = batch["input_ids"]
    total = ids.shape[0]
    if total % (dp_size * num_micro_batches):
        raise ValueError(
            f"global batch of {total} examples cannot be split into {dp_size} data-parallel replicas x "
            f"{num_micro_batches} micro-batches of equal size; use a batch size divisible by {dp_size * num_micro_batches}."
        )
    missing = [n for n in head.label_names if n not in batch]
    if missing:
        raise KeyError(f"batch has no {missing}; the {head.name} head needs {list(head.label_names)}.")
    full = pipe.adapter.complete_batch(dict(batch)) if hasattr(pipe, "adapter") else dict(batch)
    full.setdefault("attention_mask", torch.ones_like(ids))
    if "token_type_ids" in input_names:
        full.setdefault("token_type_ids", torch.zeros_like(ids))
    labels = tuple(full[n] for n in head.label_names)
    norm = None
    if head.token_level:
        norm = head.count_items(labels, seq_len=ids.shape[1]) / float(num_micro_batches * dp_size)
    per_rank = total // dp_size
    mb = per_rank // num_micro_batches
    out = []
    for m in range(num_micro_batches):
        lo = dp_rank * per_rank + m * mb
        sl = slice(lo, lo + mb)
        inputs = tuple(full[n][sl] for n in input_names)
        lab = tuple(t[sl] for t in labels)
        if norm is not None:
            lab = lab + (norm.clone(),)
        out.append((inputs, lab))
    return out


def make_batch(config, head: HeadSpec | str, batch_size: int = 4, seq_len: int = 16, seed: int = 0,
               padding: str = "right") -> dict[str, torch.Tensor]:
    """A random padded batch with labels for ``head`` (or its name); lengths vary per example (``padding``:
    right|left). Used by ``hfpipe verify``, the profiler and the tests."""
    head = head_named(head)
    g = torch.Generator().manual_seed(seed)
    vocab = config.vocab_size
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.randint(1, vocab, (batch_size, seq_len), generator=g)
    ids[ids == pad] = (pad + 1) % vocab
    lengths = [max(2, seq_len - (i * 3) % max(1, seq_len // 2)) for i in range(batch_size)]
    mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        if padding == "left":
            mask[i, seq_len - n:] = 1
        else:
            mask[i, :n] = 1
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    return {"input_ids": ids, "attention_mask": mask, **head.random_labels(config, ids, mask, lengths, g, padding)}
