"""Clear errors, raised up front (no process group): DeepSpeed config checks, unknown families, too many stages."""

import pytest
import transformers

from hfpipe.core.adapters import UnsupportedModelError
from hfpipe.core.dsconfig import validate_pipeline_ds_config
from hfpipe.core.builder import compute_parts, prepare

from models import tiny_config

GOOD = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}


def test_ds_config_accepts_consistent_config():
    validate_pipeline_ds_config(dict(GOOD, zero_optimization={"stage": 1}), num_stages=2, world_size=4)


@pytest.mark.parametrize("bad, match", [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "enable at most one"),
    ({"train_batch_size": 16}, r"train_batch_size=16 != .* \(= 8\)"),
])
def test_ds_config_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        validate_pipeline_ds_config(dict(GOOD, **bad), num_stages=2, world_size=4)


def test_num_stages_exceeds_blocks():
    builder = prepare(tiny_config("llama"), transformers.AutoModelForCausalLM)
    with pytest.raises(ValueError, match=r"num_stages=5 exceeds the 4 transformer blocks of this LlamaForCausalLM"):
        compute_parts("parameters", builder.layers(), 5, builder.adapter.num_blocks, "LlamaForCausalLM")


def test_unknown_model_type_lists_supported_and_how_to_register():
    config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(UnsupportedModelError, match=r"'vit' is not supported.*llama.*register_adapter"):
        prepare(config, transformers.AutoModelForImageClassification)


def _to_pipeline_error(num_stages: int) -> str:
    from hfpipe import to_pipeline

    try:
        to_pipeline(tiny_config("llama"), model_class=transformers.AutoModelForCausalLM, num_stages=num_stages)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_to_pipeline_stages_must_divide_the_world(dist_pool):
    """Before any engine or layer exists: 3 stages on 2 processes is one clear line on every rank."""
    errors = dist_pool(2).run(_to_pipeline_error, 3)
    assert errors[0] == errors[1] and "num_stages=3 does not divide the 2 processes" in errors[0], errors
    assert "launch a multiple of 3 processes" in errors[0]
