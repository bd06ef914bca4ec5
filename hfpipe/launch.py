"""A pool of N gloo ranks on this machine that runs functions on every rank.

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


class RankError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, jobs, results, env: dict) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        import logging

        import torch

        torch.set_num_threads(1)
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend="gloo")
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
    """``with DistributedPool(4) as pool: per_rank = pool.run(fn, *args)``."""

    def __init__(self, world_size: int, timeout: float = 600.0, env: dict | None = None):
        self.world_size = world_size
        self.timeout = timeout
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        base_env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        base_env.update(env or {})
        self._procs = [ctx.Process(target=_worker, args=(r, world_size, port, self._jobs[r], self._results, base_env),
                                   daemon=True) for r in range(world_size)]
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
