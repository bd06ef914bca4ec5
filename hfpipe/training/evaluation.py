"""Evaluation and prediction over a ``PipelineEngine``: exactly one prediction per example, metrics computed once.

The loop runs ``eval_batch(compute_loss=False, reduce_output=None)`` over the whole eval set; the last global batch is
filled with repeated examples whose outputs are dropped, the last stage of each replica keeps ``(example index,
prediction)`` pairs, they are gathered over the last stage's data-parallel group and sorted, and
``compute_metrics`` runs once on one rank with exactly one prediction per example; metrics are broadcast. The eval
loss is summed per item (label tokens, or examples) so that it is the mean over the whole eval set.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

import numpy as np
import torch

from hfpipe.training.data import input_tensor


def prediction_loop(trainer, dataset, prefix: str, share_predictions: bool):
    """``PredictionOutput`` of ``trainer`` (a ``PipelineTrainer``) over ``dataset``, identical on every rank;
    predictions and label ids only with ``share_predictions`` (``predict``), metrics always."""
    from transformers.trainer_utils import PredictionOutput

    cols = getattr(dataset, "column_names", None)
    has_labels = cols is None or all(name in cols or (name == "labels" and ("label" in cols or "label_ids" in cols))
                                     for name in trainer.pipe.label_names)
    t0 = time.perf_counter()
    engine = trainer.engine
    engine.reset_activation_shape()  # eval micro-batches may differ from training's
    try:
        with trainer.collate.own_shape():
            local, loss_sum, loss_count = _local_predictions(trainer, dataset, has_labels)
    finally:
        engine.reset_activation_shape()
    metrics, shared = _gather(trainer, dataset, prefix, has_labels, (local, loss_sum, loss_count), t0,
                              share_predictions)
    preds, label_ids = shared if shared is not None else (None, None)
    return PredictionOutput(predictions=preds, label_ids=label_ids, metrics=metrics)


def _local_predictions(trainer, dataset, has_labels: bool) -> tuple[list[tuple[int, Any]], float, float]:
    """This replica's ``(example index, prediction)`` pairs and eval-loss terms (on its last stage; empty elsewhere)."""
    engine, pipe, args = trainer.engine, trainer.pipe, trainer.args
    n = len(dataset)
    mb, m = args.per_device_eval_batch_size, trainer.num_micro_batches
    per_rank = mb * m
    g = per_rank * trainer.dp
    generate = args.predict_with_generate and trainer.generation_fn is not None
    local: list[tuple[int, Any]] = []
    loss_sum, loss_count = 0.0, 0.0
    for r in range(math.ceil(n / g)):
        idx = [r * g + trainer.dp_rank * per_rank + k for k in range(per_rank)]
        rows = [i % n for i in idx]
        if generate:
            ids = _generate(trainer, trainer.collate(dataset, rows, with_labels=has_labels))
            if engine.is_last_stage():
                local.extend((i, ids[k].numpy()) for k, i in enumerate(idx) if i < n)
            continue
        data = None
        if trainer.needs_data:
            batch = trainer.collate(dataset, rows, with_labels=has_labels)
            data = []
            for j in range(m):
                sl = slice(j * mb, (j + 1) * mb)
                inputs = tuple(input_tensor(batch, name, pipe.input_names)[sl] for name in pipe.input_names)
                labels = tuple(batch[name][sl] for name in pipe.label_names) if has_labels else (torch.zeros(1),)
                data.append((inputs, labels))
        engine.total_loss = None  # train_batch leaves a scalar here that eval outputs cannot be added to
        outs = engine.eval_batch(iter(data) if data is not None else None, compute_loss=False,
                                 reduce_output=None, num_micro_batches=m)
        if not engine.is_last_stage():
            continue
        for j, out in enumerate(outs):
            mine = idx[j * mb:(j + 1) * mb]
            valid = [k for k, i in enumerate(mine) if i < n]
            if not valid:
                continue
            vt = torch.tensor(valid)
            out_v = tuple(o[vt] for o in out) if isinstance(out, (tuple, list)) else out[vt]
            lab = tuple(t[vt] for t in data[j][1]) if has_labels else None
            if has_labels:
                s_, c_ = eval_loss_terms(pipe, out_v, lab)
                loss_sum, loss_count = loss_sum + s_, loss_count + c_
            if trainer.preprocess_logits_for_metrics is not None:
                out_v = trainer.preprocess_logits_for_metrics(out_v, lab[0] if lab and len(lab) == 1 else lab)
            arrays = tuple(_np(o) for o in out_v) if isinstance(out_v, (tuple, list)) else _np(out_v)
            for k, i in enumerate(mine[v] for v in valid):
                local.append((i, tuple(a[k] for a in arrays) if isinstance(arrays, tuple) else arrays[k]))
    return local, loss_sum, loss_count


def _gather(trainer, dataset, prefix: str, has_labels: bool, mine: tuple, t0: float, share_predictions: bool):
    """Gather every replica's pairs on one last-stage rank, compute the metrics there once, broadcast them."""
    import torch.distributed as dist
    from transformers import EvalPrediction

    engine, pipe, n = trainer.engine, trainer.pipe, len(dataset)
    # the stage that holds the outputs: the last, or rank 0 under dualpipev (its V ends where it starts)
    src = pipe._topo.get_rank(pipe=0 if getattr(pipe, "v_shape", False) else trainer.num_stages - 1, data=0)
    payload = None
    if engine.is_last_stage():
        parts = [mine]
        if trainer.dp > 1:
            parts = [None] * trainer.dp
            dist.all_gather_object(parts, mine, group=engine.grid.get_data_parallel_group())
        if trainer.rank == src:
            pairs = sorted((p for part in parts for p in part[0]), key=lambda x: x[0])
            got = [i for i, _ in pairs]
            if got != list(range(n)):
                raise RuntimeError(f"evaluation gathered {len(got)} predictions for {n} examples (duplicates or "
                                   "gaps); this is a bug in hfpipe.training.evaluation.")
            preds = _stack([p for _, p in pairs])
            label_ids = label_arrays(dataset, pipe.label_names) if has_labels else None
            metrics = {}
            total_count = sum(part[2] for part in parts)
            if total_count:
                metrics["loss"] = sum(part[1] for part in parts) / total_count
            if trainer.compute_metrics is not None:
                metrics.update(trainer.compute_metrics(EvalPrediction(predictions=preds, label_ids=label_ids)))
            runtime = time.perf_counter() - t0
            metrics.update({"runtime": runtime, "samples_per_second": n / max(runtime, 1e-9)})
            metrics = {(k if k.startswith(f"{prefix}_") else f"{prefix}_{k}"): _plain(v) for k, v in metrics.items()}
            payload = (metrics, (preds, label_ids) if share_predictions else None)
    box = [payload]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def eval_loss_terms(pipe, outputs, labels) -> tuple[float, float]:
    """(loss sum, item count) of one micro-batch: token-level heads sum over label tokens (the eval loss is the
    mean over every label token of the eval set, as HF's over one batch holding it all); example-level heads
    (classification, QA) weight the micro-batch mean by its examples."""
    head = pipe.head
    if head.per_token_labels:
        total = float(pipe.loss_fn(outputs, labels + (torch.tensor(1.0),)).float())
        return total, float(head.count_items(labels))
    n = labels[0].shape[0]
    return float(pipe.loss_fn(outputs, labels).float()) * n, float(n)


def _generate(trainer, batch):
    kwargs = {}
    if "max_new_tokens" in inspect.signature(trainer.generation_fn).parameters:
        kwargs["max_new_tokens"] = trainer.args.generation_max_length
    return trainer.generation_fn(trainer.engine, batch, **kwargs).detach().cpu()


def label_arrays(dataset, names):
    """The label columns ``names`` of ``dataset`` as numpy arrays (one array, or a tuple for several)."""
    arrays = []
    cols = getattr(dataset, "column_names", None) or []
    for name in names:
        if name == "labels" and name not in cols:
            name = "label" if "label" in cols else "label_ids" if "label_ids" in cols else name
        col = dataset[name] if hasattr(dataset, "column_names") else [dataset[i][name] for i in range(len(dataset))]
        arrays.append(np.asarray(col))
    return arrays[0] if len(arrays) == 1 else tuple(arrays)


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


def _stack(preds: list):
    if preds and isinstance(preds[0], tuple):
        return tuple(np.stack([p[i] for p in preds]) for i in range(len(preds[0])))
    return np.stack(preds)


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v
