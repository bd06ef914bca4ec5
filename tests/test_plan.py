"""``hfpipe plan`` from a config alone: the table, the JSON, --compare, and the split it shows is the one
``to_pipeline`` uses."""

import json

import pytest
from transformers import LlamaConfig

from hfpipe.cli import main
from hfpipe.plan import plan

from models import tiny_config
from test_partition import LLAMA_8B


@pytest.fixture(scope="module")
def llama_8b_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama8b")
    LlamaConfig(**LLAMA_8B, architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return path


def test_plan_llama_8b_json(llama_8b_dir, capsys):
    assert main(["plan", str(llama_8b_dir / "config.json"), "--stages", "8", "--micro-batches", "32",
                 "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert "imbalance (max/mean stage FLOPs): 1.1098" in "\n".join(out)
    assert report["parts"] == [0, 10, 18, 26, 35, 44, 53, 62, 68] and report["half_blocks"]
    rows = report["stage_rows"]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["params"] for r in rows) == 8_030_261_248
    assert report["efficiency"] == pytest.approx(32 / 39 / report["imbalance"])
    assert rows[0]["layers"] == "embed, B0-B3" and rows[3]["layers"] == "B12-B15, B16.attn"
    assert rows[-1]["layers"] == "B30-B31, norm, head"
    assert [r["in_flight"] for r in rows] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert rows[0]["memory_gib"]["total"] > rows[-2]["memory_gib"]["total"]


def test_plan_compare_and_memory_cap(llama_8b_dir, capsys):
    assert main(["plan", str(llama_8b_dir), "--stages", "4", "--compare"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isalpha() and "[" in line}
    assert float(lines["balanced"][1]) == pytest.approx(1.0499, abs=1e-4)
    assert float(lines["parameters"][1]) == pytest.approx(1.0808, abs=1e-4)
    assert set(lines) == {"balanced", "balanced:blocks", "parameters", "uniform"}
    free = plan(str(llama_8b_dir), stages=4)
    peak = max(r["memory_gib"]["total"] for r in free["stage_rows"])
    capped = plan(str(llama_8b_dir), stages=4, memory_cap_gib=peak - 3)
    assert max(r["memory_gib"]["total"] for r in capped["stage_rows"]) <= peak - 3
    assert capped["imbalance"] > free["imbalance"]
    with pytest.raises(ValueError, match="memory cap"):
        plan(str(llama_8b_dir), stages=4, memory_cap_gib=10)


def test_plan_with_chunked_loss(llama_8b_dir, capsys):
    """--loss-chunk-tokens: the last stage keeps no logits (T x vocab in bf16 + fp32 for every micro-batch in flight)
    and its head runs again in backward; the other stages are unchanged."""
    full = plan(str(llama_8b_dir), stages=4, partition="uniform", seq_len=4096)
    chunked = plan(str(llama_8b_dir), stages=4, partition="uniform", seq_len=4096, loss_chunk_tokens=1024)
    f_last, c_last = full["stage_rows"][-1], chunked["stage_rows"][-1]
    logits_gib = 4096 * 128256 * (2 + 8) / 2**30  # per micro-batch; one in flight on the last stage
    assert f_last["in_flight"] == 1
    saved = f_last["memory_gib"]["activations"] - c_last["memory_gib"]["activations"]
    assert saved == pytest.approx(logits_gib, rel=1e-6)
    head_fwd = 2 * 4096 * 4096 * 128256  # the LM head matmul, recomputed once more in backward
    assert c_last["flops"] - f_last["flops"] == pytest.approx(head_fwd, rel=0.01)
    assert [r["memory_gib"] for r in chunked["stage_rows"][:-1]] == [r["memory_gib"] for r in full["stage_rows"][:-1]]
    assert main(["plan", str(llama_8b_dir), "--stages", "4", "--loss-chunk-tokens", "1024"]) == 0
    assert "loss_chunk_tokens=1024" in capsys.readouterr().out
    with pytest.raises(ValueError, match="positive number of tokens"):
        plan(str(llama_8b_dir), stages=4, loss_chunk_tokens=0)


def test_plan_tiny_model_matches_to_pipeline_split(tmp_path):
    from hfpipe.core.costs import layer_costs
    from hfpipe.core.builder import compute_parts, prepare
    from transformers import AutoModelForCausalLM

    config = tiny_config("gpt2")
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(tmp_path)
    report = plan(str(tmp_path), stages=2, seq_len=64, partition="balanced")
    builder = prepare(config, AutoModelForCausalLM)
    flops = [c.flops for c in layer_costs(builder, seq_len=64)]
    assert report["parts"] == compute_parts("balanced", builder.layers(), 2, 4, "m", costs=flops)
    assert not report["half_blocks"] and report["model"] == "GPT2LMHeadModel"


def test_plan_errors(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing"), "--stages", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["plan", str(tmp_path), "--stages", "2"]) == 2
    assert "no config.json" in capsys.readouterr().err
