"""Optimizer states by layer, so a checkpoint written at ``p`` pipeline stages resumes at ``p'`` with them intact.

DeepSpeed keeps the optimizer states per stage (``mp_rank_XX_model_states.pt``, or ZeRO/bf16 partitions per
data-parallel rank), in the order and flattening of that stage's parameters, so they cannot be read at another stage
count. DeepSpeed's universal checkpoint (``ds_to_universal`` + ``load_universal``) converts ZeRO-1/2 and bf16
optimizer files, but not the plain torch optimizer of an fp32 ZeRO-0 run (hfpipe's CPU default) nor
``FP16_UnfusedOptimizer``'s, and it is an offline conversion of every file. Here, each save also writes what a
stage holds per parameter, keyed by the fixed global layer index and the parameter's name inside its layer::

    checkpoint-N/optimizer_layers/layer_007.pt   # {"step": 12, "params": {"mlp.up_proj.weight":
                                                 #   {"exp_avg": ..., "exp_avg_sq": ..., "fp32": ...}}}

(``fp32``: the master weight of a bf16/fp16 run; absent in fp32, where the weight is its own master). A resume at
another stage count (or world size) lets DeepSpeed load the weights and LR schedule, then puts these states into
whatever optimizer this run built: the plain torch optimizer, ``FP16_UnfusedOptimizer``'s / ``FP16_Optimizer``'s
fp32 copies, or the ZeRO-1 / ``BF16_Optimizer`` partitions through DeepSpeed's own tensor-fragment API
(``deepspeed.utils.safe_get_full_optimizer_state`` / ``safe_set_full_optimizer_state``). Saving costs about the
optimizer files' size again on disk.
"""

from __future__ import annotations

import os

import torch

FOLDER = "optimizer_layers"
#: Adam's per-parameter states (AMSGrad's max_exp_avg_sq where present)
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def layer_file(path: str, idx: int) -> str:
    return os.path.join(path, FOLDER, f"layer_{idx:03d}.pt")


def _base(opt):
    """The torch optimizer that holds the states (DeepSpeed's wrappers keep it in ``.optimizer``)."""
    return getattr(opt, "optimizer", opt)


def _masters(opt) -> dict:
    """``id(model parameter) -> (tensor the base optimizer steps, offset, numel)`` for optimizers without
    DeepSpeed's ``_hp_mapping`` (plain torch, ``FP16_UnfusedOptimizer``, ``FP16_Optimizer``)."""
    out = {}
    if hasattr(opt, "fp32_groups_flat") and hasattr(opt, "fp16_groups"):  # FP16_Optimizer: one flat fp32 per group
        for group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
            offset = 0
            for p in group:
                out[id(p)] = (flat, offset, p.numel())
                offset += p.numel()
    elif hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):  # FP16_UnfusedOptimizer: one per parameter
        for group, masters in zip(opt.fp16_groups, opt.fp32_groups):
            for p, m in zip(group, masters):
                out[id(p)] = (m, 0, m.numel())
    else:  # the torch optimizer itself (fp32, ZeRO 0): the weight is its own master
        for group in _base(opt).param_groups:
            for p in group["params"]:
                out[id(p)] = (p, 0, p.numel())
    return out


def _hp_linked(opt) -> bool:
    return bool(getattr(opt, "_hp_optimizer_states_linked", False))


def _step(opt) -> int:
    for st in _base(opt).state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def _local_params(pipe):
    """``(global layer index, name in the layer, parameter)`` for the trainable parameters of this stage; a module
    seen twice (a tied embedding at both ends of a one-stage pipeline) is listed under each index."""
    for idx, module, _ in pipe.local_layers():
        for name, p in module.named_parameters():
            if p.requires_grad:
                yield idx, name, p


def save_layer_states(engine, path: str) -> None:
    """Write this stage's optimizer states per layer into ``path/optimizer_layers`` (call on every rank: ZeRO-1 /
    bf16 partitions are gathered over the data-parallel group; the first replica writes)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if opt is None:
        return
    masters = None
    layers: dict[int, dict] = {idx: {} for idx, _, _ in engine.module.local_layers()}  # frozen layers too
    for idx, name, p in _local_params(engine.module):
        entry = {}
        if hasattr(p, "_hp_mapping"):  # ZeRO 1/2, BF16_Optimizer (collectives: same order on every replica)
            entry["fp32"] = safe_get_full_fp32_param(p).detach().cpu().clone()
            if _hp_linked(opt):
                for key in MOMENTS[:2]:
                    entry[key] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
        else:
            masters = masters if masters is not None else _masters(opt)
            if id(p) not in masters:
                continue
            m, off, n = masters[id(p)]
            st = _base(opt).state.get(m, {})
            for key in MOMENTS:
                if key in st:
                    entry[key] = st[key].detach().flatten().narrow(0, off, n).view(p.shape).cpu().clone()
            if m is not p:
                entry["fp32"] = m.detach().flatten().narrow(0, off, n).view(p.shape).cpu().clone()
        layers[idx][name] = entry
    if engine.grid.data_parallel_id != 0:
        return
    os.makedirs(os.path.join(path, FOLDER), exist_ok=True)
    step = _step(opt)
    for idx, params in layers.items():
        tmp = f"{layer_file(path, idx)}.tmp-{os.getpid()}"  # the name checkpointing.clean_output_dir removes
        torch.save({"step": step, "params": params}, tmp)
        os.replace(tmp, layer_file(path, idx))


def has_layer_states(path: str) -> bool:
    return os.path.isdir(os.path.join(path, FOLDER))


def load_layer_states(engine, path: str) -> None:
    """Put the per-layer states of ``path`` into this run's optimizer (after ``engine.load_checkpoint(path,
    load_optimizer_states=False)``); the fp32 masters of bf16/fp16 runs too. Call on every rank."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt = engine.optimizer
    base = _base(opt)
    files: dict[int, dict] = {}
    entries = []
    for idx, _, _ in engine.module.local_layers():
        if idx not in files:
            f = layer_file(path, idx)
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f} is missing: the checkpoint's optimizer states of layer {idx}; resume "
                                        "with the stage count it was written at, or from a complete checkpoint.")
            files[idx] = torch.load(f, map_location="cpu", weights_only=True)
    for idx, name, p in _local_params(engine.module):
        saved = files[idx]["params"].get(name)
        if saved is None:
            raise KeyError(f"{layer_file(path, idx)} holds no optimizer state for {name!r} (has "
                           f"{sorted(files[idx]['params'])}); the checkpoint is from another model or LoRA setting.")
        entries.append((p, saved))
    step = max((f["step"] for f in files.values()), default=0)
    # states for every tensor the base optimizer steps, as its first step() would create them
    keys = sorted({k for _, saved in entries for k in saved if k in MOMENTS}) or list(MOMENTS[:2])
    for group in base.param_groups:
        for t in group["params"]:
            st = base.state[t]
            st["step"] = torch.tensor(float(step), dtype=torch.float32)
            for key in keys:
                st[key] = torch.zeros_like(t, memory_format=torch.preserve_format)
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # link the ZeRO/bf16 fragments to the new states
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    masters = None
    with torch.no_grad():
        for p, saved in entries:
            if hasattr(p, "_hp_mapping"):
                if "fp32" in saved:
                    safe_set_full_fp32_param(p, saved["fp32"].to(p.device))
                for key in keys:
                    if key in saved:
                        safe_set_full_optimizer_state(p, saved[key].to(p.device), key)
                continue
            masters = masters if masters is not None else _masters(opt)
            m, off, n = masters[id(p)]
            if "fp32" in saved and m is not p:
                m.data.view(-1).narrow(0, off, n).copy_(saved["fp32"].reshape(-1))
            st = base.state[m]
            for key in keys:
                if key in saved:
                    st[key].view(-1).narrow(0, off, n).copy_(saved[key].reshape(-1))
    # the low-precision weights need no update: the layer files hold them, cast from these masters at save time
