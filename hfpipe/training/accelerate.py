"""The Accelerate layer of ``hfpipe.training.config``: an Accelerate config (YAML) and the ``ACCELERATE_*`` variables
that ``accelerate launch`` passes, turned into hfpipe settings.

Accelerate refuses pipeline parallelism, but its launcher starts ranks (``RANK``/``WORLD_SIZE``) like any other, and
its config is where users keep precision, ZeRO stage and accumulation. ``accelerate launch --config_file cfg.yaml``
passes the config as environment variables (names and values as ``accelerate.utils.launch.prepare_deepspeed_cmd_env``
writes them); ``--accelerate_config cfg.yaml`` reads the YAML itself. Both describe one config, so when both are
present they must agree. Only DeepSpeed settings a ``PipelineEngine`` honours pass (ZeRO 0/1, no offload: the rules
of ``hfpipe.core.dsconfig``); the rest is refused here with the Accelerate key to change. The pipeline section
(``num_stages``, ``partition_method``, ``activation_checkpoint_interval``) may live under ``deepspeed_config.pipeline``
in the YAML (Accelerate rejects unknown top-level keys); ``accelerate launch`` does not pass it on, so that section
needs ``--accelerate_config`` too.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from hfpipe.core.dsconfig import check_no_offload, check_zero_stage

PIPELINE_KEYS = ("num_stages", "partition_method", "activation_checkpoint_interval")
REFUSED_TYPES = {"FSDP": "FSDP shards every layer on every rank", "MEGATRON_LM": "Megatron-LM is its own engine",
                 "XLA": "TPUs are not supported"}
_TRUE = ("1", "true", "yes", "on")


def default_config_path() -> str:
    """Where ``accelerate config`` writes (``$HF_HOME/accelerate/default_config.yaml``), per Accelerate itself."""
    try:
        from accelerate.commands.config.config_args import default_config_file
        return default_config_file
    except ImportError:
        home = os.environ.get("HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"))
        return os.path.join(os.path.expanduser(home), "accelerate", "default_config.yaml")


def accelerate_layer(config_path: str | None, env: Mapping[str, str]) -> tuple[dict, dict]:
    """``(settings, sources)`` from the YAML at ``config_path`` (``"default"``: Accelerate's default config) and the
    ``ACCELERATE_*`` variables in ``env``; ``({}, {})`` when neither is there. Raises ``ValueError`` for settings a
    pipeline cannot run with and when the YAML and the variables disagree."""
    yaml_s, yaml_src = _from_yaml(config_path, env) if config_path else ({}, {})
    env_s, env_src = _from_env(env, have_yaml=bool(config_path))
    settings, sources = dict(yaml_s), dict(yaml_src)
    for key, value in env_s.items():
        if key in settings and not _agree(key, settings[key], value):
            raise ValueError(f"{key}: {settings[key]!r} from {yaml_src[key]} disagrees with {value!r} from "
                             f"{env_src[key]} (set by `accelerate launch`); launch with the same config file you pass "
                             "as --accelerate_config, or drop --accelerate_config.")
        if key not in settings:
            settings[key], sources[key] = value, env_src[key]
    return settings, sources


def _agree(key: str, a, b) -> bool:
    if key == "deepspeed_config_file":
        return os.path.abspath(a) == os.path.abspath(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _precision(value, where: str) -> dict:
    value = "no" if value is False or value is None else str(value).lower()  # YAML reads a bare `no` as False
    if value not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision={value!r} ({where}) is not supported by hfpipe; use 'bf16', 'fp16' or "
                         "'no'.")
    # "bf16" claims bf16 only (a JSON's fp16 section stays a separate, checked claim); "no" claims both off
    return {"bf16": False, "fp16": False} if value == "no" else {value: True}


def _check_deepspeed(zero, off_opt, off_param, zero3_init, where: dict) -> None:
    """The ``hfpipe.core.dsconfig`` rules (ZeRO 0/1, no offload), with the Accelerate key to change."""
    check_zero_stage(zero, key="zero_stage", source=where["zero_stage"],
                     fix="set zero_stage: 1 (or 0) in the Accelerate config (`accelerate launch --zero_stage 1`)")
    for key, dev in (("offload_optimizer_device", off_opt), ("offload_param_device", off_param)):
        check_no_offload(key, dev, source=where[key], fix=f"set {key}: none")
    if zero3_init is not None and str(zero3_init).lower() in _TRUE:
        raise ValueError(f"zero3_init_flag=true ({where['zero3_init_flag']}) is a ZeRO-3 setting; pipelines use ZeRO "
                         "0/1: set zero3_init_flag: false.")


def _from_yaml(path: str, env: Mapping[str, str]) -> tuple[dict, dict]:
    import yaml

    if path == "default":
        path = default_config_path()
        if not os.path.isfile(path):
            raise ValueError(f"--accelerate_config default: there is no default Accelerate config at {path}; run "
                             "`accelerate config` or pass the path of a YAML.")
    if not os.path.isfile(path):
        raise ValueError(f"--accelerate_config {path}: no such file; pass an Accelerate YAML (e.g. "
                         "ds_configs/accelerate_deepspeed.yaml) or 'default'.")
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"--accelerate_config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--accelerate_config {path}: expected a mapping of Accelerate settings, got "
                         f"{type(cfg).__name__}.")
    src = f"accelerate config {path}"
    kind = str(cfg.get("distributed_type", "NO")).upper()
    if kind in REFUSED_TYPES:
        raise ValueError(f"distributed_type: {kind} ({src}): {REFUSED_TYPES[kind]}, hfpipe runs a DeepSpeed pipeline; "
                         "set distributed_type: DEEPSPEED (with zero_stage 0 or 1).")
    s: dict[str, Any] = {}
    if "mixed_precision" in cfg:
        s.update(_precision(cfg["mixed_precision"], f"{src}: mixed_precision"))
    procs = cfg.get("num_processes")
    if isinstance(procs, int) and procs >= 1:
        s["num_processes"] = procs
    ds = (cfg.get("deepspeed_config") or {}) if kind == "DEEPSPEED" else {}  # Accelerate ignores it otherwise too
    where = {k: f"{src}: deepspeed_config.{k}" for k in ("zero_stage", "offload_optimizer_device",
                                                          "offload_param_device", "zero3_init_flag")}
    _check_deepspeed(ds.get("zero_stage"), ds.get("offload_optimizer_device"), ds.get("offload_param_device"),
                     ds.get("zero3_init_flag"), where)
    for yaml_key, key, conv in (("zero_stage", "zero_stage", int),
                                ("gradient_accumulation_steps", "gradient_accumulation_steps", int),
                                ("gradient_clipping", "gradient_clipping", float),
                                ("deepspeed_config_file", "deepspeed_config_file", str)):
        if ds.get(yaml_key) not in (None, "none", "None", ""):
            s[key] = conv(ds[yaml_key])
    pipe = ds.get("pipeline")
    if pipe is not None:
        unknown = sorted(set(pipe) - set(PIPELINE_KEYS)) if isinstance(pipe, dict) else ["(not a mapping)"]
        if unknown:
            raise ValueError(f"deepspeed_config.pipeline ({src}) has unknown keys {unknown}; expected "
                             f"{', '.join(PIPELINE_KEYS)}.")
        s["pipeline"] = dict(pipe)
    return s, {k: src for k in s}


def _from_env(env: Mapping[str, str], have_yaml: bool) -> tuple[dict, dict]:
    def on(name):
        return str(env.get(name, "")).lower() in _TRUE

    if on("ACCELERATE_USE_FSDP"):
        raise ValueError("ACCELERATE_USE_FSDP=true (`accelerate launch` with distributed_type: FSDP): FSDP shards "
                         "every layer on every rank, hfpipe runs a DeepSpeed pipeline; use distributed_type: DEEPSPEED "
                         "with zero_stage 0 or 1.")
    s: dict[str, Any] = {}
    src: dict[str, str] = {}
    fields = [f for f in env.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",") if f]
    mp = env.get("ACCELERATE_MIXED_PRECISION")
    # Accelerate always sets the variable ("no" by default): "no" is a choice only when it came from the config file
    if mp is not None and (mp.lower() != "no" or "mixed_precision" in fields):
        for k, v in _precision(mp, "env ACCELERATE_MIXED_PRECISION").items():
            s[k], src[k] = v, "env ACCELERATE_MIXED_PRECISION"
    if not on("ACCELERATE_USE_DEEPSPEED"):
        return s, src
    if "pipeline" in fields and not have_yaml:
        raise ValueError("the Accelerate config has a deepspeed_config.pipeline section, which `accelerate launch` "
                         "does not pass to the script; add --accelerate_config <the same YAML> to the script's "
                         "arguments, or set --num_stages/--partition_method on the command line or in the "
                         "deepspeed_config_file.")
    names = {"zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
             "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
             "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
             "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT"}
    _check_deepspeed(*(env.get(v) for v in names.values()), where={k: f"env {v}" for k, v in names.items()})
    for var, key, conv in (("ACCELERATE_DEEPSPEED_ZERO_STAGE", "zero_stage", int),
                           ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "gradient_accumulation_steps", int),
                           ("ACCELERATE_GRADIENT_CLIPPING", "gradient_clipping", float),
                           ("ACCELERATE_DEEPSPEED_CONFIG_FILE", "deepspeed_config_file", str)):
        if env.get(var, "").lower() not in ("", "none"):
            try:
                s[key], src[key] = conv(env[var]), f"env {var}"
            except ValueError:
                raise ValueError(f"{var}={env[var]!r}: expected a {conv.__name__}.") from None
    return s, src
