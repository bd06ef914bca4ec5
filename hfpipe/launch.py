"""Joining the process group with a timeout, and a pool of N gloo ranks on this machine that runs functions on
every rank.

:func:`init_distributed` is how every hfpipe process joins: one timeout (``--ddp_timeout``; default
:data:`DEFAULT_TIMEOUT_S` on CPU) for the rendezvous and for every process group created afterwards (DeepSpeed's
pipeline, data-parallel and tied-weight groups), and a rank or node that never joins is named on rank 0.
:func:`guard_batch` turns a collective that timed out inside a pipeline step into one line naming the stage that
stopped answering, and leaves the engine usable after a step that raised.

Used by ``hfpipe verify`` and by the test-suite: processes start, import torch/transformers/DeepSpeed and join the
process group once, then run many cases -- start-up is paid once per pool, not per case. A case that fails or
hangs on any rank tears the pool down (a rank stuck in a collective cannot be recovered) and raises with the
traceback of the rank that failed.
"""

from __future__ import annotations

import gc
import os
import queue
import socket
import traceback

import torch.multiprocessing as mp


#: seconds a rank waits for a peer (rendezvous and every collective) on CPU; HF's ``ddp_timeout`` default (1800 s)
#: on GPU. DeepSpeed's own default is 30 minutes for both, which turned a frozen peer into a long hang.
DEFAULT_TIMEOUT_S = 300
GPU_TIMEOUT_S = 1800


class RankError(RuntimeError):
    pass


class PeerTimeout(RuntimeError):
    """A rank or stage did not answer within the timeout."""

    #: whether rank 0 reports it for every rank (``hfpipe.training.failfast``): a timeout is seen by the rank that
    #: waited, so each says its own
    rank_0_reports = False


class NeverJoined(PeerTimeout):
    """Ranks that never reached the rendezvous: rank 0 names them, and tells the ranks that did come."""

    rank_0_reports = True


def default_timeout() -> int:
    import torch

    return GPU_TIMEOUT_S if torch.cuda.is_available() else DEFAULT_TIMEOUT_S


def resolve_timeout(args) -> float:
    """Seconds from ``args.ddp_timeout`` (HF's ``TrainingArguments`` name): the value given, or
    :func:`default_timeout` when it was not set (HF's 1800 s default is read as "not set" unless typed)."""
    import sys

    value = getattr(args, "ddp_timeout", None)
    typed = "ddp_timeout" in (getattr(args, "_explicit_fields", None) or ()) or "--ddp_timeout" in sys.argv
    if value is None or (value == GPU_TIMEOUT_S and not typed):
        return default_timeout()
    if value <= 0:
        raise ValueError(f"--ddp_timeout {value}: must be a positive number of seconds (default "
                         f"{DEFAULT_TIMEOUT_S} on CPU, {GPU_TIMEOUT_S} on GPU).")
    return float(value)


def _node_of(rank: int) -> str:
    """``node K`` for a global rank under DeepSpeed's launcher (``LOCAL_SIZE`` ranks per node), else ``''``."""
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 0)
    nodes = int(os.environ.get("CROSS_SIZE") or 0)
    return f"node {rank // local}" if local and nodes > 1 else ""


def _rendezvous_store(rank: int, world: int, timeout):
    """A TCPStore on ``MASTER_ADDR:MASTER_PORT`` where every rank checks in, so that rank 0 can name the ones that
    never came (torch's own rendezvous only counts them). ``None`` under torchrun's agent store."""
    import time

    from torch.distributed import TCPStore

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        store = TCPStore(addr, port, world_size=world, is_master=rank == 0, timeout=timeout,
                         wait_for_workers=False)
    except Exception as e:  # a client that never reached the master
        raise PeerTimeout(f"rank {rank}: the master (rank 0 at {addr}:{port}) did not answer within "
                          f"{timeout.total_seconds():.0f} s ({type(e).__name__}); start node 0 (and check "
                          "--master_addr/--master_port), or raise --ddp_timeout.") from None
    store.set(f"hfpipe/joined/{rank}", socket.gethostname())
    if rank == 0:
        keys = [f"hfpipe/joined/{r}" for r in range(world)]
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            if not missing:
                store.set("hfpipe/go", "ok")
                break
            if time.monotonic() > deadline:
                nodes = sorted({_node_of(r) for r in missing} - {""})
                where = f" ({', '.join(nodes)})" if nodes else ""
                msg = (f"rank(s) {', '.join(map(str, missing))}{where} of {world} never joined within "
                       f"{timeout.total_seconds():.0f} s (--ddp_timeout); start every node's launcher with the same "
                       "--master_addr/--master_port and --num_nodes, or raise --ddp_timeout.")
                store.set("hfpipe/go", msg)
                raise NeverJoined(msg)
            time.sleep(0.05)
    else:
        try:
            store.wait(["hfpipe/go"])
        except Exception:
            raise PeerTimeout(f"rank {rank}: rank 0 did not finish the rendezvous within "
                              f"{timeout.total_seconds():.0f} s (--ddp_timeout).") from None
        go = store.get("hfpipe/go").decode()
        if go != "ok":
            raise NeverJoined(go)
    from torch.distributed import PrefixStore

    return PrefixStore("hfpipe/pg", store)


def init_distributed(timeout_s: float | None = None, backend: str | None = None) -> None:
    """Join the process group (``RANK``/``WORLD_SIZE``/``MASTER_*`` from the launcher) through
    ``deepspeed.init_distributed(timeout=...)``; the timeout also becomes torch's default for every process group
    created later (DeepSpeed builds its pipeline grid's groups without passing one). A no-op if already joined,
    except that a given ``timeout_s`` still applies to the groups created from now on."""
    from datetime import timedelta

    import deepspeed
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=float(timeout_s if timeout_s else default_timeout()))
    if timeout_s or not (dist.is_available() and dist.is_initialized()):
        c10d.default_pg_timeout = timeout  # what new_group() uses when no timeout is passed
        c10d.default_pg_nccl_timeout = timeout
    if dist.is_available() and dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "WORLD_SIZE" not in os.environ:  # a plain `python script.py`: one process, one stage
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    os.environ.setdefault("LOCAL_RANK", "0")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = _rendezvous_store(rank, world, timeout) if world > 1 else None
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)


#: DeepSpeed pipeline instructions -> which peer a rank waits for in them (relative stage, or a group)
_WAITS_ON = {"_exec_recv_activations": -1, "_exec_recv_grads": +1, "_exec_send_activations": +1,
             "_exec_send_grads": -1, "_exec_reduce_tied_grads": "the stages sharing a tied weight",
             "_exec_reduce_grads": "the other data-parallel replicas of this stage",
             "_aggregate_total_loss": "the last stage (loss broadcast)", "_bcast_pipe_scalar": "the last stage"}


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


def reset_after_failure(engine) -> None:
    """Undo what a ``train_batch``/``eval_batch`` that raised half-way leaves behind, so that the next call runs (or
    fails with its own error): DeepSpeed starts its ``train_batch`` timer (and, with ``wall_clock_breakdown``, the
    micro-step ones) before the schedule and stops them after it, so one exception left them started and every
    later call died on ``train_batch timer has already been started``; the gradients the failed batch accumulated
    would otherwise be added to the next batch's; ``_force_grad_boundary`` stays set by a failed optimizer step.
    DeepSpeed has no reset of its own for this."""
    timers = getattr(engine, "timers", None)
    for timer in (timers.get_timers().values() if hasattr(timers, "get_timers") else ()):
        if getattr(timer, "started_", False):
            timer.reset()
    if getattr(engine, "tput_timer", None) is not None:
        engine.tput_timer.started = False
    engine._force_grad_boundary = False
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "zero_grad"):
        optimizer.zero_grad()
    engine.module.zero_grad(set_to_none=True)


def guard_batch(engine, fn):
    """``fn`` (``engine.train_batch`` / ``eval_batch``) that leaves the engine usable when it raises
    (:func:`reset_after_failure`), and with a collective that times out re-raised as :class:`PeerTimeout` naming
    the stage this rank was waiting for, found from the pipeline instruction that was running (DeepSpeed's and
    gloo's own message names neither)."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            reset_after_failure(engine)
            if not _is_timeout(e):
                raise
            tb, waits = e.__traceback__, None
            while tb is not None:
                waits = _WAITS_ON.get(tb.tb_frame.f_code.co_name, waits)
                tb = tb.tb_next
            stage, stages = engine.stage_id, engine.num_stages
            if isinstance(waits, int):
                peer = stage + waits
                who = f"stage {peer}" + (f" ({_node_of(engine.grid.stage_to_global(peer))})"
                                         if _node_of(engine.grid.stage_to_global(peer)) else "")
            else:
                who = waits or "a peer stage"
            import torch.distributed as dist

            from datetime import timedelta

            limit = getattr(dist.distributed_c10d, "default_pg_timeout", timedelta(0))
            raise PeerTimeout(f"rank {dist.get_rank()} (stage {stage} of {stages}): {who} stopped answering; no "
                              f"reply within {limit.total_seconds():.0f} s (--ddp_timeout). Check that rank's log "
                              f"(a hang or a crash there), or raise --ddp_timeout. [{str(e).splitlines()[0][:200]}]"
                              ) from None
    return wrapped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, jobs, results, env: dict, pg_timeout=None) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        import logging

        import torch

        torch.set_num_threads(1)
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        init_distributed(pg_timeout, backend="gloo")
    except Exception:
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args, kwargs = job
        groups = _process_groups()
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # report everything, the parent decides
            results.put((rank, False, traceback.format_exc()))
        finally:
            _destroy_groups_since(groups)
    # Leave without the interpreter's shutdown: torch.distributed / DeepSpeed exit handlers wait on a process group
    # whose peers are exiting too (seconds per pool, half a minute on a busy machine). Results are flushed first.
    results.close()
    results.join_thread()
    os._exit(0)


def _process_groups() -> set:
    from torch.distributed import distributed_c10d as c10d

    return set(c10d._world.pg_map)


def _destroy_groups_since(before: set) -> None:
    """Destroy the process groups a job created (every engine builds its grid's groups anew). Left alive, each gloo
    group keeps its threads: after a few hundred cases an idle rank held ~1700 threads, many of them runnable, which
    slowed everything else on the machine."""
    import deepspeed.comm as ds_dist
    from deepspeed.utils import groups as ds_groups
    from torch.distributed import distributed_c10d as c10d

    for pg in [g for g in list(c10d._world.pg_map) if g not in before and g is not c10d.GroupMember.WORLD]:
        try:
            ds_dist.destroy_process_group(pg)  # also drops DeepSpeed's own references to it
        except Exception:  # already gone / backend refused: nothing to release
            pass
    ds_groups.mpu = None  # the next engine sets its own grid
    gc.collect()  # engines and grids sit in reference cycles; their groups' threads end when they are freed


class DistributedPool:
    """``with DistributedPool(4) as pool: per_rank = pool.run(fn, *args)``. ``timeout``: seconds the parent waits
    for a job's results; ``pg_timeout``: the ranks' process-group timeout (:func:`init_distributed`)."""

    def __init__(self, world_size: int, timeout: float = 600.0, env: dict | None = None,
                 pg_timeout: float | None = None):
        self.world_size = world_size
        self.timeout = timeout
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        base_env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        base_env.update(env or {})
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, world_size, port, self._jobs[r], self._results, base_env, pg_timeout))
                       for r in range(world_size)]
        for p in self._procs:
            p.start()
        self._collect("start-up")

    def _collect(self, what: str) -> list:
        out: list = [None] * self.world_size
        errors = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._results.get(timeout=self.timeout)
            except queue.Empty:
                self.close(force=True)
                raise RankError(f"{what}: no answer from all {self.world_size} ranks within {self.timeout:.0f}s "
                                "(a rank hung, probably in a collective); the pool was shut down.") from None
            if not ok:
                errors.append((rank, value))
                # the other ranks may be blocked in a collective waiting for this one
                self.close(force=True)
                break
            out[rank] = value
        if errors:
            rank, tb = errors[0]
            raise RankError(f"{what} failed on rank {rank}:\n{tb}")
        return out

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def run(self, fn, *args, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results (index = rank)."""
        if not self.alive:
            raise RankError("the pool is closed (an earlier case failed); create a new one.")
        for q in self._jobs:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", "job"))

    def close(self, force: bool = False) -> None:
        for p, q in zip(self._procs, self._jobs):
            if not force and p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=0 if force else 30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
