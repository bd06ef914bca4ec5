"""The pipeline trainer's callbacks: transformers' own, plus the one log file the pipeline adds.

The trainer drives a ``transformers.trainer_callback.CallbackHandler`` with a ``TrainerState`` and a
``TrainerControl``, exactly as ``transformers.Trainer`` does: ``DefaultFlowCallback`` decides when to log, evaluate
and save (HF's ``logging_strategy``/``eval_strategy``/``save_strategy`` and step semantics), ``ProgressCallback`` is
the tqdm bar, and ``report_to`` resolves to the integration callbacks through
``transformers.integrations.get_reporting_integration_callbacks`` (``all``: every installed one; TensorBoard writes
under HF's logging folder). A user's ``TrainerCallback`` works unchanged. What hfpipe adds: ``output_dir/log.jsonl``
(one JSON object per log event, every rank-0 log of the run in one file that survives a crash).
"""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback


class JsonlLoggerCallback(TrainerCallback):
    """One JSON object per log event in ``output_dir/log.jsonl`` (global rank 0)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}, default=float) + "\n")


def default_callbacks(args) -> list:
    """HF Trainer's defaults for ``args``: ``DefaultFlowCallback``, the progress bar unless ``--disable_tqdm``,
    the ``--report_to`` integrations (offline-safe: W&B logs offline when the Hub is offline), and the JSONL log."""
    from transformers.integrations import get_reporting_integration_callbacks
    from transformers.trainer_callback import DefaultFlowCallback, ProgressCallback

    report_to = list(args.report_to or [])
    if "wandb" in report_to and os.environ.get("HF_HUB_OFFLINE") == "1":
        os.environ.setdefault("WANDB_MODE", "offline")
    out = [DefaultFlowCallback(), JsonlLoggerCallback()]
    if not args.disable_tqdm:
        out.append(ProgressCallback())
    return out + [cb() for cb in get_reporting_integration_callbacks(report_to)]
