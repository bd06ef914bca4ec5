"""Heads, tied weights, padding, activation checkpointing, hybrid pp x dp, parameter counts, more pp_plan
families, the verify CLI and clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from hfpipe.adapters import UnsupportedModelError
from hfpipe.heads import head_for_class
from hfpipe.pipeline import compute_parts, prepare
from hfpipe.verify import ModelSpec, compare, format_report, verify

from models import tiny_config

HEAD_CLASSES = {"sequence-classification": transformers.AutoModelForSequenceClassification,
                "token-classification": transformers.AutoModelForTokenClassification,
                "question-answering": transformers.AutoModelForQuestionAnswering,
                "causal-lm": transformers.AutoModelForCausalLM}


def spec(model_type, head, **overrides):
    if head in ("sequence-classification", "token-classification"):
        overrides.setdefault("num_labels", 3)
    config = tiny_config(model_type, **overrides)
    try:
        cls = HEAD_CLASSES[head]._model_mapping[type(config)]
    except KeyError:
        pytest.skip(f"transformers has no {head} class for {model_type}")
    return ModelSpec(class_name=cls.__name__, config=config.to_dict(), seed=1)


def check(report):
    assert report["passed"], format_report(report)
    assert report["max_rel_grad_err"] <= 1e-5 and report["loss_rel_err"] <= 1e-5


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("head", ["sequence-classification", "token-classification", "question-answering"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2", "bert", "distilbert", "deberta-v2", "roberta"])
def test_heads_match_hf(dist_pool, model_type, head, padding):
    check(verify(spec(model_type, head), stages=2, micro_batches=2, batch_size=8, seq_len=12, padding=padding,
                 pool=dist_pool(2)))


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_regression_head(dist_pool, model_type):
    check(verify(spec(model_type, "sequence-classification", num_labels=1), stages=2, micro_batches=2,
                 pool=dist_pool(2)))


@pytest.mark.parametrize("stages", [2, 4])
def test_tied_embeddings_span_stages(dist_pool, stages):
    s = spec("llama", "causal-lm", tie_word_embeddings=True)
    report = verify(s, stages=stages, micro_batches=4, pool=dist_pool(stages))
    check(report)
    names = {row["name"] for row in report["worst"]}
    assert "lm_head.weight" not in names  # tied: one parameter, HF lists only the embedding


def test_left_padding_causal_lm(dist_pool):
    check(verify(spec("llama", "causal-lm"), stages=2, micro_batches=4, padding="left", pool=dist_pool(2)))


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_activation_checkpointing_same_gradients(dist_pool, model_type):
    head = "causal-lm" if model_type == "llama" else "sequence-classification"
    check(verify(spec(model_type, head), stages=2, micro_batches=2, activation_checkpoint_interval=1,
                 pool=dist_pool(2)))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_hybrid_pipeline_and_data_parallel(dist_pool, model_type):
    head = "sequence-classification" if model_type == "bert" else "causal-lm"
    report = verify(spec(model_type, head), stages=2, dp=2, micro_batches=2, batch_size=8, pool=dist_pool(4))
    check(report)
    assert report["dp"] == 2


def _stage_param_counts(s: ModelSpec, stages: int):
    import torch.distributed as dist

    from hfpipe import to_pipeline

    pipe = to_pipeline(s.build(), num_stages=stages)
    out = {name: p.numel() for name, p in pipe.hf_named_parameters()}
    dist.barrier()
    return out


@pytest.mark.parametrize("model_type,head", [("llama", "causal-lm"), ("gpt2", "causal-lm"),
                                             ("bert", "sequence-classification"), ("deberta-v2", "question-answering")])
def test_parameter_counts_sum_to_hf(dist_pool, model_type, head):
    s = spec(model_type, head)
    per_rank = dist_pool(4).run(_stage_param_counts, s, 4)
    merged = {}
    for counts in per_rank:
        merged.update(counts)  # a tied weight appears on two stages under one HF name: counted once
    model = s.build()
    assert sum(merged.values()) == sum(p.numel() for p in model.parameters())
    assert set(merged) == {n for n, _ in model.named_parameters()}


def test_compare_detects_a_wrong_gradient():
    ref = {"loss": 1.0, "logits": torch.ones(2, 3), "grads": {"w": torch.tensor([1.0, 2.0])}, "params": ["w"]}
    rank = {"loss": 1.0, "logits": torch.ones(2, 3), "grads": {"w": torch.tensor([1.0, 2.001])}, "params": ["w"],
            "dp_rank": 0, "parts": [0, 1]}
    report = compare(ref, [rank])
    assert not report["passed"]
    assert report["max_rel_grad_err"] == pytest.approx(0.001 / 5 ** 0.5, rel=1e-4)
    rank["grads"] = {}
    rank["params"] = []
    assert compare(ref, [rank])["worst"][0]["note"] == "missing in pipeline"


# ----------------------------------------------------------------------------------------------------- errors
def test_unknown_model_type_lists_supported_and_how_to_register():
    config = tiny_config("llama")
    config.model_type = "my_custom_lm"
    config.base_model_pp_plan = None
    with pytest.raises(UnsupportedModelError) as exc:
        prepare(config, transformers.LlamaForCausalLM)
    msg = str(exc.value)
    assert "'my_custom_lm' is not supported" in msg and "gpt2" in msg and "register_adapter" in msg


def test_num_stages_larger_than_blocks():
    builder = prepare(tiny_config("llama"), transformers.AutoModelForCausalLM)
    with pytest.raises(ValueError, match=r"num_stages=6 exceeds the 4 transformer blocks of this LlamaForCausalLM; "
                                         r"use num_stages <= 4"):
        compute_parts("parameters", builder.layers(), 6, builder.adapter.num_blocks, "LlamaForCausalLM")


def test_unsupported_head():
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM has no head hfpipe supports"):
        head_for_class(transformers.BertForMaskedLM)


def test_router_logits_refused():
    config = tiny_config("llama")
    config.output_router_logits = True
    with pytest.raises(UnsupportedModelError, match="output_router_logits=False"):
        prepare(config, transformers.AutoModelForCausalLM)


def test_manual_partition_errors():
    builder = prepare(tiny_config("bert", num_labels=2), transformers.AutoModelForSequenceClassification)
    infos = builder.layers()
    with pytest.raises(ValueError, match="strictly increasing"):
        compute_parts([0, 3, 3], infos, 3, 4, "BertForSequenceClassification")
    with pytest.raises(ValueError, match="must stay on the stage"):
        compute_parts([0, len(infos) - 1], infos, 2, 4, "BertForSequenceClassification")
    assert compute_parts([0, 3], infos, 2, 4, "BertForSequenceClassification") == [0, 3, len(infos)]


# -------------------------------------------------------------------------------------------------- verify CLI
def test_verify_cli_json(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.save_pretrained(tmp_path / "m")
    batch = {"input_ids": [[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]],
             "attention_mask": [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]],
             "labels": [[5, 6, 7, 8, -100, -100], [9, 10, 11, 12, 13, 14]]}
    (tmp_path / "batch.json").write_text(json.dumps(batch))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-m", "hfpipe.cli", "verify", str(tmp_path / "m"), "--stages", "2",
                          "--micro-batches", "2", "--inputs", str(tmp_path / "batch.json"), "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["passed"] and report["stages"] == 2 and report["batch_size"] == 2
    assert report["loss_pipeline"] == pytest.approx(report["loss_hf"], rel=1e-5)
    assert report["max_rel_grad_err"] <= 1e-5
    assert "PASSED" in out.stdout


def test_verify_bf16(dist_pool, tmp_path):
    s = spec("llama", "causal-lm")
    s.dtype = "bf16"
    report = verify(s, stages=2, micro_batches=2, pool=dist_pool(2))
    assert report["tolerance"] == 2e-2
    assert report["passed"], format_report(report)


MORE_FAMILIES = {
    "qwen3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=6,
                   final_logit_softcapping=5.0, attn_logit_softcapping=10.0),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64),
    "olmo2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64),
    "starcoder2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, sliding_window=6),
    "mixtral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("model_type", sorted(MORE_FAMILIES))
def test_more_pp_plan_families(dist_pool, model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=128, pad_token_id=0, **MORE_FAMILIES[model_type])
    s = ModelSpec(class_name=transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__,
                  config=config.to_dict(), seed=2)
    check(verify(s, stages=2, micro_batches=2, batch_size=4, seq_len=12, pool=dist_pool(2)))


# ----------------------------------------------------------------------------- saved folders (save_pretrained)
FAMILY_HEADS = {"llama": "causal-lm", "mistral": "causal-lm", "qwen2": "causal-lm", "gemma": "causal-lm",
                "gpt_neox": "causal-lm", "gpt2": "causal-lm", "opt": "causal-lm", "bert": "sequence-classification",
                "roberta": "token-classification", "distilbert": "question-answering",
                "deberta-v2": "sequence-classification"}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for model_type, head in FAMILY_HEADS.items():
        s = spec(model_type, head)
        model = s.build()
        model.save_pretrained(root / model_type)
        out[model_type] = str(root / model_type)
    return out


@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("model_type", sorted(FAMILY_HEADS))
def test_verify_saved_folder(dist_pool, saved_models, model_type, stages):
    from hfpipe.verify import verify_dir

    report = verify_dir(saved_models[model_type], stages=stages, micro_batches=2, batch_size=4, seq_len=10,
                        pool=dist_pool(stages))
    check(report)


def _load_from_folder(path: str, stages: int):
    import torch.distributed as dist

    from hfpipe import to_pipeline

    pipe = to_pipeline(path, num_stages=stages)
    source = pipe.hfpipe_builder.source
    weights = {name: p.detach().clone() for name, p in pipe.hf_named_parameters()}
    dist.barrier()
    return {"weights": weights, "names_read": sorted(source.names_read), "bytes_read": source.bytes_read}


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_to_pipeline_from_folder_reads_only_own_layers(dist_pool, saved_models, model_type):
    """Each rank reads only the tensors of its own layers, and gets exactly the saved weights."""
    from safetensors.torch import load_file

    path = saved_models[model_type]
    saved = load_file(os.path.join(path, "model.safetensors"))
    per_rank = dist_pool(2).run(_load_from_folder, path, 2)
    for result in per_rank:
        for name, tensor in result["weights"].items():
            key = name if name in saved else None
            if key is None:  # a tied weight the file stores once
                continue
            torch.testing.assert_close(tensor, saved[key], rtol=0, atol=0)
        assert set(result["names_read"]) <= set(saved)
        assert result["bytes_read"] < sum(t.numel() * t.element_size() for t in saved.values())
    assert set(per_rank[0]["names_read"]).isdisjoint(per_rank[1]["names_read"])
    all_weights = {n for r in per_rank for n in r["weights"]}
    assert set(saved) <= all_weights
