"""LoRA out and in (issue 16, parts 4-5): adapter-only trainer checkpoints that resume with the uninterrupted losses,
``final/`` with a model card carrying PEFT's metadata (and what ``hfpipe push`` uploads), ``--merge_lora`` /
``hfpipe export --merge-lora`` equal to PEFT's merged model, ``peft_adapter=`` read stage-locally with PEFT's loss,
and adapters that do not fit the model as one error naming both.

One LoRA training run (2 stages, 4 steps, checkpoints at 2 and 4, ``--merge_lora``) and its resume from checkpoint-2
are shared by the tests of this module (``run``)."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from models import tiny_config  # noqa: E402
from test_hub import commit_files, hub  # noqa: E402,F401  (the mock Hub fixture)

SEQ = 12
TARGETS = "q_proj,v_proj"


def _data(n: int = 8):
    import datasets

    ids = torch.randint(1, 128, (n, SEQ), generator=torch.Generator().manual_seed(1))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": ids.tolist()})


def _args(out_dir, **kw):
    from hfpipe import PipelineTrainingArguments

    base = dict(output_dir=out_dir, num_stages=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_seq_length=SEQ, report_to=[], disable_tqdm=True, plot_curves=False, logging_steps=1, max_steps=4,
                save_steps=2, learning_rate=1e-2, lora_r=4, lora_alpha=8, lora_target_modules=TARGETS)
    base.update(kw)
    return PipelineTrainingArguments(**base)


def rank_train_and_resume(base: str, out: str):
    import transformers

    from hfpipe import PipelineTrainer

    def run(out_dir, **kw):
        trainer = PipelineTrainer(base, _args(out_dir, **kw), train_dataset=_data(),
                                  model_class=transformers.AutoModelForCausalLM)
        result = trainer.train()
        return result, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    first, losses = run(os.path.join(out, "run"), merge_lora=True)
    resumed, resumed_losses = run(os.path.join(out, "resumed"),
                                  resume_from_checkpoint=os.path.join(out, "run", "checkpoint-2"))
    # --peft_adapter: one step at learning rate 0 from the first run's adapter leaves exactly that adapter
    continued, _ = run(os.path.join(out, "continued"), peft_adapter=first["final_model"], lora_r=0,
                       lora_target_modules=None, learning_rate=0.0, max_steps=1, save_strategy="no")
    return {"final": first["final_model"], "losses": losses, "resumed_losses": resumed_losses,
            "resumed_final": resumed["final_model"], "continued_final": continued["final_model"]}


@pytest.fixture(scope="module")
def run(dist_pool, tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("lora_io")
    torch.manual_seed(0)
    base = str(root / "base")
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(base)
    ranks = dist_pool(2).run(rank_train_and_resume, base, str(root))
    return {"base": base, "root": root, **ranks[0]}


def _peft_logits(base: str, adapter: str):
    import transformers
    from peft import PeftModel

    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ids = torch.tensor(_data(4)["input_ids"])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _logits(folder: str):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor(_data(4)["input_ids"])
    with torch.no_grad():
        return model(input_ids=ids).logits


# -------------------------------------------------------------------------------------------------- checkpoints
def test_adapter_only_checkpoint_resumes_with_the_uninterrupted_losses(run):
    """checkpoint-N layer files hold the adapter tensors only (no base weight), the optimizer state only theirs, and
    resuming from checkpoint-2 gives steps 3-4 the losses of the run that never stopped, and the same adapter."""
    from safetensors.torch import load_file

    ckpt = os.path.join(os.path.dirname(run["final"]), "checkpoint-2")
    tag = open(os.path.join(ckpt, "latest")).read().strip()
    params = [k for name in sorted(os.listdir(os.path.join(ckpt, tag))) if name.startswith("layer_")
              for k, v in torch.load(os.path.join(ckpt, tag, name), weights_only=True).items() if v.is_floating_point()]
    assert params and all(".lora_A." in k or ".lora_B." in k for k in params), params
    assert len(params) == 4 * 2 * 2  # A and B of q_proj and v_proj in 4 blocks
    manifest = json.load(open(os.path.join(ckpt, "hfpipe.json")))
    assert manifest["lora"]["adapter_only"] and manifest["lora"]["base_model"] == run["base"]
    assert len(run["losses"]) == 4 and run["resumed_losses"][:2] == run["losses"][:2]  # log history restored
    assert run["resumed_losses"][2:] == pytest.approx(run["losses"][2:], rel=1e-6, abs=0)
    ours, theirs = (load_file(os.path.join(f, "adapter_model.safetensors")) for f in (run["final"],
                                                                                      run["resumed_final"]))
    assert sorted(ours) == sorted(theirs) and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


# ----------------------------------------------------------------------------------------------- final/, push
def test_final_has_a_model_card_with_peft_metadata(run):
    from huggingface_hub import ModelCard

    assert sorted(os.listdir(run["final"])) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = ModelCard.load(os.path.join(run["final"], "README.md"))
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert card.data.base_model is None  # a local folder is no Hub id; the text names it
    assert f"fine-tuned from `{run['base']}`" in card.text and "PeftModel.from_pretrained" in card.text


def test_push_of_an_adapter_folder_uploads_it_with_peft_card_metadata(run, tmp_path, hub):
    """What `hfpipe push` sends for an adapter folder (no network: huggingface_hub's mock transport of
    tests/test_hub.py): the adapter files and a card with library_name peft and the adapter's base_model."""
    import shutil

    from huggingface_hub import ModelCard

    from hfpipe.cli import main

    folder = tmp_path / "adapter"
    shutil.copytree(run["final"], folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "user/tiny-llama"  # as from a Hub base
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["push", str(folder), "--repo-id", "user/tiny-lora"]) == 0
    files = commit_files(hub["requests"][-1])["files"]
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert files["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.base_model == "user/tiny-llama"
    assert {"lora", "base_model:adapter:user/tiny-llama"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation"


# ------------------------------------------------------------------------------------------------------ merge
def test_merge_lora_equals_peft_merged_model(run, tmp_path):
    """--merge_lora's output_dir/merged, `hfpipe export --merge-lora` of the LoRA checkpoint and of the adapter
    folder + base: from_pretrained gives PeftModel's logits; export of the checkpoint alone is the adapter."""
    from safetensors.torch import load_file

    from hfpipe.cli import main

    ref = _peft_logits(run["base"], run["final"])
    merged = os.path.join(os.path.dirname(run["final"]), "merged")
    assert not any(".lora_" in k for k in load_file(os.path.join(merged, "model.safetensors")))
    torch.testing.assert_close(_logits(merged), ref, rtol=1e-5, atol=1e-5)

    ckpt = os.path.join(os.path.dirname(run["final"]), "checkpoint-4")
    assert main(["export", ckpt, "--merge-lora", "--output", str(tmp_path / "m1"), "--no-progress"]) == 0
    torch.testing.assert_close(_logits(str(tmp_path / "m1")), ref, rtol=1e-5, atol=1e-5)
    assert main(["export", run["final"], "--merge-lora", "--model", run["base"], "--output",
                 str(tmp_path / "m2")]) == 0
    torch.testing.assert_close(_logits(str(tmp_path / "m2")), ref, rtol=1e-5, atol=1e-5)
    assert main(["export", ckpt, "--output", str(tmp_path / "a"), "--no-progress"]) == 0
    ours, theirs = (load_file(os.path.join(f, "adapter_model.safetensors")) for f in (tmp_path / "a", run["final"]))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_merge_lora_refuses_4bit_and_no_lora():
    from hfpipe.core.lora import LoraConfigError

    args = _args("out", merge_lora=True)
    args.load_in_4bit = True  # the flag helper A2 adds; refused with the reason
    with pytest.raises(LoraConfigError, match="--merge_lora with --load_in_4bit: merging into the 4-bit base would "
                                              "round"):
        args.lora_config()
    with pytest.raises(LoraConfigError, match="--merge_lora is set but LoRA is off"):
        _args("out", merge_lora=True, lora_r=0, lora_target_modules=None, lora_alpha=8)


# ------------------------------------------------------------------------------------------------- adapter in
def rank_loss_with_adapter(base: str, adapter: str):
    import transformers

    from hfpipe import initialize, micro_batches, to_pipeline
    from hfpipe.core.batches import make_batch

    pipe = to_pipeline(base, num_stages=2, peft_adapter=adapter)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
          "steps_per_print": 10**9, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = initialize(pipe, ds)
    config = transformers.AutoConfig.from_pretrained(base)
    loss = engine.eval_batch(iter(micro_batches(make_batch(config, "causal-lm", batch_size=4, seq_len=10), pipe, 1)))
    return {"loss": float(loss), "read": list(pipe.hfpipe_builder.source.names_read),
            "own": sorted(n for n, p in pipe.hf_named_parameters() if p.requires_grad)}


def test_peft_adapter_in_is_read_stage_locally_with_peft_loss(run, dist_pool):
    """to_pipeline(base, peft_adapter=final): each rank reads exactly its own stage's adapter tensors (once), and
    the loss is PeftModel.from_pretrained(base, final)'s."""
    import transformers
    from peft import PeftModel

    from hfpipe.core.batches import make_batch

    ranks = dist_pool(2).run(rank_loss_with_adapter, run["base"], run["final"])
    for r in ranks:
        assert sorted(r["read"]) == r["own"] and len(set(r["read"])) == len(r["read"]) > 0
    assert set(ranks[0]["read"]).isdisjoint(ranks[1]["read"])
    config = transformers.AutoConfig.from_pretrained(run["base"])
    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(run["base"]),
                                      run["final"]).eval()
    with torch.no_grad():
        ref = float(model(**make_batch(config, "causal-lm", batch_size=4, seq_len=10)).loss)
    assert ranks[0]["loss"] == pytest.approx(ref, rel=1e-5) and ranks[1]["loss"] == pytest.approx(ref, rel=1e-5)


def test_trainer_peft_adapter_flag_reads_the_adapter_config(run, tmp_path):
    """--peft_adapter: the adapter's config is the LoRA config, and the trainer starts from its tensors (one step at
    learning rate 0 writes the same adapter back); a --lora_* flag that disagrees is one error."""
    from safetensors.torch import load_file

    from hfpipe.core.lora import LoraConfigError

    ours, theirs = (load_file(os.path.join(f, "adapter_model.safetensors")) for f in (run["continued_final"],
                                                                                      run["final"]))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)

    cfg = _args(str(tmp_path), lora_r=0, lora_target_modules=None, peft_adapter=run["final"]).lora_config()
    assert (cfg.r, cfg.target_modules, cfg.inference_mode) == (4, {"q_proj", "v_proj"}, False)
    with pytest.raises(LoraConfigError, match=r"--lora_r 8 disagrees with r=4 in --peft_adapter"):
        _args(str(tmp_path), lora_r=8, lora_target_modules=None, peft_adapter=run["final"])


# -------------------------------------------------------------------------------------------------- bad input
def test_adapter_for_another_model_is_one_error_naming_both(run, tmp_path):
    import transformers

    from hfpipe.checkpoint import merge_adapter
    from hfpipe.core.builder import prepare
    from hfpipe.core.lora import LoraConfigError, adapter_config, attach_adapter

    other = tmp_path / "other"
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(other)
    with pytest.raises(LoraConfigError, match=f"base_model_name_or_path='{run['base']}' but the model is "
                                              f"'{other}'"):
        attach_adapter(prepare(str(other), peft_config=adapter_config(run["final"])), run["final"])
    wide = tiny_config("llama", hidden_size=48)  # built from a config: no name to compare, the shapes disagree
    builder = prepare(wide, transformers.AutoModelForCausalLM, peft_config=adapter_config(run["final"]))
    with pytest.raises(LoraConfigError, match=r"base_model_name_or_path='.*base'\) does not fit the model .*: tensor "
                                              r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\."
                                              r"weight' has shape \(4, 32\) in the adapter but \(4, 48\) in the model"):
        attach_adapter(builder, run["final"])
    with pytest.raises(LoraConfigError, match="but the model is"):
        merge_adapter(run["final"], str(other), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    from hfpipe.core.weights import CheckpointError

    ckpt = os.path.join(os.path.dirname(run["final"]), "checkpoint-4")
    with pytest.raises(CheckpointError, match=r"is a LoRA checkpoint: it holds the adapter only, not the frozen base "
                                              r".*Fix: `hfpipe export"):
        prepare(ckpt)  # to_pipeline(checkpoint-N) of a LoRA run: the base is not in it
