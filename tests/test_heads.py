"""Heads, tied weights, padding, activation checkpointing, hybrid pp x dp, parameter counts, more pp_plan
families, the verify CLI and clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from hfpipe.core.adapters import UnsupportedModelError
from hfpipe.core.heads import head_for_class
from hfpipe.core.builder import compute_parts, prepare
from hfpipe.verify import ModelSpec, compare, format_report, verify

from models import MORE_DECODERS as MORE_FAMILIES, hf_sgd_losses, tiny_config

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


HEAD_FAMILIES = ["llama", "gpt2", "qwen2", "bert", "distilbert", "deberta-v2", "roberta"]
HEADS = ["sequence-classification", "token-classification", "question-answering"]
# every family with every head; the padding side alternates over that grid (each family and each head meets both
# sides) instead of doubling it: the two sides differ only in where the mask is, not in the head
HEAD_CASES = [(m, h, ("right", "left")[(i + j) % 2]) for i, m in enumerate(HEAD_FAMILIES) for j, h in enumerate(HEADS)]


@pytest.mark.parametrize("model_type, head, padding", HEAD_CASES)
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


def _boundary_messages(s: ModelSpec, micro_batches: int):
    """Train one step at 2 stages, recording every p2p send (shape, dtype) and the stage's packed output."""
    import deepspeed
    from deepspeed.runtime.pipe import p2p

    from hfpipe import to_pipeline
    from hfpipe.core.batches import micro_batches as split
    from hfpipe.core.batches import make_batch

    pipe = to_pipeline(s.build(), num_stages=2)
    batch = make_batch(s.hf_config(), pipe.head.name, 4, 12)
    data = split(batch, pipe, micro_batches)
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=list(pipe.parameters()), config={
        "train_micro_batch_size_per_gpu": 4 // micro_batches, "gradient_accumulation_steps": micro_batches,
        "train_batch_size": 4, "steps_per_print": 10**9, "optimizer": {"type": "SGD", "params": {"lr": 0.0}}})
    sent, real_send = [], p2p.send
    p2p.send = lambda tensor, dest: (sent.append((tuple(tensor.shape), str(tensor.dtype))), real_send(tensor, dest))[1]
    try:
        engine.train_batch(iter(data))
    finally:
        p2p.send = real_send
    outputs = pipe((batch["input_ids"][:2], batch["attention_mask"][:2])) if engine.stage_id == 0 else None
    return {"stage": engine.stage_id, "sent": sent, "batch": batch,
            "outputs": None if outputs is None else [(tuple(t.shape), str(t.dtype)) for t in
                                                       (outputs if isinstance(outputs, tuple) else (outputs,))]}


@pytest.mark.parametrize("model_type,head,carried", [("llama", "causal-lm", 0), ("opt", "causal-lm", 0),
                                                      ("bert", "token-classification", 0),
                                                      ("llama", "sequence-classification", 1)])
def test_one_message_per_boundary(dist_pool, model_type, head, carried):
    """DeepSpeed sends each tensor of a stage's output with its own blocking p2p call: hfpipe packs the 0/1 mask into
    the hidden states and recomputes positions on the next stage, so a micro-batch costs one message each way (plus
    the int64 input ids that decoder sequence classification carries to its head)."""
    s = spec(model_type, head)
    first, last = sorted(dist_pool(2).run(_boundary_messages, s, 2), key=lambda r: r["stage"])
    hidden = s.hf_config().hidden_size
    # stage 0 sends the packed activations once per micro-batch (+ the type/shape metadata of the first one)
    packed = [m for m in first["sent"] if m[0] == (2, 12, hidden + 1)]
    assert len(packed) == 2 and all(dtype == "torch.float32" for _, dtype in packed)
    assert first["outputs"][0] == ((2, 12, hidden + 1), "torch.float32")
    assert [o[1] for o in first["outputs"][1:]] == ["torch.int64"] * carried
    assert len([m for m in first["sent"] if m[0] == (2, 12)]) == 2 * carried
    # stage 1 sends back one gradient per micro-batch: the packed tensor's (the mask channel's part is zero)
    assert last["sent"] == [((2, 12, hidden + 1), "torch.float32")] * 2


def test_boundary_pack_round_trip():
    from hfpipe.core.layers import pack_boundary, unpack_boundary

    adapter = prepare(tiny_config("opt"), transformers.OPTForCausalLM).adapter
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    hidden = torch.randn(2, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    packed = pack_boundary((hidden, mask, adapter.position_ids(mask, mask)))
    assert packed.shape == (2, 5, 9) and packed.dtype == torch.bfloat16
    received = packed.detach().requires_grad_()
    h, m, pos = unpack_boundary(adapter, received)
    assert torch.equal(h, hidden) and torch.equal(m, mask)
    assert pos.tolist() == [[0, 1, 2, -1, -1], [-1, -1, 0, 1, 2]]  # OPT: cumsum(mask) * mask - 1
    (h.float() * 3).sum().backward()
    assert torch.equal(received.grad[..., :8], torch.full((2, 5, 8), 3.0, dtype=torch.bfloat16))
    assert not received.grad[..., 8].any()
    ids = torch.arange(10).view(2, 5)
    assert torch.equal(unpack_boundary(adapter, pack_boundary((hidden, mask, None, ids)))[3], ids)


@pytest.mark.filterwarnings("ignore:phi is converted")
@pytest.mark.parametrize("model_type,overrides,expected", [("llama", {}, True), ("gemma", {}, True),
                                                           ("gpt2", {}, False), ("opt", {}, False),
                                                           ("phi", {"embd_pdrop": 0.0}, True),
                                                           ("phi", {"embd_pdrop": 0.1}, False)])
def test_decoder_shell_passthrough(model_type, overrides, expected):
    """The decoder shell is skipped only where it returns the token embeddings unchanged (Gemma scales inside its
    embedding module in transformers 5); learned positions (GPT-2, OPT) or embedding dropout keep it running."""
    from hfpipe.core.layers import BodyShell

    if model_type == "phi":
        config = transformers.PhiConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, **overrides)
    else:
        config = tiny_config(model_type, **overrides)
    builder = prepare(config, transformers.AutoModelForCausalLM._model_mapping[type(config)])
    shell = BodyShell(builder, 1)
    assert shell.passthrough is expected
    ids = torch.tensor([[3, 4, 5, 6]])
    embeds = torch.randn(1, 4, config.hidden_size)
    inputs = (embeds, torch.ones_like(ids), torch.arange(4)[None])
    if expected:
        assert shell(inputs) is inputs
    else:
        shell.passthrough = True  # what skipping would give is not what the family computes
        skipped = shell(inputs)[0]
        shell.passthrough = False
        assert not torch.equal(shell(inputs)[0], skipped)


def _mask_and_rotary_builds(s: ModelSpec):
    """Builds counted over two forwards of a one-stage pipeline (new tensors each time)."""
    from hfpipe import to_pipeline

    pipe = to_pipeline(s.build(), num_stages=1)
    calls, counts = {"mask": 0, "rotary": 0}, []
    adapter, real_mask = pipe.adapter, pipe.adapter.block_mask

    def counted_mask(*args, **kwargs):
        calls["mask"] += 1
        return real_mask(*args, **kwargs)

    adapter.block_mask = counted_mask
    for layer in pipe.forward_funcs:
        rotary = getattr(getattr(layer, "aux", None), "rotary_emb", None)
        if rotary is not None:
            rotary.register_forward_hook(lambda *_: calls.__setitem__("rotary", calls["rotary"] + 1))
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    for _ in range(2):
        pipe((ids.clone(), mask.clone()))
        counts.append(dict(calls))
    return counts


@pytest.mark.parametrize("model_type,masks_per_forward", [("llama", 1), ("qwen2", 2), ("bert", 1)])
def test_masks_and_rotary_built_once_per_micro_batch(dist_pool, model_type, masks_per_forward):
    """Like the family's own forward, a stage builds each kind of mask (this qwen2: sliding + full) and the rotary
    embeddings once per micro-batch, not once per block; a new micro-batch gets its own."""
    head = "causal-lm" if model_type != "bert" else "sequence-classification"
    counts = dist_pool(1).run(_mask_and_rotary_builds, spec(model_type, head, num_hidden_layers=4))[0]
    rotary = 1 if model_type != "bert" else 0
    assert counts == [{"mask": masks_per_forward, "rotary": rotary},
                      {"mask": 2 * masks_per_forward, "rotary": 2 * rotary}]


def _clipped_sgd_losses(parts):
    from hfpipe import initialize, micro_batches, to_pipeline  # the README's API
    from hfpipe.core.batches import make_batch

    torch.manual_seed(0)
    config = tiny_config("llama", tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    batch = make_batch(config, "causal-lm", batch_size=4, seq_len=12)
    pipe = to_pipeline(model, num_stages=2, partition_method=parts)
    engine, *_ = initialize(pipe, {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                                   "train_batch_size": 4, "steps_per_print": 10**9, "gradient_clipping": 0.5,
                                   "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    data = micro_batches(batch, pipe, 2)
    losses = [float(engine.train_batch(iter(data))) for _ in range(3)]
    return {"stage": engine.stage_id, "losses": losses,
            "hf": hf_sgd_losses(model, batch, 3, lr=0.1, max_grad_norm=0.5)}


@pytest.mark.parametrize("parts", [[0, 6, 12], [0, 7, 12]])
def test_initialize_clips_by_the_whole_model_norm(dist_pool, parts):
    """fp32 ``gradient_clipping`` through ``hfpipe.pipeline.initialize`` clips like ``clip_grad_norm_`` on the HF
    model (tied weight once), whether the cut falls between blocks or inside one; DeepSpeed's own fp32 path counts
    only the first stage's gradients (update/gradient was 0.0563 vs 0.0543 for these two cuts)."""
    last = max(dist_pool(2).run(_clipped_sgd_losses, parts), key=lambda r: r["stage"])
    assert last["losses"] == pytest.approx(last["hf"], rel=1e-5)
    assert last["losses"][2] < last["losses"][0]


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
@pytest.mark.launches
def test_verify_cli_json(tmp_path):
    """`hfpipe verify FOLDER --inputs batch.json --lora-r ... --json` in its own process (ranks of its own): a batch of
    one's own, LoRA flags and the JSON report in one run (one launch, not one per flag)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.save_pretrained(tmp_path / "m")
    batch = {"input_ids": [[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]],
             "attention_mask": [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]],
             "labels": [[5, 6, 7, 8, -100, -100], [9, 10, 11, 12, 13, 14]]}
    (tmp_path / "batch.json").write_text(json.dumps(batch))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-m", "hfpipe.cli", "verify", str(tmp_path / "m"), "--stages", "2",
                          "--micro-batches", "2", "--inputs", str(tmp_path / "batch.json"), "--lora-r", "8",
                          "--lora-target-modules", "q_proj,v_proj", "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["passed"] and report["stages"] == 2 and report["batch_size"] == 2
    assert report["loss_pipeline"] == pytest.approx(report["loss_hf"], rel=1e-5)
    assert report["max_rel_grad_err"] <= 1e-5
    assert report["lora"] == {"r": 8, "lora_alpha": 8, "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"]}
    assert report["num_params"] == 4 * 2 * 2 and report["trainable_pipeline"] == report["trainable_hf"]
    assert "PASSED" in out.stdout


def test_verify_bf16(dist_pool, tmp_path):
    s = spec("llama", "causal-lm")
    s.dtype = "bf16"
    report = verify(s, stages=2, micro_batches=2, pool=dist_pool(2))
    assert report["tolerance"] == 2e-2
    assert report["passed"], format_report(report)




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


# each family once, at the stage count that tests it most: 4 where a family has several kinds of block boundary
# (decoders with rotary or learned positions, the encoders with extra embeddings); 1 for one family (the no-pipeline
# path); 2 for the rest. Every stage count is also run per family by test_equivalence.
SAVED_STAGES = {"llama": 4, "gpt2": 4, "gemma": 2, "mistral": 2, "qwen2": 1, "gpt_neox": 2, "opt": 4, "bert": 2,
                "roberta": 4, "distilbert": 2, "deberta-v2": 4}


@pytest.mark.parametrize("model_type, stages", sorted(SAVED_STAGES.items()))
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
