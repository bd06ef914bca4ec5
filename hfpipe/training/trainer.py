"""``PipelineTrainer``: HF-Trainer-shaped training and evaluation over a DeepSpeed ``PipelineEngine``.

Neither ``transformers.Trainer`` nor Accelerate can drive a ``PipelineEngine`` (it consumes whole batches through
``train_batch``/``eval_batch`` and only its first and last stages see data), so this loop does it itself. The one
idea: **every rank can compute every global batch** (``hfpipe.training.data``): the sampler is a pure function of
``(seed, epoch, step)``, each rank takes its data-parallel slice of the same global batch, the loss normaliser is the
same on every replica, and resuming is exact. This module holds the set-up and the training loop; evaluation
(``hfpipe.training.evaluation``), checkpoints (``hfpipe.training.checkpointing``) and the exported model, Hub upload
and curves (``hfpipe.training.outputs``) are the trainer's parts, each in its own module.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

import numpy as np

from hfpipe.core import lora
from hfpipe.core.builder import resolve_model
from hfpipe.core.dsconfig import check_fp16_supported
from hfpipe.core.heads import head_for_class
from hfpipe.core.partition import parse_partition_method
from hfpipe.training.numerics import NonFiniteGuard, check_initial_weights, fp16_logs
from hfpipe.training import checkpointing, evaluation, failfast, outputs
from hfpipe.training.arguments import PipelineTrainingArguments
from hfpipe.training.callbacks import default_callbacks
from hfpipe.training.config import format_sources, resolve_ds_config
from hfpipe.training.data import Collate, FixedLengthCollator, GlobalBatches
from hfpipe.training.outputs import decay_parameter_groups
from hfpipe.training.state import new_state


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
        # validate and merge before any process group work
        self.ds_config, self.config_sources = resolve_ds_config(args, world)
        if args.push_to_hub and not args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id user/name (the Hub repo to create or update).")
        check_fp16_supported(self.ds_config["fp16"]["enabled"], source=self.config_sources.get("fp16"))
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.compute_metrics, self.processing_class = compute_metrics, processing_class
        self.generation_fn, self.preprocess_logits_for_metrics = generation_fn, preprocess_logits_for_metrics
        from transformers import TrainerControl, set_seed
        from transformers.trainer_callback import CallbackHandler

        set_seed(args.seed)
        pipe_cfg = self.ds_config["pipeline"]
        self.num_stages = pipe_cfg["stages"]
        from hfpipe.launch import init_distributed, resolve_timeout

        init_distributed(resolve_timeout(args))  # --ddp_timeout for the rendezvous and every process group
        self.pipe = self._build_pipe(model, model_class, pipe_cfg)
        self._check_data(train_dataset, eval_dataset)
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
        self.collate = Collate(self.pipe, self.data_collator)
        self._batches = GlobalBatches(len(train_dataset) if train_dataset is not None else 0, self.global_batch_size,
                                      args.seed, args.train_sampling_strategy)
        self.steps_per_epoch = self._batches.steps_per_epoch
        failfast.warn_idle_stages(self.ds_config)
        failfast.warn_data_shape(train_dataset, self.global_batch_size, args.max_seq_length)
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
        if train_dataset is not None and self.max_steps <= 0:
            raise ValueError(f"--num_train_epochs {args.num_train_epochs} with --max_steps {args.max_steps} trains 0 "
                             "steps, so nothing would be trained or exported; set --num_train_epochs > 0 or "
                             "--max_steps > 0 (or leave out --do_train to only evaluate).")
        self.engine = self._initialize_engine()
        self.nonfinite = NonFiniteGuard(self.engine, skip=args.skip_nonfinite_steps)
        check_initial_weights(self.engine, self._describe_stage)
        self.dp_rank = self.engine.grid.data_parallel_id
        self.callback_handler = CallbackHandler(default_callbacks(args) + list(callbacks or []), self.pipe,
                                                processing_class, self.engine.optimizer, self.engine.lr_scheduler)
        self.control = TrainerControl()
        self.state = new_state(self, self.callback_handler.callbacks + [self.control])
        self._last_eval: tuple[int, dict] | None = None
        if self.rank == 0:
            print("hfpipe: merged DeepSpeed config (precedence: command line > Accelerate > DeepSpeed JSON > "
                  "defaults)\n" + format_sources(self.ds_config, self.config_sources), flush=True)
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "ds_config.json"), "w") as f:
                json.dump({"config": self.ds_config, "sources": self.config_sources}, f, indent=2, default=str)
        self.control = self.callback_handler.on_init_end(args, self.state, self.control)

    # ------------------------------------------------------------------------------------------------ set-up
    def _describe_stage(self, stage: int) -> str:
        """``layers a-b: TypeA, TypeB`` of ``stage`` (for messages)."""
        start, stop = self.pipe.parts[stage], self.pipe.parts[stage + 1]
        kinds = sorted({info.name for info in self.pipe.layer_infos[start:stop]})
        return f"layers {start}-{stop - 1}: {', '.join(kinds)}"

    def _check_data(self, *splits) -> None:
        """Data the model cannot take (``hfpipe.training.datacheck``), the same error on every rank."""
        from hfpipe.training.datacheck import check_dataset, position_limit

        config = self.pipe.config
        limit = position_limit(self.pipe.hfpipe_builder.adapter.meta_model)
        if limit and self.args.max_seq_length > limit:
            raise ValueError(f"--max_seq_length {self.args.max_seq_length} is longer than the model's {limit} "
                             "positions (max_position_embeddings), and every batch is padded to it; set "
                             f"--max_seq_length {limit} or less.")
        for name, data in zip(("train", "validation"), splits):
            check_dataset(data, config, split=name, num_labels=self.pipe.head.num_classes(config),
                          label_column=self.pipe.head.label_names[0], max_positions=limit)

    def _build_pipe(self, model, model_class, pipe_cfg):
        from hfpipe.pipeline import to_pipeline

        kwargs = dict(num_stages=pipe_cfg["stages"], partition_method=parse_partition_method(pipe_cfg["partition"]),
                      model_class=model_class, seed=self.args.seed, seq_len=self.args.max_seq_length,
                      activation_checkpoint_interval=pipe_cfg["activation_checkpoint_interval"],
                      micro_batch_size=self.ds_config["train_micro_batch_size_per_gpu"],
                      loss_chunk_tokens=self.args.loss_chunk_tokens or None, peft_config=self.args.lora_config(),
                      load_in_4bit=self.args.load_in_4bit, schedule=pipe_cfg.get("schedule"))
        if kwargs["peft_config"] is not None:  # PEFT's task type of the head (a PeftModel and --lora_r: one error)
            _, cls, _ = resolve_model(lora.split_peft_model(model, kwargs["peft_config"])[0], model_class)
            kwargs["peft_config"] = self.args.lora_config(head_for_class(cls).peft_task_type)
        # a path or Hub id loads stage-locally (hfpipe.checkpoint); --peft_adapter: each stage its own adapter part
        return to_pipeline(model, peft_adapter=self.args.peft_adapter, **kwargs)

    def _initialize_engine(self):
        from transformers import get_scheduler

        from hfpipe.pipeline import initialize

        args = self.args
        total = max(self.max_steps, 1)
        warmup = args.warmup(total)

        def scheduler(optimizer):
            return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                 num_training_steps=total, scheduler_specific_kwargs=args.lr_scheduler_kwargs)

        groups = decay_parameter_groups(self.pipe, self.ds_config["optimizer"]["params"]["weight_decay"])
        engine, *_ = initialize(self.pipe, self.ds_config, model_parameters=groups, lr_scheduler=scheduler)
        return engine

    # --------------------------------------------------------------------------------------------------- data
    @property
    def needs_data(self) -> bool:
        """Whether this rank's stage reads batches (the first stage its inputs, the last its labels)."""
        return self.engine.is_first_stage() or self.engine.is_last_stage()

    def global_batch_indices(self, step: int) -> list[int]:
        """Example indices of the global batch of optimizer step ``step`` (0-based); the data position is a
        function of the step."""
        return self._batches(step)

    def _train_micro_batches(self, step: int):
        from hfpipe.core.batches import micro_batches

        if not self.needs_data:
            return None, 0
        batch = self.collate(self.train_dataset, self.global_batch_indices(step))
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return micro_batches(batch, self.pipe, self.num_micro_batches, self.dp_rank, self.dp), tokens

    # -------------------------------------------------------------------------------------------------- train
    def _call(self, event, **kwargs):
        self.control = getattr(self.callback_handler, event)(self.args, self.state, self.control, **kwargs)
        return self.control

    def log(self, logs: dict) -> None:
        """``transformers.Trainer.log``: add the epoch, append to ``state.log_history``, call ``on_log``."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self._call("on_log", logs=logs)

    _log = log

    def _train_logs(self, window: list[float], tokens: int, seconds: float, lr: float) -> dict:
        """The training log of the steps since the last one: mean loss (fp32), rate, grad norm, throughput."""
        logs = {"loss": float(np.mean(window, dtype=np.float64)), "learning_rate": lr}
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            logs["grad_norm"] = float(gn)
        if self.nonfinite.skipped_steps:
            logs["skipped_nonfinite_steps"] = self.nonfinite.skipped_steps
        logs.update(fp16_logs(self.engine))  # overflow skips and the loss scale
        logs["samples_per_second"] = len(window) * self.global_batch_size / max(seconds, 1e-9)
        if self.needs_data and self.engine.is_first_stage():
            logs["tokens_per_second"] = tokens / max(seconds, 1e-9)
        return logs

    def train(self, resume_from_checkpoint: str | None = None) -> dict:
        """Run to ``max_steps`` (or the epochs); returns ``{"global_step", "train_loss", "metrics", ...}``.
        ``DefaultFlowCallback`` (or any callback) decides when to log, evaluate and save, as in HF Trainer."""
        args = self.args
        if self.train_dataset is None:
            raise ValueError("PipelineTrainer.train() needs train_dataset=.")
        resume = resume_from_checkpoint or args.resume_from_checkpoint
        start = 0
        if resume:
            start = checkpointing.load_checkpoint(self, checkpointing.find_checkpoint(resume, args.output_dir))
        checkpointing.clean_output_dir(args.output_dir, self.rank)  # what killed saves left (after resume chose)
        self.state.global_step = start
        self.state.epoch = start / self.steps_per_epoch
        self._call("on_train_begin")
        if args.eval_on_start and self.eval_dataset is not None:
            self.evaluate()
        t_start = time.perf_counter()
        window, tokens_w, time_w, losses_all = [], 0, 0.0, []
        last_saved = start if resume else None
        metrics: dict = {}
        for step in range(start, self.max_steps):
            if step % self.steps_per_epoch == 0:
                self._call("on_epoch_begin")
            self._call("on_step_begin")
            self.engine.module.train()
            data, tokens = self._train_micro_batches(step)
            lr = float(self.engine.get_lr()[0])  # the rate this step uses (HF Trainer logs the same)
            t0 = time.perf_counter()
            loss = self.engine.train_batch(iter(data) if data is not None else None)
            time_w += time.perf_counter() - t0
            loss = float(loss.float()) if hasattr(loss, "float") else float(loss)
            if not self.nonfinite.after_step(loss, step + 1, self._describe_stage):  # a skipped step: not averaged
                window.append(loss)
                losses_all.append(loss)
            tokens_w += tokens
            self.state.global_step = step + 1
            self.state.epoch = (step + 1) / self.steps_per_epoch
            self._call("on_step_end")
            if self.state.global_step % self.steps_per_epoch == 0:
                self._call("on_epoch_end")
            if self.control.should_log and window:
                self.log(self._train_logs(window, tokens_w, time_w, lr))
                window, tokens_w, time_w = [], 0, 0.0
            if self.control.should_evaluate and self.eval_dataset is not None:
                metrics = self.evaluate()
            if self.control.should_save:
                self._save_checkpoint(metrics)
                last_saved = self.state.global_step
            if self.control.should_training_stop:
                break
        runtime = time.perf_counter() - t_start
        if window:  # the steps since the last log (HF logs them in train_loss only; the curve wants them)
            self.log(self._train_logs(window, tokens_w, time_w, lr))
        result = {"global_step": self.state.global_step, "epoch": self.state.epoch,
                  "train_loss": float(np.mean(losses_all, dtype=np.float64)) if losses_all else float("nan"),
                  "train_runtime": runtime,
                  "train_samples_per_second": len(losses_all) * self.global_batch_size / max(runtime, 1e-9),
                  "train_steps_per_second": len(losses_all) / max(runtime, 1e-9), "metrics": metrics}
        if args.export_final_model:
            ckpt = None
            if args.load_best_model_at_end and self.state.best_model_checkpoint:
                ckpt = self.state.best_model_checkpoint
                # the optimizer states too where the export reads the fp32 masters they hold (bf16/fp16)
                self.engine.load_checkpoint(ckpt, load_optimizer_states=outputs.exports_masters(self),
                                            load_lr_scheduler_states=False)
                result["best_model_checkpoint"] = ckpt
            elif args.save_strategy != "no":
                if last_saved != self.state.global_step:
                    self._save_checkpoint(metrics)
                ckpt = os.path.join(args.output_dir, f"checkpoint-{self.state.global_step}")
            result["final_model"] = self.export_model(os.path.join(args.output_dir, "final"), checkpoint=ckpt)
            self._write_card(result["final_model"], metrics)
            if args.push_to_hub:
                result["hub_url"] = self._push(result["final_model"], metrics)
        self._call("on_train_end")
        if self.rank == 0:
            if args.plot_curves:
                self.plot_curves(os.path.join(args.output_dir, "training_curves.png"))
        return result

    # --------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Metrics over the whole eval set (one prediction per example), identical on every rank."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (here or in the constructor).")
        out = evaluation.prediction_loop(self, dataset, metric_key_prefix, share_predictions=False)
        self.log(dict(out.metrics))
        self._call("on_evaluate", metrics=out.metrics)
        if eval_dataset is None:
            self._last_eval = (self.state.global_step, out.metrics)
        return out.metrics

    def final_metrics(self) -> dict[str, float]:
        """The eval metrics of the trained model: the last evaluation when it ran at the last step (so it is
        logged once), else a fresh :meth:`evaluate`."""
        if self._last_eval is not None and self._last_eval[0] == self.state.global_step:
            return self._last_eval[1]
        return self.evaluate()

    def predict(self, dataset, metric_key_prefix: str = "test"):
        """``PredictionOutput(predictions, label_ids, metrics)`` in dataset order, on every rank."""
        out = evaluation.prediction_loop(self, dataset, metric_key_prefix, share_predictions=True)
        self._call("on_predict", metrics=out.metrics)
        return out

    # HF Trainer's helpers of its example scripts: ``***** train metrics *****``, ``<split>_results.json`` +
    # ``all_results.json``, ``trainer_state.json`` (rank 0 only)
    from transformers.trainer_pt_utils import log_metrics, save_metrics, save_state  # noqa: E402

    def is_world_process_zero(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------ checkpoints, outputs
    def _save_checkpoint(self, metrics: dict | None = None) -> str:
        path = checkpointing.save_checkpoint(self, metrics)
        self._call("on_save")
        return path

    def export_model(self, output_dir: str, checkpoint: str | None = None) -> str:
        """Write the weights as a normal HF folder (``from_pretrained`` loads it). Call on every rank.

        With ``checkpoint`` (a ``checkpoint-N`` folder), ``hfpipe.checkpoint.export`` converts the checkpoint on
        rank 0; otherwise every stage's live parameters (``hf_named_parameters``) are
        gathered on rank 0 and written with ``save_pretrained`` (safetensors). With LoRA: a PEFT adapter folder of the
        live adapter tensors (``checkpoint`` not read).
        """
        return outputs.export_model(self, output_dir, checkpoint)

    _push = outputs.push  # (folder, metrics) -> Hub URL or None; rank 0 only

    def _write_card(self, folder: str, metrics: dict) -> None:
        """A local model card (``README.md``) in the exported folder, pushed or not; a LoRA adapter folder has its
        own (``hfpipe.training.outputs``). Rank 0."""
        path = os.path.join(folder, "README.md")
        if self.rank != 0 or os.path.exists(path):
            return
        from hfpipe.hub import hyperparameters, model_card

        hp = {**hyperparameters(self.ds_config, self.args), "world_size": self.world_size}
        info = {"task": self.pipe.head.name, "metrics": metrics, "hyperparameters": hp,
                "base_model": getattr(self.pipe.config, "_name_or_path", None) or None}
        name = self.args.hub_model_id or os.path.basename(os.path.normpath(self.args.output_dir))
        model_card(name, info).save(path)

    def plot_curves(self, path: str) -> str | None:
        """Training loss (and eval metrics) against steps, as a PNG."""
        return outputs.plot_curves(self.state.log_history, path)
