"""Shared fixtures. ``dist_pool(n)`` gives a pool of ``n`` gloo ranks that lives for the whole session, so process
start-up and imports are paid once per world size, not once per case (see hfpipe.launch)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def dist_pool():
    from hfpipe.launch import DistributedPool

    pools: dict[int, DistributedPool] = {}

    def get(world_size: int) -> DistributedPool:
        pool = pools.get(world_size)
        if pool is None or not pool.alive:  # idle ranks block on a queue: they cost memory, not CPU
            pool = pools[world_size] = DistributedPool(world_size, timeout=300)
        return pool

    yield get
    for pool in pools.values():
        pool.close()
