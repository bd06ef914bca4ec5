"""``hfpipe plan --lora-r``: the trainable count per stage is PEFT's own, and the frozen base is budgeted as weights
only (no gradient, optimizer state or fp32 master copy), so a stage's memory drops by an exact amount."""

import copy
import json

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hfpipe.cli import main
from hfpipe.core.costs import optimizer_bytes_per_param
from hfpipe.core.lora import LoraConfigError
from hfpipe.core.meta import build_meta_model
from hfpipe.plan import GIB, plan

from test_partition import LLAMA_8B

KW = dict(stages=8, micro_batches=32, dtype="bf16")


@pytest.fixture(scope="module")
def config():
    return LlamaConfig(**LLAMA_8B, architectures=["LlamaForCausalLM"])


@pytest.fixture(scope="module")
def reports(config):
    full = plan(config, model_class=AutoModelForCausalLM, **KW)
    lora = plan(config, model_class=AutoModelForCausalLM, lora_r=8, lora_target_modules="q_proj,v_proj", **KW)
    return full, lora


def test_trainable_count_is_peft_count(config, reports):
    meta = build_meta_model(config, LlamaForCausalLM)
    peft_model = get_peft_model(copy.deepcopy(meta), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                                low_cpu_mem_usage=True)
    trainable, total = peft_model.get_nb_trainable_parameters()
    full, lora = reports
    rows = lora["stage_rows"]
    assert sum(r["trainable_params"] for r in rows) == trainable == 32 * (8 * (4096 + 4096) + 8 * (4096 + 1024))
    assert sum(r["params"] for r in rows) == total - trainable == 8_030_261_248  # the base; adapters not in params
    assert lora["parts"] == full["parts"]  # LoRA changes memory, not the FLOPs split
    assert lora["lora_target_modules"] == ["q_proj", "v_proj"] and full["lora_target_modules"] is None
    assert [r["trainable_params"] for r in full["stage_rows"]] == [r["params"] for r in full["stage_rows"]]


def test_lora_stage_memory_formula(reports):
    full, lora = reports
    per = optimizer_bytes_per_param("bf16")
    assert per == {"params": 2.0, "grads": 2.0, "optimizer": 16.0}
    for f, l in zip(full["stage_rows"], lora["stage_rows"]):
        frozen = l["params"] - l["trainable_params"]
        saved = frozen * (per["grads"] + per["optimizer"]) / GIB  # 18 bytes per frozen parameter
        assert l["memory_gib"]["params"] == pytest.approx(f["memory_gib"]["params"])
        assert l["memory_gib"]["activations"] == pytest.approx(f["memory_gib"]["activations"])
        assert l["memory_gib"]["total"] == pytest.approx(f["memory_gib"]["total"] - saved)
    s0_full, s0_lora = full["stage_rows"][0], lora["stage_rows"][0]
    assert s0_lora["trainable_params"] == 4 * 106_496  # embed, B0-B3: four blocks' q_proj + v_proj adapters
    assert s0_lora["memory_gib"]["grads"] * GIB == 2 * 4 * 106_496
    assert s0_lora["memory_gib"]["optimizer"] * GIB == 16 * 4 * 106_496
    assert s0_full["memory_gib"]["total"] - s0_lora["memory_gib"]["total"] == pytest.approx(
        18 * (s0_full["params"] - 4 * 106_496) / GIB)
    assert s0_full["params"] == 1_397_784_576
    assert s0_full["memory_gib"]["total"] == pytest.approx(40.786, abs=1e-3)
    assert s0_lora["memory_gib"]["total"] == pytest.approx(17.361, abs=1e-3)


def test_cli_lora_table_and_errors(config, tmp_path, capsys):
    config.save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--stages", "2", "--lora-r", "4", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["lora_target_modules"] == ["q_proj", "v_proj"]  # PEFT's default for Llama
    assert "trainable" in out[3] and "lora_r=4 on q_proj,v_proj" in out[1]
    assert sum(r["trainable_params"] for r in report["stage_rows"]) == 32 * 4 * (8192 + 5120)
    with pytest.raises(LoraConfigError, match="lora_r=0"):
        plan(config, model_class=AutoModelForCausalLM, stages=2, lora_r=0)
    with pytest.raises(LoraConfigError, match="lora_r is not"):
        plan(config, model_class=AutoModelForCausalLM, stages=2, lora_target_modules="q_proj")
    with pytest.raises(LoraConfigError, match="matches no module"):
        plan(config, model_class=AutoModelForCausalLM, stages=2, lora_r=8, lora_target_modules="nope")


def test_cpu_lora_builder_costs_flops_only(config):
    """``to_pipeline``'s builder (cpu, LoRA plan) splits by FLOPs without building its layers for a count."""
    from hfpipe.core.builder import prepare, stage_parts
    from hfpipe.core.costs import layer_costs, trainable_params

    builder = prepare(config, AutoModelForCausalLM, peft_config=LoraConfig(r=8, target_modules=["q_proj"]))
    assert all(c.trainable is None for c in layer_costs(builder, seq_len=128))
    assert stage_parts(builder, builder.layers(), 8, "balanced", seq_len=4096) == plan(
        config, model_class=AutoModelForCausalLM, **KW)["parts"]
    with pytest.raises(ValueError, match="meta-device builder"):
        trainable_params(builder)
