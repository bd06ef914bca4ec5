"""Peak memory per pipeline stage: full fine-tuning vs LoRA (and QLoRA) on a Llama-3.2-1B-shaped model.

    python benchmarks/lora_memory.py                      # 2 CPU stages (gloo ranks), full vs LoRA r=8
    python benchmarks/lora_memory.py --layers 4           # the 1B shape with fewer blocks (a busy / small machine)
    python benchmarks/lora_memory.py --stages 1 --qlora   # one stage; on a GPU: torch.cuda.max_memory_allocated

The model is built from the Llama-3.2-1B config with random weights (no download; every rank builds only its own
stage, ``to_pipeline(config)``), trained a few steps with AdamW through ``hfpipe.initialize``. Each mode runs in a
fresh set of rank processes (``hfpipe.launch.DistributedPool``), and each rank samples its own anonymous resident
memory (``RssAnon``: the tensors, not the libraries) every 2 ms from before the model is built to after the last
step: the peak above that baseline is the stage's memory. On a GPU the ranks report
``torch.cuda.max_memory_allocated`` instead. Next to each measurement: what ``hfpipe plan`` predicts for the same run
(weights, gradients, optimizer states, activations), and the ratio full / LoRA side by side. Writes
``<out>/lora_memory.json`` and ``<out>/lora_memory.md`` (``benchmarks/run_all.py --render-only`` folds the Markdown
into RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

#: meta-llama/Llama-3.2-1B's config.json (the fields that shape memory), so no download is needed
LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                   tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
                   architectures=["LlamaForCausalLM"])
MIB = 1 << 20


def _anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """The peak of this process's anonymous RSS above its value at start, sampled every 2 ms in a thread."""

    def __init__(self):
        self.base = _anon_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _anon_bytes())
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_bytes())
        return self.peak - self.base


def ds_config(micro_batch_size: int, micro_batches: int, bf16: bool) -> dict:
    return {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": micro_batches,
            "train_batch_size": micro_batch_size * micro_batches, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
            "bf16": {"enabled": bf16}}


def rank_run(config_dict: dict, mode: str, stages: int, steps: int, seq_len: int, micro_batch_size: int,
             micro_batches: int, lora_r: int) -> dict:
    """One rank: build its stage for ``mode`` (full | lora | qlora), train ``steps`` steps, report its memory."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hfpipe import initialize, micro_batches as split, to_pipeline
    from hfpipe.core.batches import make_batch
    from hfpipe.core.lora import trainable_count

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler = PeakSampler()
    config = LlamaConfig(**config_dict)
    lora = None if mode == "full" else LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear",
                                                   task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    pipe = to_pipeline(config, model_class=AutoModelForCausalLM, num_stages=stages, partition_method="parameters",
                       peft_config=lora, load_in_4bit=mode == "qlora")
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in pipe.parameters())
    trainable = trainable_count(pipe)
    engine, *_ = initialize(pipe, ds_config(micro_batch_size, micro_batches, bf16=cuda))
    batch = make_batch(config, "causal-lm", batch_size=micro_batch_size * micro_batches, seq_len=seq_len)
    times, losses = [], []
    for _ in range(steps):
        data = split(batch, pipe, micro_batches)
        t0 = time.perf_counter()
        losses.append(float(engine.train_batch(iter(data))))
        times.append(time.perf_counter() - t0)
    peak = sampler.stop()
    row = {"mode": mode, "stage": engine.stage_id, "params": params, "trainable": trainable,
           "peak_mib": round(peak / MIB, 1), "build_s": round(build_s, 2), "step_s": [round(t, 3) for t in times],
           "loss": losses[-1]}
    if cuda:
        row["peak_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
        row["memory"] = "torch.cuda.max_memory_allocated"
    else:
        row["memory"] = "RssAnon peak above the rank's baseline"
    return row


def predicted(config_dict: dict, mode: str, stages: int, seq_len: int, micro_batch_size: int, micro_batches: int,
              lora_r: int, dtype: str) -> list[float]:
    """``hfpipe plan``'s total per stage (MiB) for the same run."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hfpipe.plan import plan

    report = plan(LlamaConfig(**config_dict), model_class=AutoModelForCausalLM, stages=stages,
                  partition="parameters", seq_len=seq_len, micro_batch_size=micro_batch_size,
                  micro_batches=micro_batches, dtype=dtype, attention_kernel="dense",
                  lora_r=None if mode == "full" else lora_r,
                  lora_target_modules=None if mode == "full" else "all-linear", load_in_4bit=mode == "qlora")
    return [round(r["memory_gib"]["total"] * 1024, 1) for r in report["stage_rows"]]


def markdown(result: dict) -> str:
    rows = []
    by_mode = {m: sorted(result["runs"][m], key=lambda r: r["stage"]) for m in result["runs"]}
    full = by_mode.get("full")
    for mode, runs in by_mode.items():
        for r in runs:
            row = {"mode": mode, "stage": r["stage"], "params": f"{r['params'] / 1e6:.1f} M",
                   "trainable": f"{r['trainable'] / 1e6:.2f} M", "peak": f"{r['peak_mib']:.0f}",
                   "plan": f"{result['predicted'][mode][r['stage']]:.0f}",
                   "step": f"{sorted(r['step_s'])[len(r['step_s']) // 2]:.2f}"}
            if full and mode != "full":
                f = full[r["stage"]]
                row["ratio"] = f"{f['peak_mib'] / r['peak_mib']:.2f}x"
            else:
                row["ratio"] = "1.00x" if mode == "full" else "-"
            rows.append(row)
    table = harness.markdown_table(rows, [("mode", "mode", ""), ("stage", "stage", ""), ("params", "params", ""),
                                          ("trainable", "trainable", ""), ("peak", "peak MiB (measured)", ""),
                                          ("plan", "`hfpipe plan` MiB", ""), ("ratio", "full / this (measured)", ""),
                                          ("step", "median step s", "")])
    c = result["config"]
    lines = ["# LoRA vs full fine-tuning: peak memory per stage", "",
             f"Llama-3.2-1B shape (hidden {c['hidden_size']}, {c['num_hidden_layers']} blocks, vocab "
             f"{c['vocab_size']}, tied embeddings), random init, {result['stages']} stage(s), {result['steps']} AdamW "
             f"steps, {result['micro_batches']} micro-batches of {result['micro_batch_size']} x {result['seq_len']} "
             f"tokens, {result['dtype']}; LoRA r={result['lora_r']} alpha={2 * result['lora_r']} on all-linear. "
             f"Memory: {result['memory']}."]
    if (c["num_hidden_layers"], c["vocab_size"]) != (LLAMA_32_1B["num_hidden_layers"], LLAMA_32_1B["vocab_size"]):
        lines[-1] += (" Fewer blocks / a smaller vocabulary than the 1B model: its full fine-tuning at 2 fp32 stages "
                      "needs ~24 GB of host memory (`hfpipe plan` below), more than the machine had.")
    lines += ["", table, ""]
    for mode, ratio in result["ratio_by_stage"].items():
        lines.append(f"Measured full fine-tuning / {mode} peak memory per stage: "
                     + ", ".join(f"stage {s} {x:.2f}x" for s, x in enumerate(ratio)) + ".")
    whole = result.get("predicted_llama_32_1b") or {}
    if whole:
        lines += ["", "`hfpipe plan` for the whole Llama-3.2-1B (16 blocks, vocab 128256) in the same run, MiB per "
                  "stage: " + "; ".join(f"{mode} " + " / ".join(f"{v:.0f}" for v in per) for mode, per in whole.items())
                  + (f" (full / lora {whole['full'][0] / whole['lora'][0]:.2f}x on stage 0)"
                     if "full" in whole and "lora" in whole else "") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: the 1B model's 16)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the 1B model's 128256); full "
                    "fine-tuning of the whole 1B model at 2 fp32 stages needs ~24 GB of host memory")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora", "qlora"])
    ap.add_argument("--qlora", action="store_true", help="also the 4-bit base (QLoRA)")
    ap.add_argument("--out", default=os.path.join(harness.REPO, "benchmarks", "results", "cpu-lora"))
    args = ap.parse_args(argv)
    import torch

    from hfpipe.launch import DistributedPool

    config = dict(LLAMA_32_1B)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    if args.vocab:
        config["vocab_size"] = args.vocab
    modes = list(dict.fromkeys(args.modes + (["qlora"] if args.qlora else [])))
    cuda = torch.cuda.is_available()
    dtype = "bf16" if cuda else "fp32"
    runs, preds = {}, {}
    for mode in modes:
        print(f"lora_memory: {mode} at {args.stages} stage(s) ...", flush=True)
        pool = DistributedPool(args.stages, timeout=3000)  # fresh ranks: each mode's peak is its own
        try:
            runs[mode] = pool.run(rank_run, config, mode, args.stages, args.steps, args.seq_len,
                                  args.micro_batch_size, args.micro_batches, args.lora_r)
        finally:
            pool.close()
        preds[mode] = predicted(config, mode, args.stages, args.seq_len, args.micro_batch_size, args.micro_batches,
                                args.lora_r, dtype)
    # what hfpipe plan says for the whole Llama-3.2-1B (config only), whatever was measured
    whole = {mode: predicted(LLAMA_32_1B, mode, args.stages, args.seq_len, args.micro_batch_size,
                             args.micro_batches, args.lora_r, dtype) for mode in modes}
    ratio = {}
    if "full" in runs:
        full = {r["stage"]: r["peak_mib"] for r in runs["full"]}
        for mode in runs:
            if mode != "full":
                ratio[mode] = [round(full[r["stage"]] / r["peak_mib"], 3)
                               for r in sorted(runs[mode], key=lambda r: r["stage"])]
    result = {"config": config, "stages": args.stages, "steps": args.steps, "seq_len": args.seq_len,
              "micro_batch_size": args.micro_batch_size, "micro_batches": args.micro_batches, "lora_r": args.lora_r,
              "dtype": dtype, "memory": runs[modes[0]][0]["memory"], "runs": runs, "predicted": preds,
              "ratio_by_stage": ratio, "predicted_llama_32_1b": whole, "env": harness.environment(),
              "command": "python benchmarks/lora_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lora_memory.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = markdown(result)
    with open(os.path.join(args.out, "lora_memory.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
