"""The model the decoder tasks (causal LM, text-to-text) train when none is given: no pretrained decoder can be
downloaded here, so their recipes train a small Llama from its config with the word-level tokenizer of the project's
synthetic corpus (``hfpipe/data/text2text``, written by ``hfpipe/data/generate.py``).

The one idea: :func:`build_decoder` is the decoder tasks' ``build`` for :func:`hfpipe.tasks.base.run_recipe` -- this
default pair, or ``--model_name_or_path`` (a folder or Hub id whose weights the trainer reads stage-locally) with its
tokenizer.
"""

from __future__ import annotations

import os

from hfpipe.tasks.base import DATA_DIR, ModelArguments

TOKENIZER_DIR = os.path.join(DATA_DIR, "text2text", "tokenizer")


def default_tokenizer():
    """The word-level tokenizer of the synthetic corpus (``PreTrainedTokenizerFast``: BOS first, EOS and pad set)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def small_decoder_config(tokenizer, **overrides):
    """The small Llama the recipes train from scratch on the synthetic default (4 blocks, hidden 128)."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_decoder(task, raw, model_args: ModelArguments, seed: int):
    """``(model, tokenizer)``: without --model_name_or_path the small Llama config (trained from scratch) and the
    project's tokenizer; with it, the path itself (the trainer loads its weights stage-locally) and its tokenizer
    (or --tokenizer_name)."""
    if model_args.model_name_or_path is None:
        tokenizer = default_tokenizer()
        return small_decoder_config(tokenizer), tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    return model_args.model_name_or_path, tokenizer
