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
    """The seq2seq LM of an encoder-decoder, the causal LM of a decoder, the sequence classifier of an encoder."""
    for auto in (transformers.AutoModelForSeq2SeqLM, transformers.AutoModelForCausalLM,
                 transformers.AutoModelForSequenceClassification):
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


# ------------------------------------------------------------------ the automatic adapter: verified or refused
def test_gemma3_verified_at_4_stages(dist_pool):
    """Gemma 3 has one rotary embedding with a table per layer type (sliding: base 1e4, full: 1e6); it stopped with
    ``Gemma3RotaryEmbedding.forward() missing 1 required positional argument: 'layer_type'``. Alternating layer types,
    one block per stage (2 stages: tests/test_heads.py::test_more_pp_plan_families)."""
    from hfpipe.verify import ModelSpec, format_report, verify

    config = family_config("gemma3_text")
    assert len(set(config.layer_types)) == 2
    spec = ModelSpec(class_name="Gemma3ForCausalLM", config=config.to_dict(), seed=2)
    report = verify(spec, stages=4, micro_batches=2, batch_size=4, seq_len=12, pool=dist_pool(4))
    assert report["passed"], format_report(report)
    assert report["loss_rel_err"] <= 1e-5 and report["max_rel_grad_err"] <= 1e-5 and report["num_params"] == 54


def _sweep_rows():
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                        "family_sweep.json")
    with open(path) as f:
        return json.load(f)["rows"]


def test_family_sweep_table_has_no_failures_and_its_refusals_happen_before_building(monkeypatch):
    """benchmarks/family_sweep.py's table (README): no family fails; every refused one is refused by the adapter's
    acceptance check on the meta device (before any layer is built), with its one-line reason."""
    import os
    import sys
    import warnings

    from hfpipe.core.adapters import pp_plan
    from hfpipe.core.builder import prepare
    from hfpipe.core.meta import UnsupportedModelError

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.family_sweep import task_class, tiny_config

    rows = _sweep_rows()
    assert not [r for r in rows if r["status"] == "failed"]
    verified = {r["model_type"] for r in rows if r["status"] == "verified"}
    assert set(pp_plan.VERIFIED_FAMILIES) <= verified and len(verified) >= 70
    refused = [r for r in rows if r["status"] == "refused"]
    assert {"gemma4_text", "qwen3_next", "eurobert", "granite_swa"} <= {r["model_type"] for r in refused}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in refused:
            config = tiny_config(r["model_type"])
            with pytest.raises(UnsupportedModelError) as err:
                prepare(config, task_class(config))
            assert str(err.value).splitlines()[0] == r["reason"], r["model_type"]
        # the refusal list is consulted first, for any family
        monkeypatch.setitem(pp_plan.REFUSED_FAMILIES, "llama", "a reason given here")
        with pytest.raises(UnsupportedModelError, match="llama is refused by the automatic base_model_pp_plan "
                                                        "adapter: a reason given here"):
            prepare(family_config("llama"), transformers.LlamaForCausalLM)
