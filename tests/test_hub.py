"""Hub push without a network: ``huggingface_hub``'s HTTP client is swapped (``set_client_factory``) for one with an
``httpx2.MockTransport`` that answers like the Hub and records every request. Checked: the exact requests (repo
creation with the private flag, pre-upload, one commit carrying config.json, the weights and the model card), the
card's metadata, clean errors for 401/403, offline mode failing before any request, and that the token never shows up
anywhere but the Authorization header."""

import base64
import json
import os
import traceback

import pytest

from hfpipe.cli import main
from hfpipe.hub import PushError, push_to_hub

TOKEN = "hf_secretTOKEN0123456789abcdef"
# huggingface_hub's own best-effort telemetry (agent detection), not part of a push
IGNORED = ("/api/agent-harnesses",)


@pytest.fixture
def hub(monkeypatch):
    import httpx2
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest set it before huggingface_hub was imported
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # with hf_xet installed, LFS uploads bypass httpx
    state = {"requests": [], "fail": {}}  # fail: path suffix -> status code

    def handler(request):
        path = request.url.path
        if path.startswith(IGNORED):
            return httpx2.Response(404)
        body = request.content.decode()
        state["requests"].append({"method": request.method, "path": path, "auth": request.headers.get("authorization"),
                                  "body": body})
        for suffix, status in state["fail"].items():
            if suffix in path:
                return httpx2.Response(status, json={"error": f"mock {status}",
                                                     "errors": [{"message": f"mock {status}"}]})
        if path == "/api/repos/create":
            name = json.loads(body)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{name['organization']}/{name['name']}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/user/tiny/commit/" + "a" * 40,
                                              "commitOid": "a" * 40})
        if "/branch/" in path:
            return httpx2.Response(200, json={})
        return httpx2.Response(404, json={"error": f"unexpected request in the mock: {request.method} {path}"})

    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler), follow_redirects=True,
                                             event_hooks={"request": [hf_request_event_hook]}))
    yield state
    set_client_factory(default_client_factory)


@pytest.fixture
def model_dir(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=32, num_labels=2)
    folder = tmp_path / "out" / "final"
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def snapshot(folder):
    return {p: (folder / p).read_bytes() for p in sorted(os.listdir(folder))}


def commit_files(request) -> dict:
    lines = [json.loads(line) for line in request["body"].splitlines() if line.strip()]
    assert lines[0]["key"] == "header"
    files = {ln["value"]["path"]: base64.b64decode(ln["value"]["content"]) for ln in lines if ln["key"] == "file"}
    return {"summary": lines[0]["value"]["summary"], "files": files}


CARD_INFO = {"task": "sequence-classification", "base_model": "google-bert/bert-base-uncased",
             "dataset": "nyu-mll/glue",
             "metrics": {"eval_accuracy": 0.8125, "eval_f1": 0.79, "eval_loss": 0.41, "eval_runtime": 3.2},
             "hyperparameters": {"num_stages": 2, "partition_method": "balanced", "precision": "bf16",
                                 "zero_stage": 1, "gradient_accumulation_steps": 4}}


def test_push_creates_repo_preuploads_and_commits_folder_with_card(hub, model_dir, capfd):
    from huggingface_hub import ModelCard

    before = snapshot(model_dir)
    url = push_to_hub(str(model_dir), "user/tiny", private=True, commit_message="first", card_info=CARD_INFO)
    assert url == "https://huggingface.co/user/tiny"
    reqs = hub["requests"]
    assert [(r["method"], r["path"]) for r in reqs] == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"), ("POST", "/api/validate-yaml"),  # huggingface_hub checks the card twice
        ("POST", "/api/models/user/tiny/preupload/main"), ("POST", "/api/models/user/tiny/commit/main")]
    assert json.loads(reqs[0]["body"]) == {"name": "tiny", "organization": "user", "visibility": "private"}
    assert {f["path"] for f in json.loads(reqs[3]["body"])["files"]} == {"config.json", "model.safetensors",
                                                                        "README.md"}
    commit = commit_files(reqs[4])
    assert commit["summary"] == "first" and set(commit["files"]) == {"config.json", "model.safetensors", "README.md"}
    assert commit["files"]["config.json"] == before["config.json"]
    assert commit["files"]["model.safetensors"] == before["model.safetensors"]
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in reqs)  # the token travels in the header, and only there
    # the card that was uploaded is the one written into the folder; nothing else in the folder changed
    readme = (model_dir / "README.md").read_bytes()
    assert commit["files"]["README.md"] == readme and json.loads(reqs[1]["body"])["content"] == readme.decode()
    assert snapshot(model_dir) == {**before, "README.md": readme}
    card = ModelCard(readme.decode())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert card.data.base_model == "google-bert/bert-base-uncased" and card.data.datasets == ["nyu-mll/glue"]
    assert card.data.tags == ["hfpipe", "deepspeed", "pipeline-parallelism"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": 0.8125, "f1": 0.79, "loss": 0.41}  # runtime is not a result
    assert {r.dataset_type for r in card.data.eval_results} == {"nyu-mll/glue"}
    for line in ("- num_stages: 2", "- partition_method: balanced", "- precision: bf16", "- zero_stage: 1",
                 "| accuracy | 0.8125 |"):
        assert line in card.text
    out = capfd.readouterr()
    assert TOKEN not in readme.decode() + out.out + out.err


def test_push_to_a_branch_creates_it(hub, model_dir):
    url = push_to_hub(str(model_dir), "user/tiny", revision="dev", card_info={})
    assert url == "https://huggingface.co/user/tiny/tree/dev"
    assert [(r["method"], r["path"]) for r in hub["requests"]] == [
        ("POST", "/api/repos/create"), ("POST", "/api/models/user/tiny/branch/dev"),
        ("POST", "/api/validate-yaml"), ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/user/tiny/preupload/dev"), ("POST", "/api/models/user/tiny/commit/dev")]
    assert json.loads(hub["requests"][0]["body"])["visibility"] == "public"
    summary = commit_files(hub["requests"][-1])["summary"]
    assert summary == "Upload model trained with hfpipe"


@pytest.mark.parametrize("fail, status, message, sent", [
    ("/api/repos/create", 401, "creating user/tiny failed: authentication failed: set HF_TOKEN or run "
                               "`hf auth login`.", 2),  # huggingface_hub then asks whether the repo exists
    ("/commit/", 403, "uploading to user/tiny failed: permission denied: the token cannot write to user/tiny; use a "
                      "token with write access to it.", 5),
    ("/api/validate-yaml", 400, "uploading to user/tiny failed: Invalid metadata in README.md. - mock 400.", 2),
])
def test_http_errors_are_one_clean_line_without_the_token(hub, model_dir, capfd, fail, status, message, sent):
    hub["fail"] = {fail: status}
    with pytest.raises(PushError) as info:
        push_to_hub(str(model_dir), "user/tiny", card_info={})
    assert str(info.value) == message
    assert info.value.__cause__ is None and info.value.__context__ is None  # no HTTP traceback chained
    assert len(hub["requests"]) == sent
    shown = "".join(traceback.format_exception(info.value)) + "".join(capfd.readouterr())
    assert TOKEN not in shown and TOKEN not in (model_dir / "README.md").read_text()


def test_offline_fails_before_any_request_and_leaves_the_folder(hub, model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = snapshot(model_dir)
    with pytest.raises(PushError, match=rf"HF_HUB_OFFLINE is set, so nothing was uploaded to user/tiny; the model "
                                        rf"stays in {model_dir}. Unset HF_HUB_OFFLINE"):
        push_to_hub(str(model_dir), "user/tiny", card_info=CARD_INFO)
    assert hub["requests"] == [] and snapshot(model_dir) == before  # no README written either
    assert main(["push", str(model_dir), "--repo-id", "user/tiny"]) == 1 and hub["requests"] == []


def test_push_cli_uses_what_the_run_left(hub, model_dir, capsys):
    run_dir = model_dir.parent  # the trainer's output_dir: ds_config.json and the recipe's eval_results.json
    (run_dir / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.75, "eval_runtime": 1.0}))
    (run_dir / "ds_config.json").write_text(json.dumps({"config": {
        "pipeline": {"stages": 2, "partition": "uniform", "activation_checkpoint_interval": 0},
        "bf16": {"enabled": False}, "fp16": {"enabled": False}, "zero_optimization": {"stage": 0},
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "train_batch_size": 16,
        "optimizer": {"params": {"lr": 5e-5}}}, "sources": {}}))
    rc = main(["push", str(model_dir), "--repo-id", "user/tiny", "--private", "--base-model", "prajjwal1/bert-tiny"])
    out = capsys.readouterr()
    assert rc == 0 and out.out.strip() == f"pushed {model_dir} to https://huggingface.co/user/tiny"
    assert json.loads(hub["requests"][0]["body"])["visibility"] == "private"
    readme = commit_files(hub["requests"][-1])["files"]["README.md"].decode()
    for line in ("- partition_method: uniform", "- precision: fp32", "- train_batch_size: 16", "| accuracy | 0.75 |",
                 "base_model: prajjwal1/bert-tiny"):
        assert line in readme
    assert "pipeline_tag" not in readme and "model-index" not in readme  # no task known: no tag, results in text
    hub["fail"] = {"/api/repos/create": 401}
    assert main(["push", str(model_dir), "--repo-id", "user/tiny"]) == 1
    out = capsys.readouterr()
    assert out.err == ("hfpipe push: error: creating user/tiny failed: authentication failed: set HF_TOKEN or run "
                       "`hf auth login`.\n") and TOKEN not in out.out
    assert main(["push", str(run_dir / "nope"), "--repo-id", "user/tiny"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_trainer_push_passes_the_card_from_rank_0_only(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import hfpipe.hub
    from hfpipe.training.arguments import PipelineTrainingArguments
    from hfpipe.training.config import resolve_ds_config
    from hfpipe.training.trainer import PipelineTrainer

    calls = []
    monkeypatch.setattr(hfpipe.hub, "push_to_hub", lambda folder, repo, **kw: calls.append((folder, repo, kw)) or "u")
    args = PipelineTrainingArguments(push_to_hub=True, hub_model_id="user/tiny", hub_private_repo=True, bf16=True,
                                     max_steps=7, num_stages=2)
    ds, _ = resolve_ds_config(args, 4, argv=[], env={})
    fake = SimpleNamespace(rank=0, world_size=4, args=args, ds_config=ds, train_dataset=None,
                           pipe=SimpleNamespace(head=SimpleNamespace(name="sequence-classification"),
                                                config=SimpleNamespace(_name_or_path="google-bert/bert-base-uncased")))
    assert PipelineTrainer._push(fake, str(tmp_path), {"eval_accuracy": 0.9}) == "u"
    (folder, repo, kw), = calls
    assert (folder, repo, kw["private"]) == (str(tmp_path), "user/tiny", True)
    info = kw["card_info"]
    assert info["task"] == "sequence-classification" and info["base_model"] == "google-bert/bert-base-uncased"
    assert info["metrics"] == {"eval_accuracy": 0.9}
    hp = info["hyperparameters"]
    assert (hp["num_stages"], hp["precision"], hp["zero_stage"], hp["world_size"], hp["max_steps"]) == \
        (2, "bf16", 1, 4, 7)  # --bf16 alone: ZeRO-1 (fp32 accumulation)
    assert hp["partition_method"] == "balanced" and hp["train_batch_size"] == 16
    fake.rank = 1
    assert PipelineTrainer._push(fake, str(tmp_path), {}) is None and len(calls) == 1


def test_trainer_push_failure_is_reported_not_raised(hub, model_dir, monkeypatch, capfd):
    """At the end of training only rank 0 pushes: an exception there would leave the other ranks hanging, so the
    failure is one stderr line and the exported folder stays."""
    from types import SimpleNamespace

    from hfpipe.training.arguments import PipelineTrainingArguments
    from hfpipe.training.config import resolve_ds_config
    from hfpipe.training.trainer import PipelineTrainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = PipelineTrainingArguments(push_to_hub=True, hub_model_id="user/tiny")
    fake = SimpleNamespace(rank=0, world_size=2, args=args, ds_config=resolve_ds_config(args, 2, argv=[], env={})[0],
                           train_dataset=None, pipe=SimpleNamespace(head=SimpleNamespace(name="causal-lm"),
                                                                    config=SimpleNamespace()))
    before = snapshot(model_dir)
    assert PipelineTrainer._push(fake, str(model_dir), {}) is None
    assert capfd.readouterr().err.startswith("hfpipe: push to the Hub failed: HF_HUB_OFFLINE is set, so nothing was "
                                             "uploaded to user/tiny")
    assert hub["requests"] == [] and snapshot(model_dir) == before


def test_push_cli_exports_a_pipeline_checkpoint_first(hub, model_dir, tmp_path, capsys):
    """A pipeline checkpoint (here a real `hfpipe convert` folder) is exported to --export-dir and that folder is
    pushed: the uploaded weights are the model's; something that is neither is refused before any request."""
    from safetensors.torch import load, load_file

    from hfpipe.checkpoint import convert

    ckpt = tmp_path / "out" / "checkpoint-2"
    convert(model_dir, ckpt, num_stages=2, progress=False)
    assert main(["push", str(ckpt), "--repo-id", "user/tiny", "--export-dir", str(tmp_path / "hf")]) == 0
    files = commit_files(hub["requests"][-1])["files"]
    assert set(files) == {"config.json", "model.safetensors", "README.md", "generation_config.json"} - \
        ({"generation_config.json"} - set(os.listdir(tmp_path / "hf")))
    sent, ref = load(files["model.safetensors"]), load_file(model_dir / "model.safetensors")
    assert sorted(sent) == sorted(ref) and all((sent[k] == ref[k]).all() for k in ref)
    assert main(["push", str(ckpt), "--repo-id", "user/tiny"]) == 0  # default export folder: <checkpoint>-hf
    assert (tmp_path / "out" / "checkpoint-2-hf" / "model.safetensors").is_file()
    capsys.readouterr()
    n = len(hub["requests"])
    assert main(["push", str(tmp_path), "--repo-id", "user/tiny"]) == 1
    assert "is neither a model folder (config.json and *.safetensors) nor a pipeline checkpoint" in \
        capsys.readouterr().err and len(hub["requests"]) == n
