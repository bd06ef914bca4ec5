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
    config = transformers.AutoConfig.for_model("t5", vocab_size=128, d_model=32, d_ff=64, num_layers=2, num_heads=4)
    with pytest.raises(UnsupportedModelError, match=r"'t5' is not supported.*llama.*register_adapter"):
        prepare(config, transformers.T5EncoderModel)
