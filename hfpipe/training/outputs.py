"""What a training run leaves behind besides checkpoints: the HF model folder, its Hub upload, the loss curves -- and
the optimizer's weight-decay groups, which follow HF Trainer's naming rules like the exported model does.

The exported folder is a normal HF folder (``from_pretrained`` loads it). From a checkpoint it is
``hfpipe.checkpoint.export``'s conversion; without one, every stage's live parameters are gathered on rank 0 under
their HF names and written by the same writer (``hfpipe.checkpoint.write_hf_folder``). With LoRA it is a PEFT adapter
folder (``adapter_config.json`` + ``adapter_model.safetensors`` + a model card with PEFT's metadata) of the live
adapter tensors, and with ``--merge_lora`` also ``output_dir/merged``, the base with the adapter merged in by PEFT.
Hub uploads never raise on rank 0 alone: the other ranks would wait forever in the next collective.
"""

from __future__ import annotations

import os
import re
import sys

import torch

from hfpipe.checkpoint import export, hf_weight_names, merge_adapter, write_hf_folder
from hfpipe.core.lora import is_adapter_key, save_adapter

#: HF Trainer's rule: no weight decay on biases and parameters named like norms (LayerNorm modules too).
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
#: ``datasets`` builder names of local files and generated data (no Hub dataset to name on the model card).
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "generator", "pandas")


def decay_parameter_groups(pipe, weight_decay: float) -> list[dict]:
    """HF Trainer's grouping of the trainable parameters: no weight decay on biases, LayerNorm modules and parameters
    named like norms."""
    patterns = [re.compile(p) for p in NO_DECAY_PATTERNS]
    hf_name = {id(p): n for n, p in pipe.hf_named_parameters()}
    no_decay_ids = set()
    for mod in pipe.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            no_decay_ids.update(id(p) for p in mod.parameters(recurse=False))
    decay, no_decay = [], []
    for local, p in pipe.named_parameters():
        if not p.requires_grad:  # a frozen LoRA base: never in the optimizer
            continue
        name = hf_name.get(id(p), local).lower()
        if id(p) in no_decay_ids or any(pat.search(name) for pat in patterns):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def export_model(trainer, output_dir: str, checkpoint: str | None = None) -> str:
    """``PipelineTrainer.export_model``: rank 0 writes ``output_dir`` (from ``checkpoint`` or the live weights) and
    the tokenizer; every rank returns ``output_dir`` after the write."""
    import torch.distributed as dist

    dist.barrier()
    plan = getattr(trainer.pipe.hfpipe_builder, "lora", None)
    if plan is not None:
        checkpoint = None  # the adapter from the live weights (the best checkpoint's, if loaded)
    if exports_masters(trainer):
        checkpoint = None  # the live fp32 masters: a checkpoint's layer files hold the bf16/fp16 weights
    if checkpoint is None:
        state = _gather_hf_state(trainer, only_adapter=plan is not None)
    base = getattr(trainer.pipe.config, "_name_or_path", None) or None
    merge = plan is not None and getattr(trainer.args, "merge_lora", False)
    if merge and not base:  # every rank, before anyone writes: rank 0 alone raising would leave the others waiting
        raise ValueError("--merge_lora needs the base model as a folder or Hub id (its config has no _name_or_path: "
                         "the model was built from a config). Fix: pass the model as a folder, or merge later with "
                         "hfpipe export OUT/final --merge-lora --model BASE.")
    if trainer.rank == 0:
        if checkpoint is not None:
            export(checkpoint, output_dir, overwrite=True, progress=not trainer.args.disable_tqdm)
        elif plan is not None:
            def extra(folder):  # inside the adapter folder before it appears: the card and the tokenizer
                _adapter_card(trainer, base).save(os.path.join(folder, "README.md"))
                if trainer.processing_class is not None:
                    trainer.processing_class.save_pretrained(folder)

            save_adapter(plan.config, state, output_dir, base, extra=extra)
            if merge:
                merge_adapter(output_dir, base, os.path.join(os.path.dirname(os.path.abspath(output_dir)), "merged"),
                              overwrite=True)
        else:
            _save_live(trainer.pipe, state, output_dir)
        if trainer.processing_class is not None and plan is None:
            trainer.processing_class.save_pretrained(output_dir)
    dist.barrier()
    return output_dir


def _adapter_card(trainer, base: str | None):
    """The model card of a LoRA run's adapter folder: PEFT's metadata (``library_name: peft``, ``base_model``) and
    the run's settings (``hfpipe.hub.model_card``)."""
    from hfpipe.hub import hyperparameters, model_card

    info = {"library_name": "peft", "base_model": base, "task": trainer.pipe.head.name,
            "hyperparameters": hyperparameters(trainer.ds_config, trainer.args)}
    return model_card(trainer.args.hub_model_id or os.path.basename(os.path.normpath(trainer.args.output_dir)), info)


def exports_masters(trainer) -> bool:
    """Whether the export writes the optimizer's fp32 master weights: a bf16/fp16 run with ``--export_dtype`` auto
    or fp32 (its module weights are those masters rounded to 16 bits)."""
    mixed = trainer.engine.bfloat16_enabled() or trainer.engine.fp16_enabled()
    return mixed and trainer.args.export_dtype in ("auto", "fp32")


def _gather_hf_state(trainer, only_adapter: bool = False) -> dict:
    """Every stage's parameters by HF name on rank 0 (one replica's; ``only_adapter``: the LoRA adapter's tensors,
    under PEFT's keys); ``{}`` elsewhere. A bf16/fp16 run gives the optimizer's fp32 masters
    (DeepSpeed's ``safe_get_full_fp32_param``, which every data-parallel rank of a stage calls, in the same order:
    ZeRO-1 reassembles the partitions with an all-reduce) unless ``--export_dtype`` asks for 16 bits."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from hfpipe.core.weights import parse_dtype

    masters = exports_masters(trainer)
    cast = None if trainer.args.export_dtype == "auto" else parse_dtype(trainer.args.export_dtype)
    params = {}
    for name, p in trainer.pipe.hf_named_parameters():
        if only_adapter and not is_adapter_key(name):
            continue
        t = safe_get_full_fp32_param(p) if masters and p.requires_grad else None
        if trainer.dp_rank == 0:
            if t is None:  # not in the optimizer (frozen): its own weights, in the masters' dtype
                t = p.detach().float() if masters and p.is_floating_point() else p.detach()
            t = t.cpu().clone()
            params[name] = t.to(cast) if cast is not None and t.is_floating_point() else t
    parts = [None] * trainer.world_size
    dist.all_gather_object(parts, params)
    state = {}
    for part in parts:
        state.update(part)
    return state


def _save_live(pipe, state: dict, output_dir: str) -> None:
    """The gathered ``state`` as an HF folder, through the same writer as ``hfpipe export`` (no model is built)."""
    names = hf_weight_names(pipe.adapter, state.keys(), "export of the live weights")
    write_hf_folder(pipe.adapter, lambda: {n: state[n].contiguous() for n in names}, output_dir, overwrite=True)


def push(trainer, folder: str, metrics: dict):
    """Rank 0 uploads ``folder`` with a model card (metrics, the resolved config, base model, dataset). A failed
    push is reported, not raised: the other ranks have moved on (an exception here would leave them waiting in
    the next collective) and the exported folder is intact for a later ``hfpipe push``."""
    if trainer.rank != 0:
        return None
    from hfpipe.hub import PushError, hyperparameters, push_to_hub

    hp = hyperparameters(trainer.ds_config, trainer.args)
    hp["world_size"] = trainer.world_size
    info = {"metrics": metrics, "hyperparameters": hp, "task": trainer.pipe.head.name,
            "base_model": getattr(trainer.pipe.config, "_name_or_path", None) or None}
    if getattr(trainer.pipe, "hfpipe_builder", None) is not None and trainer.pipe.hfpipe_builder.lora is not None:
        info["library_name"] = "peft"  # an adapter folder: PEFT's card metadata
    name = getattr(getattr(trainer.train_dataset, "info", None), "dataset_name", None)
    if name and name not in LOCAL_BUILDERS:
        info["dataset"] = name  # a Hub dataset; local files and generated data have a builder name only
    try:
        return push_to_hub(folder, trainer.args.hub_model_id, private=trainer.args.hub_private_repo, card_info=info)
    except PushError as exc:
        print(f"hfpipe: push to the Hub failed: {exc}", file=sys.stderr, flush=True)
        return None


def plot_curves(log_history: list[dict], path: str) -> str | None:
    """Training loss (and eval metrics) against steps, as a PNG; ``None`` when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals: dict[str, list] = {}
    for h in log_history:
        for k, v in h.items():
            if k.startswith("eval_") and not k.endswith(("runtime", "per_second")) and isinstance(v, (int, float)):
                evals.setdefault(k, []).append((h["step"], v))
    if not train and not evals:
        return None
    ncols = 1 + bool(evals)
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    if train:
        axes[0][0].plot(*zip(*train), label="train loss")
    if "eval_loss" in evals:
        axes[0][0].plot(*zip(*evals.pop("eval_loss")), "o-", label="eval loss")
    axes[0][0].set_xlabel("step")
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend()
    if evals:
        for k, pts in evals.items():
            axes[0][1].plot(*zip(*pts), "o-", label=k)
        axes[0][1].set_xlabel("step")
        axes[0][1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
