"""``make bench``: run what this machine can run and (re)write ``benchmarks/RESULTS.md``.

CPU (always, unless ``--skip-cpu``): the multi-stage pipeline efficiency benchmark (fixed stage costs, then the
sleep on top of the layers' own work) and the single-stage benchmark at its small shape. GPU (when CUDA is
available): the single-stage benchmark at the Llama-3.2-1B shape. Each run leaves its JSON under
``benchmarks/results/<device>/``; RESULTS.md is rendered from every JSON found there, so a GPU session and a CPU
session each add their part without erasing the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, pipeline_efficiency, single_stage  # noqa: E402

BENCH = os.path.join(harness.REPO, "benchmarks")
RESULTS_DIR = os.path.join(BENCH, "results")


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _env_line(env: dict) -> str:
    parts = [f"device **{env['device']}**", f"CPU {env['cpu']} ({env['cpu_cores']} cores)",
             f"torch {env['torch']}", f"deepspeed {env['deepspeed']}", f"transformers {env['transformers']}",
             f"python {env['python']}", f"run {env['date']}"]
    if env.get("cuda"):
        parts.insert(1, f"CUDA {env['cuda']}")
    if env.get("load_avg_1m") is not None:
        load = f"load average (1 min) {env['load_avg_1m']}"
        if env.get("load_avg_1m_after") is not None:
            load += f" before, {env['load_avg_1m_after']} after"
        parts.append(load)
    return "; ".join(parts) + "."


def _targets_rows(pe: dict | None, gpu: dict | None, conv: dict | None = None,
                  pe_sleep: dict | None = None) -> list[dict]:
    rows = []
    if conv:
        c = conv["rows"][0]
        rows.append({"target": "`hfpipe convert` peak anonymous memory <= 1.2x the largest stage",
                     "measured": f"{c['peak_over_largest_stage']:.2f}x ({c['peak_anon_mib']} MiB of "
                                 f"{c['largest_stage_mib']} MiB; model {c['model_mib']} MiB)",
                     "met": "yes" if conv["convert_meets_target"] else "no"})
    if pe:
        t = pipeline_efficiency.check_targets(pe["rows"], pe["hfpipe_overhead"])
        w = t["worst_ratio_at_m_ge_4p"]
        by_variant = ", ".join(f"{v} {x:.3f}" for v, x in t["worst_ratio_by_variant"].items() if v != "bare-tuple")
        rows.append({"target": f"pipeline step <= {t['ratio_target']:.2f}x 1F1B ideal at m >= 4p (CPU)",
                     "measured": f"worst {by_variant}" if w else "-",
                     "met": "yes" if t["ratio_met"] else "no"})
        if t["overhead_median_ms_per_slot"] is not None:
            rows.append({"target": f"hfpipe overhead <= {t['overhead_target_ms']:.1f} ms per schedule slot (CPU)",
                         "measured": f"median {harness.ms(t['overhead_median_ms_per_slot'])} ms over the (p, m) runs "
                                     f"(largest {t['overhead_max_ms_per_slot']:.2f} ms)",
                         "met": "yes" if t["overhead_met"] else "no"})
    if pe_sleep:
        t = pipeline_efficiency.check_targets(pe_sleep["rows"], pe_sleep["hfpipe_overhead"])
        ratios = ", ".join(f"{v} {x:.3f}" for v, x in t["worst_ratio_by_variant"].items())
        text = f"worst measured/ideal at m >= 4p {ratios}"
        if t["overhead_median_ms_per_slot"] is not None:
            text += f"; hfpipe over bare median {harness.ms(t['overhead_median_ms_per_slot'])} ms per slot"
        rows.append({"target": "(diagnostic) the same with t_F/t_B slept on top of the tiny layers' own CPU work",
                     "measured": text, "met": "-"})
    if gpu:
        for key, t in gpu["targets"].items():
            fmt = (lambda v: "-" if v is None else f"{v:.3f}")  # noqa: E731
            rows.append({"target": f"GPU {key}: hfpipe >= 1.00x bare and >= 0.95x native tokens/s",
                         "measured": f"{fmt(t['vs_bare'])}x bare, {fmt(t['vs_native'])}x native",
                         "met": "yes" if t["speed_met"] else "no"})
            rows.append({"target": f"GPU {key}: hfpipe peak memory <= bare", "measured": f"{fmt(t['mem_vs_bare'])}x",
                         "met": "yes" if t["memory_met"] else "no"})
            if "chunked_mem_vs_native_amp" in t:
                rows.append({"target": f"GPU {key}: hfpipe (loss_chunk_tokens) peak memory <= 1.10x native, fp32 "
                                       "master weights on both sides",
                             "measured": f"{fmt(t['chunked_mem_vs_native_amp'])}x native-amp",
                             "met": "yes" if t["memory_vs_native_met"] else "no"})
    else:
        rows.append({"target": "GPU single stage (speed and memory vs native and bare)",
                     "measured": "not run yet: no GPU in the sessions so far", "met": "-"})
    return rows


GPU_HOWTO = """On the lent GPU machine (no registry access; DeepSpeed from the wheels in `../shared/device-wheels`,
see its README), from the repository root with `.whl` carried:

```
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \\
  && export PYTHONPATH=$PWD/.site:$PWD PATH=$PWD/.site/bin:$PATH \\
  && python3 benchmarks/run_all.py --skip-cpu --gpu-micro-batch-sizes 1 && cp benchmarks/results/cuda/* $OUT/
```

then the same with `--gpu-micro-batch-sizes 4 --merge` after copying the returned `single_stage.json` into
`benchmarks/results/cuda/` (each variant runs in its own process so that peak memory is its own; one micro-batch
size per command keeps a command under the machine's 10 minutes). Then `python benchmarks/run_all.py
--render-only` here folds it into this file. DeepSpeed's FusedAdam cannot JIT-build there; the config uses
`{"type": "AdamW", "params": {"torch_adam": true, "fused": true}}`.

The single-stage LoRA row (full fine-tuning vs LoRA r=8 vs QLoRA on the whole Llama-3.2-1B, bf16, peak
`torch.cuda.max_memory_allocated`), in the same environment:

```
python3 benchmarks/lora_memory.py --stages 1 --qlora --seq-len 1024 --out benchmarks/results/cuda-lora \\
  && cp benchmarks/results/cuda-lora/* $OUT/
```

then copy the returned `lora_memory.json` / `.md` into `benchmarks/results/cuda-lora/` and `--render-only` here."""


def message_rows(rows: list[dict]) -> list[dict]:
    """Per (p, m): step times of bare / bare-tuple / bare-packed and the extra ms per schedule slot."""
    out = []
    for p, m in sorted({(r["p"], r["m"]) for r in rows}):
        by = {r["variant"]: r["measured_s"] for r in rows if (r["p"], r["m"]) == (p, m)}
        row = {"p": p, "m": m, **by}
        for key, variant in (("tuple_ms", "bare-tuple"), ("packed_ms", "bare-packed")):
            if "bare" in by and variant in by:
                row[key] = 1e3 * (by[variant] - by["bare"]) / (m + p - 1)
        out.append(row)
    return out


def render(path: str = os.path.join(BENCH, "RESULTS.md")) -> str:
    pe = _load(os.path.join(RESULTS_DIR, "cpu", "pipeline_efficiency.json"))
    small = _load(os.path.join(RESULTS_DIR, "cpu-small", "single_stage.json"))
    gpu = _load(os.path.join(RESULTS_DIR, "cuda", "single_stage.json"))
    conv = _load(os.path.join(RESULTS_DIR, "cpu-memory", "convert_memory.json"))
    pe_sleep = _load(os.path.join(RESULTS_DIR, "cpu-sleep", "pipeline_efficiency.json"))
    lines = ["# hfpipe benchmarks", "",
             "Written by `make bench` (`python benchmarks/run_all.py`), which runs what the machine can run. Raw "
             "numbers (every step time, the per-instruction profile) are in `benchmarks/results/*/*.json`.", "",
             "## Targets", "",
             harness.markdown_table(_targets_rows(pe, gpu, conv, pe_sleep),
                                    [("target", "target", ""), ("measured", "measured", ""), ("met", "met", "")]), ""]
    lines += ["## Single stage, Llama-3.2-1B shape (GPU)", ""]
    if gpu:
        lines += [_env_line(gpu["env"]), "", f"Command: `{gpu['command']}`", "", single_stage.markdown(gpu), ""]
    else:
        lines += ["Not measured yet (no GPU was lent to the sessions so far).", "", GPU_HOWTO, ""]
    if pe:
        lines += ["## Pipeline efficiency vs the 1F1B ideal (CPU, gloo ranks)", "", _env_line(pe["env"]),
                  "The machine is shared with other jobs; sleeping layers make the schedule itself insensitive to "
                  "that, the layers' own (tiny) work and message latency are not.", "",
                  f"Command: `{pe['command']}`", "",
                  pipeline_efficiency.markdown(pe, "results/cpu/pipeline_efficiency.png"), ""]
    if pe_sleep:
        lines += ["### The same with the sleep on top of the layers' own work", "", _env_line(pe_sleep["env"]), "",
                  f"Command: `{pe_sleep['command']}`", "",
                  "Here the tiny layers' own Python-bound CPU work (about 5 ms per micro-batch and stage, on a "
                  "shared 2-core machine) adds to the slept t_F/t_B, so it shows in the step time, and so does "
                  "what hfpipe's layers cost over the hand-written ones (per-stage masks and rotary embeddings, "
                  "the attention/MLP half-blocks, HF's loss).", "",
                  pipeline_efficiency.markdown(pe_sleep, "results/cpu-sleep/pipeline_efficiency.png"), ""]
    msgs = _load(os.path.join(RESULTS_DIR, "cpu-messages", "pipeline_efficiency.json"))
    if msgs:
        lines += ["### What the int64 boundary messages cost (why hfpipe packs its boundary)", "",
                  _env_line(msgs["env"]), "", f"Command: `{msgs['command']}`", "",
                  "DeepSpeed sends every tensor of a stage's output tuple with its own blocking `send`. Until "
                  "2026-12-01 hfpipe's boundary carried two int64 tensors (attention mask, position ids) besides "
                  "the hidden states; this run priced them with the hand-written module sending them too, as two "
                  "tensors (bare-tuple) or stacked in one (bare-packed). Since then hfpipe sends one tensor: the "
                  "0/1 mask rides as an extra channel of the hidden states and each stage recomputes the positions "
                  "(`hfpipe.core.layers.pack_boundary`).", "",
                  harness.markdown_table(message_rows(msgs["rows"]), [
                      ("p", "p", ""), ("m", "m", ""), ("bare", "bare (s)", ".3f"),
                      ("bare-tuple", "bare-tuple (s)", ".3f"), ("bare-packed", "bare-packed (s)", ".3f"),
                      ("tuple_ms", "two tensors (ms/slot)", "+.2f"),
                      ("packed_ms", "one packed tensor (ms/slot)", "+.2f")]), ""]
    sched = _load(os.path.join(RESULTS_DIR, "cpu-schedules", "pipeline_efficiency.json"))
    if sched:  # written by benchmarks/pipeline_efficiency.py --schedules
        lines += ["### Schedules: 1F1B vs zero-bubble ZB-H1 and DualPipeV (`--pipeline_schedule`)", "", _env_line(sched["env"]), "",
                  f"Command: `{sched['command']}`", "", pipeline_efficiency.markdown_schedules(sched), ""]
    if small:
        lines += ["## Single stage, small shape (CPU smoke run)", "", _env_line(small["env"]), "",
                  f"Command: `{small['command']}`", "",
                  "CPU timings of a 2-layer model on a shared machine say little about GPU speed; this run checks "
                  "that every variant trains, and what the chunked cross-entropy saves in memory.", "",
                  single_stage.markdown(small), ""]
    mem = os.path.join(RESULTS_DIR, "cpu-memory", "convert_memory.md")
    if os.path.isfile(mem):  # written by benchmarks/convert_memory.py (not part of make bench: it writes ~2 GB)
        with open(mem) as f:
            body = f.read().split("\n", 1)[1].strip()
        conv = conv or {}
        lines += ["## `hfpipe convert` / `export` memory (CPU)", ""]
        if conv.get("environment"):
            lines += [_env_line(conv["environment"]), "", f"Command: `{conv['command']}`", ""]
        lines += [body, ""]
    for folder, title in (("cpu-lora", "LoRA vs full fine-tuning: peak memory per stage (CPU, 2 stages)"),
                          ("cuda-lora", "LoRA vs full fine-tuning: peak memory, one stage (GPU)")):
        lora = _load(os.path.join(RESULTS_DIR, folder, "lora_memory.json"))
        if lora:  # written by benchmarks/lora_memory.py (not part of make bench: full fine-tuning needs GBs)
            with open(os.path.join(RESULTS_DIR, folder, "lora_memory.md")) as f:
                body = f.read().split("\n", 1)[1].strip()
            lines += [f"## {title}", "", _env_line(lora["env"]), "", f"Command: `{lora['command']}`", "", body, ""]
    if gpu:
        lines += ["## Reproducing the GPU run", "", GPU_HOWTO, ""]
    text = "\n".join(lines)
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-cpu", action="store_true", help="skip the CPU benchmarks (e.g. on the GPU machine)")
    ap.add_argument("--render-only", action="store_true", help="only rewrite RESULTS.md from the saved JSON")
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run of the whole harness)")
    ap.add_argument("--gpu-micro-batch-sizes", type=int, nargs="+", default=[1, 4],
                    help="GPU single-stage micro-batch sizes; with --merge, one size per command fits the lent "
                         "machine's 10-minute limit")
    ap.add_argument("--merge", action="store_true", help="GPU: keep earlier rows of results/cuda/single_stage.json")
    args = ap.parse_args(argv)
    if not args.render_only:
        if not args.skip_cpu:
            steps, warmup = (2, 1) if args.quick else (7, 2)
            for cost, folder in (("fixed", "cpu"), ("sleep", "cpu-sleep")):
                argv_pe = ["--cost", cost, "--steps", str(steps), "--warmup", str(warmup),
                           "--out", os.path.join(RESULTS_DIR, folder)]
                if args.quick:
                    argv_pe += ["--micro-batches", "1", "4", "8"]
                pipeline_efficiency.main(argv_pe)
            # each variant in its own process: the resident-set peaks are then each variant's own
            argv_ss = ["--small", "--isolate", "--out", os.path.join(RESULTS_DIR, "cpu-small")]
            if args.quick:
                argv_ss += ["--steps", "1", "--warmup", "0", "--micro-batch-sizes", "1"]
            single_stage.main(argv_ss)
        if torch.cuda.is_available():
            single_stage.main(["--out", os.path.join(RESULTS_DIR, "cuda"), "--micro-batch-sizes",
                               *map(str, args.gpu_micro_batch_sizes)] + (["--merge"] if args.merge else []))
    text = render()
    print(f"\nwrote {os.path.join(BENCH, 'RESULTS.md')} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
