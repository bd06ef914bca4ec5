"""LoRA through ``PipelineTrainer``: the ``--lora_*`` / ``--peft_config`` flags (clear errors before any model loads)
and ``output_dir/final`` as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads onto the base model with the
pipeline's logits, after training with an optimizer that held only the adapter."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from models import tiny_config  # noqa: E402

SEQ = 12


#: model kind -> (Auto class, model class, config, --lora_target_modules, PEFT task type of its head)
CASES = {"llama": ("AutoModelForCausalLM", "LlamaForCausalLM", ("llama", {}), "q_proj,v_proj", "CAUSAL_LM"),
         "bert": ("AutoModelForSequenceClassification", "BertForSequenceClassification", ("bert", {"num_labels": 3}),
                  None, "SEQ_CLS")}  # bert: PEFT's default targets; its classifier trained in full (modules_to_save)


def _base(kind: str):
    import transformers

    torch.manual_seed(0)
    model_type, overrides = CASES[kind][2]
    return getattr(transformers, CASES[kind][1])(tiny_config(model_type, **overrides)).eval()


def _data(kind: str, n: int = 8):
    import datasets

    ids = torch.randint(1, 128, (n, SEQ), generator=torch.Generator().manual_seed(1))
    labels = ids.tolist() if kind == "llama" else (ids[:, 0] % 3).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": labels})


def _args(out_dir, **kw):
    from hfpipe import PipelineTrainingArguments

    base = dict(output_dir=out_dir, num_stages=2, per_device_train_batch_size=2, per_device_eval_batch_size=4,
                gradient_accumulation_steps=2, max_seq_length=SEQ, report_to=[], disable_tqdm=True,
                plot_curves=False, save_strategy="no", logging_steps=1, max_steps=2, learning_rate=1e-2)
    base.update(kw)
    return PipelineTrainingArguments(**base)


def rank_train_lora(kind: str, out_dir: str, base: str):
    import transformers

    from hfpipe import PipelineTrainer

    # save_strategy "steps" (the default) writes checkpoint-2 at the end; the adapter comes from the live weights
    args = _args(out_dir, lora_r=4, lora_alpha=8, lora_target_modules=CASES[kind][3], save_strategy="steps")
    trainer = PipelineTrainer(base, args, train_dataset=_data(kind),  # a folder: read stage-locally
                              model_class=getattr(transformers, CASES[kind][0]))
    opt = trainer.engine.optimizer
    groups = getattr(opt, "bf16_groups", None) or [g["params"] for g in opt.param_groups]
    optimizer_numel = sum(p.numel() for group in groups for p in group)
    result = trainer.train()
    logits = trainer.predict(_data(kind, 4)).predictions
    return {"final": result["final_model"], "optimizer_numel": optimizer_numel, "logits": logits}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_lora_training_writes_a_peft_adapter_folder(dist_pool, tmp_path, kind):
    """2 steps of LoRA at 2 stages from a base folder: final/ is adapter_config.json + adapter_model.safetensors
    naming that base, PEFT loads it onto the base with exactly its own adapter keys, and gives the trained pipeline's
    logits (a classification head, which PEFT trains in full for SEQ_CLS, included)."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    auto, _, _, targets, task = CASES[kind]
    base = str(tmp_path / "base")
    _base(kind).save_pretrained(base)
    ranks = dist_pool(2).run(rank_train_lora, kind, str(tmp_path / "out"), base)
    final = ranks[0]["final"]
    assert sorted(os.listdir(final)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(final, "adapter_config.json")) as f:
        saved = json.load(f)
    assert saved["peft_type"] == "LORA" and saved["task_type"] == task and saved["r"] == 4
    assert saved["inference_mode"] is True and saved["base_model_name_or_path"] == base
    if targets:
        assert set(saved["target_modules"]) == set(targets.split(","))

    tensors = load_file(os.path.join(final, "adapter_model.safetensors"))
    model = PeftModel.from_pretrained(getattr(transformers, auto).from_pretrained(base), final).eval()
    theirs = get_peft_model_state_dict(model)
    assert set(tensors) == set(theirs)  # no missing and no unexpected adapter keys
    assert all(torch.equal(tensors[k], theirs[k]) for k in tensors)
    assert any(".lora_B." in k and tensors[k].abs().sum() > 0 for k in tensors)  # B trained away from zero
    if task == "SEQ_CLS":
        assert "base_model.model.classifier.weight" in tensors  # the head PEFT trains in full

    config = LoraConfig.from_pretrained(final)
    config.inference_mode = False
    fresh = get_peft_model(getattr(transformers, auto).from_pretrained(base), config)
    trainable, _ = fresh.get_nb_trainable_parameters()
    assert sum(r["optimizer_numel"] for r in ranks) == trainable == sum(t.numel() for t in tensors.values())

    ids = torch.tensor(_data(kind, 4)["input_ids"])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    pipe = torch.as_tensor(ranks[0]["logits"])
    torch.testing.assert_close(pipe.reshape(ref.shape), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw, message", [
    (dict(lora_r=-2), "--lora_r -2"),
    (dict(lora_dropout=1.0, lora_r=4), "--lora_dropout 1.0"),
    (dict(lora_target_modules="q_proj"), "--lora_target_modules is set but LoRA is off"),
    (dict(peft_config="/no/such/adapter"), "--peft_config '/no/such/adapter': no such file"),
])
def test_bad_lora_flags_are_one_clear_error(tmp_path, kw, message):
    from hfpipe.core.lora import LoraConfigError

    with pytest.raises(LoraConfigError, match=message.replace("(", r"\(")):
        _args(str(tmp_path), **kw)


def test_peft_config_file_and_flags(tmp_path):
    """--peft_config reads PEFT's file; a --lora_* flag besides it must agree; the flags build PEFT's LoraConfig
    (alpha default PEFT's, task type from the head where the config has none)."""
    from peft import LoraConfig

    from hfpipe.core.lora import LoraConfigError

    LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=32).save_pretrained(str(tmp_path))
    cfg = _args(str(tmp_path), peft_config=str(tmp_path), lora_r=4).lora_config("CAUSAL_LM")
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.task_type) == (4, 32, {"q_proj", "v_proj"}, "CAUSAL_LM")
    with pytest.raises(LoraConfigError, match="--lora_r 8 disagrees with r=4"):
        _args(str(tmp_path), peft_config=str(tmp_path / "adapter_config.json"), lora_r=8)
    cfg = _args(str(tmp_path), lora_r=8, lora_target_modules="all-linear", lora_modules_to_save="score, norm")
    cfg = cfg.lora_config("SEQ_CLS")
    assert (cfg.lora_alpha, cfg.target_modules, cfg.task_type) == (LoraConfig().lora_alpha, "all-linear", "SEQ_CLS")
    assert set(cfg.modules_to_save) >= {"score", "norm"}
    assert _args(str(tmp_path)).lora_config() is None
