"""Settings precedence (command line > Accelerate > DeepSpeed JSON > defaults), conflicts and validation."""

import json
import os

import pytest

from hfpipe.training.arguments import PipelineTrainingArguments, parse_args
from hfpipe.training.config import ConfigError, explicit_fields, resolve_ds_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_ACC = ({}, {})


def _json(tmp_path, cfg, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def resolve(args, world=2, argv=(), accelerate=NO_ACC):
    return resolve_ds_config(args, world, argv=list(argv), accelerate=accelerate)


def test_defaults_fill_a_runnable_fp32_config():
    ds, src = resolve(PipelineTrainingArguments(), world=4)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 8 * 1 * 1  # all 4 ranks are the stages of one replica
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8,
                                                           "weight_decay": 0.0, "torch_adam": True,
                                                           "adam_w_mode": True}}
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 0 and ds["gradient_clipping"] == 1.0
    assert ds["pipeline"] == {"stages": 4, "partition": "balanced", "activation_checkpoint_interval": 0,
                              "schedule": "1f1b"}
    assert src["lr"] == "default" and src["train_batch_size"] == "derived"
    assert src["num_stages"] == "default (all 4 processes)"


def test_json_beats_defaults_and_cli_beats_json_defaults(tmp_path):
    path = _json(tmp_path, {"gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 2,
                            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                            "pipeline": {"stages": 2, "activation_checkpoint_interval": 1}})
    args = PipelineTrainingArguments(deepspeed=path, weight_decay=0.01)
    ds, src = resolve(args)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and src["lr"] == f"deepspeed json {path}"
    assert ds["optimizer"]["params"]["weight_decay"] == 0.01
    assert src["weight_decay"] == "command line --weight_decay 0.01"
    assert ds["pipeline"]["activation_checkpoint_interval"] == 1 and ds["train_batch_size"] == 8


def test_two_explicit_sources_that_disagree_are_an_error(tmp_path):
    path = _json(tmp_path, {"gradient_accumulation_steps": 4})
    args = PipelineTrainingArguments(deepspeed=path, gradient_accumulation_steps=8)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps: 8 from command line "
                                          r"--gradient_accumulation_steps 8 disagrees with 4 from deepspeed json"):
        resolve(args)
    # agreeing explicit sources are fine; the command line is reported as the source
    ds, src = resolve(PipelineTrainingArguments(deepspeed=path, gradient_accumulation_steps=4))
    assert ds["gradient_accumulation_steps"] == 4 and src["gradient_accumulation_steps"].startswith("command line")


def test_flag_typed_at_its_default_value_is_explicit(tmp_path):
    path = _json(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}})
    (args,) = parse_args(argv=["--deepspeed", path, "--learning_rate", "5e-5"])
    assert args.learning_rate == 5e-5 and "learning_rate" in explicit_fields(args)
    with pytest.raises(ConfigError, match="lr: 5e-05 from command line --learning_rate 5e-05 disagrees with 0.0001"):
        resolve(args)
    (args,) = parse_args(argv=["--deepspeed", path])
    assert resolve(args)[0]["optimizer"]["params"]["lr"] == 1e-4
    args.learning_rate = 1e-3  # a recipe's own default written after parsing: a default, so the JSON wins
    ds, src = resolve(args)
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and src["lr"] == f"deepspeed json {path}"
    # dashes, --flag=value and --no_flag spellings count too (argparse decides), and nothing else
    (args,) = parse_args(argv=["--learning-rate=5e-5", "--num_stages", "2", "--no_export_final_model"])
    assert explicit_fields(args) == {"learning_rate", "num_stages", "export_final_model"}


def test_fp16_flag_with_bf16_json_is_an_error(tmp_path):
    path = os.path.join(ROOT, "ds_configs", "bf16_zero1.json")
    with pytest.raises(ConfigError, match=r"fp16 from command line --fp16 disagrees with bf16 from deepspeed json"):
        resolve(PipelineTrainingArguments(deepspeed=path, fp16=True))
    with pytest.raises(ConfigError, match="both enabled"):
        resolve(PipelineTrainingArguments(bf16=True, fp16=True))


def test_accelerate_layer_sits_between_cli_and_json(tmp_path):
    path = _json(tmp_path, {"gradient_clipping": 0.5})
    acc = ({"gradient_accumulation_steps": 4, "bf16": True, "gradient_clipping": 0.5,
            "pipeline": {"num_stages": 2, "activation_checkpoint_interval": 1}},
           {"gradient_accumulation_steps": "accelerate config a.yaml", "bf16": "env ACCELERATE_MIXED_PRECISION",
            "gradient_clipping": "accelerate config a.yaml", "pipeline": "accelerate config a.yaml"})
    ds, src = resolve(PipelineTrainingArguments(deepspeed=path), accelerate=acc)
    assert ds["gradient_accumulation_steps"] == 4 and src["gradient_accumulation_steps"] == "accelerate config a.yaml"
    assert ds["bf16"]["enabled"] is True and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["gradient_clipping"] == 0.5 and src["gradient_clipping"] == "accelerate config a.yaml"
    assert ds["pipeline"]["activation_checkpoint_interval"] == 1
    with pytest.raises(ConfigError, match="fp16 from command line --fp16 disagrees with bf16 from env"):
        resolve(PipelineTrainingArguments(fp16=True), accelerate=acc)
    with pytest.raises(ConfigError, match="gradient_clipping: 1.0 from accelerate config a.yaml disagrees with 0.5"):
        resolve(PipelineTrainingArguments(deepspeed=path),
                accelerate=({"gradient_clipping": 1.0}, {"gradient_clipping": "accelerate config a.yaml"}))


def test_accelerate_num_processes_must_match_the_launch():
    acc = ({"num_processes": 4}, {"num_processes": "accelerate config a.yaml"})
    with pytest.raises(ConfigError, match="num_processes=4 .* but 2 processes were launched"):
        resolve(PipelineTrainingArguments(), world=2, accelerate=acc)
    assert resolve(PipelineTrainingArguments(num_stages=2), world=4, accelerate=acc)[0]["train_batch_size"] == 16


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_are_refused(tmp_path, stage):
    path = _json(tmp_path, {"zero_optimization": {"stage": stage}})
    with pytest.raises(ConfigError, match=f"ZeRO stage {stage} .* cannot be combined with pipeline parallelism"):
        resolve(PipelineTrainingArguments(deepspeed=path))


def test_offload_batch_and_world_size_errors(tmp_path):
    path = _json(tmp_path, {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}})
    with pytest.raises(ConfigError, match="offload_optimizer.device='cpu'"):
        resolve(PipelineTrainingArguments(deepspeed=path))
    path = _json(tmp_path, {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                            "gradient_accumulation_steps": 2}, "b.json")
    with pytest.raises(ConfigError, match=r"train_batch_size=32 .* x data-parallel replicas 2 .* = 16; set "
                                          r"train_batch_size to 16"):
        resolve(PipelineTrainingArguments(deepspeed=path, num_stages=2), world=4)
    with pytest.raises(ConfigError, match="num_stages=2 .* does not divide the 3 processes"):
        resolve(PipelineTrainingArguments(num_stages=2), world=3)


def test_shipped_ds_configs_resolve_and_deepspeed_accepts_them():
    from deepspeed.runtime.config import DeepSpeedConfig

    seen = {}
    for name in ("cpu_fp32", "bf16_zero1", "fp16"):
        args = PipelineTrainingArguments(deepspeed=os.path.join(ROOT, "ds_configs", f"{name}.json"),
                                         per_device_train_batch_size=2, gradient_accumulation_steps=4)
        ds, _ = resolve(args, world=2)  # 2 stages x 1 replica (DeepSpeedConfig checks against world size 1 here)
        cfg = DeepSpeedConfig(ds)  # DeepSpeed keeps the "pipeline" section (it has one of its own)
        assert cfg.train_batch_size == 8 and cfg.pipeline["stages"] == 2
        assert ds["optimizer"]["params"]["torch_adam"] is True
        seen[name] = (cfg.bfloat16_config.enabled, cfg.float16_config.enabled, cfg.zero_optimization_stage)
    assert seen == {"cpu_fp32": (False, False, 0), "bf16_zero1": (True, False, 1), "fp16": (False, True, 0)}
    fp16 = resolve(PipelineTrainingArguments(deepspeed=os.path.join(ROOT, "ds_configs", "fp16.json")))[0]["fp16"]
    assert fp16["loss_scale"] == 0  # dynamic loss scaling
    bf16 = resolve(PipelineTrainingArguments(deepspeed=os.path.join(ROOT, "ds_configs", "bf16_zero1.json")))[0]
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}


def test_scheduler_section_is_refused(tmp_path):
    path = _json(tmp_path, {"scheduler": {"type": "WarmupLR"}})
    with pytest.raises(ConfigError, match="--lr_scheduler_type"):
        resolve(PipelineTrainingArguments(deepspeed=path))


def test_num_stages_defaults_to_all_processes_of_a_replica():
    assert resolve(PipelineTrainingArguments(), world=1)[0]["pipeline"]["stages"] == 1  # `python recipe.py`
    ds, src = resolve(PipelineTrainingArguments(dp=2), world=4)
    assert ds["pipeline"]["stages"] == 2 and ds["train_batch_size"] == 16
    assert src["num_stages"] == "default (world size 4 / --dp 2)"
    with pytest.raises(ConfigError, match="--dp 3 does not divide the 4 processes"):
        resolve(PipelineTrainingArguments(dp=3), world=4)
    with pytest.raises(ConfigError, match=r"--num_stages 2 x --dp 1 = 2 but 4 processes were launched"):
        resolve(PipelineTrainingArguments(num_stages=2, dp=1), world=4)


def _deepspeed_accepts(ds: dict):
    """DeepSpeed's own precision/ZeRO/accumulation check (``DeepSpeedEngine._do_optimizer_sanity_check``, which
    runs at engine initialisation) on ``ds``, without building an engine: its wrapper name, or its exception."""
    import types

    import torch
    from deepspeed.runtime import engine as ds_engine
    from deepspeed.runtime.config import DeepSpeedConfig

    stub = types.SimpleNamespace(_config=DeepSpeedConfig(ds), pipeline_parallelism=True, global_rank=0)
    for name in dir(ds_engine.DeepSpeedEngine):
        if name.startswith(("zero_", "get_data_types", "bfloat16_enabled", "fp16_enabled")):
            setattr(stub, name, types.MethodType(getattr(ds_engine.DeepSpeedEngine, name), stub))
    supported, ds_engine.is_zero_supported_optimizer = ds_engine.is_zero_supported_optimizer, lambda opt: True
    try:
        return ds_engine.DeepSpeedEngine._do_optimizer_sanity_check(stub, torch.optim.AdamW([torch.nn.Parameter(
            torch.zeros(1))]))
    except (NotImplementedError, ValueError) as exc:
        return exc
    finally:
        ds_engine.is_zero_supported_optimizer = supported


@pytest.mark.parametrize("flags, zero, accum", [
    ({"bf16": True}, 1, "fp32"),                         # --bf16 alone: DeepSpeed's BF16 optimizer (fp32 masters)
    ({"bf16": True, "zero": 0}, 0, "bf16"),              # bf16 at an explicit ZeRO 0: bf16 accumulation
    ({"bf16": True, "accum": "bf16"}, 0, "bf16"),
    ({"fp16": True}, 0, None), ({}, 0, None), ({"zero": 1}, 1, None)])
def test_precision_combination_is_one_deepspeed_accepts(tmp_path, flags, zero, accum):
    cfg = {}
    if "zero" in flags:
        cfg["zero_optimization"] = {"stage": flags["zero"]}
    if "accum" in flags:
        cfg["data_types"] = {"grad_accum_dtype": flags["accum"]}
    args = PipelineTrainingArguments(bf16=flags.get("bf16", False), fp16=flags.get("fp16", False),
                                     deepspeed=_json(tmp_path, cfg) if cfg else None)
    ds, _ = resolve(args)
    assert ds["zero_optimization"]["stage"] == zero and ds.get("data_types", {}).get("grad_accum_dtype") == accum
    assert not isinstance(_deepspeed_accepts(ds), Exception)


def test_precision_combination_deepspeed_rejects_fails_at_config_time(tmp_path):
    path = _json(tmp_path, {"zero_optimization": {"stage": 0}, "data_types": {"grad_accum_dtype": "fp32"}})
    with pytest.raises(ConfigError, match=r"bf16 weights with grad_accum_dtype=fp32 .* at ZeRO stage 0 .* DeepSpeed's "
                                          r"pipeline engine rejects this mix"):
        resolve(PipelineTrainingArguments(bf16=True, deepspeed=path))
    # ... which is what DeepSpeed says at engine initialisation (after the model loaded)
    ds = resolve(PipelineTrainingArguments(deepspeed=path))[0]
    ds["bf16"] = {"enabled": True}
    assert "unsupported mix" in str(_deepspeed_accepts(ds))


def test_ds_config_command_agrees_with_the_trainer():
    from hfpipe.training.config import describe

    ds, src, world, _ = describe(["--bf16"], world_size=2)
    assert ds == resolve(parse_args(argv=["--bf16"])[0], world=2)[0]
    assert (world, ds["zero_optimization"]["stage"], ds["data_types"]["grad_accum_dtype"]) == (2, 1, "fp32")


def test_optim_maps_to_the_deepspeed_optimizer():
    (args,) = parse_args(argv=["--optim", "adamw_torch_fused"])
    ds, src = resolve(args)
    assert ds["optimizer"]["params"]["fused"] is True and src["optim"] == "command line --optim adamw_torch_fused"
    assert "fused" not in resolve(parse_args(argv=["--optim", "adamw_torch"])[0])[0]["optimizer"]["params"]
    assert "fused" not in resolve(PipelineTrainingArguments())[0]["optimizer"]["params"]  # HF's default, not typed
