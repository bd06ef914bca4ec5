"""The cost model reads work and memory off meta modules: checked against hand formulas on the Llama-3-8B shape,
MoE top-k scaling on a tiny Mixtral, and the memory rules (precision, ZeRO-1, 1F1B in-flight, checkpointing)."""

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig

from hfpipe.core.layers import LayerKind
from hfpipe.core import costs
from hfpipe.core.builder import prepare

from test_partition import LLAMA_8B

S = 4096


@pytest.fixture(scope="module")
def llama():
    return prepare(LlamaConfig(**LLAMA_8B), AutoModelForCausalLM)


def test_llama_8b_flops_match_hand_formula(llama):
    cs = costs.layer_costs(llama, seq_len=S, micro_batch_size=2)
    h, kv, inter, vocab, layers = 4096, 1024, 14336, 128256, 32
    assert sum(c.params for c in cs) == 8_030_261_248  # Llama-3-8B
    matmul = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * vocab  # weights a token meets (no embedding)
    attention = layers * 4 * h * (S + 1) / 2  # QK^T and AV over the causal half (flash)
    expected = 3 * (2 * matmul + attention) * S * 2
    total = sum(c.flops for c in cs)
    assert total == pytest.approx(expected, rel=0.01)  # the rest: norms, activations, softmax over the vocab
    blocks = [c for c in cs if c.kind is LayerKind.BLOCK]
    assert len(blocks) == 64 and [c.part for c in blocks[:2]] == ["attention", "mlp"]
    block = blocks[0].flops + blocks[1].flops
    assert 0.24 < blocks[0].flops / block < 0.27  # attention is a quarter of a block at 4k
    assert 2.1 < cs[-1].flops / block < 2.3  # LM head + loss ~ 2.2 blocks
    assert cs[0].flops / block < 1e-4  # the embedding lookup: almost free
    # activation checkpointing re-runs block forwards only: 4/3 of their cost
    ck = costs.layer_costs(llama, seq_len=S, micro_batch_size=2, activation_checkpointing=True)
    assert ck[2].flops == pytest.approx(blocks[0].flops * 4 / 3) and ck[-1].flops == cs[-1].flops


def test_dense_kernel_and_sliding_window(llama):
    flash = costs.layer_costs(llama, seq_len=S)[2]
    dense = costs.layer_costs(llama, seq_len=S, attention_kernel="dense")[2]
    assert dense.forward_flops - flash.forward_flops == pytest.approx(S * (S - (S + 1) / 2) * 32 * (4 * 128 + 5))
    shape = {**LLAMA_8B, "num_hidden_layers": 2}
    mistral = prepare(MistralConfig(**shape, sliding_window=1024), AutoModelForCausalLM)
    full = prepare(MistralConfig(**shape, sliding_window=None), AutoModelForCausalLM)
    assert costs._attention_context(full.adapter, 0, S, "flash") == (S + 1) / 2
    # the first 1024 queries see i+1 keys, the other 3072 see 1024
    assert costs._attention_context(mistral.adapter, 0, S, "flash") == pytest.approx((1024 * 1025 / 2 + 3072 * 1024) / S)
    assert costs._attention_context(mistral.adapter, 0, S, "dense") == S


def test_moe_counts_top_k_experts():
    def block_cost(experts, top_k):
        config = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128, num_local_experts=experts,
                               num_experts_per_tok=top_k)
        cs = costs.layer_costs(prepare(config, AutoModelForCausalLM), seq_len=16)
        return next(c for c in cs if c.kind is LayerKind.BLOCK and c.part in ("mlp", "whole"))

    base, more, k2 = block_cost(4, 1), block_cost(8, 1), block_cost(4, 2)
    assert more.params > 1.9 * base.params - 20000
    # 4 more experts at top-1: only the router grows (2 x 64 x 4 FLOPs + 4 element-wise per token, x3 fwd+bwd)
    assert more.flops - base.flops == pytest.approx(3 * 16 * (2 * 64 * 4 + costs.ELEMENTWISE_FLOPS * 4))
    # a second active expert: one more gated MLP per token
    assert k2.flops - base.flops == pytest.approx(3 * 16 * (2 * 3 * 64 * 128 + costs.ELEMENTWISE_FLOPS * 3 * 128 / 1),
                                                  rel=0.15)


def test_memory_rules(llama):
    assert costs.optimizer_bytes_per_param("fp32") == {"params": 4, "grads": 4, "optimizer": 8}
    assert costs.optimizer_bytes_per_param("bf16", dp=4, zero_stage=1) == {"params": 2, "grads": 2, "optimizer": 4}
    with pytest.raises(ValueError, match="ZeRO stage 0 or 1"):
        costs.optimizer_bytes_per_param("bf16", zero_stage=2)
    with pytest.raises(ValueError, match="zero_stage=-1: expected a ZeRO stage"):
        costs.optimizer_bytes_per_param("bf16", zero_stage=-1)
    assert [costs.in_flight(s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert costs.in_flight(0, 4, 2) == 2
    cs = costs.layer_costs(llama, seq_len=S)
    first = costs.stage_memory(cs, 0, 18, 0, 4, micro_batches=16)
    last = costs.stage_memory(cs, 18, 36, 3, 4, micro_batches=16)
    params = sum(c.params for c in cs[:18])
    assert first["params"] == 2 * params and first["optimizer"] == 16 * params
    assert first["activations"] == pytest.approx(4 * sum(c.activation_bytes for c in cs[:18]))
    assert last["activations"] / first["activations"] < 0.5  # one micro-batch in flight, plus the logits
    ck = costs.stage_memory(cs, 0, 18, 0, 4, micro_batches=16, activation_checkpointing=True)
    assert ck["activations"] < first["activations"] / 5
    # bf16 + fp32 master: 20 bytes per parameter (2 weight, 2 grad, 4 master, 4 fp32 grad, 8 Adam)
    assert first["params"] + first["grads"] + first["optimizer"] == 20 * params and 2.2e9 < params < 2.3e9


def test_workload_validation():
    with pytest.raises(ValueError, match="dtype='fp8'"):
        costs.Workload(dtype="fp8")
    with pytest.raises(ValueError, match="attention_kernel"):
        costs.Workload(attention_kernel="ring")


@pytest.mark.parametrize("model_type,auto", [("gpt2", "AutoModelForCausalLM"), ("opt", "AutoModelForCausalLM"),
                                             ("gemma", "AutoModelForCausalLM"),
                                             ("roberta", "AutoModelForSequenceClassification"),
                                             ("bert", "AutoModelForQuestionAnswering"),
                                             ("distilbert", "AutoModelForTokenClassification")])
def test_every_layer_kind_is_costed(model_type, auto):
    import transformers

    from models import tiny_config

    builder = prepare(tiny_config(model_type, num_labels=2), getattr(transformers, auto))
    cs = costs.layer_costs(builder, seq_len=32, micro_batch_size=2)
    assert [c.name for c in cs] == [i.name for i in builder.layers()]
    blocks = [c.flops for c in cs if c.kind is LayerKind.BLOCK]
    for part in ("whole", "attention", "mlp"):  # identical blocks (and halves) cost the same
        same = [c.flops for c in cs if c.kind is LayerKind.BLOCK and c.part == part]
        assert not same or (min(same) > 0 and max(same) == pytest.approx(min(same)))
    head = cs[-1]
    assert head.flops > 0 and all(c.flops >= 0 and c.activation_bytes > 0 for c in cs)
    if builder.tied:  # the tied LM head still multiplies by the embedding table and holds a copy of it
        config = builder.adapter.config
        assert head.params == cs[0].params
        assert head.flops >= 3 * 2 * config.vocab_size * config.hidden_size * 64  # fwd + bwd of the vocab matmul


def test_profile_layers_feeds_balanced():
    import torch

    from hfpipe.core.builder import compute_parts
    from models import tiny_config

    builder = prepare(tiny_config("llama", vocab_size=4096), AutoModelForCausalLM)
    infos = builder.layers()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = costs.profile_layers(builder, seq_len=32, micro_batch_size=2, repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert len(seconds) == len(infos) and all(s > 0 for s in seconds)
    assert seconds[-1] > seconds[0]  # a 4096-word LM head + loss outweighs the embedding lookup
    parts = compute_parts("balanced", infos, 2, 4, "m", costs=seconds)
    assert parts[0] == 0 and parts[-1] == len(infos) and 1 < parts[1] < len(infos) - 1
