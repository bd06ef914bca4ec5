"""Checkpoint reading (issue 4): lazy, stage-local safetensors sources. convert/export: tests/test_convert.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfpipe.core.weights import CheckpointError, resolve_pretrained
from models import tiny_config


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return folder, model.state_dict()


def test_resolve_pretrained_class_and_tied_lm_head(gpt2_folder):
    folder, sd = gpt2_folder
    config, cls, src = resolve_pretrained(folder)
    assert cls.__name__ == "GPT2LMHeadModel" and config.model_type == "gpt2"
    assert "lm_head.weight" not in src.keys()  # HF omits the tied head
    assert torch.equal(src.get("lm_head.weight"), sd["transformer.wte.weight"])
    _, cls2, _ = resolve_pretrained(folder, AutoModelForCausalLM)
    assert cls2 is cls


def test_source_reads_lazily_and_counts_bytes(gpt2_folder):
    folder, sd = gpt2_folder
    _, _, src = resolve_pretrained(folder)
    assert src.bytes_read == 0
    t = src.get("transformer.h.1.mlp.c_fc.weight")
    assert torch.equal(t, sd["transformer.h.1.mlp.c_fc.weight"])
    assert src.bytes_read == t.numel() * t.element_size()
    assert src.names_read == ["transformer.h.1.mlp.c_fc.weight"]
    assert src.get("no.such.weight") is None


def test_missing_files_raise(tmp_path):
    with pytest.raises(CheckpointError, match="config.json|not a folder|could not resolve"):
        resolve_pretrained(tmp_path)
