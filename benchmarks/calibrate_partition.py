"""Calibrate the cost model: predicted per-stage work shares vs. measured per-stage compute time on CPU.

A small Llama-shaped model runs as a real DeepSpeed pipeline (1F1B, gloo ranks from ``hfpipe.launch``) at p=2 and
p=4 with the ``balanced`` split. Every rank times its own ForwardPass and BackwardPass instructions with the CPU
time of its thread (``time.thread_time``, one intra-op thread per rank): on a shared, oversubscribed machine wall
time measures the neighbours, CPU time measures the work. Shares = stage time / sum over stages, compared with the
plan's FLOP shares (``attention="dense"``: CPU SDPA computes the masked half of causal attention too). The
``profile`` mode instead times each layer once in one process, partitions on those measurements and predicts the
shares from them (``hfpipe.core.costs.profile_layers``).

    python benchmarks/calibrate_partition.py --repeats 7    # writes benchmarks/calibration.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=False)


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(**MODEL)


def rank_timing(stages: int, seq_len: int, micro_batch_size: int, micro_batches: int, repeats: int, parts):
    """On every rank: ``repeats`` training steps; CPU seconds of forward and backward instructions per step."""
    import deepspeed
    import torch
    from deepspeed.runtime.pipe import schedule

    from hfpipe.core.batches import micro_batches as split
    from hfpipe.pipeline import to_pipeline

    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_config())
    pipe = to_pipeline(model, num_stages=stages, partition_method=parts, seq_len=seq_len,
                       micro_batch_size=micro_batch_size)
    del model
    config = {"train_batch_size": micro_batch_size * micro_batches, "train_micro_batch_size_per_gpu": micro_batch_size,
              "gradient_accumulation_steps": micro_batches, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=torch.optim.SGD(pipe.parameters(), lr=1e-4),
                                      config=config)
    clock = {"forward": 0.0, "backward": 0.0, "forward_wall": 0.0, "backward_wall": 0.0}
    table = dict(engine._INSTRUCTION_MAP)

    def timed(fn, key):
        def run(self, *args, **kwargs):
            t, w = time.thread_time(), time.perf_counter()
            out = fn(self, *args, **kwargs)
            clock[key] += time.thread_time() - t
            clock[key + "_wall"] += time.perf_counter() - w
            return out
        return run

    table[schedule.ForwardPass] = timed(table[schedule.ForwardPass], "forward")
    table[schedule.BackwardPass] = timed(table[schedule.BackwardPass], "backward")
    engine._INSTRUCTION_MAP = table
    g = torch.Generator().manual_seed(1)
    n = micro_batch_size * micro_batches
    ids = torch.randint(1, MODEL["vocab_size"], (n, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    data = split(batch, pipe, micro_batches, 0, 1)
    steps = []
    for step in range(repeats + 1):  # the first step warms up allocators and caches
        for k in clock:
            clock[k] = 0.0
        engine.train_batch(iter(data))
        if step:
            steps.append(dict(clock))
    return {"stage": engine.stage_id, "parts": list(pipe.parts), "steps": steps}


def predicted(stages, seq_len, micro_batch_size, partition):
    """The plan's split and FLOP shares for the calibration workload."""
    from hfpipe.plan import plan

    return plan(_config(), model_class=_model_class(), stages=stages, partition=partition, seq_len=seq_len,
                micro_batch_size=micro_batch_size, dtype="fp32", attention_kernel="dense")


def _model_class():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


def profiled(stages, seq_len, micro_batch_size):
    """Stage shares and split from measured per-layer seconds (``hfpipe.core.costs.profile_layers``)."""
    import torch

    from hfpipe import partition as partition_lib
    from hfpipe.core.costs import profile_layers
    from hfpipe.core.builder import compute_parts, prepare
    from hfpipe.plan import describe_layers

    torch.set_num_threads(1)
    builder = prepare(_config(), _model_class())
    infos = builder.layers()
    seconds = profile_layers(builder, seq_len, micro_batch_size, repeats=5)
    parts = compute_parts("balanced", infos, stages, builder.adapter.num_blocks, "LlamaForCausalLM", costs=seconds)
    sums = partition_lib.stage_sums(seconds, parts)
    return {"parts": parts, "imbalance": partition_lib.imbalance(seconds, parts),
            "stage_rows": [{"share": x / sum(sums), "layers": describe_layers(infos, parts[s], parts[s + 1])}
                           for s, x in enumerate(sums)]}


def measure(stages, seq_len, micro_batch_size, micro_batches, repeats, mode="flops"):
    from hfpipe.launch import DistributedPool

    if mode == "profile":
        report = profiled(stages, seq_len, micro_batch_size)
    else:
        report = predicted(stages, seq_len, micro_batch_size, "balanced")
    parts = report["parts"]
    pool = DistributedPool(stages, timeout=1200)
    try:
        per_rank = pool.run(rank_timing, stages, seq_len, micro_batch_size, micro_batches, repeats, parts)
    finally:
        pool.close()
    per_rank.sort(key=lambda r: r["stage"])
    assert per_rank[0]["parts"] == parts, (per_rank[0]["parts"], parts)
    # per step: each stage's share of the summed stage time; then the median over steps
    shares, noise, seconds = [], [], []
    for s in range(stages):
        totals = [st["forward"] + st["backward"] for st in per_rank[s]["steps"]]
        seconds.append(statistics.median(totals))
        noise.append((max(totals) - min(totals)) / statistics.median(totals))
    for step in range(repeats):
        totals = [per_rank[s]["steps"][step]["forward"] + per_rank[s]["steps"][step]["backward"] for s in range(stages)]
        shares.append([t / sum(totals) for t in totals])
    measured = [statistics.median(sh[s] for sh in shares) for s in range(stages)]
    pred = [row["share"] for row in report["stage_rows"]]
    errors = [abs(m - p) / p for m, p in zip(measured, pred)]
    fwd_share = [statistics.median(st["forward"] / (st["forward"] + st["backward"]) for st in r["steps"])
                 for r in per_rank]
    wall = [statistics.median(st["forward_wall"] + st["backward_wall"] for st in r["steps"]) for r in per_rank]
    return {"stages": stages, "mode": mode, "parts": parts, "layers": [row["layers"] for row in report["stage_rows"]],
            "predicted_share": pred, "measured_share": measured, "rel_error": errors, "max_rel_error": max(errors),
            "stage_cpu_seconds_median": seconds, "stage_wall_seconds_median": wall,
            "step_to_step_spread": noise, "forward_fraction": fwd_share,
            "predicted_imbalance": report["imbalance"],
            "measured_imbalance": max(measured) * stages}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["flops", "profile"], choices=["flops", "profile"],
                        help="flops: the cost model's split and shares; profile: measured per-layer seconds")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration"))
    args = parser.parse_args(argv)
    results = {"model": MODEL, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size,
               "micro_batches": args.micro_batches, "repeats": args.repeats, "clock": "thread CPU time",
               "load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "runs": []}
    for mode in args.modes:
        for p in args.stages:
            t = time.time()
            run = measure(p, args.seq_len, args.micro_batch_size, args.micro_batches, args.repeats, mode)
            run["wall_seconds"] = time.time() - t
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    results["load_average_end"] = os.getloadavg()
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(render(results))
    print(render(results))


def render(results) -> str:
    m = results["model"]
    lines = [
        "# Cost-model calibration (CPU)",
        "",
        f"Model: Llama-shaped, {m['num_hidden_layers']} blocks, hidden {m['hidden_size']}, intermediate "
        f"{m['intermediate_size']}, {m['num_attention_heads']}/{m['num_key_value_heads']} heads, vocab "
        f"{m['vocab_size']}; seq {results['seq_len']}, micro-batch {results['micro_batch_size']}, "
        f"{results['micro_batches']} micro-batches, fp32, `balanced` split (half-blocks), dense attention cost.",
        f"Clock: per-rank thread CPU time of DeepSpeed's ForwardPass + BackwardPass instructions, median of "
        f"{results['repeats']} steps after one warm-up step. Machine: {results['cpu_count']} cores shared with other "
        f"jobs (load average {results['load_average'][0]:.1f} at start, {results['load_average_end'][0]:.1f} at end).",
        "",
        "`flops` = split and shares from the FLOP cost model (`hfpipe.core.costs.layer_costs`); `profile` = split and shares "
        "from each layer's forward+backward timed once in one process (`hfpipe.core.costs.profile_layers`).",
        "",
        "| mode | p | stage | layers | predicted share | measured share | rel. error | CPU s/step (median) | spread |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        for s in range(run["stages"]):
            lines.append(f"| {run['mode']} | {run['stages']} | {s} | {run['layers'][s]} | {100 * run['predicted_share'][s]:.1f}% | "
                         f"{100 * run['measured_share'][s]:.1f}% | {100 * run['rel_error'][s]:.1f}% | "
                         f"{run['stage_cpu_seconds_median'][s]:.2f} | {100 * run['step_to_step_spread'][s]:.0f}% |")
    lines.append("")
    for run in results["runs"]:
        lines.append(f"- {run['mode']}, p={run['stages']}, parts {run['parts']}: max relative share error {100 * run['max_rel_error']:.1f}%; predicted "
                     f"imbalance {run['predicted_imbalance']:.3f}, measured {run['measured_imbalance']:.3f}.")
    lines.append("- spread = (max - min) / median of a stage's CPU seconds over the measured steps (the noise).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
