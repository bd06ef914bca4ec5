"""Zero-bubble pipeline schedules on DeepSpeed's ``PipelineEngine``: ZB-H1 (Qi et al., "Zero Bubble Pipeline
Parallelism", 2023), selected by ``schedule="zb-h1"`` (``hfpipe.initialize``, ``"pipeline": {"schedule": ...}`` in
the DeepSpeed config, ``--pipeline_schedule``).

DeepSpeed 0.19.8 runs 1F1B only (``PipelineEngine._train_schedule``) and has no split backward. ZB-H1 splits each
backward into

* **B** (:class:`BackwardInput`): the gradient of the stage's input only, sent to the previous stage at once -- the
  critical path of the pipeline now holds t_B instead of t_B + t_W;
* **W** (:class:`BackwardWeight`): the parameters' gradients, from the intermediate gradients B kept, placed where
  1F1B idles (its cooldown).

Both passes are torch's own (``torch.distributed.pipelining._backward.stage_backward_input`` /
``stage_backward_weight``), so W produces exactly the gradients one combined backward produces: the same autograd
nodes run on the same saved tensors, only at two moments. Stage ``i`` of ``p`` runs ``p - i`` warm-up forwards (as
1F1B) and keeps ``i`` W passes deferred in the steady state (:func:`zb_h1_order`), so that every stage holds at most
``p`` micro-batches of activations -- 1F1B's peak (its first stage's) -- while the bubble shrinks from
``(p-1)(t_F+t_B+t_W)`` to ``(p-1)(t_F+t_B-t_W)``. Later stages hold more than under 1F1B (up to ``p`` instead of
``p - i``), the busiest stage no more.

What is written here because DeepSpeed has none of it: the schedule (a ``TrainSchedule`` subclass yielding the
two new instructions), their engine handlers, and point-to-point messages that do not block the sender
(``torch.distributed.isend``): DeepSpeed's blocking send/recv is deadlock-free only in 1F1B's lock-step order, while
ZB-H1's order differs per stage. Each stage receives in the order its neighbour sends (one FIFO per direction), a
send never waits, so any order that respects the data dependencies runs. The first message of a step carries the
activation's shape and dtype. Evaluation (``eval_batch``) is DeepSpeed's own.

The first stage has no input gradient to send: its B is empty and its W runs the whole backward. With activation
checkpointing the segments use torch's non-reentrant checkpoint (DeepSpeed's reentrant one refuses
``autograd.grad``): a segment is recomputed in B, and W uses what the recomputation saved. Tied weights and data-parallel gradients are all-reduced
after the last W, as in 1F1B.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from hfpipe.core.dsconfig import ConfigError, check_schedule

__all__ = ["BackwardInput", "BackwardWeight", "ZeroBubbleH1Schedule", "ZeroBubbleEngine", "use_schedule",
           "zb_h1_order", "one_f_one_b_order", "simulate"]


# ------------------------------------------------------------------------------------------------- instructions
class BackwardInput(ds_schedule.BufferOpInstruction):
    """B: the gradient of the stage's input for the micro-batch in ``buffer_id`` (the loss on the last stage, the
    received output gradient elsewhere); the intermediate gradients the weights need are kept for W."""


class BackwardWeight(ds_schedule.BufferOpInstruction):
    """W: the parameters' gradients of the micro-batch in ``buffer_id``, accumulated into ``.grad``."""


class SendActivationAsync(ds_schedule.SendActivation):
    """Send the stage output without waiting for the receiver (``isend``)."""


class RecvActivationAsync(ds_schedule.RecvActivation):
    """Receive the previous stage's output (shape from the step's first message)."""


class SendGradAsync(ds_schedule.SendGrad):
    """Send the input gradient to the previous stage without waiting for it (``isend``)."""


class RecvGradAsync(ds_schedule.RecvGrad):
    """Receive the next stage's input gradient (shaped like this stage's output)."""


class FlushSends(ds_schedule.PipeInstruction):
    """Wait for this step's outstanding sends (before the gradient reductions)."""


# ------------------------------------------------------------------------------------------------- the orders
def zb_h1_order(stages: int, micro_batches: int, stage_id: int) -> list[tuple[str, int]]:
    """ZB-H1's compute order on one stage: ``[("F"|"B"|"W", micro_batch), ...]``. ``p - i`` warm-up forwards, then
    B, (W), F per micro-batch with ``i`` W passes kept deferred, then the rest of the B and W passes."""
    p, m, i = stages, micro_batches, stage_id
    warm = min(p - i, m)
    order = [("F", j) for j in range(warm)]
    nf, nb, nw = warm, 0, 0
    while nb < m:
        order.append(("B", nb))
        nb += 1
        if nb - nw > i:
            order.append(("W", nw))
            nw += 1
        if nf < m:
            order.append(("F", nf))
            nf += 1
    order += [("W", j) for j in range(nw, m)]
    return order


def one_f_one_b_order(stages: int, micro_batches: int, stage_id: int) -> list[tuple[str, int]]:
    """1F1B's compute order on one stage (what DeepSpeed's ``TrainSchedule`` runs), B = the whole backward."""
    warm = min(stages - stage_id, micro_batches)
    order = [("F", j) for j in range(warm)]
    nf = warm
    for j in range(micro_batches):
        order.append(("B", j))
        if nf < micro_batches:
            order.append(("F", nf))
            nf += 1
    return order


def simulate(schedule: str, stages: int, micro_batches: int, t_forward: float = 1.0, t_backward: float = 1.0,
             t_weight: float = 1.0, t_p2p: float = 0.0) -> dict:
    """Step time and activation memory of a schedule with fixed per-pass costs (free of any machine): ``t_backward``
    is B (the input gradient), ``t_weight`` W; 1F1B runs both as one backward. ``t_p2p`` is added to every
    message's latency. Returns ``step_time``, ``ideal_1f1b`` (``(m+p-1)(t_F+t_B+t_W)``), ``ratio`` (step time /
    1F1B ideal), ``peak_in_flight`` (micro-batches whose activations a stage holds at once, per stage) and
    ``busy`` (work per stage)."""
    name = check_schedule(schedule, num_stages=stages, micro_batches=micro_batches)
    p, m = stages, micro_batches
    split = name == "zb-h1" and p > 1
    orders = [(zb_h1_order if split else one_f_one_b_order)(p, m, i) for i in range(p)]

    def cost(op, i):
        if op == "F":
            return t_forward
        if not split:
            return t_backward + t_weight
        if i == 0:  # the first stage has no input gradient: its W is the whole backward
            return 0.0 if op == "B" else t_backward + t_weight
        return t_backward if op == "B" else t_weight

    done: dict[tuple[str, int, int], float] = {}
    clock, pos, live, peak = [0.0] * p, [0] * p, [0] * p, [0] * p
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for i in range(p):
            if pos[i] == len(orders[i]):
                continue
            op, j = orders[i][pos[i]]
            deps = {"F": [] if i == 0 else [("F", i - 1, j, t_p2p)],
                    "B": [("F", i, j, 0.0)] + ([] if i == p - 1 else [("B", i + 1, j, t_p2p)]),
                    "W": [("B", i, j, 0.0)]}[op]
            if not all(d[:3] in done for d in deps):
                continue
            start = max([clock[i]] + [done[d[:3]] + d[3] for d in deps])
            clock[i] = done[(op, i, j)] = start + cost(op, i)
            pos[i] += 1
            remaining -= 1
            progressed = True
            if op == "F":
                live[i] += 1
                peak[i] = max(peak[i], live[i])
            elif op == "W" or not split:
                live[i] -= 1
        if not progressed:  # cannot happen for the orders above; a guard for new ones
            raise RuntimeError(f"schedule {name} deadlocks at p={p}, m={m}")
    step = max(clock)
    ideal = (m + p - 1) * (t_forward + t_backward + t_weight)
    return {"schedule": name, "stages": p, "micro_batches": m, "step_time": step, "ideal_1f1b": ideal,
            "ratio": step / ideal, "peak_in_flight": peak, "busy": [m * (t_forward + t_backward + t_weight)] * p}


# ---------------------------------------------------------------------------------------------- the schedule
class ZeroBubbleH1Schedule(ds_schedule.TrainSchedule):
    """ZB-H1 as DeepSpeed instructions: one step per pass of :func:`zb_h1_order` (receive, compute, send), then
    the reductions and the optimizer step. Buffer ``j`` holds micro-batch ``j``."""

    def steps(self):
        first, last = self.stage_id == 0, self.stage_id == self.stages - 1
        for op, j in zb_h1_order(self.stages, self.micro_batches, self.stage_id):
            if op == "F":
                cmds = [] if first else [RecvActivationAsync(j)]
                if first or last:
                    cmds.append(ds_schedule.LoadMicroBatch(j))
                cmds.append(ds_schedule.ForwardPass(j))
                if not last:
                    cmds.append(SendActivationAsync(j))
            elif op == "B":
                cmds = ([] if last else [RecvGradAsync(j)]) + [BackwardInput(j)]
                if not first:
                    cmds.append(SendGradAsync(j))
            else:
                cmds = [BackwardWeight(j)]
            yield cmds
        yield [FlushSends(), ds_schedule.ReduceTiedGrads(), ds_schedule.ReduceGrads(), ds_schedule.OptimizerStep()]

    def num_pipe_buffers(self):
        return max(2, self.micro_batches)  # one per micro-batch; freed after its W, so no more memory than used


# ------------------------------------------------------------------------------------------------ the engine
_META = 8  # dtype id, ndim, up to 6 dims


class ZeroBubbleEngine(PipelineEngine):
    """A ``PipelineEngine`` that trains with :class:`ZeroBubbleH1Schedule` (made from DeepSpeed's engine by
    :func:`use_schedule`; ``deepspeed.initialize`` cannot be told an engine class)."""

    schedule_name = "zb-h1"

    def _train_schedule(self):
        return ZeroBubbleH1Schedule(micro_batches=self.micro_batches, stages=self.num_stages, stage_id=self.stage_id)

    def _exec_schedule(self, pipe_schedule):
        self._zb_sends: list = []  # (work, tensor) of outstanding isends
        self._zb_meta_sent = self._zb_meta = None
        self._zb_grads: dict[int, tuple] = {}  # micro-batch -> (work, buffer) of a posted gradient receive
        self._zb_acts: dict[int, tuple] = {}  # the same for the next activation
        self._zb_losses: dict[int, torch.Tensor] = {}
        self._zb_groups: dict[int, list] = {}
        try:
            super()._exec_schedule(pipe_schedule)
        finally:
            self._exec_flush_sends()

    # ---- messages
    def _peer(self, stage: int) -> int:
        return self.grid.stage_to_global(stage_id=stage)

    def _isend(self, tensor: torch.Tensor, stage: int) -> None:
        self._zb_sends = [(w, t) for w, t in self._zb_sends if not w.is_completed()]
        tensor = tensor.detach()
        self._zb_sends.append((dist.isend(tensor, self._peer(stage)), tensor))

    def _recv(self, tensor: torch.Tensor, stage: int) -> torch.Tensor:
        dist.irecv(tensor, self._peer(stage)).wait()
        return tensor

    def _post_recv(self, tensor: torch.Tensor, stage: int) -> tuple:
        """A receive posted ahead of its use, so that the message lands while this stage computes (messages from
        one peer match receives in the order they are posted)."""
        return dist.irecv(tensor, self._peer(stage)), tensor

    def _exec_flush_sends(self):
        for work, _ in getattr(self, "_zb_sends", []):
            work.wait()
        self._zb_sends = []

    def _exec_send_activations_async(self, buffer_id):
        out = self.pipe_buffers["outputs"][buffer_id]
        if not torch.is_tensor(out):
            raise ConfigError(f"schedule='zb-h1' needs each stage to send one tensor (hfpipe's to_pipeline packs the "
                              f"boundary into one); this stage sends a {type(out).__name__}; use schedule '1f1b'.")
        if self._zb_meta_sent is None:
            shape = list(out.shape)
            meta = torch.tensor([self.DTYPE_TO_ID[out.dtype], len(shape)] + shape + [0] * (_META - 2 - len(shape)),
                                dtype=torch.long, device=out.device)
            self._isend(meta, self.next_stage)
            self._zb_meta_sent = (out.shape, out.dtype)
        elif self._zb_meta_sent != (out.shape, out.dtype):
            raise ConfigError(f"schedule='zb-h1': micro-batches of one step differ in shape ({tuple(out.shape)} vs "
                              f"{tuple(self._zb_meta_sent[0])}); pad every micro-batch of a step to one length.")
        self._isend(out, self.next_stage)
        # its gradient comes back in micro-batch order: post the receive now
        self._zb_grads[buffer_id] = self._post_recv(torch.empty_like(out, memory_format=torch.contiguous_format),
                                                    self.next_stage)

    def _exec_recv_activations_async(self, buffer_id):
        if self._zb_meta is None:
            meta = self._recv(torch.zeros(_META, dtype=torch.long, device=self.device), self.prev_stage).tolist()
            self._zb_meta = (self.ID_TO_DTYPE[meta[0]], meta[2:2 + meta[1]])
        dtype, shape = self._zb_meta
        posted = self._zb_acts.pop(buffer_id, None)
        if posted is None:
            posted = self._post_recv(torch.empty(shape, dtype=dtype, device=self.device), self.prev_stage)
        if buffer_id + 1 < self.micro_batches:  # the next one, posted before this one is waited for
            self._zb_acts[buffer_id + 1] = self._post_recv(torch.empty(shape, dtype=dtype, device=self.device),
                                                           self.prev_stage)
        work, buf = posted
        work.wait()
        self.pipe_buffers["inputs"][buffer_id] = buf.requires_grad_(buf.is_floating_point())

    def _exec_recv_grads_async(self, buffer_id):
        work, grad = self._zb_grads[buffer_id]  # posted when the activation was sent
        work.wait()

    def _exec_send_grads_async(self, buffer_id):
        inp = self.pipe_buffers["inputs"][buffer_id]
        self._isend(inp.grad, self.prev_stage)
        inp.grad = None

    # ---- passes
    def _exec_forward_pass_zb(self, buffer_id):
        PipelineEngine._exec_forward_pass(self, buffer_id)
        if self.is_last_stage():
            self._zb_losses[buffer_id] = self.loss
        else:
            out = self.pipe_buffers["outputs"][buffer_id]
            if torch.is_tensor(out) and out._is_view():  # B detaches its outputs in place, which a view refuses
                self.pipe_buffers["outputs"][buffer_id] = out.clone()

    def _weights(self) -> list:
        return [p for p in self.module.parameters() if p.requires_grad]

    def _stage_outputs(self, buffer_id):
        """What this stage's backward starts from: the loss (the engine's output hook scales its gradient by the
        accumulation steps, as in ``engine.backward``) or the output with the received gradient."""
        if self.is_last_stage():
            return [self._zb_losses.pop(buffer_id)], None
        out = self.pipe_buffers["outputs"][buffer_id]
        return [out], [self._zb_grads.pop(buffer_id)[1]]

    def _exec_backward_input(self, buffer_id):
        if self.is_first_stage():
            return  # nothing to send upstream: W runs this stage's whole backward
        from torch.distributed.pipelining._backward import stage_backward_input

        outputs, grads = self._stage_outputs(buffer_id)
        self._running_engine_backward = True
        try:
            _, groups = stage_backward_input(outputs, grads, [self.pipe_buffers["inputs"][buffer_id]],
                                             iter(self._weights()))
        finally:
            self._running_engine_backward = False
        self._zb_groups[buffer_id] = groups
        self.pipe_buffers["outputs"][buffer_id] = None

    def _exec_backward_weight(self, buffer_id):
        from torch.distributed.pipelining._backward import stage_backward_weight

        self._running_engine_backward = True
        try:
            if self.is_first_stage():
                outputs, grads = self._stage_outputs(buffer_id)
                torch.autograd.backward(outputs, grads)
                self.pipe_buffers["outputs"][buffer_id] = None
            else:
                stage_backward_weight(iter(self._weights()), self._zb_groups.pop(buffer_id))
        finally:
            self._running_engine_backward = False
        if self.using_bf16_optimizer:  # low-precision grads into the fp32 accumulators, as DeepSpeed's backward
            self.optimizer.update_hp_grads(clear_lp_grads=True)
        self.pipe_buffers["inputs"][buffer_id] = None

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ds_schedule.ForwardPass: _exec_forward_pass_zb,
        BackwardInput: _exec_backward_input,
        BackwardWeight: _exec_backward_weight,
        SendActivationAsync: _exec_send_activations_async,
        RecvActivationAsync: _exec_recv_activations_async,
        SendGradAsync: _exec_send_grads_async,
        RecvGradAsync: _exec_recv_grads_async,
        FlushSends: _exec_flush_sends,
    }


#: schedule name -> engine class (1F1B: DeepSpeed's own)
ENGINES = {"1f1b": PipelineEngine, "zb-h1": ZeroBubbleEngine}


def use_schedule(engine: PipelineEngine, schedule: str | None) -> PipelineEngine:
    """Make a ``deepspeed.initialize`` pipeline engine train with ``schedule`` (``None``/``"1f1b"``: unchanged).
    The engine class is swapped in place: the subclass adds handlers and per-step state only."""
    name = check_schedule(schedule, num_stages=engine.num_stages, micro_batches=engine.micro_batches,
                          fp16=engine.fp16_enabled())
    cls = ENGINES[name]
    if name != "1f1b" and engine.num_stages < 2:
        return engine  # one stage: nothing to overlap, 1F1B is the same thing
    if name != "1f1b" and getattr(engine, "is_pipe_partitioned", False):
        raise ConfigError(f"schedule={name!r} with tensor-parallel pipe partitioning (pipe_partitioned): not "
                          "supported; use schedule '1f1b'.")
    if type(engine) is not cls:
        engine.__class__ = cls
    if name != "1f1b":
        # split backward runs autograd.grad on part of the graph, which reentrant checkpointing (DeepSpeed's
        # default) refuses; torch's non-reentrant checkpoint recomputes in B and keeps what W needs
        engine.module.activation_checkpoint_func = _non_reentrant_checkpoint
    return engine


def _non_reentrant_checkpoint(function, *args):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False)


def schedule_of(engine) -> str:
    """The schedule ``engine`` trains with."""
    return getattr(type(engine), "schedule_name", "1f1b")


def predict(schedule: str, stages: int, micro_batches: int, t_forward: float, t_backward: float,
            t_weight: float | None = None) -> dict:
    """:func:`simulate` for ``hfpipe plan``: ``t_backward`` is the whole backward; W is taken as half of it unless
    ``t_weight`` is given (a linear layer's input and weight gradients cost the same FLOPs)."""
    if t_weight is None:
        t_backward, t_weight = t_backward / 2, t_backward / 2
    return simulate(schedule, stages, micro_batches, t_forward, t_backward, t_weight)


def orders_table(schedule: str, stages: int, micro_batches: int) -> Sequence[str]:
    """One line per stage with the compute order (``F0 F1 B0 W0 ...``), for docs and debugging."""
    fn = zb_h1_order if check_schedule(schedule) == "zb-h1" else one_f_one_b_order
    return [" ".join(f"{op}{j}" for op, j in fn(stages, micro_batches, i)) for i in range(stages)]
