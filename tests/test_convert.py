"""Pipeline checkpoints (issue 4): HF -> ``convert`` -> ``export`` is bit-exact for every family; DeepSpeed's own
``load_checkpoint`` loads converted folders at p=2 and p=4; a pipeline trained at p=2 exports to the same logits;
a p=2 training checkpoint resumes at p=4; the real MiniLM weights survive the round trip; errors and atomic writes."""

import glob
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

sys.path.insert(0, os.path.dirname(__file__))
from models import DECODERS, FAMILIES, tiny_config  # noqa: E402

from hfpipe.checkpoint import convert, export
from hfpipe.core.weights import MANIFEST, CheckpointError, is_pipeline_checkpoint, resolve_pretrained


def _auto(model_type):
    return AutoModelForCausalLM if model_type in DECODERS else AutoModelForSequenceClassification


def _hf_folder(tmp_path, model_type, **overrides):
    torch.manual_seed(0)
    model = _auto(model_type).from_config(tiny_config(model_type, **overrides))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return folder, model


def _tensors(folder):
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(f))
    return out


# ---------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_round_trip_is_bit_exact(tmp_path, model_type):
    folder, model = _hf_folder(tmp_path, model_type)
    manifest = convert(folder, tmp_path / "ckpt", num_stages=2, progress=False)
    ckpt = tmp_path / "ckpt"
    # a complete DeepSpeed pipeline checkpoint: latest tag, one file per stateful layer, one mp_rank file per stage
    assert (ckpt / "latest").read_text() == "global_step0"
    files = sorted(os.listdir(ckpt / "global_step0"))
    saved = [d for d in manifest["layers"] if d["file"]]
    assert files == sorted([d["file"] for d in saved] + ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"])
    assert manifest["model_type"] == model_type and manifest["architecture"] == type(model).__name__
    assert manifest["partition"]["num_stages"] == 2 and len(manifest["partition"]["parts"]) == 3
    assert manifest["missing_keys"] == [] and manifest["unused_keys"] == []
    assert json.loads((ckpt / MANIFEST).read_text()) == manifest
    out = export(ckpt, tmp_path / "out", progress=False)
    src, dst = _tensors(folder), _tensors(out)
    assert sorted(src) == sorted(dst)  # tied weights dropped exactly where save_pretrained drops them
    for name, t in src.items():
        assert t.dtype == dst[name].dtype and torch.equal(t, dst[name]), name
    reloaded, info = type(model).from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.randint(2, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_sharded_export_and_dtypes(tmp_path):
    folder, model = _hf_folder(tmp_path, "llama", tie_word_embeddings=False)
    manifest = convert(folder, tmp_path / "ckpt", num_stages=3, dtype="bf16", partition_method="uniform",
                       progress=False)
    assert manifest["dtype"] == "bfloat16" and manifest["partition"]["method"] == "uniform"
    layer0 = torch.load(tmp_path / "ckpt" / "global_step0" / "layer_00-model_states.pt", weights_only=True)
    assert layer0["embed.weight"].dtype == torch.bfloat16
    out = export(tmp_path / "ckpt", tmp_path / "out", max_shard_size="20KB", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # several shards
    src, dst = _tensors(folder), _tensors(out)
    assert sorted(src) == sorted(dst)
    for name, t in src.items():
        assert dst[name].dtype == torch.bfloat16 and torch.equal(t.to(torch.bfloat16), dst[name]), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    # export can cast again (bf16 -> fp32 is exact)
    out32 = export(tmp_path / "ckpt", tmp_path / "out32", dtype="fp32", progress=False)
    assert all(t.dtype == torch.float32 for t in _tensors(out32).values())


def test_bare_deepspeed_checkpoint_exports_with_model(tmp_path):
    # what engine.save_checkpoint(dir) leaves without PipelineTrainer: no hfpipe.json, no config.json
    folder, _ = _hf_folder(tmp_path, "opt")
    convert(folder, tmp_path / "ckpt", num_stages=2, progress=False)
    os.remove(tmp_path / "ckpt" / MANIFEST)
    os.remove(tmp_path / "ckpt" / "config.json")
    with pytest.raises(CheckpointError, match="no config.json / hfpipe.json; pass the model it was trained from"):
        export(tmp_path / "ckpt", tmp_path / "out", progress=False)
    out = export(tmp_path / "ckpt" / "global_step0", tmp_path / "out", model=folder, progress=False)  # a tag folder
    src, dst = _tensors(folder), _tensors(out)
    assert sorted(src) == sorted(dst) and all(torch.equal(src[k], dst[k]) for k in src)


def test_hub_id_resolves_offline_from_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder, _ = _hf_folder(tmp_path, "gpt2")
    repo = tmp_path / "hub" / "models--someone--tiny-gpt2"
    snap = repo / "snapshots" / ("0" * 40)
    snap.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(folder, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    manifest = convert("someone/tiny-gpt2", tmp_path / "ckpt", num_stages=2, progress=False)
    assert manifest["source"] == "someone/tiny-gpt2" and manifest["missing_keys"] == []
    with pytest.raises(CheckpointError, match="could not resolve someone/not-cached as a local folder or a cached hub"):
        convert("someone/not-cached", tmp_path / "x", progress=False)


def test_gpt_neox_renamed_head_loads_stage_locally(tmp_path):
    # transformers saves GPTNeoXForCausalLM.lm_head as `embed_out` and renames it when loading: so must hfpipe
    folder, model = _hf_folder(tmp_path, "gpt_neox")
    assert "embed_out.weight" in _tensors(folder)
    _, _, src = resolve_pretrained(folder)
    assert torch.equal(src.get("lm_head.weight"), model.lm_head.weight)


def test_real_minilm_weights_round_trip(tmp_path):
    from transformers import AutoModel, AutoTokenizer, BertForSequenceClassification

    from hfpipe.tasks.base import default_model_path

    path = default_model_path()
    manifest = convert(path, tmp_path / "ckpt", num_stages=2, model_class=BertForSequenceClassification,
                       progress=False)
    # the sentence-transformers checkpoint has no classifier: initialised as HF does, and said so
    assert manifest["missing_keys"] == ["classifier.bias", "classifier.weight"]
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file() or (tmp_path / "ckpt" / "vocab.txt").is_file()
    out = export(tmp_path / "ckpt", tmp_path / "out", progress=False)
    src, dst = _tensors(path), _tensors(out)
    assert manifest["unused_keys"] == ["embeddings.position_ids"]  # a legacy buffer BertModel no longer has
    assert len(src) == 104  # 6 blocks x 16 + embeddings (5 with the legacy buffer) + pooler (2)
    for name, t in src.items():
        if name not in manifest["unused_keys"]:
            assert torch.equal(t, dst[f"bert.{name}"]), name
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["pipelines split a model into stages", "hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = AutoModel.from_pretrained(path).eval()(**batch).last_hidden_state
        got = AutoModel.from_pretrained(out).eval()(**batch).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_problem_and_leave_nothing_half_written(tmp_path, monkeypatch):
    folder, _ = _hf_folder(tmp_path, "gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        convert(tmp_path / "empty", tmp_path / "x", progress=False)
    with pytest.raises(CheckpointError, match="dtype 'int8' is not supported"):
        convert(folder, tmp_path / "x", dtype="int8", progress=False)
    with pytest.raises(CheckpointError, match="not a DeepSpeed pipeline checkpoint"):
        export(folder, tmp_path / "x", progress=False)
    assert not is_pipeline_checkpoint(folder)
    ckpt = tmp_path / "ckpt"
    convert(folder, ckpt, num_stages=2, progress=False)
    assert is_pipeline_checkpoint(ckpt) and is_pipeline_checkpoint(ckpt / "global_step0")
    # not-empty output: refused, then replaced with overwrite
    with pytest.raises(CheckpointError, match="not empty.*--overwrite"):
        convert(folder, ckpt, progress=False)
    convert(folder, ckpt, num_stages=4, overwrite=True, progress=False)
    assert json.loads((ckpt / MANIFEST).read_text())["partition"]["num_stages"] == 4
    # another family's model, or another layer count
    bert, _ = _hf_folder(tmp_path / "b", "bert")
    with pytest.raises(CheckpointError, match="holds a 'gpt2' model .* but the model is 'bert'"):
        export(ckpt, tmp_path / "y", model=bert, progress=False)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "n_layer": 2}))
    with pytest.raises(CheckpointError, match=r"has 8 pipeline layers \(4 blocks.* has 6 \(2 blocks\).* another conf"):
        export(ckpt, tmp_path / "y", progress=False)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    os.remove(ckpt / "global_step0" / "layer_03-model_states.pt")
    with pytest.raises(CheckpointError, match="layer_03-model_states.pt is missing"):
        export(ckpt, tmp_path / "y", progress=False)
    # a convert that fails half-way leaves no folder behind (and no temporary one)
    real_save, calls = torch.save, []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert(folder, tmp_path / "half", progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "half").exists() and not glob.glob(str(tmp_path / ".half*"))
    assert not (tmp_path / "y").exists() and not glob.glob(str(tmp_path / ".y*"))


def test_cli_convert_and_export(tmp_path, capsys):
    from hfpipe.cli import main

    folder, model = _hf_folder(tmp_path, "bert")
    assert main(["convert", str(folder), "--stages", "2", "--output", str(tmp_path / "ckpt"),
                 "--partition", "parameters", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 stages" in out and "layer_" not in out.splitlines()[0]
    assert main(["export", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert sorted(_tensors(folder)) == sorted(_tensors(tmp_path / "out"))
    assert main(["export", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- multi-process
def rank_load_converted(ckpt: str, hf_folder: str, stages: int):
    import deepspeed  # noqa: F401

    from hfpipe import to_pipeline
    from hfpipe.pipeline import initialize

    ref = _tensors(hf_folder)
    ref["lm_head.weight"] = ref["model.embed_tokens.weight"]
    config = tiny_config("llama", tie_word_embeddings=True)
    pipe = to_pipeline(config, model_class=AutoModelForCausalLM, num_stages=stages, seed=999,
                       partition_method="uniform")
    engine, *_ = initialize(pipe, {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                                   "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    before = {n: p.detach().clone() for n, p in pipe.hf_named_parameters()}
    path, client = engine.load_checkpoint(ckpt, load_module_only=True)
    after = {n: p.detach().clone() for n, p in pipe.hf_named_parameters()}
    # the same weights through to_pipeline(ckpt): only this stage's layer files are opened
    pipe2 = to_pipeline(ckpt, num_stages=stages, partition_method="uniform")
    local = {n: p.detach().clone() for n, p in pipe2.hf_named_parameters()}
    files = sorted(pipe2.hfpipe_builder.source._files)
    return {"loaded": path is not None, "changed": any(not torch.equal(before[n], after[n]) for n in before),
            "equal": all(torch.equal(after[n], ref[n]) for n in after), "names": sorted(after),
            "equal2": all(torch.equal(local[n], ref[n]) for n in local), "files": files,
            "parts": pipe.parts, "stage": engine.stage_id}


@pytest.mark.parametrize("stages", [2, 4])
def test_deepspeed_load_checkpoint_loads_converted_weights(dist_pool, tmp_path, stages):
    folder, _ = _hf_folder(tmp_path, "llama", tie_word_embeddings=True)
    convert(folder, tmp_path / "ckpt", num_stages=2, progress=False)  # converted at 2, loaded at 2 and 4
    results = dist_pool(stages).run(rank_load_converted, str(tmp_path / "ckpt"), str(folder), stages)
    assert all(r["loaded"] and r["changed"] and r["equal"] and r["equal2"] for r in results)
    names = set().union(*(r["names"] for r in results))
    assert names == set(_tensors(folder))  # every weight is on some stage (the tied head once)
    parts = results[0]["parts"]
    for r in results:  # each rank opened only the layer files of its own stage (+ the tied embedding on the last)
        own = set(range(parts[r["stage"]], parts[r["stage"] + 1])) | ({0} if r["stage"] == stages - 1 else set())
        assert r["files"] and all(int(f[6:8]) in own for f in r["files"]), (r["stage"], r["files"])


def rank_train_export(out_dir: str):
    from test_trainer import _args, _cls_data, _cls_model

    from hfpipe import PipelineTrainer

    args = _args(out_dir, 2, max_steps=3, save_strategy="steps", save_steps=3, learning_rate=1e-3,
                 export_final_model=True)
    trainer = PipelineTrainer(_cls_model(0).train(), args, train_dataset=_cls_data(16))
    trainer.train()
    pred = trainer.predict(_cls_data(6, seed=5))
    return pred.predictions


def test_trained_pipeline_exports_to_the_same_logits(dist_pool, tmp_path):
    from transformers import BertForSequenceClassification

    from test_trainer import _cls_data

    logits = dist_pool(2).run(rank_train_export, str(tmp_path))[0]
    ckpt = tmp_path / "checkpoint-3"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["global_step"] == 3 and manifest["partition"]["num_stages"] == 2
    assert (tmp_path / "final" / "model.safetensors").is_file()
    model, info = BertForSequenceClassification.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    data = _cls_data(6, seed=5)
    ids = torch.zeros(6, 12, dtype=torch.long)
    mask = torch.zeros(6, 12, dtype=torch.long)
    for i, row in enumerate(data["input_ids"]):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    with torch.no_grad():
        ref = model.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(torch.as_tensor(logits), ref, rtol=1e-5, atol=1e-6)
    # `hfpipe export` of the training checkpoint gives the same files
    again = export(ckpt, tmp_path / "again", progress=False)
    a, b = _tensors(tmp_path / "final"), _tensors(again)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def rank_resume(out_dir: str, stages: int, resume: str | None):
    import warnings

    from test_trainer import _args, _cls_data, _cls_model

    from hfpipe import PipelineTrainer

    args = _args(out_dir, stages, max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-3,
                 warmup_steps=2, resume_from_checkpoint=resume)
    trainer = PipelineTrainer(_cls_model(7 if resume else 0).train(), args, train_dataset=_cls_data(16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.train()
    hist = trainer.state.log_history
    return {"loss": [h["loss"] for h in hist if "loss" in h], "lr": [h["learning_rate"] for h in hist if "loss" in h],
            "steps": [h["step"] for h in hist if "loss" in h], "global_step": result["global_step"],
            "warnings": [str(w.message) for w in caught]}


def test_training_checkpoint_resumes_at_another_stage_count(dist_pool, tmp_path):
    a = dist_pool(2).run(rank_resume, str(tmp_path / "a"), 2, None)[0]
    b = dist_pool(4).run(rank_resume, str(tmp_path / "b"), 4, str(tmp_path / "a" / "checkpoint-3"))[0]
    assert b["steps"] == list(range(1, 7)) and b["global_step"] == 6  # steps 1-3 from the restored log history
    assert b["lr"] == a["lr"]  # the LR schedule continues where it was
    # the restored weights, data position and (resharded, hfpipe.training.reshard) Adam moments give the
    # uninterrupted curve, and nothing warns of a reset
    assert b["loss"][3:] == pytest.approx(a["loss"][3:], rel=1e-6)
    assert not any("optimizer states" in w for w in b["warnings"])
