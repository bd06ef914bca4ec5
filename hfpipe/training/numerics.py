"""A NaN/Inf in training stops the run with the step and the stage that produced it, or skips the step on request.

DeepSpeed's pipeline engine trains on through NaN losses in fp32 and bf16 (only fp16's loss scaler looks at
overflow), and by the time the loss is known every stage's weights have taken the update. hfpipe watches two places:

- each stage's forward (a hook on the stage module) records whether it turned finite inputs into non-finite
  outputs, so when the loss is NaN the first such stage can be named, with its layers;
- fp16's own overflow skips are DeepSpeed's; :func:`fp16_logs` puts them and the loss scale in the logs;
- the optimizer step: with ``skip_nonfinite_steps`` every rank checks its own gradients before the update and the
  replica agrees (one all-reduce over all ranks, at the optimizer step every rank executes once per batch) to skip
  the update and clear the gradients when any rank has a non-finite one, as fp16's scaler skips an overflow.

Written by hand because neither DeepSpeed nor transformers offers either check for a pipeline.
"""

from __future__ import annotations

import math

import torch


def fp16_logs(engine) -> dict:
    """fp16's dynamic loss scaling in the training logs: ``loss_scale`` (the scaler's current scale) and
    ``skipped_overflow_steps`` (steps DeepSpeed skipped on a gradient overflow since the start, as its engine counts
    them and saves them in checkpoints). Empty without fp16: bf16 and fp32 do not scale."""
    if not engine.fp16_enabled():
        return {}
    scale = engine._get_optimizer_loss_scale()
    logs = {"skipped_overflow_steps": int(engine.skipped_steps)}
    if scale is not None:
        logs["loss_scale"] = float(scale)
    return logs


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; the message names the step and the stage it came from."""


def _finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    return True


class NonFiniteGuard:
    """Attach to an hfpipe engine (``hfpipe.initialize``'s); call :meth:`after_step` with each step's loss."""

    def __init__(self, engine, *, skip: bool = False):
        self.engine, self.skip = engine, skip
        self.produced = False  # this stage turned finite inputs into non-finite outputs in the current step
        self.skipped_steps = 0
        self._skipped_now = False
        engine.module.register_forward_hook(self._watch)
        if skip:
            if engine.fp16_enabled():
                raise ValueError("--skip_nonfinite_steps with fp16: fp16's dynamic loss scaling already skips "
                                 "overflowing steps (counted in the logs); drop --skip_nonfinite_steps.")
            self._wrap_step(engine.optimizer)

    # ----------------------------------------------------------------------------------------------- watching
    def _watch(self, module, inputs, output) -> None:
        if not self.produced and _finite(inputs) and not _finite(output):
            self.produced = True

    def _first_producer(self) -> int | None:
        """The first stage of this replica whose forward made a non-finite output from finite inputs (all ranks of
        the replica's pipeline call this together)."""
        import torch.distributed as dist

        grid = self.engine.grid
        flags = torch.zeros(grid.pipe_parallel_size, dtype=torch.int32, device=self._device())
        flags[self.engine.stage_id] = int(self.produced)
        dist.all_reduce(flags, group=grid.get_pipe_parallel_group())
        bad = [s for s, f in enumerate(flags.tolist()) if f]
        return bad[0] if bad else None

    def _device(self) -> torch.device:
        p = next(self.engine.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ----------------------------------------------------------------------------------------------- skipping
    def _wrap_step(self, optimizer) -> None:
        import torch.distributed as dist

        step = optimizer.step

        def guarded_step(*args, **kwargs):
            params = [p for p in self.engine.module.parameters() if p.grad is not None]
            bad = torch.tensor([0 if all(bool(torch.isfinite(p.grad).all()) for p in params) else 1],
                               dtype=torch.int32, device=self._device())
            dist.all_reduce(bad)  # every rank reaches its optimizer step once per batch
            self._skipped_now = bool(bad.item())
            if self._skipped_now:
                for p in params:
                    p.grad = None
                self.skipped_steps += 1
                return None
            return step(*args, **kwargs)

        optimizer.step = guarded_step

    # ----------------------------------------------------------------------------------------------- per step
    def after_step(self, loss, step: int, describe_stage=None) -> bool:
        """Call on every rank after ``train_batch``. Returns True when the step was skipped (its loss is not to be
        logged); raises :class:`NonFiniteLossError` when the loss is NaN/Inf and skipping is off.
        ``describe_stage(s)`` names stage ``s``'s layers in the message."""
        value = float(loss)
        producer = self._first_producer() if not math.isfinite(value) else None
        self.produced = False
        if math.isfinite(value) and not self._skipped_now:
            return False
        if self.skip:
            self._skipped_now = False
            return True
        where = ("" if producer is None else f"; stage {producer}"
                 + (f" ({describe_stage(producer)})" if describe_stage else "")
                 + " was the first to turn finite inputs into NaN/Inf activations")
        raise NonFiniteLossError(
            f"step {step}: the training loss is {value}{where}. The weights have taken this step's update, so the "
            "run stops here: resume from the last checkpoint with a lower --learning_rate, --max_grad_norm 1.0 or "
            "bf16 instead of fp16, check the data, or pass --skip_nonfinite_steps to skip such steps.")


def check_initial_weights(engine, describe_stage=None) -> None:
    """Before the first step: refuse NaN/Inf weights on any stage (a damaged checkpoint or a bad init trains NaN
    every step otherwise). Every rank calls it; every rank raises the same error naming the stage(s)."""
    import torch.distributed as dist

    from hfpipe.core.validate import NonFiniteError, nonfinite

    bad = nonfinite(engine.module.named_parameters())
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32)
    flags[dist.get_rank()] = int(bool(bad))
    dist.all_reduce(flags)
    if not flags.any():
        return
    grid = engine.grid
    stages = sorted({grid._topo.get_coord(r).pipe for r, f in enumerate(flags.tolist()) if f})
    named = ", ".join(f"stage {s}" + (f" ({describe_stage(s)})" if describe_stage else "") for s in stages)
    mine = f"; here: {', '.join(n for n, _ in bad[:3])}" if bad else ""
    raise NonFiniteError(f"the weights of {named} hold NaN/Inf before training{mine}; the model or checkpoint is "
                         "damaged: load another copy (hfpipe convert refuses such weights too).")
