"""The trainer's ``checkpoint-N`` folders: save, rotate, find, resume -- at the same or another stage count.

A folder holds DeepSpeed's own checkpoint (``engine.save_checkpoint``: layer files, optimizer states per stage), the
manifest and config ``hfpipe export`` / ``to_pipeline(path)`` read back (``hfpipe.checkpoint.write_manifest``), one
RNG state per rank, ``trainer_state.json`` and the optimizer states per layer (``hfpipe.training.reshard``, read when
the stage count changes). Since the data position is a function of the step (``hfpipe.training.data``), the step is
all a resume needs to continue exactly where the run stopped.

A folder is **complete** only once :data:`COMPLETE_MARKER` exists: rank 0 writes it last, after a barrier that every
rank reaches only when its own files are on disk. ``latest`` and resume read complete folders only (and say which
incomplete or damaged ones they skipped); JSON state is written to a temporary name and renamed; rotation
(``save_total_limit``) runs only after the new folder is complete; :func:`clean_output_dir` removes what killed saves
left behind. DeepSpeed's own ``save_checkpoint`` has no completion marker, and transformers'
``get_last_checkpoint`` takes the highest ``checkpoint-N`` whatever its state, so this module does both itself.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
#: written last into a finished ``checkpoint-N`` (JSON: step, world size, stages)
COMPLETE_MARKER = "hfpipe_checkpoint_complete.json"
#: infix of the temporary names files and folders are written under before the rename
TMP_INFIX = ".tmp-"


def _say(message: str) -> None:
    """One line from global rank 0 (every rank calls the functions that say it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"hfpipe: {message}", flush=True)


def write_json_atomic(path: str, obj) -> None:
    """``json.dump`` to ``path`` through a temporary name in the same folder and ``os.replace``: a reader sees the
    old file or the whole new one, never a prefix."""
    tmp = f"{path}{TMP_INFIX}{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def torch_save_atomic(obj, path: str) -> None:
    tmp = f"{path}{TMP_INFIX}{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` is not a complete, readable checkpoint (``None`` when it is)."""
    if not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
        return f"no {COMPLETE_MARKER} (a save that did not finish)"
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        int(state["global_step"])
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (ValueError, KeyError, TypeError) as e:
        return f"{STATE_FILE} is damaged ({type(e).__name__}: {e})"
    if not os.path.isfile(os.path.join(path, "latest")):
        return "no DeepSpeed 'latest' tag file"
    return None


def _numbered(output_dir: str) -> list[str]:
    """``checkpoint-N`` folders of ``output_dir``, by ``N``."""
    found = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*")) if p.rsplit("-", 1)[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.rsplit("-", 1)[-1]))


def last_checkpoint(output_dir: str, verbose: bool = True) -> str | None:
    """The newest *complete* ``checkpoint-N`` of ``output_dir`` (``None`` if there is none); with ``verbose``, names
    each newer folder it skipped and why. Use it instead of transformers' ``get_last_checkpoint``, which takes the
    highest ``N`` even when that save never finished."""
    for p in reversed(_numbered(output_dir) if os.path.isdir(output_dir) else []):
        problem = checkpoint_problem(p)
        if problem is None:
            return p
        if verbose:
            _say(f"skipping incomplete checkpoint {p}: {problem}")
    return None


def find_checkpoint(path: str, output_dir: str, verbose: bool = True) -> str:
    """The folder ``--resume_from_checkpoint path`` means: ``path`` itself (it must be complete), or the newest
    complete one of ``output_dir`` for ``latest``."""
    if path in ("latest", "last", "True", "true"):
        found = last_checkpoint(output_dir, verbose)
        if found is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint-N folder (with "
                                    f"{COMPLETE_MARKER}) in {output_dir}; start without --resume_from_checkpoint.")
        return found
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such folder; pass a checkpoint-N folder "
                                "written by PipelineTrainer (or 'latest').")
    problem = checkpoint_problem(path)
    if problem is not None:
        parent = os.path.dirname(os.path.abspath(path))
        other = last_checkpoint(parent, verbose=False)
        hint = f"resume from {other} (the newest complete one) or 'latest'" if other else \
            "pass a complete checkpoint-N folder written by PipelineTrainer"
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: not a complete checkpoint: {problem}; {hint}.")
    return path


def clean_output_dir(output_dir: str, rank: int = 0) -> list[str]:
    """Remove what killed saves left in ``output_dir`` (rank 0 only; returns the removed paths, each also printed):
    ``checkpoint-N`` folders without :data:`COMPLETE_MARKER` and temporary files/folders (``*.tmp-*``, e.g. a
    killed ``hfpipe convert``'s ``.name.tmp-xxxx``). Complete checkpoints with a damaged state file are reported,
    not removed."""
    removed: list[str] = []
    if rank != 0 or not os.path.isdir(output_dir):
        return removed
    for p in _numbered(output_dir):
        problem = checkpoint_problem(p)
        if problem is None:
            continue
        if os.path.isfile(os.path.join(p, COMPLETE_MARKER)):
            _say(f"checkpoint {p} is damaged ({problem}); left in place, resume skips it")
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        _say(f"removed incomplete checkpoint {p} ({problem})")
    stale = glob.glob(os.path.join(output_dir, f"*{TMP_INFIX}*")) + glob.glob(os.path.join(output_dir, f".*{TMP_INFIX}*"))
    stale += glob.glob(os.path.join(output_dir, "checkpoint-*", f"*{TMP_INFIX}*"))
    for p in sorted(set(stale)):
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.remove(p)
        removed.append(p)
        _say(f"removed stale temporary {p} (left by a killed save or convert)")
    return removed


def weights_dtype(engine) -> str:
    return "bfloat16" if engine.bfloat16_enabled() else "float16" if engine.fp16_enabled() else "float32"


def save_checkpoint(trainer, metrics: dict | None = None) -> str:
    """Write ``checkpoint-<global step>`` of ``trainer`` (a ``PipelineTrainer``) on every rank; returns its path.

    Order: every rank writes its files (DeepSpeed's, its RNG state, its stage's per-layer optimizer states), rank 0
    the manifest and ``trainer_state.json``; barrier; rank 0 writes :data:`COMPLETE_MARKER`, then rotates; barrier.
    A save killed anywhere before the marker leaves a folder that resume skips and the next run removes."""
    import torch.distributed as dist

    from hfpipe.training import reshard

    args, state, step = trainer.args, trainer.state, trainer.state.global_step
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    if trainer.rank == 0 and os.path.isdir(path):  # a folder of this step from a save that did not finish
        shutil.rmtree(path)
    dist.barrier()
    from hfpipe.core.lora import adapter_only  # LoRA: the adapter (+ its optimizer state) only

    trainer.engine.save_checkpoint(path, client_state={"hfpipe_global_step": step},
                                   exclude_frozen_parameters=adapter_only(trainer.pipe))
    reshard.save_layer_states(trainer.engine, path)
    if trainer.rank == 0:
        from hfpipe.checkpoint import write_manifest

        pipe = trainer.pipe
        write_manifest(path, pipe.hfpipe_builder, pipe.layer_infos, parts=pipe.parts,
                       partition_method=args.partition_method, dtype=weights_dtype(trainer.engine),
                       source="PipelineTrainer", global_step=step)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(path)
    torch_save_atomic({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                      os.path.join(path, f"rng_state_{trainer.rank}.pth"))
    _track_best(args, state, metrics, path)
    if trainer.rank == 0:
        from hfpipe.training.state import state_dict  # HF's TrainerState JSON, the pipeline's extras inside

        write_json_atomic(os.path.join(path, STATE_FILE), state_dict(trainer))
    dist.barrier()  # every rank's files are on disk
    if trainer.rank == 0:
        write_json_atomic(os.path.join(path, COMPLETE_MARKER), {"global_step": step, "world_size": trainer.world_size,
                                                                "num_stages": trainer.num_stages})
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
    """Delete all but the newest ``limit`` complete checkpoints (and ``keep``, the best one). Called once the newest
    is complete, so a save that dies never costs the previous good checkpoint."""
    if not limit:
        return
    found = [p for p in _numbered(output_dir) if checkpoint_problem(p) is None]
    kept = set(found[-limit:]) | ({keep} if keep else set())
    for p in found:
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(trainer, path: str) -> int:
    """Restore weights, optimizer, LR schedule, best metric, log history and RNG states from ``path``; returns the
    step to continue from."""
    from hfpipe.training.state import read_state

    saved = read_state(path)  # TrainerState's fields and the pipeline's extras, flat
    if saved.get("train_batch_size") != trainer.global_batch_size:
        raise ValueError(f"{path} was written with a global batch of {saved.get('train_batch_size')}, this run "
                         f"uses {trainer.global_batch_size}; resume with the same batch settings.")
    saved_stages = saved.get("num_stages", trainer.num_stages)
    from hfpipe.core.lora import adapter_only
    from hfpipe.training import reshard

    same_world = saved.get("world_size", trainer.world_size) == trainer.world_size
    if saved_stages == trainer.num_stages and (same_world or not reshard.has_layer_states(path)):
        # DeepSpeed's own files: bit-exact (LoRA: they hold the adapter; the base stays as built, hence not strict)
        trainer.engine.load_checkpoint(path, load_module_strict=not adapter_only(trainer.pipe))
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
    """Resume a checkpoint written at another stage count (or world size): DeepSpeed loads the weights (layer files
    are indexed by the fixed layer list) and the LR schedule; the optimizer states -- Adam moments, step and the fp32
    masters of bf16/fp16 runs -- come from the checkpoint's per-layer files (``hfpipe.training.reshard``)."""
    from hfpipe.training import reshard

    if not reshard.has_layer_states(path):
        raise FileNotFoundError(f"{path} was saved with {saved_stages} pipeline stages and has no "
                                f"{reshard.FOLDER}/ (per-layer optimizer states); this run has {num_stages} stages. "
                                f"Resume it with --num_stages {saved_stages}.")
    from hfpipe.core.lora import adapter_only

    engine.load_checkpoint(path, load_optimizer_states=False, load_lr_scheduler_states=True,
                           load_module_strict=not adapter_only(engine.module))
    opt = engine.optimizer
    if hasattr(opt, "refresh_fp32_params"):  # bf16/fp16 optimizers keep fp32 masters of the loaded weights
        opt.refresh_fp32_params()
    reshard.load_layer_states(engine, path)
    if engine.lr_scheduler is not None:  # the optimizer's param groups did not come from the checkpoint
        for group, lr in zip(opt.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
