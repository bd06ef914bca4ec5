"""Stage boundaries are pure functions: checked against brute force on random small cases and on the shapes of
Llama-3-8B and Qwen2.5-7B (config only, meta device), without any process group."""

import itertools
import random

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from hfpipe.core import partition as P
from hfpipe.core.costs import layer_costs
from hfpipe.core.builder import compute_parts, prepare


def brute_force(weights, p, cut_allowed, feasible=None):
    """Minimal max stage weight over every contiguous split (``inf`` when none is feasible)."""
    n = len(weights)
    cuts = [i for i in range(1, n) if cut_allowed[i]]
    best = float("inf")
    for chosen in itertools.combinations(cuts, p - 1):
        parts = [0, *chosen, n]
        if feasible and not all(feasible(s, parts[s], parts[s + 1]) for s in range(p)):
            continue
        best = min(best, max(P.stage_sums(weights, parts)))
    return best


def greedy_fits(weights, p, cut_allowed, limit):
    """Independent exact check: can the layers be packed into <= p stages of weight <= limit? (furthest reach)"""
    n, start, stages = len(weights), 0, 0
    while start < n:
        total, end, best_end = 0.0, start, None
        while end < n:
            total += weights[end]
            if total > limit:
                break
            end += 1
            if end == n or cut_allowed[end]:
                best_end = end
        if best_end is None:
            return False
        start, stages = best_end, stages + 1
    return stages <= p


def test_random_cases_match_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n, p = rng.randint(2, 10), rng.randint(1, 4)
        weights = [rng.choice([0.0, rng.random(), rng.randint(1, 5)]) for _ in range(n)]
        cut_allowed = [True] + [rng.random() < 0.8 for _ in range(n - 1)]
        if sum(cut_allowed[1:]) < p - 1:
            with pytest.raises(P.PartitionError, match="use num_stages <="):
                P.balanced(weights, p, cut_allowed)
            continue
        parts = P.balanced(weights, p, cut_allowed)
        assert parts[0] == 0 and parts[-1] == n and len(parts) == p + 1
        assert all(cut_allowed[b] for b in parts[1:-1]) and all(a < b for a, b in zip(parts, parts[1:]))
        assert max(P.stage_sums(weights, parts)) == pytest.approx(brute_force(weights, p, cut_allowed), abs=1e-12)
        # a memory cap (here: at most k layers per stage, weighted by stage index) is honoured exactly
        mem = [rng.randint(1, 4) for _ in range(n)]
        memory = lambda s, a, b: sum(mem[a:b]) + s  # noqa: E731
        cap = rng.randint(3, 12)
        best = brute_force(weights, p, cut_allowed, lambda s, a, b: memory(s, a, b) <= cap)
        if best == float("inf"):
            with pytest.raises(P.PartitionError, match="within the per-stage limit"):
                P.balanced(weights, p, cut_allowed, memory=memory, memory_cap=cap)
        else:
            parts = P.balanced(weights, p, cut_allowed, memory=memory, memory_cap=cap)
            assert all(memory(s, parts[s], parts[s + 1]) <= cap for s in range(p))
            assert max(P.stage_sums(weights, parts)) == pytest.approx(best, abs=1e-12)


LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192)
QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768)


@pytest.fixture(scope="module")
def shapes():
    out = {}
    for name, cls, kw in (("llama", LlamaConfig, LLAMA_8B), ("qwen", Qwen2Config, QWEN_7B)):
        builder = prepare(cls(**kw), AutoModelForCausalLM)  # meta device only: no weights are allocated
        infos = builder.layers()
        assert all(p.is_meta for p in builder.adapter.meta_model.parameters())
        out[name] = (infos, [c.flops for c in layer_costs(builder, seq_len=4096, micro_batch_size=1)])
    return out


# (shape, stages) -> (balanced max/mean, parameters max/mean, whole-block balanced max/mean), seq 4096, flash
EXPECTED = {("llama", 4): (1.0499, 1.0808, 1.0515), ("llama", 8): (1.1098, 1.1683, 1.1683),
            ("qwen", 4): (1.0596, 1.0832, 1.0596), ("qwen", 8): (1.0596, 1.1068, 1.0596)}


@pytest.mark.parametrize("name,stages", sorted(EXPECTED))
def test_real_shapes_balanced_is_optimal_and_beats_parameters(shapes, name, stages):
    infos, flops = shapes[name]
    cut_allowed = [i.cut_allowed for i in infos]
    parts = compute_parts("balanced", infos, stages, 32, "model", costs=flops)
    params = compute_parts("parameters", infos, stages, 32, "model")
    whole = compute_parts("balanced:blocks", infos, stages, 32, "model", costs=flops)
    best = max(P.stage_sums(flops, parts))
    if stages == 4:  # C(67, 3) splits: enumerate them all
        assert best == pytest.approx(brute_force(flops, stages, cut_allowed), rel=1e-12)
    # optimality by an independent exact test: the optimum fits, and no split with a smaller maximum exists
    segment_sums = {sum(flops[a:b]) for a in range(len(flops)) for b in range(a + 1, len(flops) + 1)}
    below = max(s for s in segment_sums if s < best * (1 - 1e-12))
    assert greedy_fits(flops, stages, cut_allowed, best * (1 + 1e-12))
    assert not greedy_fits(flops, stages, cut_allowed, below)
    assert all(infos[b].part != "mlp" for b in whole[1:-1])  # whole blocks: never between the halves
    exp_bal, exp_par, exp_whole = EXPECTED[name, stages]
    assert P.imbalance(flops, parts) == pytest.approx(exp_bal, abs=5e-4)
    assert P.imbalance(flops, params) == pytest.approx(exp_par, abs=5e-4)
    assert P.imbalance(flops, whole) == pytest.approx(exp_whole, abs=5e-4)
    assert P.imbalance(flops, parts) < P.imbalance(flops, params)


def test_llama_8b_half_blocks_beat_whole_blocks(shapes):
    infos, flops = shapes["llama"]
    halves = P.imbalance(flops, compute_parts("balanced", infos, 8, 32, "m", costs=flops))
    whole = P.imbalance(flops, compute_parts("balanced:blocks", infos, 8, 32, "m", costs=flops))
    assert 1.10 <= halves <= 1.115 and 1.16 <= whole <= 1.175


def test_existing_methods_and_errors():
    assert P.uniform(6, 3) == [0, 2, 4, 6]
    assert P.min_max_partition([1, 1, 4, 1, 1], 3) == [0, 2, 3, 5]
    assert P.min_max_partition([1, 1, 4, 1, 1], 2) == [0, 2, 5]  # ties: lexicographically smallest
    assert P.by_type(["E", "Block", "Block", "H"], "block", 2) == [0, 2, 4]
    assert P.from_boundaries([0, 2], 4, 2) == [0, 2, 4]
    assert P.imbalance([1, 1, 1, 3], [0, 3, 4]) == pytest.approx(1.0)
    with pytest.raises(P.PartitionError, match=">= 0"):
        P.balanced([1, -1], 1)
    infos = prepare(LlamaConfig(**{**LLAMA_8B, "num_hidden_layers": 2}), AutoModelForCausalLM).layers()
    with pytest.raises(ValueError, match="needs costs="):
        compute_parts("balanced", infos, 2, 2, "m")
    with pytest.raises(ValueError, match="'balanced'"):
        compute_parts("fastest", infos, 2, 2, "m")
