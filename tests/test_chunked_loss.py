"""``loss_chunk_tokens``: the causal-LM training loss over chunks of tokens (``hfpipe.core.heads.ChunkedLogits``) gives
HF's loss and gradients without ever holding the full logits; evaluation and generation still see logits."""

import pytest
import torch
import transformers

from hfpipe.core.batches import micro_batches
from hfpipe.core.heads import ChunkedLogits
from hfpipe.pipeline import to_pipeline
from hfpipe.core.batches import make_batch

from models import hf_sgd_losses, tiny_config


def _model(family):
    torch.manual_seed(0)
    if family == "gemma2":  # final logit soft-capping runs inside the head, per chunk
        config = transformers.Gemma2Config(vocab_size=128, pad_token_id=0, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=8, max_position_embeddings=64, sliding_window=6,
                                           final_logit_softcapping=5.0)
    elif family == "gpt_neox":  # untied head
        config = tiny_config("gpt_neox", num_hidden_layers=2, tie_word_embeddings=False)
    else:  # llama, tied to the input embedding
        config = tiny_config("llama", num_hidden_layers=2, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _compare_with_hf(family, chunk_tokens):
    model = _model(family)
    batch = make_batch(model.config, "causal-lm", batch_size=3, seq_len=11)
    hf_loss = model(**batch).loss
    hf_loss.backward()
    pipe = to_pipeline(model, num_stages=1, loss_chunk_tokens=chunk_tokens).eval()
    (inputs, labels), = micro_batches(batch, pipe, 1)
    out = pipe(inputs)
    assert isinstance(out, ChunkedLogits)
    loss = pipe.loss_fn(out, labels)
    loss.backward()
    torch.testing.assert_close(loss, hf_loss, rtol=1e-6, atol=1e-7)
    hf_params = dict(model.named_parameters())
    grads = dict(pipe.hf_named_parameters())
    assert grads
    for name, p in grads.items():
        torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # evaluation / generation: logits as without chunking
        logits = pipe(inputs)
    torch.testing.assert_close(logits, model(**batch).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [5, 1000])
@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2"])
def test_chunked_loss_matches_hf(dist_pool, family, chunk_tokens):
    """Loss, every gradient (the tied one included) and the no-grad logits, on a one-stage pipeline."""
    dist_pool(1).run(_compare_with_hf, family, chunk_tokens)


def _head_calls():
    model = _model("llama")
    batch = make_batch(model.config, "causal-lm", batch_size=2, seq_len=12)
    pipe = to_pipeline(model, num_stages=1, loss_chunk_tokens=8)
    (inputs, labels), = micro_batches(batch, pipe, 1)
    out = pipe(inputs)
    seen = []
    real = out.logits_fn
    out.logits_fn = lambda x: seen.append(tuple(x[0].shape[:2])) or real(x)
    pipe.loss_fn(out, labels).backward()
    return seen


def test_chunks_never_hold_the_full_logits(dist_pool):
    """Every head call sees at most ``chunk_tokens`` tokens, in forward and in the backward recomputation."""
    seen = dist_pool(1).run(_head_calls)[0]
    assert seen == [(2, 4)] * 3 * 2  # 8 tokens = 2 rows x 4 positions; 3 chunks, each run again in backward


def _train_step(model_type, chunk, stages):
    import deepspeed

    torch.manual_seed(0)
    config = tiny_config(model_type, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    pipe = to_pipeline(model, num_stages=stages, loss_chunk_tokens=chunk)
    batch = make_batch(config, "causal-lm", batch_size=4, seq_len=12)
    data = micro_batches(batch, pipe, 2)
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=list(pipe.parameters()), config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4,
        "steps_per_print": 10**9, "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    losses = [float(engine.train_batch(iter(data))) for _ in range(2)]
    return {"stage": engine.stage_id, "losses": losses, "hf": hf_sgd_losses(model, batch, 2, lr=0.1)}


def test_chunked_loss_in_a_two_stage_engine(dist_pool):
    """Two SGD steps at 2 stages (tied head on the last stage, loss normalised over the global batch): the same losses
    as with full logits and as HF's model under torch SGD."""
    pool = dist_pool(2)
    full = max(pool.run(_train_step, "llama", None, 2), key=lambda r: r["stage"])
    chunked = max(pool.run(_train_step, "llama", 5, 2), key=lambda r: r["stage"])
    assert chunked["losses"] == pytest.approx(full["losses"], rel=1e-6)
    assert chunked["losses"] == pytest.approx(chunked["hf"], rel=1e-5)
    assert chunked["losses"][1] < chunked["losses"][0]


@pytest.mark.parametrize("value,match", [(0, "positive number of tokens"), (-4, "positive number of tokens"),
                                         (2.5, "positive number of tokens")])
def test_loss_chunk_tokens_must_be_positive(value, match):
    with pytest.raises(ValueError, match=match):
        to_pipeline(_model("llama"), num_stages=1, loss_chunk_tokens=value)


def test_loss_chunk_tokens_only_for_causal_lm():
    model = transformers.AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=3))
    with pytest.raises(ValueError, match="applies to causal-LM heads"):
        to_pipeline(model, num_stages=1, loss_chunk_tokens=1024)
