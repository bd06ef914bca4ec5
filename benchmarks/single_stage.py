"""One stage, no bubbles: does hfpipe train a Llama-3.2-1B-shaped model as fast and as lean as native HF and as a
hand-written DeepSpeed pipeline?

Variants, in one process, one after another on the same device (memory is released and the peak counter reset
between them):

* ``native``         HF ``LlamaForCausalLM``, pure bf16 weights, fused torch AdamW, eager (regime: bf16 weights);
* ``native-compile`` the same under ``torch.compile``;
* ``native-amp``     fp32 weights + ``torch.autocast(bf16)``, fused AdamW (regime: fp32 master weights);
* ``bare``           hand-written one-stage ``PipelineModule`` (``benchmarks.harness.bare_llama_pipeline``), DeepSpeed
  ZeRO-1 bf16 (bf16 weights, fp32 master copy, fp32 gradient accumulation);
* ``hfpipe``         ``hfpipe.to_pipeline(..., num_stages=1)`` with the same DeepSpeed config;
* ``bare-chunked-ce`` / ``native-chunked-ce``: the loss projects and takes the fp32 cross-entropy over 1024 tokens
  at a time (``harness.chunked_causal_lm_loss``), never holding full fp32 logits;
* ``hfpipe-chunked-ce``: hfpipe's own ``to_pipeline(..., loss_chunk_tokens=1024)`` (``hfpipe.core.heads.ChunkedLogits``).

Tokens/s counts every token of the global batch (micro-batch x accumulation x seq); MFU uses
``6 N + 12 L h s`` FLOPs per token (N = parameters, tied embedding once -- its head matmul is real compute, its
lookup is free) against the dense bf16 peak of the GPU (detected for H100/H200 or ``--peak-tflops``).

    python benchmarks/single_stage.py                   # GPU: the 1B shape, micro-batch 1 and 4
    python benchmarks/single_stage.py --small           # CPU smoke: a tiny shape, a few steps, seconds
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
import traceback

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import harness  # noqa: E402

#: Dense bf16 tensor-core peaks (TFLOP/s), from NVIDIA's data sheets (the sparse figure is twice this).
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
               "A100": 312.0}

FULL_SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                  max_position_embeddings=8192, rms_norm_eps=1e-5)
SMALL_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=512)
ALL_VARIANTS = ("native", "native-compile", "native-amp", "native-chunked-ce", "bare", "bare-chunked-ce", "hfpipe",
                "hfpipe-chunked-ce")


def detect_peak_tflops(name: str | None) -> float | None:
    if not name:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # most specific first
        if all(part in name for part in key.split()):
            return PEAK_TFLOPS[key]
    return None


def llama_config(small: bool):
    from transformers import LlamaConfig

    config = LlamaConfig(**(SMALL_SHAPE if small else FULL_SHAPE), pad_token_id=0)
    config._attn_implementation = "sdpa"
    return config


def flops_per_token(num_params: int, config, seq_len: int) -> float:
    """``6 N + 12 L h s`` (PaLM appendix B): matmuls forward+backward plus attention scores and values."""
    return 6.0 * num_params + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def count_params(config) -> int:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())  # tied weight counted once


# ------------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """GPU: ``max_memory_allocated`` since the start. CPU: peak resident set over a 2 ms sampler thread, minus the
    resident set at the start (approximate: the C allocator may keep freed memory)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = 0
        else:
            import psutil

            self._proc = psutil.Process()
            self.base = self._proc.memory_info().rss
            self._peak = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return (self._peak - self.base) / 2**30

    def __exit__(self, *exc):
        if self.device.type != "cuda":
            self._stop.set()
            self._thread.join()
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ensure_distributed():
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def ds_config(micro_batch_size: int, grad_accum: int, device: torch.device, dtype: str) -> dict:
    """ZeRO-1; bf16 weights with fp32 master weights and fp32 gradient accumulation; fused torch AdamW (DeepSpeed's
    own FusedAdam needs a JIT build)."""
    cfg = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum,
           "train_batch_size": micro_batch_size * grad_accum, "steps_per_print": 10**9, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": 1},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0, "torch_adam": True,
                                                     "fused": device.type == "cuda"}}}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


# ----------------------------------------------------------------------------------------------- variants
def _batches(config, micro_batch_size: int, grad_accum: int, seq_len: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (micro_batch_size * grad_accum, seq_len), generator=g)
    return ids.to(device)


def _native_step_fn(variant: str, config, device, dtype: str):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    weights_dtype = torch.float32 if variant == "native-amp" or dtype == "fp32" else torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(config).to(weights_dtype)
    model.train()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=fused, foreach=not fused)
    amp = variant == "native-amp" and dtype == "bf16"
    chunked = variant == "native-chunked-ce"
    forward = torch.compile(model) if variant == "native-compile" else model

    def loss_of(ids):
        if chunked:
            hidden = forward.model(input_ids=ids).last_hidden_state
            return harness.chunked_causal_lm_loss((hidden, model.lm_head.weight), ids)
        return forward(input_ids=ids, labels=ids).loss

    def step(micro):
        for ids in micro:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_of(ids)
            (loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    regime = "fp32 weights + autocast bf16" if amp else f"pure {'bf16' if weights_dtype == torch.bfloat16 else 'fp32'}"
    return step, (model, opt), regime


def _pipeline_step_fn(variant: str, config, device, dtype: str, micro_batch_size: int, grad_accum: int):
    import deepspeed

    _ensure_distributed()
    torch.manual_seed(0)
    if variant.startswith("bare"):
        with torch.device(device):  # initialise on the GPU, not on its host
            pipe = harness.bare_llama_pipeline(config, 1, chunked_loss=variant == "bare-chunked-ce")

        def to_data(micro):
            return [(ids, ids) for ids in micro]
    else:
        from transformers import LlamaForCausalLM

        from hfpipe import to_pipeline
        from hfpipe.core.batches import micro_batches

        pipe = to_pipeline(config, model_class=LlamaForCausalLM, num_stages=1,
                           loss_chunk_tokens=1024 if variant == "hfpipe-chunked-ce" else None)

        def to_data(micro):
            ids = torch.cat(micro)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            return micro_batches(batch, pipe, len(micro))
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=[p for p in pipe.parameters() if p.requires_grad],
                                      config=ds_config(micro_batch_size, grad_accum, device, dtype))
    cache = {}

    def step(micro):
        key = id(micro)
        if key not in cache:
            cache.clear()
            cache[key] = to_data(micro)
        return engine.train_batch(iter(cache[key]))

    regime = "ZeRO-1 bf16 (fp32 master + fp32 grad accum)" if dtype == "bf16" else "ZeRO-1 fp32"
    return step, (engine, pipe), regime


def run_variant(variant: str, config, device, dtype: str, micro_batch_size: int, grad_accum: int, seq_len: int,
                steps: int, warmup: int) -> dict:
    ids = _batches(config, micro_batch_size, grad_accum, seq_len, device)
    micro = list(ids.split(micro_batch_size))
    with PeakMemory(device) as mem:
        if variant.startswith("native"):
            step, keep, regime = _native_step_fn(variant, config, device, dtype)
        else:
            step, keep, regime = _pipeline_step_fn(variant, config, device, dtype, micro_batch_size, grad_accum)
        times, loss = [], None
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            loss = step(micro)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        peak = mem.peak_gb()
    engine = keep[0]
    if hasattr(engine, "destroy"):
        engine.destroy()
    del keep, step, engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step_s = harness.median(times)
    return {"variant": variant, "regime": regime, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum,
            "seq_len": seq_len, "step_s": step_s, "tokens_per_s": micro_batch_size * grad_accum * seq_len / step_s,
            "peak_gb": peak, "final_loss": float(loss), "step_times_s": times}


def _run_isolated(variant: str, mbs: int, small: bool, grad_accum: int, seq_len: int, steps: int, warmup: int,
                  dtype: str) -> dict:
    """One variant in a fresh process, so that nothing an earlier variant left on the GPU (allocator cache,
    DeepSpeed's global state) counts in its peak memory."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--one-row", path, "--variants", variant,
               "--micro-batch-sizes", str(mbs), "--grad-accum", str(grad_accum), "--seq-len", str(seq_len),
               "--steps", str(steps), "--warmup", str(warmup), "--dtype", dtype] + (["--small"] if small else [])
        # a fresh single-process group: drop what a launcher or an earlier group in this process put in the env
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"variant {variant} (micro-batch {mbs}) exited with {proc.returncode}: "
                               f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}\n"
                               f"{proc.stderr[-3000:]}")
        with open(path) as f:
            return json.load(f)


def finalize(rows: list[dict], fpt: float, peak_tflops: float | None) -> list[dict]:
    """MFU and the ratios within one run (x native, x bare, memory x bare)."""
    for r in rows:
        if "error" not in r:
            r["mfu"] = r["tokens_per_s"] * fpt / (peak_tflops * 1e12) if peak_tflops else None
    for mbs in sorted({r["micro_batch_size"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["micro_batch_size"] == mbs and "error" not in r}
        for r in by.values():
            for ref in ("native", "bare"):
                if ref in by:
                    r[f"vs_{ref}"] = r["tokens_per_s"] / by[ref]["tokens_per_s"]
                    r[f"mem_vs_{ref}"] = r["peak_gb"] / by[ref]["peak_gb"] if by[ref]["peak_gb"] > 0 else None
    order = {v: i for i, v in enumerate(ALL_VARIANTS)}
    return sorted(rows, key=lambda r: (r["micro_batch_size"], order.get(r["variant"], 99)))


def run(small: bool = False, variants=None, micro_batch_sizes=(1, 4), grad_accum: int = 4, seq_len: int | None = None,
        steps: int | None = None, warmup: int | None = None, dtype: str = "bf16", peak_tflops: float | None = None,
        isolate: bool | None = None, previous: dict | None = None, log=print) -> dict:
    """``isolate``: each variant in its own process (default on GPU). ``previous``: an earlier result of the same
    settings whose rows are kept for the (variant, micro-batch) pairs this run does not measure."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = llama_config(small)
    seq_len = seq_len or (256 if small else 2048)
    steps = steps or (3 if small else 10)
    warmup = warmup if warmup is not None else (1 if small else 3)
    if variants is None:
        variants = [v for v in ALL_VARIANTS if device.type == "cuda" or v != "native-compile"]
    env = harness.environment()
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = detect_peak_tflops(env["device"])
    if isolate is None:
        isolate = device.type == "cuda"
    n = count_params(config)
    fpt = flops_per_token(n, config, seq_len)
    rows = []
    for mbs in micro_batch_sizes:
        for variant in variants:
            try:
                if isolate:
                    row = _run_isolated(variant, mbs, small, grad_accum, seq_len, steps, warmup, dtype)
                else:
                    row = run_variant(variant, config, device, dtype, mbs, grad_accum, seq_len, steps, warmup)
            except Exception as e:  # e.g. out of memory at micro-batch 4: report it, keep going
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row = {"variant": variant, "micro_batch_size": mbs, "grad_accum": grad_accum, "seq_len": seq_len,
                       "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                       "traceback": traceback.format_exc()[-2000:]}
                log(f"mbs={mbs} {variant}: FAILED {row['error']}")
                rows.append(row)
                continue
            rows.append(row)
            log(f"mbs={mbs} {variant:<17} {row['tokens_per_s']:>10.1f} tok/s  peak {row['peak_gb']:.2f} GB  "
                f"loss {row['final_loss']:.4f}  ({row['regime']})")
    if previous:
        done = {(r["variant"], r["micro_batch_size"]) for r in rows}
        rows += [r for r in previous.get("rows", []) if (r["variant"], r["micro_batch_size"]) not in done]
    rows = finalize(rows, fpt, peak_tflops)
    return {"benchmark": "single_stage", "env": env, "command": harness.command_line(),
            "settings": {"small": small, "shape": SMALL_SHAPE if small else FULL_SHAPE, "num_params": n,
                         "flops_per_token": fpt, "seq_len": seq_len, "grad_accum": grad_accum, "steps": steps,
                         "warmup": warmup, "dtype": dtype, "peak_tflops": peak_tflops, "device": device.type},
            "rows": rows, "targets": check_targets(rows)}


def check_targets(rows) -> dict:
    """hfpipe >= 1.00x bare and >= 0.95x native tokens/s; memory <= bare (same DeepSpeed config); hfpipe with its
    chunked loss <= 1.10x native in the same precision regime (fp32 master weights: ``native-amp``)."""
    out = {}
    for r in rows:
        if r.get("variant") == "hfpipe" and "error" not in r:
            mbs = r["micro_batch_size"]
            by = {x["variant"]: x for x in rows if x["micro_batch_size"] == mbs and "error" not in x}
            chunked, amp = by.get("hfpipe-chunked-ce"), by.get("native-amp")
            mem_native = (chunked["peak_gb"] / amp["peak_gb"] if chunked and amp and amp["peak_gb"] > 0 else None)
            out[f"mbs{mbs}"] = {
                "vs_bare": r.get("vs_bare"), "vs_native": r.get("vs_native"), "mem_vs_bare": r.get("mem_vs_bare"),
                "speed_met": (r.get("vs_bare") or 0) >= 1.0 and (r.get("vs_native") or 0) >= 0.95,
                "memory_met": r.get("mem_vs_bare") is not None and r["mem_vs_bare"] <= 1.0,
                "chunked_mem_vs_native_amp": mem_native,
                "memory_vs_native_met": mem_native is not None and mem_native <= 1.10}
    return out


def markdown(results: dict) -> str:
    s = results["settings"]
    shape = s["shape"]
    mem = "peak GPU memory (GB)" if s["device"] == "cuda" else "peak RSS delta (GB, approx.)"
    lines = [
        f"Shape: hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, {shape['num_attention_heads']} "
        f"heads / {shape['num_key_value_heads']} KV, intermediate {shape['intermediate_size']}, vocab "
        f"{shape['vocab_size']} (tied), {s['num_params'] / 1e6:.1f} M parameters; seq {s['seq_len']}, "
        f"{s['grad_accum']} micro-batches per step, {s['dtype']}, SDPA; median of {s['steps']} steps after "
        f"{s['warmup']} warm-up; {s['flops_per_token'] / 1e9:.2f} GFLOP/token"
        + (f"; MFU against {s['peak_tflops']:.0f} TFLOP/s." if s["peak_tflops"] else "; no MFU (no GPU peak)."),
        "",
        harness.markdown_table(results["rows"], [
            ("micro_batch_size", "mbs", ""), ("variant", "variant", ""), ("regime", "precision regime", ""),
            ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".1%"), ("peak_gb", mem, ".2f"),
            ("vs_native", "x native", ".3f"), ("vs_bare", "x bare", ".3f"), ("mem_vs_bare", "mem x bare", ".2f"),
            ("final_loss", "loss", ".3f"), ("error", "error", "")]),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shape, few steps (CPU smoke test)")
    ap.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=None)
    ap.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; detected for H100/H200")
    ap.add_argument("--out", default=None, help="folder for single_stage.{json,md}")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each variant in its own process (default: on GPU)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an earlier single_stage.json in --out for pairs not measured now "
                         "(split a long GPU run over several commands)")
    ap.add_argument("--one-row", default=None, help=argparse.SUPPRESS)  # internal: one variant, row -> JSON file
    args = ap.parse_args(argv)
    if args.one_row:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        config = llama_config(args.small)
        row = run_variant(args.variants[0], config, device, args.dtype, args.micro_batch_sizes[0], args.grad_accum,
                          args.seq_len, args.steps, args.warmup)
        harness.write_json(args.one_row, row)
        return 0
    device_name = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or os.path.join(harness.REPO, "benchmarks", "results", "cpu-small" if args.small else device_name)
    previous = None
    if args.merge and os.path.exists(os.path.join(out, "single_stage.json")):
        import json

        with open(os.path.join(out, "single_stage.json")) as f:
            previous = json.load(f)
    results = run(args.small, args.variants, args.micro_batch_sizes, args.grad_accum, args.seq_len, args.steps,
                  args.warmup, args.dtype, args.peak_tflops, args.isolate, previous)
    results["command"] = harness.command_line(__file__, argv)
    if previous:
        results["command"] = f"{previous.get('command', '')}; {results['command']}"
    os.makedirs(out, exist_ok=True)
    harness.write_json(os.path.join(out, "single_stage.json"), results)
    with open(os.path.join(out, "single_stage.md"), "w") as f:
        f.write(markdown(results) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
