"""The trainer's ``transformers.TrainerState`` and ``trainer_state.json``: HF's own file, hfpipe's extras inside it.

``trainer_state.json`` is ``TrainerState``'s JSON, so ``transformers.TrainerState.load_from_json`` reads it. What a
pipeline resume needs besides (data position, seed, world size, stage count) goes where HF's loader allows extra
state: ``stateful_callbacks`` (``{"PipelineTrainer": {"args": {}, "attributes": {...}}}``, the shape of HF's
``ExportableState``). :func:`read_state` gives both back as one flat dict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

EXTRAS_KEY = "PipelineTrainer"


def new_state(trainer, callbacks) -> "TrainerState":  # noqa: F821
    """A ``TrainerState`` as ``transformers.Trainer`` builds one: process flags, the stateful callbacks, and the
    step intervals of ``DefaultFlowCallback`` (``< 1``: a ratio of the training steps)."""
    from transformers import TrainerState
    from transformers.trainer_callback import ExportableState

    args = trainer.args
    state = TrainerState(is_local_process_zero=int(os.environ.get("LOCAL_RANK", 0)) == 0,
                         is_world_process_zero=trainer.rank == 0,
                         stateful_callbacks=[cb for cb in callbacks if isinstance(cb, ExportableState)])
    state.max_steps = trainer.max_steps
    state.train_batch_size = trainer.global_batch_size
    if trainer.steps_per_epoch:
        state.num_train_epochs = math.ceil(trainer.max_steps / trainer.steps_per_epoch)
    total = max(trainer.max_steps, 1)
    state.logging_steps = args.steps("logging_steps", total) or 1
    state.eval_steps = args.steps("eval_steps", total) or state.logging_steps
    state.save_steps = args.steps("save_steps", total)
    return state


def state_dict(trainer) -> dict:
    """``trainer_state.json`` of ``trainer`` now: ``TrainerState``'s fields, the pipeline's extras in
    ``stateful_callbacks``."""
    state, step = trainer.state, trainer.state.global_step
    epoch, b = divmod(step, trainer.steps_per_epoch) if trainer.steps_per_epoch else (0, 0)
    extras = {"data_position": {"epoch": epoch, "batch_in_epoch": b,
                                "examples_seen": step * trainer.global_batch_size},
              "seed": trainer.args.seed, "world_size": trainer.world_size, "num_stages": trainer.num_stages}
    out = dataclasses.asdict(state)
    callbacks = state.stateful_callbacks if isinstance(state.stateful_callbacks, dict) else {}
    out["stateful_callbacks"] = {**callbacks, EXTRAS_KEY: {"args": {}, "attributes": extras}}
    out["max_steps"], out["train_batch_size"] = trainer.max_steps, trainer.global_batch_size
    return out


def read_state(path: str) -> dict:
    """A checkpoint's ``trainer_state.json`` as one flat dict (HF's fields and the pipeline's extras)."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        saved = json.load(f)
    extras = ((saved.get("stateful_callbacks") or {}).get(EXTRAS_KEY) or {}).get("attributes", {})
    return {**saved, **extras}
