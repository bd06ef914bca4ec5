"""LoRA through the pipeline (hfpipe.core.lora): PEFT's own LoRA layers per stage, same loss and trainable gradients
as ``peft.get_peft_model`` on the HF model, adapter-only optimizer, frozen base, seeded init independent of the stage
count, frozen tied embeddings, clear errors."""

import os
import sys
import warnings

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from hfpipe.core.builder import prepare
from hfpipe.core.lora import LoraConfigError
from hfpipe.verify import ModelSpec, format_report, verify

sys.path.insert(0, os.path.dirname(__file__))
from models import family_config  # noqa: E402

CLASSES = {"causal-lm": transformers.AutoModelForCausalLM,
           "sequence-classification": transformers.AutoModelForSequenceClassification}


def model_spec(model_type, head="causal-lm", **overrides):
    if head == "sequence-classification":
        overrides.setdefault("num_labels", 3)
    config = family_config(model_type, **overrides)
    cls = CLASSES[head]._model_mapping[type(config)]
    return ModelSpec(class_name=cls.__name__, config=config.to_dict(), seed=1)


# (model type, head, config overrides, target_modules, stages, activation checkpointing): each stage count and each
# kind of cut (tied embedding/head across stages, a classifier PEFT trains in full) meets LoRA somewhere, not every
# family at every count (test_equivalence does that without LoRA)
CASES = {
    "llama-default": ("llama", "causal-lm", {}, None, [1, 4], 0),
    "llama-tied": ("llama", "causal-lm", {"tie_word_embeddings": True}, ["q_proj", "v_proj"], [4], 0),
    "llama-checkpointing": ("llama", "causal-lm", {}, "all-linear", [2], 1),
    "qwen2-all-linear": ("qwen2", "causal-lm", {}, "all-linear", [2], 0),
    "gpt2-conv1d": ("gpt2", "causal-lm", {}, None, [2], 0),
    "mixtral": ("mixtral", "causal-lm", {}, ["q_proj", "k_proj", "o_proj"], [2], 0),
    "bert-seq-cls": ("bert", "sequence-classification", {}, None, [2], 0),
    "deberta-v2-seq-cls": ("deberta-v2", "sequence-classification", {}, None, [1], 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_matches_peft(dist_pool, case):
    """Loss, logits and every trainable gradient equal peft.get_peft_model's (same adapter), and the pipeline trains
    exactly PEFT's parameters (names and element count): LoRA A/B, plus the classifier PEFT trains in full."""
    model_type, head, overrides, targets, all_stages, checkpointing = CASES[case]
    spec = model_spec(model_type, head, **overrides)
    for stages in all_stages:
        report = verify(spec, stages=stages, micro_batches=2, batch_size=4, seq_len=10, pool=dist_pool(stages),
                        lora=LoraConfig(r=8, lora_alpha=16, target_modules=targets),
                        activation_checkpoint_interval=checkpointing)
        assert report["passed"], format_report(report)
        assert report["max_rel_grad_err"] <= 1e-5 and report["loss_rel_err"] <= 1e-5
        assert report["trainable_pipeline"] == report["trainable_hf"] > 0
        names = {row["name"] for row in report["worst"]}
        assert all(n.startswith("base_model.model.") for n in names)  # PEFT's state-dict keys
        if head == "sequence-classification":
            assert report["num_params"] == 4 * 2 * 2 + 2  # A/B of query and value in 4 blocks + classifier w, b


def test_lora_bf16_within_bf16_tolerance(dist_pool):
    spec = model_spec("llama", "sequence-classification")
    spec.dtype = "bf16"
    report = verify(spec, stages=2, micro_batches=2, batch_size=4, seq_len=10, pool=dist_pool(2),
                    lora=LoraConfig(r=8))
    assert report["passed"] and report["tolerance"] == 2e-2, format_report(report)


# ------------------------------------------------------------------------------------- engine: init, optimizer
def _engine_step(model_type, overrides, lora_kwargs, stages, bf16):
    """peft_config= path through hfpipe.initialize: initial adapter, optimizer size, one AdamW step."""
    import torch.distributed as dist

    from hfpipe import initialize, micro_batches, to_pipeline
    from hfpipe.core.batches import make_batch

    torch.manual_seed(1)
    config = family_config(model_type, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = to_pipeline(model, num_stages=stages, peft_config=LoraConfig(**lora_kwargs))
    said = [str(w.message) for w in caught if "holds no targeted module" in str(w.message)]
    before = {n: p.detach().clone() for n, p in pipe.hf_named_parameters()}
    trainable = {n for n, p in pipe.hf_named_parameters() if p.requires_grad}
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4,
          "steps_per_print": 10**9, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
          "bf16": {"enabled": bf16}}
    result = {"stage": engine_stage(pipe), "init": {n: t for n, t in before.items() if n in trainable},
              "said": said}
    engine, optimizer, *_ = initialize(pipe, ds)
    groups = getattr(engine.optimizer, "bf16_groups", None) or [g["params"] for g in engine.optimizer.param_groups]
    result["optimizer_numel"] = sum(p.numel() for group in groups for p in group)
    data = micro_batches(make_batch(config, "causal-lm", batch_size=4, seq_len=10), pipe, 2)
    before = {n: p.detach().clone() for n, p in pipe.hf_named_parameters()}  # as the engine holds them (bf16: cast)
    result["loss"] = float(engine.train_batch(iter(data)))
    after = dict(pipe.hf_named_parameters())
    result["base_changed"] = [n for n, t in before.items() if n not in trainable and not torch.equal(after[n], t)]
    result["adapter_changed"] = sorted(n for n in trainable if not torch.equal(after[n].detach(), before[n]))
    result["trainable"] = sorted(trainable)
    return result


def engine_stage(pipe):
    return pipe.stage_id


def _peft_reference(model_type, overrides, lora_kwargs):
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(family_config(model_type, **overrides))
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    numel = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return numel, set(get_peft_model_state_dict(peft_model))


@pytest.mark.parametrize("bf16", [False, True])
def test_adapter_only_optimizer_and_frozen_tied_base(dist_pool, bf16):
    """A tied Llama at 2 stages, LoRA via peft_config=: the optimizer holds exactly PEFT's trainable parameters, the
    frozen tied embedding passes DeepSpeed's tied-gradient all-reduce (bf16: its _hp_grad), the base does not move
    and the adapter does; names are PEFT's get_peft_model_state_dict keys."""
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM"}
    overrides = {"tie_word_embeddings": True}
    per_stage = dist_pool(2).run(_engine_step, "llama", overrides, lora, 2, bf16)
    numel, keys = _peft_reference("llama", overrides, lora)
    assert sum(r["optimizer_numel"] for r in per_stage) == numel
    assert set().union(*(r["trainable"] for r in per_stage)) == keys
    for r in per_stage:
        assert r["base_changed"] == []
        # B starts at zero, so only B has a gradient in the first step (A moves by weight decay at most)
        assert {n for n in r["trainable"] if ".lora_B." in n} <= set(r["adapter_changed"]) <= set(r["trainable"])
        assert torch.isfinite(torch.tensor(r["loss"]))


def test_initial_adapter_is_peft_init_and_independent_of_stage_count(dist_pool):
    """LoRA A is PEFT's kaiming init and B is zero (a no-op adapter), seeded per layer: identical at 1 and 2 stages;
    a stage holding no targeted module trains nothing, says so once and still steps (bf16)."""
    lora = {"r": 4, "target_modules": ["q_proj"], "layers_to_transform": [0]}
    one = dist_pool(1).run(_engine_step, "llama", {}, lora, 1, False)[0]
    two = dist_pool(2).run(_engine_step, "llama", {}, lora, 2, True)  # bf16: the idle stage steps too
    assert sorted(one["init"]) == sorted(n for r in two for n in r["init"])
    merged = {n: t for r in two for n, t in r["init"].items()}
    for name, tensor in one["init"].items():
        assert torch.equal(tensor, merged[name]), name
        assert (tensor == 0).all() if ".lora_B." in name else tensor.abs().sum() > 0
    assert [len(r["said"]) for r in sorted(two, key=lambda r: r["stage"])] == [0, 1]
    assert one["said"] == []


# ------------------------------------------------------------------------------------------------- bad input
def test_target_modules_matching_nothing_is_one_clear_error():
    config = family_config("llama")
    with pytest.raises(LoraConfigError, match=r"matches no module.*'down_proj', 'gate_proj', 'k_proj', 'lm_head', "
                                              r"'o_proj', 'q_proj', 'up_proj', 'v_proj'"):
        prepare(config, transformers.AutoModelForCausalLM, peft_config=LoraConfig(target_modules=["qkv"]))


def test_peft_model_and_peft_config_together_is_refused():
    model = transformers.AutoModelForCausalLM.from_config(family_config("llama"))
    peft_model = get_peft_model(model, LoraConfig(r=2))
    with pytest.raises(LoraConfigError, match="already carries its config"):
        prepare(peft_model, peft_config=LoraConfig(r=2))


def test_modules_to_save_on_a_whole_layer_is_refused():
    """The final norm is a pipeline layer of its own: PEFT would wrap it, hfpipe cannot yet -- an error, not a
    silently frozen module."""
    config = family_config("llama")
    builder = prepare(config, transformers.AutoModelForCausalLM,
                      peft_config=LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["norm"]))
    from hfpipe.core.weights import meta_layers

    with pytest.raises(LoraConfigError, match=r"'model.norm', which is a whole pipeline layer"):
        meta_layers(builder)
