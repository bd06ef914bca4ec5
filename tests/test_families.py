"""Every entry of ``hfpipe families``: activation checkpointing recomputes exactly its blocks, and ``hfpipe plan``
plans it (config only)."""

import json
from collections import Counter

import pytest
import transformers

from hfpipe.core.adapters import supported_families
from hfpipe.plan import plan

from models import family_config

FAMILY_TYPES = sorted(supported_families())


def _model_class(config):
    """The causal LM of a decoder, the sequence classifier of an encoder."""
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise AssertionError(f"no causal-LM or sequence-classification class for {config.model_type}")


def test_every_family_has_a_tiny_config():
    assert len(FAMILY_TYPES) >= 19 and {"deberta-v2", "llama", "bert", "gpt2", "mixtral"} <= set(FAMILY_TYPES)
    for model_type in FAMILY_TYPES:
        assert family_config(model_type).model_type == model_type


def _forward_calls(model_type: str, interval: int) -> dict:
    """Forward calls of every layer of a one-stage pipeline during one ``train_batch`` (one micro-batch), per place
    in the layer list the layer runs at."""
    import deepspeed
    import torch

    from hfpipe import to_pipeline
    from hfpipe.core.batches import make_batch, micro_batches
    from hfpipe.verify import ds_config, zero_dropout

    config = zero_dropout(family_config(model_type))
    torch.manual_seed(0)
    pipe = to_pipeline(config, model_class=_model_class(config), num_stages=1,
                       activation_checkpoint_interval=interval)
    calls, first, entries = Counter(), {}, Counter()
    for idx, module, _ in pipe.local_layers():
        if pipe.layer_infos[idx].kind.value == "head" and id(module) in first:
            continue  # a tied LM head runs its function on the embedding's weight, not the embedding module
        if id(module) in first:  # a tied module built once and run at several places (DeBERTa's relative table)
            entries[first[id(module)]] += 1
            continue
        first[id(module)] = idx
        entries[idx] = 1
        module.register_forward_hook(lambda m, i, o, idx=idx: calls.update([idx]))
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=torch.optim.SGD(pipe.parameters(), lr=0.0),
                                      config=ds_config(2, 1, 1))
    batch = make_batch(config, pipe.head, batch_size=2, seq_len=8)
    engine.train_batch(iter(micro_batches(batch, pipe, 1)))
    # calls per place the module runs at
    return {idx: (pipe.layer_infos[idx].kind.value, pipe.layer_infos[idx].name, calls[idx] / entries[idx])
            for idx in entries}


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_activation_checkpointing_recomputes_each_block_once(dist_pool, model_type):
    """With ``activation_checkpoint_interval=1`` every block (whole or half) runs twice per micro-batch (forward,
    then again in backward) and nothing else does; without checkpointing every layer runs once. DeBERTa-v2's blocks,
    whose class is not named ``Block``, were never checkpointed before the layers carried ``checkpointable``."""
    pool = dist_pool(1)
    plain, = pool.run(_forward_calls, model_type, 0)
    checkpointed, = pool.run(_forward_calls, model_type, 1)
    assert all(n == 1 for _, _, n in plain.values()), plain
    blocks = {idx: n for idx, (kind, _, n) in checkpointed.items() if kind == "block"}
    others = {idx: (name, n) for idx, (kind, name, n) in checkpointed.items() if kind != "block"}
    assert len(blocks) >= 4 and set(blocks.values()) == {2}, checkpointed
    assert all(n == 1 for _, n in others.values()), others


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_plan_every_family(model_type):
    config = family_config(model_type)
    report = plan(config, model_class=_model_class(config), stages=2, seq_len=16, micro_batches=4)
    assert report["model_type"] == model_type and report["parts"][0] == 0 and len(report["parts"]) == 3
    assert sum(r["share"] for r in report["stage_rows"]) == pytest.approx(1.0)
    layers = ", ".join(r["layers"] for r in report["stage_rows"])
    assert layers.startswith("embed, B0") and layers.endswith("norm, head"), layers
    blocks = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layers
    assert f"B{blocks - 1}" in layers


def test_plan_cli_deberta_v2(tmp_path, capsys):
    """The CLI on a DeBERTa-v2 config.json (it stopped with ``hfpipe plan: error: 'prelude'``): the relative table
    in front of each block is shown with its block."""
    from hfpipe.cli import main

    config = family_config("deberta-v2", architectures=["DebertaV2ForSequenceClassification"])
    config.save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path / "config.json"), "--stages", "2", "--seq-len", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["layers"] for r in report["stage_rows"]] in (["embed, B0-B1", "B2-B3, norm, head"],
                                                            ["embed, B0-B2", "B3, norm, head"],
                                                            ["embed, B0", "B1-B3, norm, head"])
