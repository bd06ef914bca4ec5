"""``PipelineTrainer``: HF-Trainer-shaped training and evaluation over a DeepSpeed ``PipelineEngine``.

Neither ``transformers.Trainer`` nor Accelerate can drive a ``PipelineEngine`` (it consumes whole batches through
``train_batch``/``eval_batch`` and only its first and last stages see data), so this loop does it itself. The one
idea: **every rank can compute every global batch**. The sampler is a pure function of ``(seed, epoch, step)``, so
each rank derives the same global batch, takes its data-parallel slice (keyed on the engine's DP rank, not the
global rank), and the loss normaliser (label tokens of the *whole* global batch, ``hfpipe.data.micro_batches``) is
the same on every replica -- which also makes the data position a function of the step, so resuming is exact.

Evaluation runs ``eval_batch(compute_loss=False, reduce_output=None)`` over the whole eval set; the last global
batch is filled with repeated examples whose outputs are dropped, the last stage of each replica keeps
``(example index, prediction)`` pairs, they are gathered over the last stage's data-parallel group and sorted, and
``compute_metrics`` runs once on one rank with exactly one prediction per example; metrics are broadcast.
"""

from __future__ import annotations

import glob
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from hfpipe.training.arguments import PipelineTrainingArguments
from hfpipe.training.callbacks import CallbackHandler, default_callbacks
from hfpipe.training.config import format_sources, resolve_ds_config

SEQ_KEYS = ("input_ids", "attention_mask", "token_type_ids")
STATE_FILE = "trainer_state.json"


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def epoch_order(num_examples: int, seed: int, epoch: int, strategy: str = "random") -> list[int]:
    """The example order of ``epoch``: a permutation seeded by ``seed + epoch`` (identical on every rank)."""
    if strategy == "sequential":
        return list(range(num_examples))
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=g).tolist()


def decay_parameter_groups(pipe, weight_decay: float) -> list[dict]:
    """HF Trainer's grouping: no weight decay on biases, LayerNorm modules and parameters named like norms."""
    patterns = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]
    hf_name = {id(p): n for n, p in pipe.hf_named_parameters()}
    no_decay_ids = set()
    for mod in pipe.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            no_decay_ids.update(id(p) for p in mod.parameters(recurse=False))
    decay, no_decay = [], []
    for local, p in pipe.named_parameters():
        name = hf_name.get(id(p), local).lower()
        if id(p) in no_decay_ids or any(pat.search(name) for pat in patterns):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


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


class PipelineTrainer:
    """Train, evaluate, checkpoint and export an HF model through a DeepSpeed pipeline.

    ``model``: an HF model instance, a folder / Hub id (weights read stage-locally), or a config with
    ``model_class=`` (e.g. ``AutoModelForSequenceClassification``). Datasets hold the pipeline's input columns
    (``pipe.input_names``) and label columns (``pipe.label_names``), already tokenized. Call every method on every
    rank.
    """

    def __init__(self, model, args: PipelineTrainingArguments | None = None, train_dataset=None, eval_dataset=None,
                 data_collator: Callable | None = None, compute_metrics: Callable | None = None,
                 processing_class=None, callbacks=None, model_class=None, generation_fn: Callable | None = None,
                 preprocess_logits_for_metrics: Callable | None = None):
        self.args = args = args if args is not None else PipelineTrainingArguments()
        rank, world = _world()
        argv = None if getattr(args, "_explicit_fields", None) is not None else sys.argv[1:]
        # validate and merge before any process group work
        self.ds_config, self.config_sources = resolve_ds_config(args, world, argv=argv)
        if args.push_to_hub and not args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id user/name (the Hub repo to create or update).")
        if self.ds_config["fp16"]["enabled"]:
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_fp16_supported():
                from hfpipe.training.config import ConfigError

                raise ConfigError(f"fp16 (from {self.config_sources.get('fp16')}) is not supported on the "
                                  f"{get_accelerator().device_name()} accelerator; use bf16 (ds_configs/"
                                  "bf16_zero1.json or --bf16) or fp32 here, fp16 on GPUs.")
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.compute_metrics, self.processing_class = compute_metrics, processing_class
        self.generation_fn, self.preprocess_logits_for_metrics = generation_fn, preprocess_logits_for_metrics
        from transformers import TrainerControl, TrainerState, set_seed

        set_seed(args.seed)
        pipe_cfg = self.ds_config["pipeline"]
        self.num_stages = pipe_cfg["stages"]
        self.pipe = self._build_pipe(model, model_class, pipe_cfg)
        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.dp = self.world_size // self.num_stages
        self.micro_batch_size = self.ds_config["train_micro_batch_size_per_gpu"]
        self.num_micro_batches = self.ds_config["gradient_accumulation_steps"]
        self.global_batch_size = self.ds_config["train_batch_size"]
        head = self.pipe.head
        token_labels = head.label_names if head.per_token_labels else ()
        pad_id = getattr(self.pipe.config, "pad_token_id", None)
        self.data_collator = data_collator or FixedLengthCollator(args.max_seq_length, pad_id or 0, token_labels)
        self.steps_per_epoch = (len(train_dataset) // self.global_batch_size) if train_dataset is not None else 0
        if train_dataset is not None and self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {len(train_dataset)} examples, fewer than one global batch of "
                             f"{self.global_batch_size} (micro batch {self.micro_batch_size} x "
                             f"{self.num_micro_batches} micro-batches x {self.dp} replicas); lower the batch size.")
        if args.max_steps > 0:
            self.max_steps = args.max_steps
        elif train_dataset is not None:
            self.max_steps = math.ceil(args.num_train_epochs * self.steps_per_epoch)
        else:
            self.max_steps = 0
        self.engine = self._initialize_engine()
        self.dp_rank = self.engine.grid.data_parallel_id
        self.state = TrainerState()
        self.state.max_steps = self.max_steps
        self.state.is_world_process_zero = self.rank == 0
        self.state.is_local_process_zero = int(os.environ.get("LOCAL_RANK", 0)) == 0
        self.state.logging_steps, self.state.save_steps = args.logging_steps, args.save_steps
        self.control = TrainerControl()
        self.callback_handler = CallbackHandler(default_callbacks(args.report_to) + list(callbacks or []))
        self._order_cache: dict[int, list[int]] = {}
        self._shape = None
        if self.rank == 0:
            print("hfpipe: merged DeepSpeed config (precedence: command line > Accelerate > DeepSpeed JSON > "
                  "defaults)\n" + format_sources(self.ds_config, self.config_sources), flush=True)
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "ds_config.json"), "w") as f:
                json.dump({"config": self.ds_config, "sources": self.config_sources}, f, indent=2, default=str)

    # ------------------------------------------------------------------------------------------------ set-up
    def _build_pipe(self, model, model_class, pipe_cfg):
        from hfpipe.pipeline import to_pipeline

        part = pipe_cfg["partition"]
        if isinstance(part, str) and part[:1].isdigit():
            part = [int(x) for x in part.split(",")]
        kwargs = dict(num_stages=pipe_cfg["stages"], partition_method=part, model_class=model_class,
                      activation_checkpoint_interval=pipe_cfg["activation_checkpoint_interval"], seed=self.args.seed,
                      seq_len=self.args.max_seq_length,
                      micro_batch_size=self.ds_config["train_micro_batch_size_per_gpu"],
                      loss_chunk_tokens=self.args.loss_chunk_tokens or None)
        return to_pipeline(model, **kwargs)  # a path or Hub id loads stage-locally (hfpipe.checkpoint)

    def _initialize_engine(self):
        from transformers import get_scheduler

        from hfpipe.pipeline import initialize

        args = self.args
        total = max(self.max_steps, 1)
        warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total)

        def scheduler(optimizer):
            return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                 num_training_steps=total)

        groups = decay_parameter_groups(self.pipe, self.ds_config["optimizer"]["params"]["weight_decay"])
        engine, *_ = initialize(self.pipe, self.ds_config, model_parameters=groups, lr_scheduler=scheduler)
        return engine

    # --------------------------------------------------------------------------------------------------- data
    @property
    def _needs_data(self) -> bool:
        return self.engine.is_first_stage() or self.engine.is_last_stage()

    def _columns(self, dataset, with_labels: bool) -> list[str]:
        names = list(self.pipe.input_names) + (list(self.pipe.label_names) if with_labels else [])
        if with_labels and "labels" in names:
            names += ["label", "label_ids"]  # default_data_collator renames both to "labels"
        cols = getattr(dataset, "column_names", None)
        return [n for n in names if cols is None or n in cols]

    def _collate(self, dataset, indices, with_labels=True) -> dict[str, torch.Tensor]:
        cols = self._columns(dataset, with_labels)
        features = [{k: v for k, v in dataset[int(i)].items() if k in cols} for i in indices]
        batch = self.data_collator(features)
        if "label" in batch and "labels" not in batch:
            batch["labels"] = batch.pop("label")
        shape = tuple(batch["input_ids"].shape[1:])
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise ValueError(f"batch shape {shape} differs from the first batch's {self._shape}; the pipeline reuses "
                             "buffers sized for the first shape -- pad every batch to --max_seq_length (the default "
                             "collator does).")
        return batch

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._order_cache:
            self._order_cache = {epoch: epoch_order(len(self.train_dataset), self.args.seed, epoch,
                                                    self.args.train_sampling_strategy)}
        return self._order_cache[epoch]

    def global_batch_indices(self, step: int) -> list[int]:
        """Example indices of the global batch of optimizer step ``step`` (0-based); the data position is a
        function of the step."""
        epoch, b = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        return order[b * self.global_batch_size:(b + 1) * self.global_batch_size]

    def _train_micro_batches(self, step: int):
        from hfpipe.core.batches import micro_batches

        if not self._needs_data:
            return None, 0
        batch = self._collate(self.train_dataset, self.global_batch_indices(step))
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return micro_batches(batch, self.pipe, self.num_micro_batches, self.dp_rank, self.dp), tokens

    # -------------------------------------------------------------------------------------------------- train
    def _call(self, event, **kwargs):
        self.control = self.callback_handler.call(event, self.args, self.state, self.control, **kwargs)
        return self.control

    def _log(self, logs: dict) -> None:
        logs = {k: (round(v, 6) if isinstance(v, float) and k in ("epoch",) else v) for k, v in logs.items()}
        logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self._call("on_log", logs=logs)

    def train(self, resume_from_checkpoint: str | None = None) -> dict:
        """Run to ``max_steps`` (or the epochs); returns ``{"global_step", "train_loss", ...}``."""
        args = self.args
        if self.train_dataset is None:
            raise ValueError("PipelineTrainer.train() needs train_dataset=.")
        resume = resume_from_checkpoint or args.resume_from_checkpoint
        start = 0
        if resume:
            start = self._load_checkpoint(self._find_checkpoint(resume))
        self.state.global_step = start
        self.state.epoch = start / self.steps_per_epoch
        self._call("on_train_begin")
        t_start = time.perf_counter()
        window, tokens_w, time_w, losses_all = [], 0, 0.0, []
        last_saved = start if resume else None
        last_eval = None
        metrics: dict = {}
        for step in range(start, self.max_steps):
            self.engine.module.train()
            data, tokens = self._train_micro_batches(step)
            lr = float(self.engine.get_lr()[0])  # the rate this step uses (HF Trainer logs the same)
            t0 = time.perf_counter()
            loss = self.engine.train_batch(iter(data) if data is not None else None)
            time_w += time.perf_counter() - t0
            loss = float(loss)
            window.append(loss)
            losses_all.append(loss)
            tokens_w += tokens
            self.state.global_step = step + 1
            self.state.epoch = (step + 1) / self.steps_per_epoch
            self._call("on_step_end")
            done = self.state.global_step >= self.max_steps or self.control.should_training_stop
            end_of_epoch = self.state.global_step % self.steps_per_epoch == 0
            if self.state.global_step % args.logging_steps == 0 or done:
                gn = self.engine.get_global_grad_norm()
                logs = {"loss": sum(window) / len(window), "learning_rate": lr}
                if gn is not None:
                    logs["grad_norm"] = float(gn)
                logs["samples_per_second"] = len(window) * self.global_batch_size / max(time_w, 1e-9)
                if self._needs_data and self.engine.is_first_stage():
                    logs["tokens_per_second"] = tokens_w / max(time_w, 1e-9)
                self._log(logs)
                window, tokens_w, time_w = [], 0, 0.0
            eval_every = args.eval_steps or args.logging_steps
            if self.eval_dataset is not None and (
                    (args.eval_strategy == "steps" and self.state.global_step % eval_every == 0)
                    or (args.eval_strategy == "epoch" and end_of_epoch) or self.control.should_evaluate):
                metrics = self.evaluate()
                last_eval = self.state.global_step
            if (args.save_strategy == "steps" and args.save_steps and self.state.global_step % args.save_steps == 0) \
                    or (args.save_strategy == "epoch" and end_of_epoch) or self.control.should_save:
                self._save_checkpoint(metrics)
                last_saved = self.state.global_step
            self.control.should_evaluate = self.control.should_save = False  # a callback's request is one-shot
            if done:
                break
        runtime = time.perf_counter() - t_start
        if self.eval_dataset is not None and args.eval_strategy != "no" and last_eval != self.state.global_step:
            metrics = self.evaluate()
        result = {"global_step": self.state.global_step,
                  "train_loss": float(np.mean(losses_all)) if losses_all else float("nan"),
                  "train_runtime": runtime,
                  "train_samples_per_second": len(losses_all) * self.global_batch_size / max(runtime, 1e-9),
                  "metrics": metrics}
        if args.export_final_model:
            ckpt = None
            if args.load_best_model_at_end and self.state.best_model_checkpoint:
                ckpt = self.state.best_model_checkpoint
                self.engine.load_checkpoint(ckpt, load_optimizer_states=False, load_lr_scheduler_states=False)
                result["best_model_checkpoint"] = ckpt
            elif args.save_strategy != "no":
                if last_saved != self.state.global_step:
                    self._save_checkpoint(metrics)
                ckpt = os.path.join(args.output_dir, f"checkpoint-{self.state.global_step}")
            result["final_model"] = self.export_model(os.path.join(args.output_dir, "final"), checkpoint=ckpt)
            if args.push_to_hub:
                result["hub_url"] = self._push(result["final_model"], metrics)
        self._call("on_train_end")
        if self.rank == 0:
            with open(os.path.join(args.output_dir, "train_results.json"), "w") as f:
                json.dump(result, f, indent=2, default=float)
            if args.plot_curves:
                self.plot_curves(os.path.join(args.output_dir, "training_curves.png"))
        return result

    # --------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Metrics over the whole eval set (one prediction per example), identical on every rank."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (here or in the constructor).")
        out = self._prediction_loop(dataset, metric_key_prefix, share_predictions=False)
        self._log(dict(out.metrics))
        self._call("on_evaluate", metrics=out.metrics)
        return out.metrics

    def predict(self, dataset, metric_key_prefix: str = "test"):
        """``PredictionOutput(predictions, label_ids, metrics)`` in dataset order, on every rank."""
        return self._prediction_loop(dataset, metric_key_prefix, share_predictions=True)

    def _prediction_loop(self, dataset, prefix: str, share_predictions: bool):
        import torch.distributed as dist
        from transformers import EvalPrediction
        from transformers.trainer_utils import PredictionOutput

        engine, pipe, args = self.engine, self.pipe, self.args
        n = len(dataset)
        mb, m = args.per_device_eval_batch_size, self.num_micro_batches
        per_rank = mb * m
        g = per_rank * self.dp
        cols = getattr(dataset, "column_names", None)
        has_labels = cols is None or all(name in cols or (name == "labels" and ("label" in cols or "label_ids" in cols))
                                         for name in pipe.label_names)
        generate = args.predict_with_generate and self.generation_fn is not None
        t0 = time.perf_counter()
        local: list[tuple[int, Any]] = []
        loss_sum, loss_count = 0.0, 0
        engine.reset_activation_shape()  # eval micro-batches may differ from training's
        saved_shape, self._shape = self._shape, None
        try:
            for r in range(math.ceil(n / g)):
                idx = [r * g + self.dp_rank * per_rank + k for k in range(per_rank)]
                rows = [i % n for i in idx]
                if generate:
                    batch = self._collate(dataset, rows, with_labels=has_labels)
                    ids = self._generate(batch)
                    if engine.is_last_stage():
                        local.extend((i, ids[k].numpy()) for k, i in enumerate(idx) if i < n)
                    continue
                data = None
                if self._needs_data:
                    batch = self._collate(dataset, rows, with_labels=has_labels)
                    data = []
                    for j in range(m):
                        sl = slice(j * mb, (j + 1) * mb)
                        inputs = tuple(self._input(batch, name)[sl] for name in pipe.input_names)
                        labels = tuple(batch[name][sl] for name in pipe.label_names) if has_labels else \
                            (torch.zeros(1),)
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
                    if has_labels:
                        s_, c_ = self._eval_loss_terms(out_v, tuple(t[vt] for t in data[j][1]))
                        loss_sum, loss_count = loss_sum + s_, loss_count + c_
                    if self.preprocess_logits_for_metrics is not None:
                        lab = tuple(t[vt] for t in data[j][1]) if has_labels else None
                        out_v = self.preprocess_logits_for_metrics(out_v, lab[0] if lab and len(lab) == 1 else lab)
                    arrays = tuple(_np(o) for o in out_v) if isinstance(out_v, (tuple, list)) else _np(out_v)
                    for k, i in enumerate(mine[v] for v in valid):
                        local.append((i, tuple(a[k] for a in arrays) if isinstance(arrays, tuple) else arrays[k]))
        finally:
            engine.reset_activation_shape()
            self._shape = saved_shape
        # gather over the last stage's data-parallel group, in example order
        src = pipe._topo.get_rank(pipe=self.num_stages - 1, data=0)
        payload = None
        if engine.is_last_stage():
            parts = [None] * self.dp
            if self.dp > 1:
                dist.all_gather_object(parts, (local, loss_sum, loss_count),
                                       group=engine.grid.get_data_parallel_group())
            else:
                parts = [(local, loss_sum, loss_count)]
            if self.rank == src:
                pairs = sorted((p for part in parts for p in part[0]), key=lambda x: x[0])
                got = [i for i, _ in pairs]
                if got != list(range(n)):
                    raise RuntimeError(f"evaluation gathered {len(got)} predictions for {n} examples (duplicates or "
                                       "gaps); this is a bug in hfpipe.training.trainer.")
                preds = _stack([p for _, p in pairs])
                label_ids = self._label_ids(dataset) if has_labels else None
                metrics = {}
                total_count = sum(part[2] for part in parts)
                if total_count:
                    metrics["loss"] = sum(part[1] for part in parts) / total_count
                if self.compute_metrics is not None:
                    metrics.update(self.compute_metrics(EvalPrediction(predictions=preds, label_ids=label_ids)))
                runtime = time.perf_counter() - t0
                metrics.update({"runtime": runtime, "samples_per_second": n / max(runtime, 1e-9)})
                metrics = {(k if k.startswith(f"{prefix}_") else f"{prefix}_{k}"): _plain(v)
                           for k, v in metrics.items()}
                payload = (metrics, (preds, label_ids) if share_predictions else None)
        box = [payload]
        dist.broadcast_object_list(box, src=src)
        metrics, shared = box[0]
        preds, label_ids = shared if shared is not None else (None, None)
        return PredictionOutput(predictions=preds, label_ids=label_ids, metrics=metrics)

    def _eval_loss_terms(self, outputs, labels) -> tuple[float, float]:
        """(loss sum, item count) of one micro-batch: token-level heads sum over label tokens (the eval loss is the
        mean over every label token of the eval set, as HF's over one batch holding it all); example-level heads
        (classification, QA) weight the micro-batch mean by its examples."""
        head = self.pipe.head
        if head.per_token_labels:
            total = float(self.pipe.loss_fn(outputs, labels + (torch.tensor(1.0),)).float())
            return total, float(head.count_items(labels))
        n = labels[0].shape[0]
        return float(self.pipe.loss_fn(outputs, labels).float()) * n, float(n)

    def _generate(self, batch):
        kwargs = {}
        if "max_new_tokens" in inspect.signature(self.generation_fn).parameters:
            kwargs["max_new_tokens"] = self.args.generation_max_length
        ids = self.generation_fn(self.engine, batch, **kwargs)
        return ids.detach().cpu()

    def _input(self, batch, name):
        if name in batch:
            return batch[name]
        if name == "attention_mask":
            return torch.ones_like(batch["input_ids"])
        if name == "token_type_ids":
            return torch.zeros_like(batch["input_ids"])
        raise KeyError(f"the eval batch has no {name!r}; the pipeline's first stage needs {self.pipe.input_names}.")

    def _label_ids(self, dataset):
        names = self.pipe.label_names
        arrays = []
        cols = getattr(dataset, "column_names", None) or []
        for name in names:
            if name == "labels" and name not in cols:
                name = "label" if "label" in cols else "label_ids" if "label_ids" in cols else name
            col = dataset[name] if hasattr(dataset, "column_names") else [dataset[i][name] for i in range(len(dataset))]
            arrays.append(np.asarray(col))
        return arrays[0] if len(arrays) == 1 else tuple(arrays)

    # ---------------------------------------------------------------------------------------------- checkpoints
    def _find_checkpoint(self, path: str) -> str:
        if path in ("latest", "last", "True", "true"):
            found = sorted(glob.glob(os.path.join(self.args.output_dir, "checkpoint-*")),
                           key=lambda p: int(p.rsplit("-", 1)[-1]) if p.rsplit("-", 1)[-1].isdigit() else -1)
            found = [p for p in found if os.path.isfile(os.path.join(p, STATE_FILE))]
            if not found:
                raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint-N folder with {STATE_FILE} "
                                        f"in {self.args.output_dir}.")
            return found[-1]
        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            raise FileNotFoundError(f"--resume_from_checkpoint {path}: no {STATE_FILE} there; pass a checkpoint-N "
                                    "folder written by PipelineTrainer (or 'latest').")
        return path

    def _save_checkpoint(self, metrics: dict | None = None) -> str:
        import torch.distributed as dist

        args, step = self.args, self.state.global_step
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        self.engine.save_checkpoint(path, client_state={"hfpipe_global_step": step})
        if self.rank == 0:  # what `hfpipe export` / to_pipeline(path) need to read the layer files back
            from hfpipe.checkpoint import write_manifest

            pipe = self.pipe
            write_manifest(path, pipe.hfpipe_builder, pipe.layer_infos, parts=pipe.parts,
                           partition_method=self.args.partition_method, dtype=self._weights_dtype(),
                           source="PipelineTrainer", global_step=step)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(path)
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                   os.path.join(path, f"rng_state_{self.rank}.pth"))
        key = args.metric_for_best_model
        if key and metrics:
            key = key if key.startswith("eval_") else f"eval_{key}"
            if key in metrics:
                value = metrics[key]
                better = self.state.best_metric is None or (
                    value > self.state.best_metric if args.greater_is_better else value < self.state.best_metric)
                if better:
                    self.state.best_metric, self.state.best_model_checkpoint = value, path
        if self.rank == 0:
            epoch, b = divmod(step, self.steps_per_epoch) if self.steps_per_epoch else (0, 0)
            state = {"global_step": step, "epoch": self.state.epoch, "max_steps": self.max_steps,
                     "data_position": {"epoch": epoch, "batch_in_epoch": b,
                                       "examples_seen": step * self.global_batch_size},
                     "train_batch_size": self.global_batch_size, "seed": args.seed, "world_size": self.world_size,
                     "num_stages": self.num_stages, "best_metric": self.state.best_metric,
                     "best_model_checkpoint": self.state.best_model_checkpoint,
                     "log_history": self.state.log_history}
            with open(os.path.join(path, STATE_FILE), "w") as f:
                json.dump(state, f, indent=2, default=float)
            self._rotate_checkpoints()
        dist.barrier()
        self._call("on_save")
        return path

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        found = sorted((p for p in glob.glob(os.path.join(self.args.output_dir, "checkpoint-*"))
                        if p.rsplit("-", 1)[-1].isdigit()), key=lambda p: int(p.rsplit("-", 1)[-1]))
        keep = set(found[-limit:])
        if self.state.best_model_checkpoint:
            keep.add(self.state.best_model_checkpoint)
        for p in found:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def _load_checkpoint(self, path: str) -> int:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        if state.get("train_batch_size") != self.global_batch_size:
            raise ValueError(f"{path} was written with a global batch of {state.get('train_batch_size')}, this run "
                             f"uses {self.global_batch_size}; resume with the same batch settings.")
        saved_stages = state.get("num_stages", self.num_stages)
        if saved_stages == self.num_stages:
            self.engine.load_checkpoint(path)
        else:
            self._load_resharded(path, saved_stages)
        self.state.log_history = state.get("log_history", [])
        self.state.best_metric = state.get("best_metric")
        self.state.best_model_checkpoint = state.get("best_model_checkpoint")
        rng = os.path.join(path, f"rng_state_{self.rank}.pth")
        if os.path.isfile(rng) and state.get("world_size") == self.world_size:
            s = torch.load(rng, weights_only=False)
            random.setstate(s["python"])
            np.random.set_state(s["numpy"])
            torch.set_rng_state(s["torch"])
        return int(state["global_step"])

    def _weights_dtype(self) -> str:
        return "bfloat16" if self.engine.bfloat16_enabled() else "float16" if self.engine.fp16_enabled() else "float32"

    def _load_resharded(self, path: str, saved_stages: int) -> None:
        """Resume a checkpoint written at another stage count: weights (layer files are indexed by the fixed layer
        list), step, LR schedule and data position carry over; DeepSpeed keeps optimizer states per stage, so the
        optimizer restarts from zero moments (warned)."""
        import warnings

        warnings.warn(f"{path} was saved with {saved_stages} pipeline stages and this run has {self.num_stages}: "
                      "weights, step, LR schedule and data position are restored, the optimizer states (Adam moments) "
                      "are reset. Resume with the same stage count to keep them.", stacklevel=3)
        engine = self.engine
        engine.load_checkpoint(path, load_optimizer_states=False, load_lr_scheduler_states=True)
        opt = engine.optimizer
        if hasattr(opt, "refresh_fp32_params"):  # bf16/fp16 optimizers keep fp32 masters of the loaded weights
            opt.refresh_fp32_params()
        if engine.lr_scheduler is not None:  # the optimizer's param groups did not come from the checkpoint
            for group, lr in zip(opt.param_groups, engine.lr_scheduler.get_last_lr()):
                group["lr"] = lr

    # ------------------------------------------------------------------------------------------------- export
    def export_model(self, output_dir: str, checkpoint: str | None = None) -> str:
        """Write the weights as a normal HF folder (``from_pretrained`` loads it). Call on every rank.

        With ``checkpoint`` (a ``checkpoint-N`` folder), ``hfpipe.checkpoint.export`` converts the checkpoint on
        rank 0; otherwise every stage's live parameters (``hf_named_parameters``) are
        gathered on rank 0 and written with ``save_pretrained`` (safetensors).
        """
        import torch.distributed as dist

        dist.barrier()
        if checkpoint is not None:
            if self.rank == 0:
                from hfpipe.checkpoint import export

                export(checkpoint, output_dir, overwrite=True, progress=not self.args.disable_tqdm)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
            dist.barrier()
            return output_dir
        params = {}
        if self.dp_rank == 0:
            params = {name: p.detach().float().cpu().clone() if self.engine.bfloat16_enabled() or
                      self.engine.fp16_enabled() else p.detach().cpu().clone()
                      for name, p in self.pipe.hf_named_parameters()}
        parts = [None] * self.world_size
        dist.all_gather_object(parts, params)
        if self.rank == 0:
            state = {}
            for part in parts:
                state.update(part)
            model_class = self.pipe.adapter.model_class
            model = model_class._from_config(self.pipe.config)
            missing, unexpected = model.load_state_dict(state, strict=False)
            tied = set()
            if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
                tied = {n for n, p in model.named_parameters(remove_duplicate=False)
                        if p is model.get_input_embeddings().weight}
            missing = [k for k in missing if k not in tied and k in dict(model.named_parameters())]
            if missing or unexpected:
                raise RuntimeError(f"export: parameters missing {missing[:5]} / unexpected {unexpected[:5]} when "
                                   f"loading the pipeline's weights into {model_class.__name__}.")
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        dist.barrier()
        return output_dir

    def _push(self, folder: str, metrics: dict):
        """Rank 0 uploads ``folder`` with a model card (metrics, the resolved config, base model, dataset). A failed
        push is reported, not raised: the other ranks have moved on (an exception here would leave them waiting in
        the next collective) and the exported folder is intact for a later ``hfpipe push``."""
        if self.rank != 0:
            return None
        from hfpipe.hub import PushError, hyperparameters, push_to_hub

        hp = hyperparameters(self.ds_config, self.args)
        hp["world_size"] = self.world_size
        info = {"metrics": metrics, "hyperparameters": hp, "task": self.pipe.head.name,
                "base_model": getattr(self.pipe.config, "_name_or_path", None) or None}
        ds_info = getattr(self.train_dataset, "info", None)
        name = getattr(ds_info, "dataset_name", None)
        if name and name not in ("json", "csv", "parquet", "text", "arrow", "generator", "pandas"):
            info["dataset"] = name  # a Hub dataset; local files and generated data have a builder name only
        try:
            return push_to_hub(folder, self.args.hub_model_id, private=self.args.hub_private_repo, card_info=info)
        except PushError as exc:
            print(f"hfpipe: push to the Hub failed: {exc}", file=sys.stderr, flush=True)
            return None

    # ------------------------------------------------------------------------------------------------- curves
    def plot_curves(self, path: str) -> str | None:
        """Training loss (and eval metrics) against steps, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = self.state.log_history
        train = [(h["step"], h["loss"]) for h in hist if "loss" in h]
        evals: dict[str, list] = {}
        for h in hist:
            for k, v in h.items():
                if k.startswith("eval_") and not k.endswith(("runtime", "per_second")) and isinstance(v, (int, float)):
                    evals.setdefault(k, []).append((h["step"], v))
        if not train and not evals:
            return None
        ncols = 1 + bool(evals)
        fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
        if train:
            axes[0][0].plot(*zip(*train), label="train loss")
        if "eval_loss" in evals:
            axes[0][0].plot(*zip(*evals.pop("eval_loss")), "o-", label="eval loss")
        axes[0][0].set_xlabel("step")
        axes[0][0].set_ylabel("loss")
        axes[0][0].legend()
        if evals:
            for k, pts in evals.items():
                axes[0][1].plot(*zip(*pts), "o-", label=k)
            axes[0][1].set_xlabel("step")
            axes[0][1].legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


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
