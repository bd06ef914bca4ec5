"""The DeepSpeed-config rules of a pipeline run, each written once, checked before any process group is joined.

DeepSpeed discovers some incompatibilities late (ZeRO-2/3 with a pipeline fails deep inside the engine) or not at
all. Every place that holds DeepSpeed settings -- the merged trainer config (``hfpipe.training.config``), the
Accelerate layer (``hfpipe.training.accelerate``), ``hfpipe.initialize`` with a hand-written dict -- checks them with
the functions here, so each rule and its message exist once: one function per rule, raising one :class:`ConfigError`
that names the value, where it came from (``source``, when the caller knows) and the fix.
:func:`validate_pipeline_ds_config` applies them all to a finished DeepSpeed dict.
"""

from __future__ import annotations

from typing import Mapping

OFFLOAD_SECTIONS = ("offload_optimizer", "offload_param")


class ConfigError(ValueError):
    """A setting hfpipe cannot run with; the message names the value, the source and the fix."""


def _at(source: str | None) -> str:
    return f" ({source})" if source else ""


def check_zero_stage(stage, *, key: str = "zero_optimization.stage", source: str | None = None,
                     fix: str = 'set "zero_optimization": {"stage": 1} (or 0)') -> int:
    """ZeRO stage 0 or 1 only: stage 2 shards gradients and 3 parameters over the data-parallel ranks, which a
    ``PipelineEngine`` does not support. Returns the stage as an int."""
    stage = int(stage or 0)
    if stage < 0:
        raise ConfigError(f"{key}={stage}{_at(source)}: expected a ZeRO stage (0 or 1 with pipeline parallelism); "
                          f"{fix}.")
    if stage >= 2:
        shards = "gradients" if stage == 2 else "gradients and parameters"
        raise ConfigError(f"{key}={stage}{_at(source)}: ZeRO stage {stage} shards {shards} over the data-parallel "
                          "ranks, which cannot be combined with pipeline parallelism: DeepSpeed's PipelineEngine "
                          f"supports ZeRO stage 0 or 1 only; {fix}.")
    return stage


def check_no_offload(key: str, device, *, source: str | None = None, fix: str = "remove the offload section") -> None:
    """No optimizer or parameter offload (``device`` None or ``"none"``)."""
    if device is not None and str(device).lower() != "none":
        raise ConfigError(f"{key}={device!r}{_at(source)}: offloading is not supported with pipeline parallelism; "
                          f"{fix}.")


def check_one_precision(bf16: bool, fp16: bool, *, bf16_source: str = "bf16.enabled in the DeepSpeed config",
                        fp16_source: str = "fp16.enabled in the DeepSpeed config",
                        fix: str = "set the other \"enabled\" to false") -> None:
    """At most one of bf16 and fp16."""
    if bf16 and fp16:
        raise ConfigError(f"bf16 ({bf16_source}) and fp16 ({fp16_source}) are both enabled; enable at most one "
                          f"precision ({fix}).")


def check_stages_divide(num_stages, world_size: int, *, stages_source: str | None = None,
                        world_source: str | None = None) -> int:
    """Every pipeline needs all its stages: ``num_stages`` >= 1 divides the world size (launched processes, or
    Accelerate's ``num_processes`` when ``world_source`` says where that came from). Returns the data-parallel size."""
    stages = int(num_stages)
    if stages < 1:
        raise ConfigError(f"num_stages={stages}{_at(stages_source)}: expected a positive number of pipeline stages; "
                          "set num_stages to 1 or more.")
    if world_size % stages:
        if world_source:
            what = (f"num_processes={world_size} ({world_source}) is not divisible by num_stages={stages}"
                    f"{_at(stages_source)}")
            fix = f"set num_processes to a multiple of {stages}"
        else:
            what = f"num_stages={stages}{_at(stages_source)} does not divide the {world_size} processes"
            fix = f"launch a multiple of {stages} processes"
        raise ConfigError(f"{what}; every pipeline needs all its stages (the rest is data parallelism): {fix}, or a "
                          f"num_stages that divides {world_size}.")
    return world_size // stages


def check_batch_sizes(train_batch_size, micro_batch_size, accumulation_steps, dp: int, *,
                      sources: Mapping[str, str] | None = None, world_size: int | None = None) -> int:
    """train batch = micro batch x gradient accumulation steps x data-parallel replicas (``train_batch_size`` None:
    derived). ``sources`` (keys ``train_batch_size``, ``micro_batch_size``, ``gradient_accumulation_steps``) says
    where each value came from. Returns the train batch size."""
    micro, accum = int(micro_batch_size), int(accumulation_steps)
    if micro < 1 or accum < 1:
        raise ConfigError(f"micro batch size {micro} and gradient_accumulation_steps {accum}: expected both >= 1; "
                          "set them to 1 or more.")
    total = micro * accum * dp
    if train_batch_size is not None and int(train_batch_size) != total:
        def at(key):
            return _at(f"from {sources[key]}" if sources and key in sources else None)

        where = f" (= {world_size} processes / {world_size // dp} stages)" if world_size else ""
        raise ConfigError(
            f"train_batch_size={train_batch_size}{at('train_batch_size')} != the batch the other settings give "
            f"(= {total}): micro batch {micro}{at('micro_batch_size')} x gradient_accumulation_steps {accum}"
            f"{at('gradient_accumulation_steps')} x data-parallel replicas {dp}{where} = {total}; set "
            f"train_batch_size to {total} (or leave it out / \"auto\"), or change the micro batch or accumulation.")
    return total


#: pipeline schedules hfpipe runs on DeepSpeed's engine (``hfpipe.schedules``); the first is DeepSpeed's own 1F1B
SCHEDULES = ("1f1b", "zb-h1", "dualpipev")


def check_schedule(schedule, *, num_stages: int | None = None, micro_batches: int | None = None,
                   fp16: bool = False, source: str | None = None) -> str:
    """The pipeline schedule: one of :data:`SCHEDULES` (``None``: ``"1f1b"``) that the run can honour. ``zb-h1``
    splits each backward into an input-gradient and a weight-gradient pass, which fp16's dynamic loss scaling cannot
    follow (it checks for overflow per whole backward); ``dualpipev`` (two chunks per rank) needs at least 2 x stages
    micro-batches per step (DeepSpeed's ``DualPipeVSchedule``) and runs its loss backward outside fp16's loss
    scaler. Returns the name."""
    name = "1f1b" if schedule is None else str(schedule).strip().lower()
    if name not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r}{_at(source)}: expected one of {', '.join(SCHEDULES)}; set the "
                          "pipeline schedule to \"1f1b\" (DeepSpeed's, the default), \"zb-h1\" (zero-bubble) or "
                          "\"dualpipev\" (two chunks per rank).")
    if name == "dualpipev" and num_stages and num_stages > 1 and micro_batches is not None \
            and micro_batches < 2 * num_stages:
        raise ConfigError(f"schedule='dualpipev'{_at(source)} with {micro_batches} micro-batches at {num_stages} "
                          f"stages: DualPipeV needs >= 2 x stages micro-batches per step ({2 * num_stages} here); use "
                          f"{2 * num_stages} or more (gradient_accumulation_steps; --micro-batches in hfpipe verify), "
                          "or schedule \"zb-h1\".")
    if name in ("zb-h1", "dualpipev") and fp16:
        why = ("fp16's dynamic loss scaling checks for overflow once per whole backward, which zb-h1 splits into "
               "input- and weight-gradient passes" if name == "zb-h1" else
               "dualpipev runs the loss backward on rank 0 itself, outside fp16's loss scaler")
        raise ConfigError(f"schedule={name!r}{_at(source)} with fp16: {why}; use bf16 or fp32 with {name}, or "
                          "schedule \"1f1b\" with fp16.")
    return name


def validate_pipeline_ds_config(config: dict, num_stages: int, world_size: int) -> None:
    """Raise :class:`ConfigError` (a ``ValueError``) when the DeepSpeed dict ``config`` cannot drive a pipeline of
    ``num_stages`` stages on ``world_size`` ranks."""
    dp = check_stages_divide(num_stages, world_size)
    zero = config.get("zero_optimization") or {}
    check_zero_stage(zero.get("stage", 0))
    for section in OFFLOAD_SECTIONS:
        check_no_offload(f"zero_optimization.{section}.device", (zero.get(section) or {}).get("device"))
    check_one_precision(bool((config.get("bf16") or {}).get("enabled", False)),
                        bool((config.get("fp16") or {}).get("enabled", False)))
    train = config.get("train_batch_size")
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    if None not in (train, micro, accum):
        check_batch_sizes(train, micro, accum, dp, world_size=world_size)
    check_schedule((config.get("pipeline") or {}).get("schedule"), num_stages=num_stages,
                   micro_batches=None if accum is None else int(accum),
                   fp16=bool((config.get("fp16") or {}).get("enabled", False)),
                   source="pipeline.schedule in the DeepSpeed config")


def check_fp16_supported(fp16: bool, *, source: str | None = None) -> None:
    """fp16 needs an accelerator that trains in it. DeepSpeed's CPU accelerator reports fp16 as supported wherever
    oneDNN has fp16 kernels, but that is inference support: hfpipe refuses fp16 training on CPU (use bf16)."""
    if not fp16:
        return
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu" or not acc.is_fp16_supported():
        raise ConfigError(f"fp16{_at(f'from {source}' if source else None)} is not supported on the "
                          f"{acc.device_name()} accelerator; use bf16 (ds_configs/bf16_zero1.json or --bf16) or fp32 "
                          "here, fp16 on GPUs.")
