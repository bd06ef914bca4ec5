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
