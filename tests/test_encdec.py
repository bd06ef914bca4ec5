"""Encoder-decoders through the pipeline (issue 18): T5 (v1.0 tied, v1.1 gated-GELU untied), BART, mBART and Marian
train exactly like HF -- loss, logits and every gradient <= 1e-5 relative in fp32 on padded encoder and decoder
inputs, decoder inputs shifted from the labels as HF does -- with the stage cut inside the encoder (T5: mid-stack,
so the tied relative-position table is on both stages), at the encoder/decoder seam and inside the decoder."""

import pytest
import torch

from hfpipe.verify import ModelSpec, format_report, verify

from models import family_config

CLASSES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
           "bart": "BartForConditionalGeneration", "mbart": "MBartForConditionalGeneration", "marian": "MarianMTModel"}
T5_V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False)

# layer lists (hfpipe.core.adapters.encdec): T5  0 embed, 1 enc shell, (bias, block) x 3 at 2..7, 8 enc final,
# 9 dec shell, (bias, block) x 2 at 10..13, 14 dec final, 15 head; BART-likes  0, 1, blocks 2-4, 5, 6, blocks 7-8, 9, 10
T5_IN_ENCODER, T5_SEAM, T5_IN_DECODER = [0, 4], [0, 9], [0, 12]
BART_IN_DECODER, BART_SEAM = [0, 8], [0, 6]


def spec_for(model_type, **overrides):
    config = family_config(model_type, **overrides)
    return ModelSpec(class_name=CLASSES[model_type], config=config.to_dict(), seed=0)


def check(report):
    assert report["passed"], format_report(report)
    assert report["loss_rel_err"] <= 1e-5 and report["max_rel_grad_err"] <= 1e-5
    assert report["num_params"] >= 20


CASES = [
    ("t5", {}, 2, T5_IN_ENCODER, "left"),
    ("t5", T5_V11, 2, T5_SEAM, "right"),
    ("t5", {}, 2, T5_IN_DECODER, "right"),
    ("bart", {}, 2, BART_IN_DECODER, "right"),
    ("mbart", {}, 2, BART_SEAM, "left"),
    ("marian", {}, 2, BART_IN_DECODER, "right"),
    ("t5", T5_V11, 4, [0, 4, 9, 12], "right"),
    ("bart", {}, 1, "parameters", "right"),
]


@pytest.mark.parametrize("model_type,overrides,stages,partition,padding", CASES,
                         ids=[f"{c[0]}{'-v1.1' if c[1] else ''}-p{c[2]}-{c[3]}" for c in CASES])
def test_verify_encoder_decoder(dist_pool, model_type, overrides, stages, partition, padding):
    spec = spec_for(model_type, **overrides)
    report = verify(spec, stages=stages, micro_batches=4 if stages > 1 else 1, batch_size=8, seq_len=12,
                    partition=partition, padding=padding, pool=dist_pool(stages))
    check(report)
    if not isinstance(partition, str):
        assert report["parts"][:-1] == partition


def _builder(model_type, **overrides):
    import transformers

    from hfpipe.core.builder import prepare

    config = family_config(model_type, **overrides)
    return prepare(config, transformers.AutoModelForSeq2SeqLM, device="meta")


def test_cost_model_counts_source_and_target_tokens():
    """Encoder layers cost per source token, decoder layers per target token; a decoder block's cross-attention
    (keys/values from every source token, every target token attending to every source token) grows with the
    source: exactly 2 x d x d per K/V projection per extra source token plus 4 x head_dim + 5 per head per
    (target, source) pair, x3 for forward + backward."""
    from hfpipe.core.costs import Workload, layer_costs

    b = _builder("bart")
    short = layer_costs(b, Workload(seq_len=16, target_len=8, dtype="fp32"))
    long = layer_costs(b, Workload(seq_len=48, target_len=8, dtype="fp32"))
    names = [c.name for c in short]
    enc, dec = names.index("EncoderBlock"), names.index("DecoderBlock")
    d, heads = 32, 4
    expected = 3 * ((48 - 16) * 2 * (2 * d * d) + 8 * (48 - 16) * heads * (4 * (d // heads) + 5))
    assert long[dec].flops - short[dec].flops == pytest.approx(expected)
    assert long[enc].flops > 2.9 * short[enc].flops  # per source token, plus attention over the longer source
    head = names.index("TiedHead")
    assert long[head].flops == short[head].flops  # the LM head and loss run on the 8 target tokens either way
    assert long[0].flops - short[0].flops == pytest.approx(2 * (48 - 16) * d)  # embedding gathers both streams


def test_plan_encoder_decoder_target_len():
    """``hfpipe plan --target-len``: short targets leave most work in the encoder, so the balanced cut moves into it
    (equal lengths: inside the decoder, whose blocks also cross-attend)."""
    import transformers

    from hfpipe.plan import format_plan, plan

    config = family_config("t5", num_layers=4, num_decoder_layers=4)
    cls = transformers.T5ForConditionalGeneration
    equal = plan(config, model_class=cls, stages=2, seq_len=64, micro_batches=4, dtype="fp32")
    short = plan(config, model_class=cls, stages=2, seq_len=64, target_len=4, micro_batches=4, dtype="fp32")
    assert short["parts"][1] < 10 < equal["parts"][1]  # layer 10: the encoder's final norm
    assert "target_len=4" in format_plan(short)
    assert short["stage_rows"][0]["layers"].startswith("embed, B0")
