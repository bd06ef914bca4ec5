"""QLoRA through the pipeline (hfpipe.core.quantize): each stage quantises its own frozen linear weights with
bitsandbytes (nf4, double quantisation, bf16 compute) while it loads them, and trains PEFT's LoRA on top -- the same
4-bit weights, loss and adapter gradients as transformers' ``from_pretrained(quantization_config=...)`` +
``prepare_model_for_kbit_training`` + ``get_peft_model``; ``hfpipe plan --load-in-4bit`` budgets 4-bit weights."""

import os
import sys
import warnings

import pytest
import torch
import transformers
from peft import LoraConfig

from hfpipe.core.lora import LoraConfigError

sys.path.insert(0, os.path.dirname(__file__))
from models import family_config  # noqa: E402

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")


def _cpu_4bit_reason():
    """Why 4-bit bitsandbytes cannot train on this machine's CPU (None: it can)."""
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4").to("cpu")
        x = torch.randn(2, 64, requires_grad=True)
        layer(x).sum().backward()
        return None if x.grad is not None else "no gradient through Linear4bit on CPU"
    except Exception as exc:  # noqa: BLE001 -- any failure means: not supported here
        return f"bitsandbytes 4-bit does not run on this CPU ({type(exc).__name__}: {exc})"


REASON = _cpu_4bit_reason()
if REASON is not None:
    print(f"test_qlora skipped: {REASON}", file=sys.stderr)
needs_4bit = pytest.mark.skipif(REASON is not None, reason=REASON or "")

LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")


def _hf_qlora(folder, batch):
    """transformers + PEFT's QLoRA on the whole model: 4-bit weights by name, loss, adapter gradients (PEFT keys)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from hfpipe.core.lora import hf_key, trainable_count
    from hfpipe.core.quantize import qlora_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=qlora_config(),
                                                                  device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        packed = {n: p.data.clone() for n, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit)}
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(**LORA))
    peft_model.train()
    out = peft_model(**batch)
    out.loss.backward()
    named = [(hf_key(n), p) for n, p in peft_model.get_base_model().named_parameters() if p.requires_grad]
    return {"loss": float(out.loss.detach()), "logits": out.logits.detach().float(), "params": [n for n, _ in named],
            "grads": {n: p.grad.float() for n, p in named}, "adapter": {n: p.detach().clone() for n, p in named},
            "packed": packed, "trainable": trainable_count(peft_model)}


def _rank_qlora(folder, adapter, batch, micro_batches):
    """One rank: the pipeline from the folder with load_in_4bit, HF's adapter copied in; what it read, which weights
    it holds in 4 bits (their packed bytes), its logits, loss and adapter gradients."""
    import deepspeed

    from hfpipe import to_pipeline
    from hfpipe.core import weights
    from hfpipe.core.batches import micro_batches as split
    from hfpipe.core.lora import trainable_count
    from hfpipe.verify import GradRecorder, ds_config

    read = []
    original = weights.SafetensorsSource.get

    def recording_get(self, name):
        read.append(name)
        return original(self, name)

    weights.SafetensorsSource.get = recording_get
    try:
        pipe = to_pipeline(folder, num_stages=2, partition_method="parameters", load_in_4bit=True,
                           peft_config=LoraConfig(**LORA))
    finally:
        weights.SafetensorsSource.get = original
    named = dict(pipe.hf_named_parameters())
    with torch.no_grad():
        for name, p in named.items():
            if name in adapter:
                p.copy_(adapter[name])
    packed = {n: p.data.clone() for n, p in named.items() if isinstance(p, bnb.nn.Params4bit)}
    full_precision_2d = sorted(n for n, p in named.items() if p.is_floating_point() and p.dim() == 2
                               and not p.requires_grad and ".layers." in n)
    trainable = [p for p in pipe.parameters() if p.requires_grad]
    recorder = GradRecorder(trainable)
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=recorder,
                                      config=ds_config(batch["input_ids"].shape[0], micro_batches, 1))
    data = split(batch, pipe, micro_batches, 0, 1)
    outputs = engine.eval_batch(iter(data), compute_loss=False, reduce_output=None)
    loss = engine.train_batch(iter(data))
    grads = {n: recorder.grads[id(p)].float() for n, p in named.items() if p.requires_grad and id(p) in recorder.grads}
    return {"stage": engine.stage_id, "dp_rank": 0, "loss": float(loss), "parts": list(pipe.parts),
            "logits": torch.cat(list(outputs)).float() if engine.is_last_stage() else None, "grads": grads,
            "params": [n for n, p in named.items() if p.requires_grad], "trainable": trainable_count(pipe),
            "read": read, "own": sorted({hf for _, m, _ in pipe.local_layers() for hf in m.hf_names().values()}), "packed": packed, "full_precision_2d": full_precision_2d}


@needs_4bit
def test_qlora_matches_transformers_bnb_and_peft(dist_pool, tmp_path):
    """A Llama at 2 stages with load_in_4bit: each rank reads only its own stage's tensors and stores exactly the
    linear weights transformers quantises, bit for bit; logits, loss and every adapter gradient match HF's QLoRA."""
    from hfpipe.core.batches import make_batch
    from hfpipe.verify import compare

    torch.manual_seed(0)
    config = family_config("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    batch = make_batch(config, "causal-lm", batch_size=4, seq_len=12)
    ref = _hf_qlora(str(tmp_path), batch)
    per_rank = dist_pool(2).run(_rank_qlora, str(tmp_path), ref["adapter"], batch, 2)

    # stage-local: a rank reads only tensors of its own layers, and the two stages' reads split the checkpoint
    for r in per_rank:
        assert set(r["read"]) <= set(r["own"]) and r["read"]
        assert r["full_precision_2d"] == []  # no block linear weight stays in full precision
    assert not set(per_rank[0]["read"]) & set(per_rank[1]["read"])
    # the 4-bit weights: the same modules as transformers (all block linears; lm_head kept), the same packed bytes
    packed = {n: t for r in per_rank for n, t in r["packed"].items()}
    assert sorted(packed) == sorted(ref["packed"]) and len(packed) == 4 * 7
    for name, tensor in packed.items():
        assert tensor.dtype == torch.uint8 and torch.equal(tensor, ref["packed"][name]), name
    report = compare(ref, per_rank)
    assert report["trainable_pipeline"] == report["trainable_hf"] == ref["trainable"] > 0
    assert report["num_params"] == len(ref["params"]) == 4 * 7 * 2
    # the same 4-bit weights and the same bf16 kernels on the same rows: fp32 verify tolerance holds (measured:
    # logits equal, loss 1e-7, gradients 1.3e-7 relative)
    assert report["passed"] and report["tolerance"] == 1e-5, report
    assert report["logits_rel_err"] <= 1e-5 and report["max_rel_grad_err"] <= 1e-5, report


# ------------------------------------------------------------------------------------------------- bad input
def test_load_in_4bit_needs_an_adapter_and_4bit_bitsandbytes():
    from transformers import BitsAndBytesConfig

    from hfpipe.core.builder import prepare
    from hfpipe.core.quantize import QuantizationError, qlora_config, resolve_config
    from hfpipe.training.arguments import PipelineTrainingArguments

    config = family_config("llama")
    with pytest.raises(QuantizationError, match="trains only through adapters"):
        prepare(config, transformers.AutoModelForCausalLM, quantization_config=qlora_config())
    with pytest.raises(QuantizationError, match="in 4 bits only"):
        resolve_config(quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    cfg = resolve_config(load_in_4bit=True)
    assert (cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant, cfg.bnb_4bit_compute_dtype) == \
        ("nf4", True, torch.bfloat16)
    assert resolve_config(quantization_config=cfg.to_dict()).bnb_4bit_quant_type == "nf4"
    with pytest.raises(LoraConfigError, match="--load_in_4bit"):
        PipelineTrainingArguments(output_dir="x", load_in_4bit=True)
    assert PipelineTrainingArguments(output_dir="x", load_in_4bit=True, lora_r=8).load_in_4bit


def test_classifier_head_and_modules_to_save_stay_in_full_precision():
    """transformers keeps the output embedding / last module; the head PEFT trains in full is kept too (a 4-bit
    weight cannot train), so a BERT classifier quantises its blocks and pooler but not the classifier."""
    from hfpipe.core.builder import prepare
    from hfpipe.core.quantize import qlora_config

    config = family_config("bert", num_labels=2)
    builder = prepare(config, transformers.AutoModelForSequenceClassification, device="meta",
                      peft_config=LoraConfig(r=4, task_type="SEQ_CLS"), quantization_config=qlora_config())
    q = builder.quantization
    assert q.converts("bert.encoder.layer.0.attention.self.query") and q.converts("bert.pooler.dense")
    assert not q.converts("classifier")


# ---------------------------------------------------------------------------------------------------- budget
def test_bytes_per_param_is_what_bitsandbytes_stores():
    """0.5 byte per weight + the statistics: double quantisation 4.127 bits per weight (QLoRA), else 4.5."""
    from hfpipe.core.quantize import bytes_per_param, qlora_config

    cfg = qlora_config()
    assert bytes_per_param(cfg) * 8 == pytest.approx(4.127, abs=1e-3)

    def stored(rows):  # bytes of the packed weight and every tensor of its quant state
        weight = bnb.nn.Params4bit(torch.randn(rows, 1024), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True).to("cpu")
        return weight.data.numel() * weight.data.element_size() + sum(
            t.numel() * t.element_size() for t in weight.quant_state.as_dict(packed=True).values()
            if isinstance(t, torch.Tensor))

    # per weight, without the per-tensor code tables (the nf4 and 8-bit maps: ~1 KiB per tensor)
    assert (stored(1024) - stored(512)) / (512 * 1024) == pytest.approx(bytes_per_param(cfg), rel=1e-4)
    cfg.bnb_4bit_use_double_quant = False
    assert bytes_per_param(cfg) == 0.5625


def test_plan_load_in_4bit_budgets_4bit_frozen_weights():
    """Llama-3-8B at 8 stages with LoRA: --load-in-4bit stores every block linear in 4 bits (embedding, norms and
    lm_head as they are), so each stage's weights drop by exactly (2 - 0.516) bytes per quantised parameter."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hfpipe.core.quantize import bytes_per_param, qlora_config
    from hfpipe.plan import GIB, plan
    from test_partition import LLAMA_8B

    config = LlamaConfig(**LLAMA_8B, architectures=["LlamaForCausalLM"])
    kw = dict(stages=8, micro_batches=32, dtype="bf16", lora_r=8, model_class=AutoModelForCausalLM)
    lora, qlora = plan(config, **kw), plan(config, load_in_4bit=True, **kw)
    block_linear = 4096 * (4096 * 2 + 1024 * 2) + 3 * 4096 * 14336  # q, o, k, v, gate, up, down
    rows_l, rows_q = lora["stage_rows"], qlora["stage_rows"]
    assert sum(r["quantized_params"] for r in rows_q) == 32 * block_linear
    assert all(r["quantized_params"] == 0 for r in rows_l)
    assert qlora["load_in_4bit"] and not lora["load_in_4bit"]
    per = 2 - bytes_per_param(qlora_config())
    for l, q in zip(rows_l, rows_q):
        assert q["memory_gib"]["params"] == pytest.approx(l["memory_gib"]["params"] - q["quantized_params"] * per / GIB)
        assert q["memory_gib"]["optimizer"] == l["memory_gib"]["optimizer"]
    assert rows_q[0]["quantized_params"] == 4 * block_linear  # embedding + 4 blocks
    with pytest.raises(Exception, match="lora"):
        plan(config, stages=2, model_class=AutoModelForCausalLM, load_in_4bit=True)
