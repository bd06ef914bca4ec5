"""docs/errors.md is true: every row's bad input, run here, fails with exactly the message the table shows.

Each case below is one row (same id). A case makes the bad input and returns the exception it raised; temporary
paths read ``<tmp>`` in the table. ``python tests/test_errors.py`` rewrites the table from the cases (after a
message changed on purpose); the test fails whenever the code and the table disagree, or a row has no case.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import family_config  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
CASES: dict[str, tuple[str, object]] = {}


def case(case_id: str, bad_input: str):
    def register(fn):
        CASES[case_id] = (bad_input, fn)
        return fn
    return register


def raised(fn, *args, **kwargs) -> BaseException:
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- the case's error, whatever its type
        return exc
    raise AssertionError(f"{getattr(fn, '__name__', fn)} raised nothing")


def _llama(**kw):
    from transformers import AutoModelForCausalLM

    return family_config("llama", **kw), AutoModelForCausalLM


def _lora_args(tmp, **kw):
    from hfpipe.training.arguments import PipelineTrainingArguments

    return raised(PipelineTrainingArguments, output_dir=str(tmp / "out"), **kw)


def _validate(config: dict, stages: int = 2, world: int = 2):
    from hfpipe.core.dsconfig import validate_pipeline_ds_config

    return raised(validate_pipeline_ds_config, config, stages, world)


def _accelerate(tmp: Path, yaml_text: str | None = None, env: dict | None = None, name: str = "acc.yaml"):
    from hfpipe.training.accelerate import accelerate_layer

    path = None
    if yaml_text is not None:
        path = tmp / name
        path.write_text(yaml_text)
    return raised(accelerate_layer, str(path) if path else None, env or {})


# --- models ------------------------------------------------------------------------------------------------------

@case("unknown-model-type", "a model family with no adapter and no `base_model_pp_plan` (`vit`)")
def _(tmp):
    from transformers import AutoModelForImageClassification, ViTConfig

    from hfpipe.core.builder import prepare

    return raised(prepare, ViTConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                     num_attention_heads=2), AutoModelForImageClassification, device="meta")


@case("not-a-model", "`to_pipeline(123)`")
def _(tmp):
    from hfpipe.core.builder import prepare

    return raised(prepare, 123, None, device="meta")


@case("config-without-class", "`to_pipeline(config)` without `model_class=`")
def _(tmp):
    from hfpipe.core.builder import prepare

    return raised(prepare, family_config("llama"), None, device="meta")


@case("stages-exceed-layers", "`hfpipe plan` of a 4-block Llama at 16 stages")
def _(tmp):
    from hfpipe.plan import plan

    config, cls = _llama()
    return raised(plan, config, model_class=cls, stages=16)


@case("stages-zero", "`hfpipe plan --stages 0`")
def _(tmp):
    from hfpipe.plan import plan

    config, cls = _llama()
    return raised(plan, config, model_class=cls, stages=0)


@case("loss-chunk-non-causal", "`loss_chunk_tokens` with a sequence-classification head")
def _(tmp):
    from transformers import AutoModelForSequenceClassification

    from hfpipe.plan import plan

    return raised(plan, family_config("bert"), model_class=AutoModelForSequenceClassification, stages=2,
                  loss_chunk_tokens=64)


# --- partitions --------------------------------------------------------------------------------------------------

@case("unknown-partition", "`--partition_method fastest`")
def _(tmp):
    from hfpipe.core.partition import parse_partition_method

    return raised(parse_partition_method, "fastest")


@case("partition-not-increasing", "`--partition_method 0,3,2` (cuts out of order)")
def _(tmp):
    from hfpipe.core.partition import parse_partition_method
    from hfpipe.plan import plan

    config, cls = _llama()
    return raised(plan, config, model_class=cls, stages=3, partition=parse_partition_method("0,3,2"))


@case("partition-out-of-range", "`--partition_method 0,4,99` (a cut past the last layer)")
def _(tmp):
    from hfpipe.core.partition import parse_partition_method
    from hfpipe.plan import plan

    config, cls = _llama()
    return raised(plan, config, model_class=cls, stages=3, partition=parse_partition_method("0,4,99"))


@case("partition-type-no-match", "`--partition_method type:Conv2d` (no layer of that type)")
def _(tmp):
    from hfpipe.plan import plan

    config, cls = _llama()
    return raised(plan, config, model_class=cls, stages=2, partition="type:Conv2d")


# --- DeepSpeed settings ------------------------------------------------------------------------------------------

@case("zero-2", "`\"zero_optimization\": {\"stage\": 2}` with a pipeline")
def _(tmp):
    return _validate({"zero_optimization": {"stage": 2}})


@case("zero-3", "`\"zero_optimization\": {\"stage\": 3}` with a pipeline")
def _(tmp):
    return _validate({"zero_optimization": {"stage": 3}})


@case("zero-negative", "`\"zero_optimization\": {\"stage\": -1}`")
def _(tmp):
    return _validate({"zero_optimization": {"stage": -1}})


@case("offload-optimizer", "`offload_optimizer.device: cpu` with a pipeline")
def _(tmp):
    return _validate({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}})


@case("offload-param", "`offload_param.device: nvme` with a pipeline")
def _(tmp):
    return _validate({"zero_optimization": {"stage": 1, "offload_param": {"device": "nvme"}}})


@case("bf16-and-fp16", "bf16 and fp16 both enabled")
def _(tmp):
    return _validate({"bf16": {"enabled": True}, "fp16": {"enabled": True}})


@case("world-not-divisible", "3 processes for 2 stages")
def _(tmp):
    return _validate({}, stages=2, world=3)


@case("batch-arithmetic", "`train_batch_size` 10 with micro batch 2 x accumulation 4 x 1 replica")
def _(tmp):
    return _validate({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4})


@case("micro-batch-zero", "micro batch size 0")
def _(tmp):
    return _validate({"train_batch_size": 0, "train_micro_batch_size_per_gpu": 0, "gradient_accumulation_steps": 4})


@case("fp16-on-cpu", "fp16 on the CPU accelerator")
def _(tmp):
    from hfpipe.core.dsconfig import check_fp16_supported

    return raised(check_fp16_supported, True, source="--fp16")


@case("deepspeed-json-missing", "`--deepspeed` naming no file")
def _(tmp):
    from hfpipe.training.config import _json_layer

    return raised(_json_layer, str(tmp / "nope.json"))


@case("deepspeed-json-invalid", "`--deepspeed` file that is not JSON")
def _(tmp):
    from hfpipe.training.config import _json_layer

    (tmp / "ds.json").write_text("{stage: 1")
    return raised(_json_layer, str(tmp / "ds.json"))


# --- Accelerate --------------------------------------------------------------------------------------------------

@case("accelerate-fsdp", "an Accelerate config asking for FSDP")
def _(tmp):
    return _accelerate(tmp, "distributed_type: FSDP\nnum_processes: 2\n")


@case("accelerate-fsdp-env", "`accelerate launch` with FSDP (`ACCELERATE_USE_FSDP=true`)")
def _(tmp):
    return _accelerate(tmp, env={"ACCELERATE_USE_FSDP": "true"})


@case("accelerate-missing", "`--accelerate_config` naming no file")
def _(tmp):
    from hfpipe.training.accelerate import accelerate_layer

    return raised(accelerate_layer, str(tmp / "none.yaml"), {})


@case("accelerate-not-yaml", "an Accelerate config that is not YAML")
def _(tmp):
    return _accelerate(tmp, "a: [1, 2\n")


@case("accelerate-not-mapping", "an Accelerate config whose top level is a list")
def _(tmp):
    return _accelerate(tmp, "- 1\n- 2\n")


@case("accelerate-fp8", "Accelerate `mixed_precision: fp8`")
def _(tmp):
    return _accelerate(tmp, "distributed_type: DEEPSPEED\nmixed_precision: fp8\n")


@case("accelerate-zero3-init", "Accelerate `zero3_init_flag: true`")
def _(tmp):
    return _accelerate(tmp, "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 1\n"
                            "  zero3_init_flag: true\n")


# --- LoRA --------------------------------------------------------------------------------------------------------

@case("lora-negative-rank", "`--lora_r -4`")
def _(tmp):
    return _lora_args(tmp, lora_r=-4)


@case("lora-dropout-range", "`--lora_dropout 1.5`")
def _(tmp):
    return _lora_args(tmp, lora_r=8, lora_dropout=1.5)


@case("lora-flag-without-rank", "`--lora_alpha 16` without `--lora_r`")
def _(tmp):
    return _lora_args(tmp, lora_alpha=16)


@case("lora-targets-match-nothing", "`--lora_target_modules nothing_proj` (no such module)")
def _(tmp):
    from hfpipe.plan import plan

    config, cls = _llama()
    return raised(plan, config, model_class=cls, stages=2, lora_r=8, lora_target_modules="nothing_proj")


# --- checkpoints and outputs ---------------------------------------------------------------------------------

@case("output-not-empty", "`hfpipe convert` into a folder that is not empty")
def _(tmp):
    from hfpipe.checkpoint import convert

    config, cls = _llama()
    (tmp / "out").mkdir()
    (tmp / "out" / "x").write_text("")
    return raised(convert, cls.from_config(config), tmp / "out", progress=False)


@case("checkpoint-other-model", "a checkpoint converted from another model (`to_pipeline(gpt2_checkpoint)` "
                                "with a Llama)")
def _(tmp):
    from transformers import AutoModelForCausalLM

    from hfpipe.checkpoint import convert, export

    convert(AutoModelForCausalLM.from_config(family_config("gpt2")), tmp / "ckpt", progress=False)
    config, _ = _llama()
    return raised(export, tmp / "ckpt", tmp / "hf", model=AutoModelForCausalLM.from_config(config))


@case("checkpoint-other-depth", "a checkpoint converted at another depth (4 blocks, exported with a 2-block "
                                "config)")
def _(tmp):
    from transformers import AutoModelForCausalLM

    from hfpipe.checkpoint import convert, export

    convert(AutoModelForCausalLM.from_config(family_config("llama", num_hidden_layers=4)), tmp / "ckpt",
            progress=False)
    config, _ = _llama(num_hidden_layers=2)
    return raised(export, tmp / "ckpt", tmp / "hf", model=AutoModelForCausalLM.from_config(config))


@case("checkpoint-other-width", "a checkpoint of the same depth but another width (hidden size 32, exported "
                                "with a hidden size 64 config)")
def _(tmp):
    from transformers import AutoModelForCausalLM

    from hfpipe.checkpoint import convert, export

    config, _ = _llama()
    convert(AutoModelForCausalLM.from_config(config), tmp / "ckpt", progress=False)
    wide, _ = _llama(hidden_size=64, intermediate_size=128)
    return raised(export, tmp / "ckpt", tmp / "hf", model=wide, model_class=AutoModelForCausalLM, progress=False)


@case("verify-batch-split", "`hfpipe verify --batch-size 6 --micro-batches 4`")
def _(tmp):
    from hfpipe.verify import check_run_shape

    return raised(check_run_shape, 2, 1, 4, 6)


@case("verify-dp-zero", "`hfpipe verify --dp 0`")
def _(tmp):
    from hfpipe.verify import check_run_shape

    return raised(check_run_shape, 2, 0, 4, 8)


@case("negative-learning-rate", "`--learning_rate -1e-4`")
def _(tmp):
    return _lora_args(tmp, learning_rate=-1e-4)


@case("checkpoint-interval-negative", "`--activation_checkpoint_interval -1`")
def _(tmp):
    return _lora_args(tmp, activation_checkpoint_interval=-1)


def _data_error(rows, **kw):
    from datasets import Dataset

    from hfpipe.training.datacheck import check_dataset

    data = Dataset.from_list(rows) if rows else Dataset.from_dict({"input_ids": [], "labels": []})
    return raised(check_dataset, data, family_config("bert", num_labels=3), split="train", **kw)


@case("data-empty", "an empty (or header-only) training file")
def _(tmp):
    return _data_error([])


@case("data-token-id", "token ids from another tokenizer (id 500 for a 128-token vocabulary)")
def _(tmp):
    return _data_error([{"input_ids": [1, 500], "labels": 0}])


@case("data-too-long", "a 600-token example for a model with 512 positions")
def _(tmp):
    return _data_error([{"input_ids": [1] * 600, "labels": 0}], max_positions=512)


@case("data-label-range", "label 3 for a 3-class head")
def _(tmp):
    return _data_error([{"input_ids": [1, 2], "labels": 3}], num_labels=3)


def _saved(tmp: Path, **kw) -> Path:
    """A tiny Llama saved with save_pretrained (one model.safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config, _ = _llama(**kw)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "hf")
    return tmp / "hf"


@case("safetensors-truncated", "`hfpipe convert` of a folder whose model.safetensors lost its last 100 bytes")
def _(tmp):
    from hfpipe.checkpoint import convert

    f = _saved(tmp) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return raised(convert, tmp / "hf", tmp / "ckpt", progress=False)


@case("safetensors-bad-header", "`hfpipe convert` of a model.safetensors whose header bytes are damaged")
def _(tmp):
    from hfpipe.checkpoint import convert

    f = _saved(tmp) / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    return raised(convert, tmp / "hf", tmp / "ckpt", progress=False)


@case("safetensors-nan-bytes", "`hfpipe convert` of a model.safetensors with damaged data bytes (header intact, "
                               "NaNs in a weight)")
def _(tmp):
    import json as _json
    import struct

    from hfpipe.checkpoint import convert

    f = _saved(tmp) / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = _json.loads(data[8:8 + n])["model.norm.weight"]["data_offsets"][0] + 8 + n
    data[start:start + 8] = b"\xff" * 8  # two float32 NaNs
    f.write_bytes(bytes(data))
    return raised(convert, tmp / "hf", tmp / "ckpt", progress=False)


@case("config-json-malformed", "`hfpipe convert` of a folder whose config.json is not valid JSON")
def _(tmp):
    from hfpipe.checkpoint import convert

    folder = _saved(tmp)
    (folder / "config.json").write_text((folder / "config.json").read_text()[:-20])
    return raised(convert, folder, tmp / "ckpt", progress=False)


@case("layer-file-truncated", "`hfpipe export` of a checkpoint whose layer file is truncated")
def _(tmp):
    from hfpipe.checkpoint import convert, export

    convert(_saved(tmp), tmp / "ckpt", progress=False)
    f = tmp / "ckpt" / "global_step0" / "layer_00-model_states.pt"
    f.write_bytes(f.read_bytes()[:200])
    return raised(export, tmp / "ckpt", tmp / "out", progress=False)


@case("export-nonfinite", "`hfpipe export` of a checkpoint holding a NaN weight (a diverged run)")
def _(tmp):
    import torch

    from hfpipe.checkpoint import convert, export

    convert(_saved(tmp), tmp / "ckpt", progress=False)
    f = tmp / "ckpt" / "global_step0" / "layer_00-model_states.pt"
    state = torch.load(f)
    next(iter(state.values()))[0, 0] = float("nan")
    torch.save(state, f)
    return raised(export, tmp / "ckpt", tmp / "out", progress=False)


@case("push-offline", "`hfpipe push` with `HF_HUB_OFFLINE=1` (no network, e.g. no token reachable)")
def _(tmp):
    from hfpipe.hub import push

    (tmp / "final").mkdir()
    os.environ["HF_HUB_OFFLINE"] = "1"
    return raised(push, str(tmp / "final"), "me/model")


@case("push-missing-folder", "`hfpipe push` of a folder that does not exist")
def _(tmp):
    from hfpipe.hub import push

    return raised(push, str(tmp / "missing"), "me/model")


# --- the table ---------------------------------------------------------------------------------------------------

def message(case_id: str, tmp: Path) -> str:
    exc = CASES[case_id][1](tmp)
    text = f"{type(exc).__name__}: {exc}"
    assert "\n" not in text, f"{case_id}: the message is not one line: {text!r}"
    text = re.sub(r"Supported: .*?, and any family", "Supported: <the `hfpipe families` list>, and any family", text)
    return text.replace(str(tmp.resolve()), "<tmp>").replace(str(tmp), "<tmp>")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _uncell(text: str) -> str:
    return text.strip().replace("\\|", "|")


def table_rows() -> dict[str, str]:
    """``id -> message`` as the table in docs/errors.md has them."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `([a-z0-9-]+)` \|(.*)\|(.*)\|\s*$", line.replace("\\|", "\0"))
        if m:
            rows[m.group(1)] = _uncell(m.group(3).replace("\0", "\\|")).strip("`")
    return rows


HEADER = """# Errors: what each bad input gets

Every row is checked by `tests/test_errors.py`, which makes the bad input and compares the message it gets with the
one shown here, word for word (`<tmp>` stands for a temporary folder, and the list of supported families is
abbreviated). Errors hfpipe knows to be the user's print as
one line, `hfpipe <command>: error: ...` in the CLI, with exit status 2.

| id | bad input | message |
|---|---|---|
"""


def write_table(tmp: Path) -> None:
    lines = [HEADER.rstrip("\n")]
    for case_id, (bad, _) in CASES.items():
        sub = tmp / case_id
        sub.mkdir()
        lines.append(f"| `{case_id}` | {_cell(bad)} | `{_cell(message(case_id, sub))}` |")
    DOC.write_text("\n".join(lines) + "\n")


def test_every_row_has_a_case_and_at_least_30_rows():
    rows = table_rows()
    assert len(rows) >= 30
    assert set(rows) == set(CASES)


@pytest.mark.parametrize("case_id", list(CASES))
def test_row(case_id, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
    assert message(case_id, tmp_path) == table_rows()[case_id]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_table(Path(d))
    print(f"wrote {DOC} ({len(CASES)} rows)")
