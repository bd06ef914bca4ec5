"""The pipeline trains exactly like the HF model: loss, logits and every gradient, on padded batches, for every
supported family at 1, 2 and 4 stages with 1 and 4 micro-batches (real DeepSpeed engines on gloo ranks)."""

import pytest

from hfpipe.verify import ModelSpec, format_report, verify

from models import DECODERS, ENCODERS, tiny_config

CLASSES = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification",
           "token-classification": "AutoModelForTokenClassification",
           "question-answering": "AutoModelForQuestionAnswering"}


def spec_for(model_type, head, **overrides):
    import transformers

    config = tiny_config(model_type, **overrides)
    auto = getattr(transformers, CLASSES[head])
    cls = auto._model_mapping[type(config)]
    return ModelSpec(class_name=cls.__name__, config=config.to_dict(), seed=0)


def check(report):
    assert report["passed"], format_report(report)
    assert report["loss_rel_err"] <= 1e-5 and report["max_rel_grad_err"] <= 1e-5


@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("micro_batches", [1, 4])
@pytest.mark.parametrize("model_type", sorted(DECODERS))
def test_decoder_causal_lm(dist_pool, model_type, stages, micro_batches):
    spec = spec_for(model_type, "causal-lm")
    check(verify(spec, stages=stages, micro_batches=micro_batches, batch_size=8, seq_len=12,
                 pool=dist_pool(stages)))


@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("micro_batches", [1, 4])
@pytest.mark.parametrize("model_type", sorted(ENCODERS))
def test_encoder_sequence_classification(dist_pool, model_type, stages, micro_batches):
    spec = spec_for(model_type, "sequence-classification", num_labels=3)
    check(verify(spec, stages=stages, micro_batches=micro_batches, batch_size=8, seq_len=12,
                 pool=dist_pool(stages)))
