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

**DualPipeV** (DeepSeek-V3's, ``schedule="dualpipev"``) executes DeepSpeed 0.19.8's own ``DualPipeVSchedule``
instructions, which its ``PipelineEngine`` cannot run (no ``CommitP2P`` handler, no phases, no two-chunk module).
The model is cut into ``2p`` chunks and rank ``r`` holds chunks ``r`` (phase 0, activations flow towards the last
rank) and ``2p-1-r`` (phase 1, flowing back), so rank 0 holds the embedding and the head: the loss and a tied
embedding/head live on one rank, the tied "all-reduce" is over that one rank. What is written here:
:class:`VShapeStages` (the two-chunk ``PipelineModule``: builds both chunks' layers, runs the chunk of the current
phase) and :class:`DualPipeVEngine` (the handlers: phased sends/receives queued until ``CommitP2P``, which posts them
and waits for the receives; the turn of the V on the last rank, whose phase-0 output is its own phase-1 input; the
loss on rank 0's phase 1). Sends never wait (as above), receives are matched per direction and phase by tag (gloo;
NCCL matches them in order, which :func:`simulate` checks is the same order). DeepSpeed's schedule keeps each
backward whole (its ``weight_chunk`` is only a ``CommitP2P``), so the gradients are one backward's, as in 1F1B.
Evaluation runs the same schedule with ``forward_only=True``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from hfpipe.core.dsconfig import ConfigError, check_schedule

__all__ = ["BackwardInput", "BackwardWeight", "ZeroBubbleH1Schedule", "ZeroBubbleEngine", "DualPipeVEngine",
           "VShapeStages", "use_schedule", "zb_h1_order", "one_f_one_b_order", "dualpipev_order", "simulate"]


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
    if name == "dualpipev" and p > 1:
        return _simulate_dualpipev(p, m, t_forward, t_backward + t_weight, t_p2p)
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


def _v_down(phase: int) -> int:
    """Direction of the activations in ``phase``: towards the last rank (+1) in phase 0, back (-1) in phase 1."""
    return 1 if phase == 0 else -1


#: message tag per (what, phase): each direction of a rank pair carries one activation and one gradient stream
_V_TAGS = {("act", 0): 0, ("act", 1): 1, ("grad", 0): 2, ("grad", 1): 3}


def _v_message(cmd, rank: int):
    """``(send?, peer rank, tag)`` of a DualPipeV communication instruction, or None for any other."""
    phase = cmd.kwargs.get("phase", 0)
    d = _v_down(phase)
    if isinstance(cmd, ds_schedule.SendActivation):
        return True, rank + d, _V_TAGS["act", phase]
    if isinstance(cmd, ds_schedule.RecvActivation):
        return False, rank - d, _V_TAGS["act", phase]
    if isinstance(cmd, ds_schedule.SendGrad):
        return True, rank - d, _V_TAGS["grad", phase]
    if isinstance(cmd, ds_schedule.RecvGrad):
        return False, rank + d, _V_TAGS["grad", phase]
    return None


def dualpipev_programs(stages: int, micro_batches: int, forward_only: bool = False) -> list[list]:
    """DeepSpeed's ``DualPipeVSchedule`` instructions of every rank, flattened."""
    return [[cmd for step in ds_schedule.DualPipeVSchedule(micro_batches, stages, r, forward_only=forward_only).steps()
             for cmd in step] for r in range(stages)]


def dualpipev_order(stages: int, micro_batches: int, rank: int) -> list[tuple[str, int, int]]:
    """DualPipeV's compute order on one rank: ``[("F"|"B", phase, micro_batch), ...]`` (virtual stage ``rank`` in
    phase 0, ``2p-1-rank`` in phase 1), as DeepSpeed's ``DualPipeVSchedule`` issues it."""
    m = micro_batches
    out = []
    for cmd in dualpipev_programs(stages, m)[rank]:
        if isinstance(cmd, (ds_schedule.ForwardPass, ds_schedule.BackwardPass)):
            out.append(("F" if isinstance(cmd, ds_schedule.ForwardPass) else "B", cmd.phase, cmd.buffer_id % m))
    return out


def _simulate_dualpipev(p: int, m: int, t_forward: float, t_backward: float, t_p2p: float = 0.0, *,
                        rendezvous: bool = False, forward_only: bool = False) -> dict:
    """Runs DeepSpeed's ``DualPipeVSchedule`` instruction by instruction on ``p`` simulated ranks, as
    :class:`DualPipeVEngine` executes it: a chunk's forward takes ``t_forward / 2`` and its (whole) backward
    ``t_backward / 2`` (each rank holds two half-size chunks); sends are posted at ``CommitP2P`` and never wait
    (``rendezvous=True``: a commit also waits until each of its sends is received, NCCL's semantics), a commit waits
    for its receives. Checks what the engine relies on -- every rank pair receives each stream in the order it is
    sent, untagged too (NCCL); an input or gradient is there before the pass that uses it; no deadlock -- and
    raises ``RuntimeError`` otherwise. ``peak_in_flight`` counts a rank's chunk activations in units of a whole
    stage's (two chunks = one 1F1B micro-batch)."""
    progs = dualpipev_programs(p, m, forward_only)
    pc, clock = [0] * p, [0.0] * p
    queued: list[list] = [[] for _ in range(p)]  # per rank: (send?, peer, tag, buffer) until CommitP2P
    blocked: list[list | None] = [None] * p  # the ops of the commit a rank waits in
    posted: dict = {}  # (src, dst, tag, seq) -> (time posted, buffer)
    received: dict = {}  # (src, dst, tag, seq) -> time the receiver posted it
    seq_send: dict = {}
    seq_recv: dict = {}
    order_send: dict = {}  # untagged (src, dst) -> buffers in posting order, to compare with the receiver's
    order_recv: dict = {}
    ready = [set() for _ in range(p)]  # ("act"|"grad", buffer) that arrived
    live, peak = [0] * p, [0] * p
    m_buf = m

    def key_of(op, rank):
        send, peer, tag, buf = op
        return (rank, peer, tag) if send else (peer, rank, tag)

    def post(rank):
        ops = []
        for op in queued[rank]:
            send, peer, tag, buf = op
            stream = key_of(op, rank)
            table = seq_send if send else seq_recv
            seq = table.get(stream, 0)
            table[stream] = seq + 1
            (order_send if send else order_recv).setdefault(stream[:2], []).append((tag, buf))
            if send:
                posted[stream + (seq,)] = (clock[rank], buf)
            else:
                received[stream + (seq,)] = clock[rank]
            ops.append((send, stream + (seq,), buf, tag))
        queued[rank] = []
        return ops

    def try_finish(rank) -> bool:
        t = clock[rank]
        for send, key, buf, tag in blocked[rank]:
            if send:
                if rendezvous:
                    if key not in received:
                        return False
                    t = max(t, received[key])
                continue
            if key not in posted:
                return False
            sent_at, sent_buf = posted[key]
            if sent_buf % m_buf != buf % m_buf or (sent_buf >= m_buf) != (buf >= m_buf):
                raise RuntimeError(f"dualpipev p={p} m={m}: rank {rank} receives buffer {buf} on tag {tag} where "
                                   f"rank {key[0]} sent buffer {sent_buf}")
            t = max(t, sent_at + t_p2p)
        for send, key, buf, tag in blocked[rank]:
            if not send:
                ready[rank].add(("act" if tag < 2 else "grad", buf))
        clock[rank], blocked[rank] = t, None
        return True

    last = p - 1
    while any(pc[r] < len(progs[r]) or blocked[r] is not None for r in range(p)):
        progressed = False
        for r in range(p):
            if blocked[r] is not None:
                if not try_finish(r):
                    continue
                progressed = True
            while pc[r] < len(progs[r]):
                cmd = progs[r][pc[r]]
                pc[r] += 1
                progressed = True
                msg = _v_message(cmd, r)
                if msg is not None:
                    queued[r].append(msg + (cmd.buffer_id,))
                elif isinstance(cmd, ds_schedule.CommitP2P):
                    blocked[r] = post(r)
                    if not try_finish(r):
                        break
                elif isinstance(cmd, ds_schedule.ForwardPass):
                    buf, phase = cmd.buffer_id, cmd.phase
                    received_input = not (r == 0 and phase == 0) and not (r == last and phase == 1)
                    if received_input and ("act", buf) not in ready[r]:
                        raise RuntimeError(f"dualpipev p={p} m={m}: rank {r} runs forward {buf} before its input")
                    if r == last and phase == 1 and ("F", buf - m) not in ready[r]:
                        raise RuntimeError(f"dualpipev p={p} m={m}: the turn of the V runs before its phase 0")
                    ready[r].add(("F", buf))
                    clock[r] += t_forward / 2
                    live[r] += 1
                    peak[r] = max(peak[r], live[r])
                elif isinstance(cmd, ds_schedule.BackwardPass):
                    buf, phase = cmd.buffer_id, cmd.phase
                    received_grad = not (r == 0 and phase == 1) and not (r == last and phase == 0)
                    if received_grad and ("grad", buf) not in ready[r]:
                        raise RuntimeError(f"dualpipev p={p} m={m}: rank {r} runs backward {buf} before its gradient")
                    if ("F", buf) not in ready[r] or (r == last and phase == 0 and ("B", buf + m) not in ready[r]):
                        raise RuntimeError(f"dualpipev p={p} m={m}: rank {r} runs backward {buf} too early")
                    ready[r].add(("B", buf))
                    clock[r] += t_backward / 2
                    live[r] -= 1
        if not progressed:
            raise RuntimeError(f"dualpipev deadlocks at p={p}, m={m}"
                               + (" when sends wait for their receiver" if rendezvous else ""))
    untagged = all([b for _, b in order_send.get(k, [])] == [b for _, b in order_recv.get(k, [])]
                   and [t for t, _ in order_send.get(k, [])] == [t for t, _ in order_recv.get(k, [])]
                   for k in set(order_send) | set(order_recv))
    if not untagged:
        raise RuntimeError(f"dualpipev p={p} m={m}: a rank pair receives its messages in another order than they "
                           "were sent (untagged p2p, as NCCL matches them, would mix them up)")
    step = max(clock)
    ideal = (m + p - 1) * (t_forward + t_backward)
    return {"schedule": "dualpipev", "stages": p, "micro_batches": m, "step_time": step, "ideal_1f1b": ideal,
            "ratio": step / ideal, "peak_in_flight": [x / 2 for x in peak], "busy": [m * (t_forward + t_backward)] * p}


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


# --------------------------------------------------------------------------------------------------- DualPipeV
class VShapeStages:
    """The two-chunk stage of DualPipeV, mixed into a ``PipelineModule`` subclass (``hfpipe.pipeline``'s
    ``DualPipeVModule``): the module's ``parts`` hold ``2p`` chunks, rank ``r`` builds chunks ``r`` and ``2p-1-r``
    (global layer indices, so names, layer files and seeds are the 1F1B ones) and its forward runs the chunk of
    :attr:`active_chunk` (0: phase 0, 1: phase 1), set by :class:`DualPipeVEngine` before each forward.

    The forward is written here because DeepSpeed's runs one contiguous range of ``forward_funcs`` and looks them up
    again when a checkpointed segment is recomputed in backward (by then the other chunk may be active)."""

    #: what to_pipeline / use_schedule check a V-shaped module by
    v_shape = True
    active_chunk = 0

    def _partition_layers(self, method=None):
        p = self.num_stages
        parts = list(self._hfpipe_parts)
        if len(parts) != 2 * p + 1:
            raise ConfigError(f"schedule='dualpipev' needs 2 x {p} chunk boundaries (parts), got {len(parts) - 1} "
                              "chunks; build the module with to_pipeline(..., schedule='dualpipev').")
        self.parts = parts
        r = self._topo.get_coord(self.global_rank).pipe
        self.v_chunks = [(parts[r], parts[r + 1]), (parts[2 * p - 1 - r], parts[2 * p - r])]
        self._set_bounds(*self.v_chunks[0])

    def _build(self):
        sizes = []
        for start, stop in self.v_chunks:
            self._set_bounds(start, stop)
            before = len(self.forward_funcs)
            super()._build()
            sizes.append(len(self.forward_funcs) - before)
        self._set_bounds(*self.v_chunks[0])
        self.v_funcs = [self.forward_funcs[:sizes[0]], self.forward_funcs[sizes[0]:]]
        self.v_indices = [i for start, stop in self.v_chunks for i in range(start, stop)]

    def virtual_stage(self, chunk: int) -> int:
        """The chunk's position in the model (0 .. 2p-1)."""
        return self.stage_id if chunk == 0 else 2 * self.num_stages - 1 - self.stage_id

    def stage_owner(self, layer_idx):
        """The rank that holds ``layer_idx`` (DeepSpeed groups tied weights by it: the embedding and a tied head
        are both on rank 0)."""
        c = next(c for c in range(len(self.parts) - 1) if self.parts[c] <= layer_idx < self.parts[c + 1])
        return c if c < self.num_stages else 2 * self.num_stages - 1 - c

    def layer_index(self, local: int) -> int:
        return self.v_indices[local]

    def ckpt_layer_path(self, ckpt_dir, local_layer_idx):
        return super().ckpt_layer_path(ckpt_dir, self.v_indices[local_layer_idx] - self._local_start)

    def ckpt_layer_path_list(self, ckpt_dir, local_layer_idx):
        return super().ckpt_layer_path_list(ckpt_dir, self.v_indices[local_layer_idx] - self._local_start)

    def forward(self, forward_input):
        chunk = self.active_chunk
        c = self.virtual_stage(chunk)
        x = self.adapter.unpack_boundary(forward_input) if c > 0 else forward_input
        funcs = self.v_funcs[chunk]
        interval = self.activation_checkpoint_interval
        if interval <= 0:
            x = _sequential(funcs)(x)
        else:
            for s in range(0, len(funcs), interval):
                part = funcs[s:s + interval]
                x = x if isinstance(x, tuple) else (x,)
                x = (self.activation_checkpoint_func(_sequential(part), *x) if self._is_checkpointable(part)
                     else _sequential(part)(*x))
        return self.adapter.pack_boundary(x) if c < 2 * self.num_stages - 1 else x


def _sequential(funcs):
    def run(*inputs):
        x = inputs[0] if len(inputs) == 1 else inputs
        for f in funcs:
            x = f(x)
        return x
    return run


class DualPipeVEngine(ZeroBubbleEngine):
    """A ``PipelineEngine`` that trains (and evaluates) with DeepSpeed's own ``DualPipeVSchedule`` on a
    :class:`VShapeStages` module (made by :func:`use_schedule`). Rank 0 holds the loss, so here it is the "last
    stage" (``is_last_stage``: where DeepSpeed and hfpipe look for the loss and the logits)."""

    schedule_name = "dualpipev"

    def _train_schedule(self):
        return ds_schedule.DualPipeVSchedule(self.micro_batches, self.num_stages, self.stage_id)

    def _inference_schedule(self, micro_batches):
        return ds_schedule.DualPipeVSchedule(micro_batches, self.num_stages, self.stage_id, forward_only=True)

    def is_last_stage(self):
        return self.stage_id == 0

    def _loss_stage_global_rank(self):
        return self.grid.stage_to_global(0)

    def _backward_prologue_per_tensor(self, grad):
        return grad  # rank 0 holds outputs of both phases; the loss is divided by the accumulation steps instead

    def _exec_schedule(self, pipe_schedule):
        self._zb_sends = []
        self._v_m = pipe_schedule.micro_batches
        self._v_queue: list = []  # (send?, peer rank, tag, tensor, buffer kind, buffer id) until CommitP2P
        self._v_meta = None  # (dtype, shape) of this step's boundary tensors
        self._v_meta_sent = False
        self._v_grads: dict[int, torch.Tensor] = {}
        self._zb_losses = {}
        try:
            PipelineEngine._exec_schedule(self, pipe_schedule)
        finally:
            self._exec_flush_sends()

    # ---- messages
    def _v_boundary(self, buffer_id) -> torch.Tensor:
        out = self.pipe_buffers["outputs"][buffer_id]
        if not torch.is_tensor(out):
            raise ConfigError(f"schedule='dualpipev' needs each chunk to send one tensor (hfpipe's to_pipeline packs "
                              f"the boundary into one); this one sends a {type(out).__name__}; use schedule '1f1b'.")
        return out

    def _exec_v_send_activations(self, buffer_id, phase=0):
        out = self._v_boundary(buffer_id)
        peer = self.stage_id + _v_down(phase)
        if phase == 0 and not self._v_meta_sent:  # the step's first message to the next rank: shape and dtype
            shape = list(out.shape)
            meta = torch.tensor([self.DTYPE_TO_ID[out.dtype], len(shape)] + shape + [0] * (_META - 2 - len(shape)),
                                dtype=torch.long, device=out.device)
            self._zb_sends.append((dist.isend(meta, self._peer(peer), tag=_V_TAGS["act", 0]), meta))
            self._v_meta_sent = True
        if self._v_meta is None:
            self._v_meta = (out.dtype, list(out.shape))
        elif self._v_meta != (out.dtype, list(out.shape)):
            raise ConfigError(f"schedule='dualpipev': micro-batches of one step differ in shape ({tuple(out.shape)} "
                              f"vs {tuple(self._v_meta[1])}); pad every micro-batch of a step to one length.")
        self._v_queue.append((True, peer, _V_TAGS["act", phase], out.detach(), None, buffer_id))

    def _exec_v_recv_activations(self, buffer_id, phase=0):
        peer = self.stage_id - _v_down(phase)
        if self._v_meta is None:  # a rank's first receive of a step is a phase-0 activation, after the shape
            meta = torch.zeros(_META, dtype=torch.long, device=self.device)
            dist.irecv(meta, self._peer(peer), tag=_V_TAGS["act", 0]).wait()
            meta = meta.tolist()
            self._v_meta = (self.ID_TO_DTYPE[meta[0]], meta[2:2 + meta[1]])
        dtype, shape = self._v_meta
        self._v_queue.append((False, peer, _V_TAGS["act", phase], torch.empty(shape, dtype=dtype, device=self.device),
                              "inputs", buffer_id))

    def _exec_v_send_grads(self, buffer_id, phase=0):
        inp = self.pipe_buffers["inputs"][buffer_id]
        grad = inp.grad if inp.grad is not None else torch.zeros_like(inp)
        self._v_queue.append((True, self.stage_id - _v_down(phase), _V_TAGS["grad", phase], grad, None, buffer_id))
        self.pipe_buffers["inputs"][buffer_id] = None

    def _exec_v_recv_grads(self, buffer_id, phase=0):
        out = self._v_boundary(buffer_id)
        self._v_queue.append((False, self.stage_id + _v_down(phase), _V_TAGS["grad", phase],
                              torch.empty_like(out, memory_format=torch.contiguous_format), "grads", buffer_id))

    def _exec_commit_p2p(self):
        """Post the queued sends (not waited for until the step ends) and receives, and wait for the receives."""
        self._zb_sends = [(w, t) for w, t in self._zb_sends if not w.is_completed()]
        recvs = []
        for send, peer, tag, tensor, kind, buffer_id in self._v_queue:
            if send:
                self._zb_sends.append((dist.isend(tensor, self._peer(peer), tag=tag), tensor))
            else:
                recvs.append((dist.irecv(tensor, self._peer(peer), tag=tag), tensor, kind, buffer_id))
        self._v_queue = []
        for work, tensor, kind, buffer_id in recvs:
            work.wait()
            if kind == "inputs":
                self.pipe_buffers["inputs"][buffer_id] = tensor.requires_grad_(tensor.is_floating_point())
            else:
                self._v_grads[buffer_id] = tensor

    # ---- passes
    def _exec_v_load_micro_batch(self, buffer_id):
        """Rank 0 phase 0: the inputs into ``buffer_id``, the labels to the phase-1 buffer of the same micro-batch
        (where the loss is computed)."""
        batch = self._next_batch()
        inputs = batch[0]
        self.pipe_buffers["inputs"][buffer_id] = (inputs.clone().to(self.device).detach() if torch.is_tensor(inputs)
                                                  else tuple(x.clone().detach().to(self.device) for x in inputs))
        labels = batch[1]
        self.pipe_buffers["labels"][buffer_id + self._v_m] = (
            labels.to(self.device) if torch.is_tensor(labels) else tuple(x.to(self.device).detach() for x in labels))

    def _exec_v_forward_pass(self, buffer_id, phase=0):
        m, rank, last = self._v_m, self.stage_id, self.num_stages - 1
        if rank == last and phase == 1:  # the turn of the V: this rank's own phase-0 output is the input
            turn = self.pipe_buffers["outputs"][buffer_id - m].detach()
            self.pipe_buffers["inputs"][buffer_id] = turn.requires_grad_(turn.is_floating_point())
        x = self.pipe_buffers["inputs"][buffer_id]
        x = tuple(t.clone() for t in x) if isinstance(x, tuple) else x.clone()
        self.module.active_chunk = phase
        outputs = super(PipelineEngine, self).forward(x)  # DeepSpeedEngine.forward (its hooks, autocast)
        if not self.module.training:
            from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing

            ds_checkpointing.reset()
        self.pipe_buffers["outputs"][buffer_id] = outputs
        if not (rank == 0 and phase == 1):
            return
        if self._compute_loss and self.module.loss_fn is not None:
            loss = self.module.loss_fn(outputs, self.pipe_buffers["labels"][buffer_id])
        else:
            loss = outputs
        self.loss = loss
        if self.eval_return_logits:
            self.outputs = outputs
        if torch.is_tensor(loss):
            self.fwd_outputs.append(loss.detach())
            self.total_loss = loss.detach().clone() if self.total_loss is None else self.total_loss + loss.detach()
        else:
            self.fwd_outputs.append([t.detach() for t in loss])
            self.total_loss = ([t.detach().clone() for t in loss] if self.total_loss is None
                               else [a + t.detach() for a, t in zip(self.total_loss, loss)])
        if self.module.training:
            self._zb_losses[buffer_id] = loss

    def _exec_v_backward_pass(self, buffer_id, phase=0):
        m, rank, last = self._v_m, self.stage_id, self.num_stages - 1
        if rank == 0 and phase == 1:
            tensors, grads = [self._zb_losses.pop(buffer_id) / self.gradient_accumulation_steps()], None
            self.pipe_buffers["labels"][buffer_id] = None
        elif rank == last and phase == 0:  # the turn of the V: the phase-1 input's gradient
            tensors = [self.pipe_buffers["outputs"][buffer_id]]
            turn = self.pipe_buffers["inputs"][buffer_id + m]
            grads = [turn.grad if turn.grad is not None else torch.zeros_like(turn)]
            self.pipe_buffers["inputs"][buffer_id + m] = None
        else:
            tensors, grads = [self.pipe_buffers["outputs"][buffer_id]], [self._v_grads.pop(buffer_id)]
        self._running_engine_backward = True
        try:
            torch.autograd.backward(tensors, grads)
        finally:
            self._running_engine_backward = False
        if self.using_bf16_optimizer:  # low-precision grads into the fp32 accumulators, as DeepSpeed's backward
            self.optimizer.update_hp_grads(clear_lp_grads=True)
        self.pipe_buffers["outputs"][buffer_id] = None
        if rank == 0 and phase == 0:
            self.pipe_buffers["inputs"][buffer_id] = None  # token ids: no gradient to send

    def _exec_v_reduce_tied_grads(self):
        self._exec_flush_sends()
        PipelineEngine._exec_reduce_tied_grads(self)

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ds_schedule.LoadMicroBatch: _exec_v_load_micro_batch,
        ds_schedule.ForwardPass: _exec_v_forward_pass,
        ds_schedule.BackwardPass: _exec_v_backward_pass,
        ds_schedule.SendActivation: _exec_v_send_activations,
        ds_schedule.RecvActivation: _exec_v_recv_activations,
        ds_schedule.SendGrad: _exec_v_send_grads,
        ds_schedule.RecvGrad: _exec_v_recv_grads,
        ds_schedule.CommitP2P: _exec_commit_p2p,
        ds_schedule.ReduceTiedGrads: _exec_v_reduce_tied_grads,
    }


#: schedule name -> engine class (1F1B: DeepSpeed's own)
ENGINES = {"1f1b": PipelineEngine, "zb-h1": ZeroBubbleEngine, "dualpipev": DualPipeVEngine}


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
    v_shape = getattr(engine.module, "v_shape", False)
    if v_shape != (name == "dualpipev"):
        raise ConfigError(f"schedule={name!r} on a module built for "
                          f"{'dualpipev' if v_shape else 'one chunk per stage'}: dualpipev needs its two chunks per "
                          "rank from to_pipeline(..., schedule='dualpipev') and no other schedule can run them; pass "
                          "the same schedule to to_pipeline and initialize.")
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
    """One line per stage with the compute order (``F0 F1 B0 W0 ...``; dualpipev marks phase-1 passes ``F0'``),
    for docs and debugging."""
    name = check_schedule(schedule, num_stages=stages, micro_batches=micro_batches)
    if name == "dualpipev" and stages > 1:
        return [" ".join(f"{op}{j}{chr(39) * phase}" for op, phase, j in dualpipev_order(stages, micro_batches, i))
                for i in range(stages)]
    fn = zb_h1_order if name == "zb-h1" else one_f_one_b_order
    return [" ".join(f"{op}{j}" for op, j in fn(stages, micro_batches, i)) for i in range(stages)]
