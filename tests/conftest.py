"""Shared fixtures. ``dist_pool(n)`` gives a pool of ``n`` gloo ranks that lives for the whole session, so process
start-up and imports are paid once per world size, not once per case (see hfpipe.launch).

Tests marked ``launches`` start their own processes (the ``deepspeed`` launcher, the CLI): they run last, after every
pool has been closed, so no idle rank of a pool shares the two cores with them, and each gets the machine to itself.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_POOLS: dict = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "launches: starts its own processes (deepspeed launcher, CLI); runs last, "
                                       "with no rank pool alive")


def pytest_collection_modifyitems(session, config, items):
    """Tests that launch processes go last (stable order otherwise)."""
    items[:] = ([i for i in items if i.get_closest_marker("launches") is None]
                + [i for i in items if i.get_closest_marker("launches") is not None])


def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


@pytest.fixture(autouse=True)
def _no_pool_beside_launches(request):
    if request.node.get_closest_marker("launches") is not None:
        _close_pools()
    yield


@pytest.fixture(scope="session")
def dist_pool():
    from hfpipe.launch import DistributedPool

    def get(world_size: int) -> DistributedPool:
        pool = _POOLS.get(world_size)
        if pool is None or not pool.alive:
            pool = _POOLS[world_size] = DistributedPool(world_size, timeout=300)
        return pool

    yield get
    _close_pools()
