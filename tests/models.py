"""Tiny configs for every supported family (2-4 blocks, hidden 32-64), shared by the tests."""

from transformers import AutoConfig

COMMON = dict(vocab_size=128, pad_token_id=0)

DECODERS = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, sliding_window=6),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=6,
                  max_window_layers=2),
    "gemma": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                     max_position_embeddings=64, rotary_pct=0.5),
    "gpt2": dict(n_embd=32, n_layer=4, n_head=4, n_positions=64),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64,
                word_embed_proj_dim=32),
}

ENCODERS = {
    "bert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=64, type_vocab_size=2),
    "roberta": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    max_position_embeddings=64, type_vocab_size=1, pad_token_id=1),
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=4, n_heads=4, max_position_embeddings=64),
    "deberta-v2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                       max_position_embeddings=64, relative_attention=True, position_buckets=8,
                       max_relative_positions=16, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                       type_vocab_size=0, conv_kernel_size=3),
}

FAMILIES = {**DECODERS, **ENCODERS}

#: families verified through the automatic base_model_pp_plan adapter beyond DECODERS (causal LM, 2 stages)
MORE_DECODERS = {
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
    # one rotary table per layer type (sliding: base 1e4, full: 1e6), alternating so that each stage holds both
    "gemma3_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=6,
                        layer_types=["sliding_attention", "full_attention"] * 2),
}

#: encoder-decoders (hfpipe.core.adapters.encdec): 3 encoder + 2 decoder blocks, seq2seq LM head
_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
           eos_token_id=1)
_BART = dict(d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
             decoder_start_token_id=2)
ENCODER_DECODERS = {
    "t5": _T5,
    "bart": _BART,
    "mbart": _BART,
    "marian": dict(_BART, decoder_vocab_size=128),
}

#: families handled by an adapter of another family: model_type -> the family whose tiny config fits
ALIASES = {"xlm-roberta": "roberta", "camembert": "roberta", "mt5": "t5"}


def family_config(model_type: str, **overrides):
    """A tiny config for any entry of ``hfpipe families``."""
    from transformers import AutoConfig

    kwargs = dict(COMMON)
    kwargs.update({**FAMILIES, **MORE_DECODERS, **ENCODER_DECODERS}[ALIASES.get(model_type, model_type)])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_config(model_type: str, **overrides):
    kwargs = dict(COMMON)
    kwargs.update(FAMILIES[model_type])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def hf_sgd_losses(model, batch, steps: int, lr: float, max_grad_norm: float | None = None) -> list[float]:
    """The HF model's own loss over ``steps`` plain SGD steps on ``batch`` (optionally clipped like HF Trainer): the
    reference a pipeline's ``train_batch`` losses are compared with."""
    import torch

    opt, losses = torch.optim.SGD(model.parameters(), lr=lr), []
    for _ in range(steps):
        loss = model(**batch).loss
        losses.append(float(loss))
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad()
    return losses
