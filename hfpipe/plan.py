"""``hfpipe plan``: how a model would be split into pipeline stages, and what each stage costs, before any GPU is
touched.

Everything is read off the config: the model is built on the meta device (no weights, so an 8B config plans in
about a second), its fixed layer list comes from ``hfpipe.pipeline.prepare``, each layer's work and memory from
``hfpipe.core.costs``, and the stage boundaries from the same ``compute_parts`` that ``to_pipeline`` uses -- so the plan
shows exactly the split training will run with. The predicted pipeline efficiency is the 1F1B bubble times the
imbalance: ``m / (m + p - 1) x mean / max`` stage cost; with ``schedule="zb-h1"`` the bubble is ZB-H1's
(``hfpipe.schedules.predict``: the backward split into equal input- and weight-gradient halves) and each stage's
activations are those of the micro-batches ZB-H1 holds at once there. With ``schedule="dualpipev"`` the model is cut
into ``2 x stages`` chunks exactly as ``to_pipeline(schedule="dualpipev")`` cuts it, each rank's row sums its two
chunks (rank 0: the first and the last), the bubble is DualPipeV's simulated step and the activations those of the
``p + 1/2`` micro-batches (in whole-stage units) each rank holds at its peak.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from hfpipe.core import costs as costs_lib
from hfpipe.core import lora as lora_lib
from hfpipe.core import quantize as quantize_lib
from hfpipe.core import partition as partition_lib
from hfpipe.core.builder import compute_parts, prepare
from hfpipe.core.layers import LayerKind
from hfpipe.core.weights import CheckpointError, transformers_class

METHODS = ("balanced", "balanced:blocks", "parameters", "uniform")
GIB = 1024.0 ** 3


def load_config(path: str):
    """``(config, model class)`` from a folder holding config.json, or a config.json file (no weights needed)."""
    import transformers
    from transformers import AutoConfig

    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} has no config.json; hfpipe plan takes a model folder or a config.json.")
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; hfpipe plan takes a model folder or a config.json file.")
    config = AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    try:
        cls = transformers_class(archs[0] if archs else None, f"{path} config.json")
    except CheckpointError:  # no architectures (or an unknown one): plan the (seq2seq) LM of this config
        auto = (transformers.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False)
                else transformers.AutoModelForCausalLM)
        cls = auto._model_mapping[type(config)]
    return config, cls


def describe_layers(infos, start: int, stop: int) -> str:
    """``"embed, B0-B7, B8.attn"``: what a stage owns, with half-blocks marked."""
    items: list[str] = []
    run: list[int] = []  # whole blocks in a row

    def flush():
        if run:
            items.append(f"B{run[0]}" if len(run) == 1 else f"B{run[0]}-B{run[-1]}")
            run.clear()

    i = start
    while i < stop:
        info = infos[i]
        if info.kind is LayerKind.BLOCK:
            halves = infos[i:min(i + 2, stop)]
            if len(halves) == 2 and halves[1].block == info.block and not halves[1].layer.starts_block:
                run.append(info.block)  # both halves of a block: shown as the block
                i += 2
                continue
            if info.layer.owned_children is None:
                run.append(info.block)
            else:
                flush()
                items.append(f"B{info.block}.{info.layer.plan_label}")
        elif info.layer.plan_label is not None:  # a prelude (plan_label None) is shown with its block
            flush()
            if not items or items[-1] != info.layer.plan_label:
                items.append(info.layer.plan_label)
        i += 1
    flush()
    return ", ".join(items)


def plan(model, *, stages: int, partition="balanced", seq_len: int = 4096, micro_batch_size: int = 1,
         micro_batches: int | None = None, dp: int = 1, zero_stage: int = 0, dtype: str = "bf16",
         activation_checkpointing: bool = False, memory_cap_gib: float | None = None,
         attention_kernel: str = "flash", model_class=None, loss_chunk_tokens: int | None = None,
         lora_r: int | None = None, lora_target_modules=None, load_in_4bit: bool = False, target_len: int | None = None,
         schedule: str = "1f1b") -> dict:
    """The stage split of ``model`` (an HF model, a config + ``model_class``, or a config folder / config.json) and
    each stage's layers, parameters, FLOPs, share of work and memory. ``micro_batches`` defaults to ``4 x stages``;
    ``loss_chunk_tokens`` as in ``to_pipeline`` (the head keeps no logits and runs again in backward). ``lora_r``:
    plan LoRA training at that rank on ``lora_target_modules`` (names or ``"all-linear"``; ``None``: PEFT's default
    for the family) -- the frozen base holds weights only, the adapters train; ``load_in_4bit`` (with ``lora_r``):
    the linear weights ``to_pipeline(load_in_4bit=True)`` quantises hold 4 bits each plus their statistics
    (``hfpipe.core.quantize.bytes_per_param``: QLoRA's nf4 with double quantisation). ``target_len``: encoder-decoders'
    decoder tokens per example (``seq_len`` is then the source length; default: ``seq_len``)."""
    if isinstance(model, (str, os.PathLike)):
        model, model_class = load_config(str(model))
    if stages < 1:
        raise ValueError(f"stages={stages}; expected a positive integer.")
    m = micro_batches or 4 * stages
    from hfpipe.schedules import predict

    # the schedule's bubble (t_B = 2 t_F) and micro-batches held per stage; rule errors before any work
    sched = predict(schedule, stages, m, 1.0, 2.0)
    builder = prepare(model, model_class, device="meta")
    builder.lora = lora_lib.plan(builder.adapter.meta_model, _lora_config(lora_r, lora_target_modules, builder))
    if load_in_4bit:
        builder.quantization = quantize_lib.plan(builder.adapter.meta_model, quantize_lib.qlora_config(), builder.lora)
    builder.chunk_loss(loss_chunk_tokens)
    infos = builder.layers()
    workload = costs_lib.Workload(seq_len=seq_len, micro_batch_size=micro_batch_size, dtype=dtype,
                                  activation_checkpointing=activation_checkpointing,
                                  attention_kernel=attention_kernel, target_len=target_len)
    layer_costs = costs_lib.layer_costs(builder, workload)
    flops = [c.flops for c in layer_costs]
    mem_kwargs = dict(micro_batches=m, dtype=dtype, dp=dp, zero_stage=zero_stage,
                      activation_checkpointing=activation_checkpointing)

    def memory(stage, start, stop):
        return costs_lib.stage_memory(layer_costs, start, stop, stage, stages, **mem_kwargs)["total"]

    name = builder.adapter.model_class.__name__
    v_shape = sched["schedule"] == "dualpipev" and stages > 1  # 2p chunks, rank r holds chunks r and 2p-1-r
    if v_shape:
        if 2 * stages > builder.adapter.num_blocks:
            raise ValueError(f"schedule='dualpipev' cuts the model into 2 x stages = {2 * stages} chunks, but this "
                             f"{name} has {builder.adapter.num_blocks} transformer blocks; use stages <= "
                             f"{builder.adapter.num_blocks // 2} or schedule 'zb-h1'.")
        if memory_cap_gib is not None:
            raise ValueError("memory_cap_gib with schedule='dualpipev': the capped split is per contiguous stage; "
                             "plan without --memory-cap-gib, or with schedule 'zb-h1' / '1f1b'.")
        parts = compute_parts(partition, infos, 2 * stages, builder.adapter.num_blocks, name, costs=flops)
    elif memory_cap_gib is not None and isinstance(partition, str) and partition.startswith("balanced"):
        cut_allowed = [i.cut_allowed and (partition == "balanced" or i.layer.starts_block) for i in infos]
        if stages > builder.adapter.num_blocks:
            compute_parts(partition, infos, stages, builder.adapter.num_blocks, name, costs=flops)  # its error
        parts = partition_lib.balanced(flops, stages, cut_allowed, memory=memory, memory_cap=memory_cap_gib * GIB)
    else:
        parts = compute_parts(partition, infos, stages, builder.adapter.num_blocks, name, costs=flops)
    # the layer ranges of each rank: one stage, or DualPipeV's two chunks
    ranges = [[(parts[s], parts[s + 1]), (parts[2 * stages - 1 - s], parts[2 * stages - s])] if v_shape
              else [(parts[s], parts[s + 1])] for s in range(stages)]
    sums = [sum(sum(flops[a:b]) for a, b in rr) for rr in ranges]
    total = sum(sums)
    mean = total / stages
    rows = []
    for s in range(stages):
        start, stop = ranges[s][0]
        chunk_mems = [costs_lib.stage_memory(layer_costs, a, b, s, stages, **mem_kwargs) for a, b in ranges[s]]
        mem = {k: sum(c[k] for c in chunk_mems) for k in chunk_mems[0]}
        base = costs_lib.in_flight(s, stages, m)
        held = sched["peak_in_flight"][s]
        if held != base:  # activations scale with the micro-batches a stage holds at once
            extra = mem["activations"] * (held / base - 1)
            mem = {**mem, "activations": mem["activations"] + extra, "total": mem["total"] + extra}
        mine = [c for a, b in ranges[s] for c in layer_costs[a:b]]
        rows.append({"stage": s, "first_layer": start, "last_layer": stop - 1,
                     "layers": " + ".join(describe_layers(infos, a, b) for a, b in ranges[s]),
                     "chunks": [[a, b - 1] for a, b in ranges[s]],
                     "params": sum(c.params for c in mine),
                     "trainable_params": sum(c.trainable_params for c in mine), "flops": sums[s],
                     "quantized_params": sum(c.quantized for c in mine),
                     "share": sums[s] / total if total else 0.0, "in_flight": held,
                     "memory_gib": {k: v / GIB for k, v in mem.items()}})
    imbalance = max(sums) / mean if mean else 1.0
    bubble = m * 3.0 / sched["step_time"]  # = m / (m + p - 1) for 1F1B
    return {
        "model": name, "model_type": builder.adapter.config.model_type, "stages": stages,
        "partition": partition if isinstance(partition, str) else list(partition), "parts": parts,
        "half_blocks": builder.half_blocks, "num_layers": len(infos), "num_blocks": builder.adapter.num_blocks,
        "seq_len": seq_len, "target_len": target_len, "micro_batch_size": micro_batch_size, "micro_batches": m, "dp": dp,
        "zero_stage": zero_stage, "dtype": dtype, "activation_checkpointing": activation_checkpointing,
        "attention_kernel": attention_kernel, "memory_cap_gib": memory_cap_gib, "loss_chunk_tokens": loss_chunk_tokens,
        "lora_r": lora_r, "lora_target_modules": _targets(builder.lora), "load_in_4bit": load_in_4bit,
        "total_flops": total, "imbalance": imbalance, "bubble_efficiency": bubble,
        "efficiency": bubble / imbalance, "stage_rows": rows, "schedule": sched["schedule"],
    }


def _lora_config(r, target_modules, builder):
    """The ``peft.LoraConfig`` plan's LoRA arguments ask for (``None``: full fine-tuning), task type from the head."""
    if r is None:
        if target_modules is not None:
            raise lora_lib.LoraConfigError(f"lora_target_modules={target_modules!r} is set but lora_r is not. Fix: "
                                           "add --lora-r R (e.g. 8).")
        return None
    if r < 1:
        raise lora_lib.LoraConfigError(f"lora_r={r}: expected the LoRA rank, a positive integer. Fix: e.g. --lora-r 8.")
    from peft import LoraConfig

    try:
        return LoraConfig(r=r, target_modules=lora_lib.module_names(target_modules),
                          task_type=builder.head.peft_task_type)
    except ValueError as exc:
        raise lora_lib.LoraConfigError(f"lora_r={r}, lora_target_modules={target_modules!r} give no valid "
                                       f"peft.LoraConfig: {exc}") from None


def _targets(lora) -> list[str] | None:
    """The target modules PEFT resolved (a regex stays one string)."""
    if lora is None:
        return None
    targets = lora.config.target_modules
    return [targets] if isinstance(targets, str) else sorted(targets)


def compare(model, *, stages: int, methods: Sequence[str] = METHODS, **kwargs) -> list[dict]:
    """:func:`plan` for each of ``methods`` (methods that do not apply, e.g. too few cut points, are skipped)."""
    if isinstance(model, (str, os.PathLike)):
        model, kwargs["model_class"] = load_config(str(model))
    out = []
    for method in methods:
        try:
            out.append(plan(model, stages=stages, partition=method, **kwargs))
        except partition_lib.PartitionError as exc:
            out.append({"partition": method, "error": str(exc)})
    return out


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_plan(report: dict) -> str:
    r = report
    lora = bool(r.get("lora_r"))
    lines = [
        f"hfpipe plan: {r['model']} ({r['num_blocks']} blocks, {r['num_layers']} pipeline layers, "
        f"{'half-blocks' if r['half_blocks'] else 'whole blocks'})  stages={r['stages']} "
        f"partition={r['partition']}",
        f"workload: seq_len={r['seq_len']}"
        + (f" target_len={r['target_len']}" if r.get("target_len") else "")
        + f" micro_batch_size={r['micro_batch_size']} micro_batches={r['micro_batches']}"
        f" dp={r['dp']} zero={r['zero_stage']} dtype={r['dtype']} activation_checkpointing="
        f"{'on' if r['activation_checkpointing'] else 'off'} attention={r['attention_kernel']}"
        + (f" loss_chunk_tokens={r['loss_chunk_tokens']}" if r.get("loss_chunk_tokens") else "")
        + (f" lora_r={r['lora_r']} on {','.join(r['lora_target_modules'])} (base frozen: weights only)" if lora else "")
        + (", 4-bit base (nf4 + double quantisation)" if r.get("load_in_4bit") else ""),
        "",
        f"{'stage':>5}  {'layers':<30}{'params':>10}" + (f"{'trainable':>11}" if lora else "") + f"{'FLOPs/mb':>11}{'share':>8}{'in flight':>10}"
        f"{'mem GiB':>9}  (weights+grads+optim / activations)",
    ]
    for row in r["stage_rows"]:
        mem = row["memory_gib"]
        states = mem["params"] + mem["grads"] + mem["optimizer"]
        lines.append(f"{row['stage']:>5}  {row['layers']:<30}{_si(row['params']):>10}"
                     + (f"{_si(row['trainable_params']):>11}" if lora else "") + f"{_si(row['flops']):>11}"
                     f"{100 * row['share']:>7.1f}%{row['in_flight']:>10}{mem['total']:>9.1f}  "
                     f"({states:.1f} / {mem['activations']:.1f})")
    lines += [
        "",
        f"parts: {r['parts']}",
        f"imbalance (max/mean stage FLOPs): {r['imbalance']:.4f}",
        f"predicted efficiency ({r.get('schedule', '1f1b')}): "
        + ("m/(m+p-1)" if r.get("schedule", "1f1b") == "1f1b" else "bubble") +
        f" x mean/max = {r['bubble_efficiency']:.4f} x {1 / r['imbalance']:.4f} = {r['efficiency']:.4f}",
    ]
    return "\n".join(lines)


def format_compare(reports: list[dict]) -> str:
    ok = [r for r in reports if "error" not in r]
    head = ok[0] if ok else {}
    lines = []
    if head:
        lines.append(f"hfpipe plan --compare: {head['model']}  stages={head['stages']} seq_len={head['seq_len']} "
                     f"micro_batch_size={head['micro_batch_size']} micro_batches={head['micro_batches']} "
                     f"dtype={head['dtype']}")
        lines.append("")
    lines.append(f"{'method':<18}{'max/mean':>9}{'efficiency':>12}{'max mem GiB':>13}  parts")
    for r in reports:
        if "error" in r:
            lines.append(f"{r['partition']:<18}  n/a: {r['error']}")
            continue
        mem = max(row["memory_gib"]["total"] for row in r["stage_rows"])
        lines.append(f"{str(r['partition']):<18}{r['imbalance']:>9.4f}{r['efficiency']:>12.4f}{mem:>13.1f}  "
                     f"{r['parts']}")
    return "\n".join(lines)


def to_json(obj) -> str:
    return json.dumps(obj, default=str)
