"""Memory of ``hfpipe convert`` / ``export`` on a model large enough to see it (not run in CI).

Writes a random Llama (default ~1.2B parameters, bf16, sharded safetensors) to disk tensor by tensor, then runs
``convert`` (and ``export``) in a fresh process that samples its own anonymous RSS (``RssAnon`` in
``/proc/self/status``: memory-mapped safetensors pages are file-backed and not counted) every 2 ms. The figure is
the peak above the process's post-import baseline, compared side by side with the size of the largest pipeline stage
and of the whole model. Target: peak <= 1.2 x the largest stage.

    python benchmarks/convert_memory.py [--layers 20] [--hidden 2048] [--stages 4] [--workdir /tmp/hfpipe-convmem]

Results: ``benchmarks/results/cpu-memory/convert_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

OUT_DIR = os.path.join(harness.REPO, "benchmarks", "results", "cpu-memory")

_CHILD = r"""
import json, os, sys, threading, time
import hfpipe.checkpoint as ck

def anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

base = anon(); peak = [base]; stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
t = threading.Thread(target=sample, daemon=True); t.start()
start = time.perf_counter()
what, src, dst, stages = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if what == "convert":
    ck.convert(src, dst, num_stages=stages, partition_method="parameters", progress=False)
else:
    ck.export(src, dst, progress=False)
seconds = time.perf_counter() - start
stop.set(); t.join(); peak[0] = max(peak[0], anon())
print("RESULT " + json.dumps({"baseline": base, "peak": peak[0], "seconds": seconds}))
"""


def write_random_model(folder: str, layers: int, hidden: int, vocab: int, shard_bytes: int = 1 << 30) -> dict:
    """A random bf16 ``LlamaForCausalLM`` written tensor by tensor (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shard, shard_size, weight_map, files, total = {}, 0, {}, [], 0

    def flush():
        nonlocal shard, shard_size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_size = {}, 0

    for name, p in meta.state_dict().items():
        t = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
        shard[name] = t
        shard_size += t.numel() * 2
        total += t.numel()
        if shard_size >= shard_bytes:
            flush()
    flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, f)
    config.save_pretrained(folder)
    return {"parameters": total, "bytes": total * 2}


def _run_child(what: str, src: str, dst: str, stages: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, what, src, dst, str(stages)], capture_output=True, text=True,
                         check=True, cwd=harness.REPO)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/hfpipe-convmem")
    ap.add_argument("--keep", action="store_true", help="keep the model and checkpoint folders")
    args = ap.parse_args(argv)

    shutil.rmtree(args.workdir, ignore_errors=True)
    hf, ckpt, out = (os.path.join(args.workdir, n) for n in ("hf", "ckpt", "export"))
    t0 = time.perf_counter()
    model = write_random_model(hf, args.layers, args.hidden, args.vocab)
    print(f"wrote a random Llama: {model['parameters'] / 1e9:.2f}B parameters, {model['bytes'] / 2**30:.2f} GiB "
          f"bf16 ({time.perf_counter() - t0:.0f} s)")
    conv = _run_child("convert", hf, ckpt, args.stages)
    manifest = json.load(open(os.path.join(ckpt, "hfpipe.json")))
    tag = open(os.path.join(ckpt, "latest")).read().strip()
    layer_bytes = [os.path.getsize(os.path.join(ckpt, tag, d["file"])) if d["file"] else 0
                   for d in manifest["layers"]]
    parts = manifest["partition"]["parts"]
    stage_bytes = [sum(layer_bytes[parts[s]:parts[s + 1]]) for s in range(len(parts) - 1)]
    exp = _run_child("export", ckpt, out, args.stages)
    largest = max(stage_bytes)
    rows = []
    for name, r in (("convert", conv), ("export", exp)):
        extra = r["peak"] - r["baseline"]
        rows.append({"job": name, "seconds": round(r["seconds"], 1), "peak_anon_mib": round(extra / 2**20),
                     "largest_stage_mib": round(largest / 2**20), "model_mib": round(model["bytes"] / 2**20),
                     "peak_over_largest_stage": round(extra / largest, 3),
                     "peak_over_model": round(extra / model["bytes"], 3)})
    report = {"environment": harness.environment(), "command": harness.command_line(argv=argv),
              "model": {**model, "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab},
              "stages": args.stages, "stage_bytes": stage_bytes, "rows": rows,
              "target": "convert: peak anonymous RSS above baseline <= 1.2 x largest stage",
              "convert_meets_target": rows[0]["peak_over_largest_stage"] <= 1.2}
    os.makedirs(OUT_DIR, exist_ok=True)
    harness.write_json(os.path.join(OUT_DIR, "convert_memory.json"), report)
    table = harness.markdown_table(rows, [("job", "job", ""), ("seconds", "seconds", ".1f"),
                                          ("peak_anon_mib", "peak anon RSS (MiB)", "d"),
                                          ("largest_stage_mib", "largest stage (MiB)", "d"),
                                          ("model_mib", "model (MiB)", "d"),
                                          ("peak_over_largest_stage", "peak / largest stage", ".3f"),
                                          ("peak_over_model", "peak / model", ".3f")])
    md = (f"# convert / export memory\n\n{model['parameters'] / 1e9:.2f}B-parameter random Llama (bf16), "
          f"{args.stages} stages (`parameters` partition). Peak anonymous RSS above the post-import baseline "
          f"(memory-mapped pages not counted).\n\n{table}\n\nTarget (convert): <= 1.2 x the largest stage -- "
          f"{'met' if report['convert_meets_target'] else 'MISSED'}.\n")
    with open(os.path.join(OUT_DIR, "convert_memory.md"), "w") as f:
        f.write(md)
    print(md)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
