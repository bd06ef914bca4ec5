"""Callbacks of the pipeline trainer, in the shape of transformers' ``TrainerCallback``.

The trainer calls ``on_train_begin / on_step_end / on_log / on_evaluate / on_save / on_train_end`` with
``(args, state, control, **kwargs)`` where ``state`` is a ``transformers.TrainerState`` and ``control`` a
``transformers.TrainerControl``; so a user's existing ``TrainerCallback`` subclass works unchanged (setting
``control.should_training_stop`` stops the run). The built-in reporters below write only on global rank 0
(``state.is_world_process_zero``): a JSONL log, TensorBoard scalars, wandb and mlflow when installed, and tqdm.
"""

from __future__ import annotations

import importlib.util
import json
import os

from transformers import TrainerCallback

EVENTS = ("on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin", "on_step_end", "on_epoch_end", "on_log",
          "on_evaluate", "on_predict", "on_save", "on_train_end")


class CallbackHandler:
    def __init__(self, callbacks):
        self.callbacks = [c() if isinstance(c, type) else c for c in callbacks]

    def add(self, cb):
        self.callbacks.append(cb() if isinstance(cb, type) else cb)

    def call(self, event, args, state, control, **kwargs):
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is None:
                continue
            result = fn(args, state, control, **kwargs)
            if result is not None:
                control = result
        return control


def _scalars(logs: dict) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("step", "epoch")}


class JsonlLoggerCallback(TrainerCallback):
    """One JSON object per log event in ``output_dir/log.jsonl``."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}, default=float) + "\n")


class _Tracker(TrainerCallback):
    """A tracker that lives on global rank 0 from train begin to train end; subclasses say how to ``start`` it (the
    returned handle), ``log`` scalars to it and ``finish`` it."""

    def __init__(self):
        self.handle = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.handle is None:
            self.handle = self.start(args)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.handle is not None and logs:
            self.log(_scalars(logs), state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.finish()
            self.handle = None


def _run_config(args) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


class TensorBoardCallback(_Tracker):
    def start(self, args):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(os.path.join(args.output_dir, "runs", args.run_name or "hfpipe"))

    def log(self, scalars, step):
        for k, v in scalars.items():
            self.handle.add_scalar(k.replace("eval_", "eval/", 1) if k.startswith("eval_") else f"train/{k}", v, step)
        self.handle.flush()

    def finish(self):
        self.handle.close()


class WandbCallback(_Tracker):
    def start(self, args):
        import wandb

        return wandb.init(project=os.environ.get("WANDB_PROJECT", "hfpipe"), name=args.run_name,
                          config=_run_config(args))

    def log(self, scalars, step):
        self.handle.log(scalars, step=step)

    def finish(self):
        self.handle.finish()


class MLflowCallback(_Tracker):
    def start(self, args):
        import mlflow

        mlflow.start_run(run_name=args.run_name)
        mlflow.log_params({k: str(v)[:250] for k, v in _run_config(args).items()})
        return mlflow

    def log(self, scalars, step):
        self.handle.log_metrics(scalars, step=step)

    def finish(self):
        self.handle.end_run()


class ProgressCallback(TrainerCallback):
    """A tqdm bar on global rank 0, with the last loss in its postfix."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not args.disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in _scalars(logs).items() if k in ("loss", "learning_rate", "eval_loss")
                     or (k.startswith("eval_") and not k.endswith(("runtime", "per_second")))}
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


REPORTERS = {"tensorboard": (TensorBoardCallback, "tensorboard"), "wandb": (WandbCallback, "wandb"),
             "mlflow": (MLflowCallback, "mlflow")}


def default_callbacks(report_to) -> list:
    """JSONL + tqdm always; trackers from ``report_to`` that are installed (unknown names raise)."""
    out = [JsonlLoggerCallback(), ProgressCallback()]
    for name in report_to or []:
        if name in ("none", "None"):
            continue
        if name not in REPORTERS:
            raise ValueError(f"--report_to {name!r} is not supported; use any of {sorted(REPORTERS)} or none.")
        cls, module = REPORTERS[name]
        if importlib.util.find_spec(module) is None:
            import warnings

            warnings.warn(f"--report_to {name}: the {module} package is not installed; skipping it.")
            continue
        out.append(cls())
    return out
