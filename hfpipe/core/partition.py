"""Stage boundaries as pure functions over per-layer weights. No torch.distributed here.

A partition is DeepSpeed's ``parts`` list: ``parts[s]`` is the first layer of stage ``s`` and ``parts[-1]`` the
number of layers. Some layer pairs must stay on one stage (e.g. the final norm and the head, whose pooled output is
a float that must not cross a boundary); ``cut_allowed[i]`` says whether a stage may start at layer ``i``.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence


METHODS = ("balanced", "balanced:blocks", "parameters", "uniform")  # and "type:<regex>"


class PartitionError(ValueError):
    pass


def parse_partition_method(value):
    """A partition method as written on a command line or in a config: ``"0,5,9"`` -> ``[0, 5, 9]`` (the first layer
    of each stage), a list stays a list of ints, a method name (:data:`METHODS`, ``"type:<regex>"``) is kept as is."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    text = str(value).strip()
    if text[:1].isdigit():
        try:
            return [int(x) for x in text.split(",")]
        except ValueError:
            pass
    elif isinstance(value, str) and (text.lower() in METHODS or text.lower().startswith("type:")):
        return value
    raise PartitionError(f"partition method {value!r}: expected one of {', '.join(METHODS)}, type:<regex>, or the "
                         "comma-separated first layer index of each stage (e.g. 0,5,9).")


def _check(num_layers: int, num_stages: int, cut_allowed: Sequence[bool]) -> list[int]:
    if num_stages < 1:
        raise PartitionError(f"num_stages={num_stages}; expected a positive integer.")
    if len(cut_allowed) != num_layers:
        raise PartitionError(f"cut_allowed has {len(cut_allowed)} entries for {num_layers} layers.")
    cuts = [i for i in range(1, num_layers) if cut_allowed[i]]
    if len(cuts) < num_stages - 1:
        raise PartitionError(
            f"num_stages={num_stages} needs {num_stages - 1} stage boundaries but this model allows only {len(cuts)}; "
            f"use num_stages <= {len(cuts) + 1}."
        )
    return cuts


def min_max_partition(weights: Sequence[float], num_stages: int, cut_allowed: Sequence[bool] | None = None,
                      feasible: Callable[[int, int, int], bool] | None = None) -> list[int]:
    """Contiguous split into exactly ``num_stages`` non-empty stages minimising the heaviest stage (exact DP).

    ``feasible(stage, start, stop)``, when given, says whether stage ``stage`` may own layers ``[start, stop)``
    (e.g. a memory cap); the optimum is then taken over feasible splits only. Among optimal splits, ties are broken
    towards the lexicographically smallest ``parts`` list for determinism. O(p * n^2) on n layers (a few hundred).
    """
    n = len(weights)
    if cut_allowed is None:
        cut_allowed = [True] * n
    _check(n, num_stages, cut_allowed)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    starts = [0] + [i for i in range(1, n) if cut_allowed[i]]
    inf = float("inf")
    # best[s][j]: minimal max over splitting layers [0, starts_j) ... we index by layer position instead.
    positions = starts + [n]
    index = {pos: k for k, pos in enumerate(positions)}
    best = [[inf] * len(positions) for _ in range(num_stages + 1)]
    back = [[-1] * len(positions) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for j in range(1, len(positions)):
            end = positions[j]
            for i in range(j):
                if best[s - 1][i] == inf:
                    continue
                if feasible is not None and not feasible(s - 1, positions[i], end):
                    continue
                cost = max(best[s - 1][i], prefix[end] - prefix[positions[i]])
                if cost < best[s][j] - 1e-12 * max(1.0, abs(cost)):
                    best[s][j], back[s][j] = cost, i
    last = index[n]
    if best[num_stages][last] == inf:
        why = " within the per-stage limit (e.g. the memory cap)" if feasible is not None else ""
        raise PartitionError(f"cannot split {n} layers into {num_stages} non-empty stages{why}; use more stages, "
                             "or raise the limit (more data-parallel ranks for ZeRO-1, activation checkpointing).")
    parts = [n]
    j = last
    for s in range(num_stages, 0, -1):
        j = back[s][j]
        parts.append(positions[j])
    return parts[::-1]


def balanced(costs: Sequence[float], num_stages: int, cut_allowed: Sequence[bool] | None = None, *,
             memory: Callable[[int, int, int], float] | None = None, memory_cap: float | None = None) -> list[int]:
    """The ``balanced`` method: the contiguous split minimising the slowest stage's cost (exact, see
    :func:`min_max_partition`), optionally with every stage's ``memory(stage, start, stop)`` <= ``memory_cap``.

    ``costs`` is per-layer work (``hfpipe.core.costs``: forward+backward FLOPs, or measured seconds)."""
    if any(c < 0 for c in costs):
        raise PartitionError(f"layer costs must be >= 0; got {min(costs)}.")
    feasible = None
    if memory_cap is not None:
        if memory is None:
            raise PartitionError("memory_cap= needs memory=(stage, start, stop) -> bytes.")
        feasible = lambda s, a, b: memory(s, a, b) <= memory_cap  # noqa: E731
    return min_max_partition(costs, num_stages, cut_allowed, feasible)


def stage_sums(weights: Sequence[float], parts: Sequence[int]) -> list[float]:
    """Total weight of each stage of ``parts``."""
    return [float(sum(weights[parts[s]:parts[s + 1]])) for s in range(len(parts) - 1)]


def imbalance(weights: Sequence[float], parts: Sequence[int]) -> float:
    """Max over mean stage weight (1.0 = perfectly even): the slowdown of a pipeline against an even split."""
    sums = stage_sums(weights, parts)
    mean = sum(sums) / len(sums)
    return max(sums) / mean if mean > 0 else 1.0


def uniform(num_layers: int, num_stages: int, cut_allowed: Sequence[bool] | None = None) -> list[int]:
    """DeepSpeed's ``uniform``: balance the number of layers per stage."""
    return min_max_partition([1.0] * num_layers, num_stages, cut_allowed)


def by_type(names: Sequence[str], pattern: str, num_stages: int, cut_allowed: Sequence[bool] | None = None) -> list[int]:
    """DeepSpeed's ``type:<regex>``: balance the layers whose class name matches ``pattern`` (case-insensitive)."""
    regex = re.compile(pattern, re.IGNORECASE)
    weights = [1.0 if regex.search(name) else 0.0 for name in names]
    if not any(weights):
        raise PartitionError(f"partition method 'type:{pattern}' matches no layer; layer types are {sorted(set(names))}.")
    return min_max_partition(weights, num_stages, cut_allowed)


def from_boundaries(boundaries: Sequence[int], num_layers: int, num_stages: int,
                    cut_allowed: Sequence[bool] | None = None) -> list[int]:
    """Explicit boundaries: the first layer of each stage ``[0, b1, ..., b_{p-1}]`` (or with ``num_layers`` last)."""
    parts = [int(b) for b in boundaries]
    if parts and parts[-1] != num_layers:
        parts.append(num_layers)
    if len(parts) != num_stages + 1 or parts[0] != 0:
        raise PartitionError(
            f"manual partition {list(boundaries)} must list the first layer of each of the {num_stages} stages, "
            f"starting with 0 (e.g. {uniform(num_layers, num_stages)[:-1]}); the model has {num_layers} layers."
        )
    out = [b for b in parts[1:-1] if not 0 < b < num_layers]
    if out:
        raise PartitionError(f"manual partition {list(boundaries)} cuts at layer(s) {out}, outside the model's "
                             f"layers 1..{num_layers - 1} (it has {num_layers} pipeline layers, `hfpipe plan` lists "
                             f"them); e.g. {uniform(num_layers, num_stages)[:-1]}.")
    if any(b >= a for a, b in zip(parts[1:], parts[:-1])):
        raise PartitionError(f"manual partition {list(boundaries)} must be strictly increasing (no empty stage).")
    if cut_allowed is not None:
        bad = [b for b in parts[1:-1] if not cut_allowed[b]]
        if bad:
            raise PartitionError(f"manual partition cuts at layer(s) {bad}, which must stay on the stage of the layer "
                                 "before them (e.g. the head after the final norm).")
    return parts


def stage_of(parts: Sequence[int], layer: int) -> int:
    for s in range(len(parts) - 1):
        if parts[s] <= layer < parts[s + 1]:
            return s
    raise IndexError(layer)
