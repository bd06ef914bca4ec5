"""Size on disk of a trainer ``checkpoint-N``: full fine-tuning vs LoRA on the same model (not run in CI).

A random Llama (default ~0.2B parameters, fp32) is saved as an HF folder; ``PipelineTrainer`` runs one step at 2
CPU stages and saves ``checkpoint-1`` twice: full fine-tuning (weights + Adam states of every parameter) and LoRA
r=8 on q_proj,v_proj (adapter tensors + their Adam states only: DeepSpeed's ``exclude_frozen_parameters``; the base is
re-read from its folder on resume). The table splits each folder into DeepSpeed's layer files (weights), its
per-stage files (optimizer states), the per-layer optimizer states and the rest (manifest, RNG, trainer state).

    python benchmarks/lora_checkpoint_size.py [--layers 8] [--hidden 1024] [--vocab 32000] [--workdir /tmp/x]

Results: ``benchmarks/results/cpu-memory/lora_checkpoint_size.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

OUT_DIR = os.path.join(harness.REPO, "benchmarks", "results", "cpu-memory")


def _rank_run(base: str, out: str, lora: bool) -> dict:
    import datasets
    import torch
    import transformers

    from hfpipe import PipelineTrainer, PipelineTrainingArguments

    ids = torch.randint(1, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": ids.tolist()})
    extra = dict(lora_r=8, lora_alpha=16, lora_target_modules="q_proj,v_proj") if lora else {}
    args = PipelineTrainingArguments(output_dir=out, num_stages=2, per_device_train_batch_size=2,
                                     gradient_accumulation_steps=2, max_seq_length=16, max_steps=1, save_steps=1,
                                     report_to=[], disable_tqdm=True, plot_curves=False, export_final_model=False,
                                     logging_steps=1, **extra)
    trainer = PipelineTrainer(base, args, train_dataset=data, model_class=transformers.AutoModelForCausalLM)
    trainer.train()
    return {"trainable": sum(p.numel() for p in trainer.pipe.parameters() if p.requires_grad)}


def _sizes(folder: str) -> dict:
    """MiB of the checkpoint's parts: DeepSpeed's layer files (weights), its per-stage files (optimizer states), the
    per-layer optimizer states (``optimizer_layers/``, for resuming at another stage count) and the rest."""
    out = {"weights": 0, "optimizer": 0, "optimizer_layers": 0, "other": 0}
    for root, _, files in os.walk(folder):
        for f in files:
            n = os.path.getsize(os.path.join(root, f))
            part = os.path.relpath(root, folder).split(os.sep)[0]
            key = ("optimizer_layers" if part == "optimizer_layers" else
                   "weights" if part.startswith("global_step") and f.startswith("layer_") else
                   "optimizer" if part.startswith("global_step") else "other")
            out[key] += n
    out["total"] = sum(out.values())
    return {k: v / 2**20 for k, v in out.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--workdir", default="/tmp/hfpipe-lora-ckpt")
    args = p.parse_args(argv)

    import torch
    import transformers

    from hfpipe.launch import DistributedPool

    shutil.rmtree(args.workdir, ignore_errors=True)
    base = os.path.join(args.workdir, "base")
    config = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                                      num_key_value_heads=max(1, args.hidden // 256), vocab_size=args.vocab,
                                      max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(base)
    del model
    rows = []
    with DistributedPool(2, timeout=3600) as pool:
        for name, lora in (("full fine-tuning", False), ("LoRA r=8 q_proj,v_proj", True)):
            out = os.path.join(args.workdir, "lora" if lora else "full")
            trainable = sum(r["trainable"] for r in pool.run(_rank_run, base, out, lora))
            sizes = _sizes(os.path.join(out, "checkpoint-1"))
            rows.append({"run": name, "params": params, "trainable": trainable, **sizes})
    ratio = rows[1]["total"] / rows[0]["total"]
    for r in rows:
        r["vs_full"] = r["total"] / rows[0]["total"]
    result = {"environment": harness.environment(), "model": config.to_dict(), "rows": rows, "ratio": ratio}
    os.makedirs(OUT_DIR, exist_ok=True)
    harness.write_json(os.path.join(OUT_DIR, "lora_checkpoint_size.json"), result)
    table = harness.markdown_table(rows, [("run", "run", ""), ("trainable", "trainable params", ",d"),
                                          ("weights", "weights MiB", ".2f"), ("optimizer", "optimizer MiB", ".2f"),
                                          ("optimizer_layers", "per-layer optimizer MiB", ".2f"),
                                          ("other", "other MiB", ".2f"), ("total", "checkpoint MiB", ".2f"),
                                          ("vs_full", "vs full", ".4f")])
    md = (f"# Trainer checkpoint size: full fine-tuning vs LoRA\n\nRandom Llama, {params / 1e6:.0f}M parameters "
          f"({args.layers} blocks, hidden {args.hidden}, vocab {args.vocab}), fp32, 2 CPU stages, checkpoint-1.\n\n"
          f"{table}\n\nLoRA checkpoint / full checkpoint = {ratio:.4f} (1 : {1 / ratio:.0f}).\n")
    with open(os.path.join(OUT_DIR, "lora_checkpoint_size.md"), "w") as f:
        f.write(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
