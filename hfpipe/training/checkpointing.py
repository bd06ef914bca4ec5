"""The trainer's ``checkpoint-N`` folders: save, rotate, find, resume -- at the same or another stage count.

A folder holds DeepSpeed's own checkpoint (``engine.save_checkpoint``: layer files, optimizer states per stage), the
manifest and config ``hfpipe export`` / ``to_pipeline(path)`` read back (``hfpipe.checkpoint.write_manifest``), one
RNG state per rank and ``trainer_state.json``. Since the data position is a function of the step
(``hfpipe.training.data``), the step is all a resume needs to continue exactly where the run stopped.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import warnings

import numpy as np
import torch

STATE_FILE = "trainer_state.json"


def _numbered(output_dir: str) -> list[str]:
    """``checkpoint-N`` folders of ``output_dir``, by ``N``."""
    found = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*")) if p.rsplit("-", 1)[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.rsplit("-", 1)[-1]))


def find_checkpoint(path: str, output_dir: str) -> str:
    """The folder ``--resume_from_checkpoint path`` means: ``path`` itself, or the newest complete one for
    ``latest``."""
    if path in ("latest", "last", "True", "true"):
        found = [p for p in _numbered(output_dir) if os.path.isfile(os.path.join(p, STATE_FILE))]
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint-N folder with {STATE_FILE} "
                                    f"in {output_dir}.")
        return found[-1]
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no {STATE_FILE} there; pass a checkpoint-N "
                                "folder written by PipelineTrainer (or 'latest').")
    return path


def weights_dtype(engine) -> str:
    return "bfloat16" if engine.bfloat16_enabled() else "float16" if engine.fp16_enabled() else "float32"


def save_checkpoint(trainer, metrics: dict | None = None) -> str:
    """Write ``checkpoint-<global step>`` of ``trainer`` (a ``PipelineTrainer``) on every rank; returns its path."""
    import torch.distributed as dist

    args, state, step = trainer.args, trainer.state, trainer.state.global_step
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    trainer.engine.save_checkpoint(path, client_state={"hfpipe_global_step": step})
    if trainer.rank == 0:
        from hfpipe.checkpoint import write_manifest

        pipe = trainer.pipe
        write_manifest(path, pipe.hfpipe_builder, pipe.layer_infos, parts=pipe.parts,
                       partition_method=args.partition_method, dtype=weights_dtype(trainer.engine),
                       source="PipelineTrainer", global_step=step)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(path)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               os.path.join(path, f"rng_state_{trainer.rank}.pth"))
    _track_best(args, state, metrics, path)
    if trainer.rank == 0:
        epoch, b = divmod(step, trainer.steps_per_epoch) if trainer.steps_per_epoch else (0, 0)
        saved = {"global_step": step, "epoch": state.epoch, "max_steps": trainer.max_steps,
                 "data_position": {"epoch": epoch, "batch_in_epoch": b,
                                   "examples_seen": step * trainer.global_batch_size},
                 "train_batch_size": trainer.global_batch_size, "seed": args.seed, "world_size": trainer.world_size,
                 "num_stages": trainer.num_stages, "best_metric": state.best_metric,
                 "best_model_checkpoint": state.best_model_checkpoint, "log_history": state.log_history}
        with open(os.path.join(path, STATE_FILE), "w") as f:
            json.dump(saved, f, indent=2, default=float)
        rotate_checkpoints(args.output_dir, args.save_total_limit, keep=state.best_model_checkpoint)
    dist.barrier()
    return path


def _track_best(args, state, metrics: dict | None, path: str) -> None:
    """``state.best_metric`` / ``best_model_checkpoint`` after saving ``path`` with ``metrics``."""
    key = args.metric_for_best_model
    if not (key and metrics):
        return
    key = key if key.startswith("eval_") else f"eval_{key}"
    if key in metrics:
        value = metrics[key]
        if state.best_metric is None or (value > state.best_metric if args.greater_is_better
                                         else value < state.best_metric):
            state.best_metric, state.best_model_checkpoint = value, path


def rotate_checkpoints(output_dir: str, limit: int | None, keep: str | None = None) -> None:
    """Delete all but the newest ``limit`` checkpoints (and ``keep``, the best one)."""
    if not limit:
        return
    found = _numbered(output_dir)
    kept = set(found[-limit:]) | ({keep} if keep else set())
    for p in found:
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(trainer, path: str) -> int:
    """Restore weights, optimizer, LR schedule, best metric, log history and RNG states from ``path``; returns the
    step to continue from."""
    with open(os.path.join(path, STATE_FILE)) as f:
        saved = json.load(f)
    if saved.get("train_batch_size") != trainer.global_batch_size:
        raise ValueError(f"{path} was written with a global batch of {saved.get('train_batch_size')}, this run "
                         f"uses {trainer.global_batch_size}; resume with the same batch settings.")
    saved_stages = saved.get("num_stages", trainer.num_stages)
    if saved_stages == trainer.num_stages:
        trainer.engine.load_checkpoint(path)
    else:
        load_resharded(trainer.engine, path, saved_stages, trainer.num_stages)
    state = trainer.state
    state.log_history = saved.get("log_history", [])
    state.best_metric = saved.get("best_metric")
    state.best_model_checkpoint = saved.get("best_model_checkpoint")
    rng = os.path.join(path, f"rng_state_{trainer.rank}.pth")
    if os.path.isfile(rng) and saved.get("world_size") == trainer.world_size:
        s = torch.load(rng, weights_only=False)
        random.setstate(s["python"])
        np.random.set_state(s["numpy"])
        torch.set_rng_state(s["torch"])
    return int(saved["global_step"])


def load_resharded(engine, path: str, saved_stages: int, num_stages: int) -> None:
    """Resume a checkpoint written at another stage count: weights (layer files are indexed by the fixed layer
    list), step, LR schedule and data position carry over; DeepSpeed keeps optimizer states per stage, so the
    optimizer restarts from zero moments (warned)."""
    warnings.warn(f"{path} was saved with {saved_stages} pipeline stages and this run has {num_stages}: "
                  "weights, step, LR schedule and data position are restored, the optimizer states (Adam moments) "
                  "are reset. Resume with the same stage count to keep them.", stacklevel=4)
    engine.load_checkpoint(path, load_optimizer_states=False, load_lr_scheduler_states=True)
    opt = engine.optimizer
    if hasattr(opt, "refresh_fp32_params"):  # bf16/fp16 optimizers keep fp32 masters of the loaded weights
        opt.refresh_fp32_params()
    if engine.lr_scheduler is not None:  # the optimizer's param groups did not come from the checkpoint
        for group, lr in zip(opt.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
