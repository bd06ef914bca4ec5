"""One DeepSpeed config for a pipeline run, merged from four layers with one precedence rule.

Layers, highest first: **explicit command-line arguments** > **Accelerate** (YAML / ``ACCELERATE_*`` variables,
read by ``hfpipe.training.accelerate.accelerate_layer``) > **DeepSpeed JSON** (``--deepspeed file.json``) >
**defaults** (the ``PipelineTrainingArguments`` defaults). A value is *explicit* when it comes from one of the three
upper layers; a JSON value ``"auto"`` is not explicit. Each setting takes the highest explicit value; when two
explicit layers give *different* values for the same setting the run stops with an error that names both (as HF
Trainer does for ``--deepspeed``): silently preferring one would train something the user did not ask for. So
``--fp16`` with a JSON that enables bf16 is an error, ``--gradient_accumulation_steps 8`` with a JSON saying 8 is fine.

"Explicit command-line argument" means a flag the user typed (``hfpipe.training.arguments.parse_args`` records them:
argparse itself decides what ``--name-with-dashes``, ``--no_name`` or an abbreviation names) or a key of the args
file; for arguments built in Python, a field whose value differs from the dataclass default. The merged config is validated before any process group is joined, with the rules of
``hfpipe.core.dsconfig`` (ZeRO 2/3, offload, batch sizes that do not multiply out, two precisions, stage count vs. world
size), each value named with its source.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping, Sequence

from hfpipe.core.dsconfig import (OFFLOAD_SECTIONS, ConfigError, check_batch_sizes, check_no_offload,
                                   check_one_precision, check_schedule, check_stages_divide, check_zero_stage)
from hfpipe.training.arguments import explicit_fields, parse_args

__all__ = ["ConfigError", "describe", "explicit_fields", "format_sources", "resolve_ds_config"]

DEFAULT = "default"
AUTO = "auto"

#: setting -> argument field (the CLI layer); settings without a field come from Accelerate / JSON / defaults only.
CLI_FIELDS = {
    "bf16": "bf16",
    "fp16": "fp16",
    "micro_batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "max_grad_norm",
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "beta1": "adam_beta1",
    "beta2": "adam_beta2",
    "eps": "adam_epsilon",
    "num_stages": "num_stages",
    "partition_method": "partition_method",
    "activation_checkpoint_interval": "activation_checkpoint_interval",
    "schedule": "pipeline_schedule",
    "optim": "optim",
}
FALLBACK_DEFAULTS = {"zero_stage": 0, "train_batch_size": None}


# ------------------------------------------------------------------------------------------------- the layers
def _json_layer(path: str | None) -> tuple[dict, dict, dict]:
    """(settings, sources, raw JSON) from a DeepSpeed JSON; ``"auto"`` values are skipped."""
    if not path:
        return {}, {}, {}
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed {path}: no such file; pass a DeepSpeed JSON such as ds_configs/cpu_fp32.json.")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--deepspeed {path} is not valid JSON: {exc}") from None
    src = f"deepspeed json {path}"
    s: dict[str, Any] = {}

    def put(key, value):
        if value is not None and value != AUTO:
            s[key] = value

    for prec in ("bf16", "fp16"):
        sec = raw.get(prec)
        if isinstance(sec, dict) and "enabled" in sec:
            put(prec, sec["enabled"] if sec["enabled"] == AUTO else bool(sec["enabled"]))
    put("micro_batch_size", raw.get("train_micro_batch_size_per_gpu"))
    put("gradient_accumulation_steps", raw.get("gradient_accumulation_steps"))
    put("train_batch_size", raw.get("train_batch_size"))
    put("gradient_clipping", raw.get("gradient_clipping"))
    zero = raw.get("zero_optimization") or {}
    put("zero_stage", zero.get("stage"))
    for k in OFFLOAD_SECTIONS:
        dev = (zero.get(k) or {}).get("device")
        if dev not in (None, "none"):
            put(k, dev)
    opt = raw.get("optimizer") or {}
    params = opt.get("params") or {}
    put("lr", params.get("lr"))
    put("weight_decay", params.get("weight_decay"))
    put("eps", params.get("eps"))
    betas = params.get("betas")
    if isinstance(betas, (list, tuple)) and len(betas) == 2:
        put("beta1", betas[0])
        put("beta2", betas[1])
    pipe = raw.get("pipeline") or {}
    put("num_stages", pipe.get("stages"))
    if pipe.get("partition") not in (None, "best"):  # "best" is DeepSpeed's own default, not a choice
        put("partition_method", pipe["partition"])
    put("activation_checkpoint_interval", pipe.get("activation_checkpoint_interval"))
    put("schedule", pipe.get("schedule"))
    if raw.get("scheduler"):
        raise ConfigError(f"{path} has a \"scheduler\" section; hfpipe builds the schedule from --lr_scheduler_type, "
                          "--warmup_steps/--warmup_ratio and --learning_rate. Remove the section.")
    return s, {k: src for k in s}, raw


def _accelerate_layer(args, env: Mapping[str, str] | None) -> tuple[dict, dict]:
    try:
        from hfpipe.training.accelerate import accelerate_layer
    except ImportError:  # the bridge is optional: no Accelerate settings
        return {}, {}
    try:
        settings, sources = accelerate_layer(getattr(args, "accelerate_config", None),
                                             os.environ if env is None else env)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return dict(settings), dict(sources)


def _flatten_pipeline(settings: dict, sources: dict) -> None:
    pipe = settings.pop("pipeline", None) or {}
    psrc = sources.pop("pipeline", "accelerate")
    for k in ("num_stages", "partition_method", "activation_checkpoint_interval", "schedule"):
        if k in pipe:
            settings[k] = pipe[k]
            sources.setdefault(k, psrc)


def _describe_cli(field: str, value) -> str:
    value = getattr(value, "value", value)  # HF's str enums (--optim)
    return f"command line --{field}" + ("" if isinstance(value, bool) else f" {value}")


# ------------------------------------------------------------------------------------------------------ merge
def resolve_ds_config(args, world_size: int | None, *, argv: Sequence[str] | None = None,
                      env: Mapping[str, str] | None = None,
                      accelerate: tuple[dict, dict] | None = None) -> tuple[dict, dict]:
    """``(ds_config, sources)`` for ``args`` (a ``PipelineTrainingArguments``) on ``world_size`` processes.

    ``sources[setting]`` says where each value came from (``argv`` is accepted for older callers and not read:
    parsed arguments know their explicit fields). ``accelerate`` injects the Accelerate layer (tests);
    otherwise it is read from ``args.accelerate_config`` and ``env`` (default ``os.environ``). ``world_size=None``
    (``hfpipe ds-config`` without a launch): Accelerate's ``num_processes`` if given, else one replica per stage.
    """
    explicit = explicit_fields(args)
    acc, acc_src = accelerate if accelerate is not None else _accelerate_layer(args, env)
    acc, acc_src = dict(acc), dict(acc_src)
    _flatten_pipeline(acc, acc_src)
    procs = acc.pop("num_processes", None)
    if world_size is None and procs is not None:
        world_size = int(procs)
    if procs is not None and int(procs) != world_size:
        raise ConfigError(f"num_processes={procs} (from {acc_src.get('num_processes', 'accelerate')}) but "
                          f"{world_size} processes were launched; launch {procs} processes or fix num_processes.")
    procs_src = acc_src.pop("num_processes", None)
    ds_path = args.deepspeed
    if acc.get("deepspeed_config_file"):
        acc_path = acc.pop("deepspeed_config_file")
        src = acc_src.pop("deepspeed_config_file", "accelerate")
        if ds_path and os.path.abspath(ds_path) != os.path.abspath(acc_path):
            raise ConfigError(f"--deepspeed {ds_path} disagrees with deepspeed_config_file={acc_path} from {src}; "
                              "pass one of them.")
        ds_path = ds_path or acc_path
    js, js_src, raw = _json_layer(ds_path)

    cli, cli_src = {}, {}
    for key, field in CLI_FIELDS.items():
        if field in explicit:
            cli[key] = getattr(args, field)
            cli_src[key] = _describe_cli(field, cli[key])
    # a precision flag set to False on the command line says "not this one", which is no claim about the other
    for prec in ("bf16", "fp16"):
        if cli.get(prec) is False:
            del cli[prec], cli_src[prec]

    layers = [(cli, cli_src), (acc, acc_src), (js, js_src)]
    settings, sources = {}, {}
    keys = set(CLI_FIELDS) | set(FALLBACK_DEFAULTS) | set(acc) | set(js)
    for key in sorted(keys):
        found = [(lay[key], src[key]) for lay, src in layers if key in lay]
        if found:
            value, source = found[0]
            for other, other_src in found[1:]:
                if not _same(value, other):
                    raise ConfigError(
                        f"{key}: {value!r} from {source} disagrees with {other!r} from {other_src}; two explicit "
                        f"sources must agree (precedence: command line > Accelerate > DeepSpeed JSON > defaults). "
                        "Remove one of them, or make them equal.")
            settings[key], sources[key] = value, source
        elif key in CLI_FIELDS:
            settings[key], sources[key] = getattr(args, CLI_FIELDS[key]), DEFAULT
        elif key in FALLBACK_DEFAULTS:
            settings[key], sources[key] = FALLBACK_DEFAULTS[key], DEFAULT
    _check_precision(settings, sources, layers)
    if settings["num_stages"] is None:  # all processes of a replica
        dp = getattr(args, "dp", None) or 1
        world = world_size if world_size is not None else dp
        if world % dp:
            raise ConfigError(f"--dp {dp} does not divide the {world} processes; launch a multiple of {dp} processes "
                              "or change --dp.")
        settings["num_stages"] = world // dp
        sources["num_stages"] = f"default (world size {world} / --dp {dp})" if getattr(args, "dp", None) else \
            f"default (all {world} processes)"
    elif getattr(args, "dp", None) and world_size is not None and settings["num_stages"] * args.dp != world_size:
        raise ConfigError(f"--num_stages {settings['num_stages']} x --dp {args.dp} = "
                          f"{settings['num_stages'] * args.dp} but {world_size} processes were launched; launch "
                          f"{settings['num_stages'] * args.dp} processes or drop --dp.")
    if procs is not None:
        check_stages_divide(settings["num_stages"], int(procs), stages_source=f"from {sources['num_stages']}",
                            world_source=f"from {procs_src}")
    if world_size is None:
        world_size = int(settings["num_stages"])
    ds = _build(settings, sources, raw, world_size)
    return ds, sources


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _check_precision(settings: dict, sources: dict, layers) -> None:
    # --fp16 vs a JSON that enables bf16 (and the reverse): two explicit sources that disagree
    for i, (lay, src) in enumerate(layers):
        for j, (lay2, src2) in enumerate(layers):
            if i != j and lay.get("fp16") is True and lay2.get("bf16") is True:
                first, second = (("fp16", src["fp16"]), ("bf16", src2["bf16"])) if i < j else \
                    (("bf16", src2["bf16"]), ("fp16", src["fp16"]))
                raise ConfigError(f"{first[0]} from {first[1]} disagrees with {second[0]} from {second[1]}; "
                                  "choose one precision in one place.")
    check_one_precision(settings.get("bf16"), settings.get("fp16"), bf16_source=f"from {sources.get('bf16')}",
                        fp16_source=f"from {sources.get('fp16')}",
                        fix='--bf16 or --fp16, or the matching "enabled" in the JSON')


def _build(s: dict, sources: dict, raw: dict, world_size: int) -> dict:
    zero = check_zero_stage(s.get("zero_stage"), key="zero_stage", source=f"from {sources['zero_stage']}")
    for k in OFFLOAD_SECTIONS:
        if k in s:
            check_no_offload(f"zero_optimization.{k}.device", s[k], source=f"from {sources[k]}")
    stages = int(s["num_stages"])
    dp = check_stages_divide(stages, world_size, stages_source=f"from {sources['num_stages']}")
    micro, gas = int(s["micro_batch_size"]), int(s["gradient_accumulation_steps"])
    tbs = s.get("train_batch_size")
    total = check_batch_sizes(tbs, micro, gas, dp, sources=sources, world_size=world_size)
    sources["train_batch_size"] = sources.get("train_batch_size") if tbs is not None else "derived"
    ds = {k: copy.deepcopy(v) for k, v in raw.items() if k not in ("bf16", "fp16", "zero_optimization", "optimizer",
                                                                     "pipeline", "data_types")}
    ds.update({
        "train_batch_size": total,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(s["gradient_clipping"] or 0.0),
        "steps_per_print": raw.get("steps_per_print", 10**9) if raw.get("steps_per_print") != AUTO else 10**9,
    })
    opt = copy.deepcopy(raw.get("optimizer") or {})
    opt_type = opt.get("type", "AdamW")
    if str(opt_type).lower() not in ("adamw", "adam"):
        raise ConfigError(f"optimizer type {opt_type!r} is not supported by the pipeline trainer; use \"AdamW\".")
    params = {k: v for k, v in (opt.get("params") or {}).items() if v != AUTO}
    params.update({"lr": float(s["lr"]), "betas": [float(s["beta1"]), float(s["beta2"])], "eps": float(s["eps"]),
                   "weight_decay": float(s["weight_decay"])})
    params.setdefault("torch_adam", True)  # FusedAdam needs a JIT build; "fused": true is the fast path on GPU
    if sources.get("optim", DEFAULT) != DEFAULT and getattr(s["optim"], "value", s["optim"]) == "adamw_torch_fused":
        params["fused"] = True  # --optim adamw_torch_fused: torch's fused AdamW kernel (DeepSpeed passes it on)
    if opt_type == "AdamW":
        params.setdefault("adam_w_mode", True)
    ds["optimizer"] = {"type": opt_type, "params": params}
    bf16, fp16 = bool(s.get("bf16")), bool(s.get("fp16"))
    ds["bf16"] = {**{k: v for k, v in (raw.get("bf16") or {}).items() if v != AUTO}, "enabled": bf16}
    fp16_sec = {k: v for k, v in (raw.get("fp16") or {}).items() if v != AUTO}
    if fp16:
        fp16_sec.setdefault("loss_scale", 0)  # 0 = dynamic loss scaling
        fp16_sec.setdefault("initial_scale_power", 16)
        fp16_sec.setdefault("loss_scale_window", 1000)
        fp16_sec.setdefault("hysteresis", 2)
        fp16_sec.setdefault("min_loss_scale", 1)
    ds["fp16"] = {**fp16_sec, "enabled": fp16}
    data_types = copy.deepcopy(raw.get("data_types") or {})
    zero = _precision_combination(bf16, fp16, zero, data_types, sources)
    if data_types:
        ds["data_types"] = data_types
    zero_sec = {k: v for k, v in (raw.get("zero_optimization") or {}).items() if v != AUTO}
    ds["zero_optimization"] = {**zero_sec, "stage": zero}
    pipe_sec = copy.deepcopy(raw.get("pipeline") or {})
    pm = s["partition_method"]
    pipe_sec.update({"stages": stages, "partition": pm if isinstance(pm, str) else list(pm),
                     "activation_checkpoint_interval": int(s["activation_checkpoint_interval"]),
                     "schedule": check_schedule(s.get("schedule"), num_stages=stages, micro_batches=gas, fp16=fp16,
                                                source=f"from {sources.get('schedule', DEFAULT)}")})
    ds["pipeline"] = pipe_sec
    return ds


def _precision_combination(bf16: bool, fp16: bool, zero: int, data_types: dict, sources: dict) -> int:
    """The ZeRO stage, with ``data_types["grad_accum_dtype"]`` filled in, of a combination DeepSpeed's pipeline
    engine accepts. Written out here (not left to DeepSpeed) because DeepSpeed finds a bad mix only at engine
    initialisation, after the model has loaded; the rule is ``DeepSpeedEngine._do_optimizer_sanity_check`` of
    DeepSpeed 0.19 (tests/test_trainer_parity.py runs that very check on every combination chosen here): without
    ZeRO the accumulation dtype must equal the model's; with ZeRO-1 any is accepted (bf16 + fp32 accumulation is
    DeepSpeed's BF16 optimizer, the one with fp32 master weights and gradients). ``--bf16`` alone picks ZeRO-1 +
    fp32 accumulation; bf16 at an explicit ZeRO 0 accumulates in bf16 (DeepSpeed accepts it and warns)."""
    model = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    accum = data_types.get("grad_accum_dtype")
    if accum is not None:
        sources.setdefault("grad_accum_dtype", "the DeepSpeed JSON's data_types")
    accum = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(accum, accum)
    zero_default = sources.get("zero_stage") == DEFAULT
    if bf16 and zero == 0 and zero_default and accum in (None, "fp32"):
        zero = 1
        sources["zero_stage"] = "default (bf16: ZeRO-1 with fp32 gradient accumulation, which DeepSpeed's pipeline " \
                                "accepts)"
    if bf16 and accum is None:
        data_types["grad_accum_dtype"] = accum = "fp32" if zero >= 1 else "bf16"
        sources.setdefault("grad_accum_dtype", f"default (bf16 at ZeRO {zero})")
    if zero == 0 and accum is not None and accum != model:
        raise ConfigError(f"{model} weights with grad_accum_dtype={accum} (from {sources.get('grad_accum_dtype')}) "
                          f"at ZeRO stage 0 (from {sources.get('zero_stage')}): DeepSpeed's pipeline engine rejects "
                          "this mix ('unsupported mix of model_dtype and grad_accum_dtype'); use ZeRO stage 1 "
                          f"(zero_optimization.stage 1) or data_types.grad_accum_dtype {model}.")
    return zero


def describe(argv: Sequence[str] = (), *, world_size: int | None = None,
             env: Mapping[str, str] | None = None) -> tuple[dict, dict, int, str]:
    """What ``hfpipe ds-config`` prints: ``(ds_config, sources, world_size, where the world size came from)`` for the
    ``PipelineTrainingArguments`` flags in ``argv`` (the recipes' flags), the Accelerate layer and ``world_size``
    processes (default: Accelerate's ``num_processes``, else ``$WORLD_SIZE``, else one data-parallel replica)."""
    env = os.environ if env is None else env
    (args,) = parse_args(argv=list(argv))
    acc = _accelerate_layer(args, env)
    if world_size is not None:
        world_src = "--world-size"
    elif "num_processes" in acc[0]:
        world_src = acc[1].get("num_processes", "accelerate")
    elif env.get("WORLD_SIZE"):
        world_size, world_src = int(env["WORLD_SIZE"]), "env WORLD_SIZE"
    else:
        world_src = "one data-parallel replica (no --world-size)"
    ds, sources = resolve_ds_config(args, world_size, argv=list(argv), accelerate=acc)
    stages = ds["pipeline"]["stages"]
    dp = ds["train_batch_size"] // (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"])
    world = dp * stages
    return ds, sources, world, world_src


def format_sources(ds_config: dict, sources: dict) -> str:
    """The merged config as ``setting = value   (source)`` lines, for the one log line at start-up."""
    values = {
        "num_stages": ds_config["pipeline"]["stages"], "partition_method": ds_config["pipeline"]["partition"],
        "activation_checkpoint_interval": ds_config["pipeline"]["activation_checkpoint_interval"],
        "schedule": ds_config["pipeline"].get("schedule", "1f1b"),
        "micro_batch_size": ds_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
        "train_batch_size": ds_config["train_batch_size"], "gradient_clipping": ds_config["gradient_clipping"],
        "bf16": ds_config["bf16"]["enabled"], "fp16": ds_config["fp16"]["enabled"],
        "zero_stage": ds_config["zero_optimization"]["stage"], "lr": ds_config["optimizer"]["params"]["lr"],
        "weight_decay": ds_config["optimizer"]["params"]["weight_decay"],
        "beta1": ds_config["optimizer"]["params"]["betas"][0], "beta2": ds_config["optimizer"]["params"]["betas"][1],
        "eps": ds_config["optimizer"]["params"]["eps"],
    }
    if "data_types" in ds_config:
        values["grad_accum_dtype"] = ds_config["data_types"].get("grad_accum_dtype")
    width = max(len(k) for k in values)
    return "\n".join(f"  {k:<{width}} = {v!s:<12} ({sources.get(k, DEFAULT)})" for k, v in values.items())
