"""The benchmark harness: its pure pieces (1F1B ideal, summaries, targets, reports, the chunked loss) and a tiny
real run of the pipeline-efficiency benchmark. No timing thresholds: timings depend on the machine."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, pipeline_efficiency, single_stage  # noqa: E402


def test_ideal_step_time_and_bubble():
    assert harness.ideal_step_time(4, 2, 0.02, 0.04) == pytest.approx(5 * 0.06)
    assert harness.ideal_step_time(16, 4, 0.01, 0.02) == pytest.approx(19 * 0.03)
    assert harness.ideal_step_time(1, 1, 0.5, 1.0) == pytest.approx(1.5)
    assert harness.bubble_fraction(8, 4) == pytest.approx(3 / 11)
    with pytest.raises(ValueError, match="num_micro_batches >= 1"):
        harness.ideal_step_time(0, 2, 0.1, 0.1)


def _fake_rank(stage, times, fwd_ms, bwd_ms, extra=None):
    instr = {"ForwardPass": fwd_ms, "BackwardPass": bwd_ms, **(extra or {})}
    return {"rank": stage, "stage": stage, "times": times, "instructions_ms_per_step": instr, "parts": [0, 3, 6]}


def test_summarize_overheads_and_targets():
    tf, tb, p, m = 0.02, 0.04, 2, 8
    # slowest rank per step is taken, then the median over steps; sleep is subtracted from the profile
    bare = pipeline_efficiency.summarize("bare", p, m, tf, tb, [
        _fake_rank(0, [0.60, 0.62, 0.58], 8 * 20 + 8.0, 8 * 40 + 4.0, {"SendActivation": 2.0}),
        _fake_rank(1, [0.61, 0.63, 0.57], 8 * 20 + 16.0, 8 * 40 + 8.0, {"RecvActivation": 3.0})])
    assert bare["measured_s"] == pytest.approx(0.61)
    assert bare["ideal_s"] == pytest.approx(9 * 0.06)
    assert bare["ratio"] == pytest.approx(0.61 / 0.54)
    assert bare["overhead_per_slot_ms"] == pytest.approx(1e3 * (0.61 - 0.54) / 9)
    assert bare["useful_fraction"] == pytest.approx(8 * 0.06 / 0.61)
    assert bare["layer_compute_ms"] == pytest.approx(3.0)  # busiest stage: (16 + 8) ms / 8 micro-batches
    assert bare["ideal_with_compute_s"] == pytest.approx(9 * 0.063)
    assert bare["profile"][1]["ms_per_step"]["ForwardPass"] == pytest.approx(16.0)
    hf = dict(bare, variant="hfpipe", measured_s=0.6145, ratio=0.6145 / 0.54)
    tup = dict(bare, variant="bare-tuple", measured_s=0.6127)
    over = pipeline_efficiency.hfpipe_overheads([bare, tup, hf])
    assert len(over) == 1
    assert over[0]["overhead_ms_per_slot"] == pytest.approx(0.5)
    assert over[0]["messages_ms_per_slot"] == pytest.approx(0.3)
    t = pipeline_efficiency.check_targets([bare, hf], over)
    assert t["worst_ratio_at_m_ge_4p"]["variant"] == "hfpipe" and t["ratio_met"] is False  # 1.138 > 1.10
    assert t["overhead_median_ms_per_slot"] == pytest.approx(0.5) and t["overhead_met"] is True
    assert t["messages_median_ms_per_slot"] == pytest.approx(0.3)
    text = pipeline_efficiency.markdown({"settings": {"t_forward_ms": 20, "t_backward_ms": 40, "model": "tiny",
                                                      "steps": 3, "warmup": 1},
                                         "rows": [bare, tup, hf], "hfpipe_overhead": over, "targets": t})
    assert "| 2 | 8 | hfpipe | 0.540 | 0.615 | 1.138 |" in text
    assert "**missed** (worst per variant: bare 1.130, bare-tuple 1.130, hfpipe 1.138)" in text
    assert "**met** (median over the runs 0.50 ms" in text
    assert "(bare-tuple) costs a median 0.30 ms per slot" in text


def test_markdown_table_and_report_files(tmp_path):
    table = harness.markdown_table([{"a": 1, "b": 2.5}, {"a": 2, "b": None}], [("a", "A", ""), ("b", "B", ".2f")])
    assert table.splitlines() == ["| A | B |", "|---|---:|", "| 1 | 2.50 |", "| 2 | - |"]
    rows = [{"variant": v, "p": 2, "m": m, "useful_fraction": f}
            for v in ("bare", "hfpipe") for m, f in ((1, 0.4), (4, 0.7))]
    png = harness.plot_efficiency(rows, str(tmp_path / "eff.png"), "test")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    harness.write_json(str(tmp_path / "r.json"), {"x": 1.5})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1.5}
    assert "benchmarks/run_all.py --quick" in harness.command_line(
        os.path.join(harness.REPO, "benchmarks", "run_all.py"), ["--quick"])


def test_single_stage_pure_pieces():
    assert single_stage.detect_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert single_stage.detect_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert single_stage.detect_peak_tflops("NVIDIA H200") == 989.0
    assert single_stage.detect_peak_tflops("cpu") is None
    config = single_stage.llama_config(small=False)
    n = single_stage.count_params(config)
    assert n == 1_235_814_400  # Llama-3.2-1B, tied embeddings counted once
    assert single_stage.flops_per_token(n, config, 2048) == pytest.approx(6 * n + 12 * 16 * 2048 * 2048)
    cfg = single_stage.ds_config(4, 4, torch.device("cpu"), "bf16")
    assert cfg["train_batch_size"] == 16 and cfg["zero_optimization"]["stage"] == 1
    assert cfg["optimizer"]["params"]["torch_adam"] is True and cfg["data_types"]["grad_accum_dtype"] == "fp32"


@pytest.mark.parametrize("chunked_gb,met", [(40.0, True), (56.0, False)])
def test_single_stage_targets(chunked_gb, met):
    rows = [{"variant": v, "micro_batch_size": 4, "tokens_per_s": tps, "peak_gb": gb}
            for v, tps, gb in [("native", 100.0, 36.0), ("native-amp", 90.0, 50.0), ("bare", 95.0, 48.0),
                               ("hfpipe", 96.0, 47.0), ("hfpipe-chunked-ce", 94.0, chunked_gb)]]
    t = single_stage.check_targets(single_stage.finalize(rows, 1.0, None))["mbs4"]
    assert t["vs_native"] == pytest.approx(0.96) and t["vs_bare"] == pytest.approx(96 / 95)
    assert t["speed_met"] and t["memory_met"] and t["mem_vs_bare"] == pytest.approx(47 / 48)
    assert t["chunked_mem_vs_native_amp"] == pytest.approx(chunked_gb / 50.0)
    assert t["memory_vs_native_met"] is met


def test_chunked_loss_matches_full_loss():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, 3] = -100
    full = harness.causal_lm_loss(hidden @ weight.t(), labels)
    g_full = torch.autograd.grad(full, (hidden, weight))
    chunked = harness.chunked_causal_lm_loss((hidden, weight), labels, chunk_tokens=5)
    g_chunk = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, full)
    for a, b in zip(g_chunk, g_full):
        torch.testing.assert_close(a, b)


def test_torch_threads_is_restored_even_on_error():
    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with harness.torch_threads(1):
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outer)


@pytest.mark.parametrize("stage_id", [0, 1])
def test_fixed_stage_cost_pads_each_pass(stage_id):
    """Forward takes at least t_F and backward at least t_B (the stage's own work inside the window), gradients
    unchanged; on the first stage the backward window closes on the embedding's output."""
    import time

    class Stage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stage_id = stage_id
            self.embed, self.lin = torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4)
            self.forward_funcs = [self.embed, self.lin] if stage_id == 0 else [self.lin]

        def forward(self, x):
            for f in self.forward_funcs:
                x = f(x)
            return x

    stage = Stage()
    harness.fix_stage_cost(stage, 0.05, 0.08)
    x = torch.tensor([[1, 2], [3, 4]]) if stage_id == 0 else torch.randn(2, 4, requires_grad=True)
    t0 = time.perf_counter()
    y = stage(x)
    t1 = time.perf_counter()
    y.sum().backward()
    t2 = time.perf_counter()
    assert t1 - t0 >= 0.05 and t2 - t1 >= 0.08
    expected = stage.lin.weight.sum(0).expand(2, 2, 4) if stage_id == 0 else stage.lin.weight.sum(0).expand(2, 4)
    if stage_id == 0:
        assert torch.equal(stage.embed.weight.grad[1:5], expected.reshape(4, 4))
    else:
        assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("cost", ["fixed", "sleep"])
@pytest.mark.parametrize("variant", ["bare", "hfpipe"])
def test_efficiency_tiny_run(dist_pool, variant, cost):
    p, m, tf, tb = 2, 2, 0.001, 0.002
    per_rank = dist_pool(p).run(pipeline_efficiency.rank_run, variant, p, m, tf, tb, 1, 0, cost=cost)
    assert sorted(r["stage"] for r in per_rank) == [0, 1]
    row = pipeline_efficiency.summarize(variant, p, m, tf, tb, per_rank)
    for key in ("variant", "p", "m", "ideal_s", "measured_s", "ratio", "useful_fraction", "overhead_per_slot_ms",
                "layer_compute_ms", "schedule_ratio", "step_times_s", "parts", "profile"):
        assert key in row, key
    assert (row["variant"], row["p"], row["m"]) == (variant, 2, 2)
    assert row["ideal_s"] == pytest.approx(3 * 0.003)
    assert len(row["step_times_s"]) == 1 and row["measured_s"] > 0
    first, last = row["profile"]
    # stage 0 sends activations and receives gradients; stage 1 the opposite; both run forward and backward
    assert {"ForwardPass", "BackwardPass", "SendActivation", "RecvGrad"} <= set(first["ms_per_step"])
    assert {"ForwardPass", "BackwardPass", "RecvActivation", "SendGrad"} <= set(last["ms_per_step"])
    assert "SendActivation" not in last["ms_per_step"]
    json.dumps(row)  # the report is JSON-serialisable
