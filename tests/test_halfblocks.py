"""Half-blocks: pre-norm families expose each block as an attention half and an MLP half, so a stage boundary may
fall inside a block, and the pipeline still trains exactly like HF (loss and every gradient)."""

import pytest
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hfpipe.core.layers import LayerKind
from hfpipe.core.layers import _halves_match
from hfpipe.core.builder import prepare
from hfpipe.verify import ModelSpec, format_report, verify

from models import tiny_config


def _spec(model_type, cls=AutoModelForCausalLM, **overrides):
    config = tiny_config(model_type, **overrides)
    return ModelSpec(class_name=cls._model_mapping[type(config)].__name__, config=config.to_dict(), seed=0)


@pytest.mark.parametrize("model_type,expected", [("llama", True), ("mistral", True), ("qwen2", True),
                                                 ("gpt2", False), ("opt", False), ("gpt_neox", False)])
def test_family_granularity(model_type, expected):
    builder = prepare(tiny_config(model_type), AutoModelForCausalLM)
    infos = builder.layers()
    blocks = [i for i in infos if i.kind is LayerKind.BLOCK]
    assert builder.half_blocks is expected
    assert len(blocks) == (8 if expected else 4)
    assert [i.part for i in blocks][:2] == (["attention", "mlp"] if expected else ["whole", "whole"])
    assert [i.block for i in blocks] == ([0, 0, 1, 1, 2, 2, 3, 3] if expected else [0, 1, 2, 3])
    # parameter counts still add up to the HF model's (tied embedding counted once)
    meta = builder.adapter.meta_model
    assert sum(i.num_params for i in infos) == sum(p.numel() for p in meta.parameters())


def test_layer_list_independent_of_stages():
    from hfpipe.core.builder import compute_parts

    builder = prepare(tiny_config("llama"), AutoModelForCausalLM)
    infos = builder.layers()
    names = [i.name for i in infos]
    for p in (1, 2, 4):
        compute_parts("parameters", infos, p, builder.adapter.num_blocks, "LlamaForCausalLM")
        assert [i.name for i in builder.layers()] == names


def test_hf_names_of_halves():
    from hfpipe.core.layers import AttentionHalfBlock, MLPHalfBlock

    builder = prepare(tiny_config("llama"), AutoModelForCausalLM)
    attn, mlp = AttentionHalfBlock(builder, 2, 1), MLPHalfBlock(builder, 3, 1)
    assert sorted(attn.hf_names().values()) == sorted(
        f"model.layers.1.{n}" for n in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                        "self_attn.v_proj.weight", "self_attn.o_proj.weight"))
    assert sorted(mlp.hf_names().values()) == sorted(
        f"model.layers.1.{n}" for n in ("post_attention_layernorm.weight", "mlp.gate_proj.weight",
                                        "mlp.up_proj.weight", "mlp.down_proj.weight"))
    assert set(attn.hf_names()) == {n for n, _ in attn.named_parameters()} | {n for n, _ in attn.named_buffers()
                                                                             if not n.startswith("aux.")}


class _PostNormBlock(nn.Module):
    """Standard child names but Gemma-2-like maths (norm *after* attention): the self-check must refuse it."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        h = config.hidden_size
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(h), nn.LayerNorm(h)
        self.self_attn, self.mlp = _Attn(h), nn.Linear(h, h)

    def forward(self, hidden_states, **kwargs):
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states))
        hidden_states = hidden_states + self.post_attention_layernorm(attn)
        return hidden_states + self.mlp(hidden_states)


class _Attn(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.proj = nn.Linear(h, h)

    def forward(self, hidden_states, **kwargs):
        return self.proj(hidden_states), None


def test_self_check_refuses_other_shapes():
    config = tiny_config("llama")
    assert not _halves_match(_PostNormBlock, config)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert _halves_match(LlamaDecoderLayer, config)


def test_encoders_keep_whole_blocks():
    builder = prepare(tiny_config("bert", num_labels=2), AutoModelForSequenceClassification)
    assert not builder.half_blocks and all(i.part == "whole" for i in builder.layers() if i.kind is LayerKind.BLOCK)


@pytest.mark.parametrize("stages,parts", [(2, [0, 3]), (4, [0, 3, 6, 9])])
def test_cut_inside_block_matches_hf(dist_pool, stages, parts):
    # tiny llama: [TokenEmbedding, BodyShell, Attn0, MLP0, ..., Attn3, MLP3, Final, Head]; cuts at 3 and 9 fall
    # between the attention and MLP halves of blocks 0 and 3
    report = verify(_spec("llama"), stages=stages, micro_batches=2, batch_size=4, seq_len=12, partition=parts,
                    pool=dist_pool(stages))
    assert report["parts"] == parts + [12]
    assert report["passed"], format_report(report)
    assert report["loss_rel_err"] <= 1e-5 and report["max_rel_grad_err"] <= 1e-5
    assert report["num_params"] == 3 + 4 * 9  # every HF parameter compared (embed, norm, lm_head + 9 per block)


def test_default_balanced_partition_matches_hf(dist_pool):
    # to_pipeline's default method, end to end (costs at the default seq_len = max_position_embeddings = 64)
    from hfpipe.core.costs import layer_costs
    from hfpipe.core.builder import compute_parts

    builder = prepare(tiny_config("llama"), AutoModelForCausalLM)
    flops = [c.flops for c in layer_costs(builder, seq_len=64)]  # to_pipeline's default: max_position_embeddings
    expected = compute_parts("balanced", builder.layers(), 2, 4, "LlamaForCausalLM", costs=flops)
    report = verify(_spec("llama"), stages=2, micro_batches=2, batch_size=4, seq_len=12, partition="balanced",
                    pool=dist_pool(2))
    assert report["parts"] == expected == [0, 6, 12]
    assert report["passed"], format_report(report)
