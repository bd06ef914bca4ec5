"""LoRA through the pipeline: each stage wraps only its own layers with PEFT's own LoRA layers.

Why a module of its own: every pipeline layer is cut out of the meta model and made real on the rank that owns it
(``hfpipe.core.meta.materialize``), so ``peft.get_peft_model`` on the whole model -- which would need every weight on
every rank -- is not an option. The one idea: *PEFT decides, once, on the meta model; each layer re-applies that
decision to itself.* :func:`plan` runs ``get_peft_model`` on a meta-device copy (free: no weights), which resolves
``target_modules`` exactly as PEFT does (a list, a regex, ``"all-linear"``, PEFT's default modules for the model
type) and the ``modules_to_save`` PEFT adds for the task type (the ``score`` / ``classifier`` head of ``SEQ_CLS``);
the result is the set of full module names to adapt or train in full. :func:`wrap` then runs
``peft.inject_adapter_in_model`` on a materialised layer for exactly the names inside it (and PEFT's
``ModulesToSaveWrapper`` for the heads), under the layer's seed, and freezes everything else. No LoRA maths lives
in hfpipe.

Names: a layer's ``hf_names()`` pass every local name through :func:`hf_key`, so the base weights PEFT wraps keep
their HF names (``...q_proj.base_layer.weight`` -> ``...q_proj.weight``: they load from the same checkpoints) and the
adapter weights get the keys of PEFT's ``get_peft_model_state_dict`` / ``adapter_model.safetensors``
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, ``base_model.model.score.weight``): they load
from a PEFT state dict and will save as one. A ``PeftModel`` passed to ``to_pipeline`` becomes a state-dict source
under these keys (:func:`split_peft_model`), so the pipeline starts from exactly its adapter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from hfpipe.core.weights import StateDictSource

#: prefix of every adapter key in PEFT's saved state dict (``PeftModel.base_model.model`` is the HF model)
PEFT_PREFIX = "base_model.model."
#: the adapter name inside the pipeline (PEFT's default)
ADAPTER = "default"
#: the unused parameter a stage with nothing to train holds, so that its optimizer is not empty (:func:`mark_stage`)
IDLE_STAGE_PARAMETER = "lora_idle_stage"


class LoraConfigError(ValueError):
    """A LoRA configuration that does not fit the model."""


# ------------------------------------------------------------------------------------------- trainer flags
#: the trainer flags named as PEFT names them (``PipelineTrainingArguments``) and the ``LoraConfig`` field of each
LORA_FLAGS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
              "lora_target_modules": "target_modules", "lora_modules_to_save": "modules_to_save"}


def module_names(value):
    """``"q_proj, v_proj"`` -> ``["q_proj", "v_proj"]``; ``"all-linear"`` stays a string; empty -> ``None``."""
    if isinstance(value, str):
        value = value.strip()
        if value == "all-linear":
            return value
        value = value.split(",")
    names = [v.strip() for v in value or () if v.strip()]
    return names or None


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple, set, frozenset)) and isinstance(b, (list, tuple, set, frozenset)):
        return set(a) == set(b)
    return a == b


def read_peft_config(path: str):
    """The ``peft.LoraConfig`` in ``path`` (an ``adapter_config.json`` or a folder holding one), read by PEFT."""
    from peft import LoraConfig, PeftConfig

    file = os.path.join(path, "adapter_config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise LoraConfigError(f"--peft_config {path!r}: no such file; expected a PEFT adapter_config.json or a "
                              "folder holding one. Fix: pass its path.")
    try:
        config = PeftConfig.from_peft_type(**LoraConfig.from_json_file(file))
    except (ValueError, TypeError, KeyError) as exc:
        raise LoraConfigError(f"--peft_config {file!r} is not a PEFT config ({exc}). Fix: pass the "
                              "adapter_config.json PEFT wrote (peft_type LORA).") from None
    if not isinstance(config, LoraConfig):
        raise LoraConfigError(f"--peft_config {file!r} has peft_type {config.peft_type}; hfpipe pipelines take LoRA "
                              "configs only. Fix: pass a LoRA adapter_config.json.")
    return config


def to_lora_config(args, task_type: str | None = None):
    """The ``peft.LoraConfig`` that trainer arguments ``args`` ask for (``None``: LoRA off), ``task_type`` set where
    the config has none. ``--peft_config FILE`` is read by PEFT, and a ``--lora_*`` flag set besides it (not at its
    default) must agree with the file; otherwise ``--lora_r R > 0`` builds the config from the flags. Bad values:
    one :class:`LoraConfigError` (needs no model, so the trainer raises it before loading one)."""
    defaults = {f.name: f.default for f in dataclasses.fields(args) if f.name in LORA_FLAGS}
    given = {flag: getattr(args, flag) for flag in LORA_FLAGS if getattr(args, flag) != defaults[flag]}
    if args.lora_r < 0:
        raise LoraConfigError(f"--lora_r {args.lora_r}: expected the LoRA rank, > 0 (0: LoRA off).")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise LoraConfigError(f"--lora_dropout {args.lora_dropout}: expected a probability in [0, 1).")
    if not args.peft_config and args.lora_r == 0:
        if given:
            raise LoraConfigError(f"--{next(iter(given))} is set but LoRA is off. Fix: add --lora_r R (e.g. 8) or "
                                  "--peft_config adapter_config.json.")
        return None
    from peft import LoraConfig

    if args.peft_config:
        config = read_peft_config(args.peft_config)
        for flag, value in given.items():
            value = module_names(value) if flag in ("lora_target_modules", "lora_modules_to_save") else value
            if not _same(value, getattr(config, LORA_FLAGS[flag])):
                raise LoraConfigError(f"--{flag} {value!r} disagrees with {LORA_FLAGS[flag]}="
                                      f"{getattr(config, LORA_FLAGS[flag])!r} in --peft_config {args.peft_config!r}. "
                                      f"Fix: drop --{flag} or make them agree.")
    else:
        try:
            config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                target_modules=module_names(args.lora_target_modules),
                                modules_to_save=module_names(args.lora_modules_to_save))
        except ValueError as exc:
            raise LoraConfigError(f"--lora_* flags give no valid peft.LoraConfig: {exc}") from None
    if config.task_type is None and task_type is not None:
        config = dataclasses.replace(config, task_type=task_type)
    return config


def save_adapter(config, state: dict, output_dir: str, base_model: str | None = None) -> None:
    """A PEFT adapter folder: ``config`` written by PEFT (``LoraConfig.save_pretrained``, ``inference_mode`` on and
    ``base_model_name_or_path`` = ``base_model`` when given, as ``PeftModel.save_pretrained`` does) and the adapter
    tensors of ``state`` (:func:`is_adapter_key` names: PEFT's own keys) as ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    config = dataclasses.replace(config, inference_mode=True,
                                 base_model_name_or_path=base_model or config.base_model_name_or_path)
    config.save_pretrained(output_dir)
    tensors = {k: v.contiguous() for k, v in sorted(state.items()) if is_adapter_key(k)}
    save_file(tensors, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


def hf_key(name: str, adapter: str = ADAPTER) -> str:
    """The checkpoint name of a tensor of a PEFT-wrapped module (identity for anything PEFT did not wrap).

    Frozen base weights keep their HF names (``q_proj.base_layer.weight`` -> ``q_proj.weight``, a module-to-save's
    ``original_module``); adapter weights get PEFT's saved keys (``base_model.model.`` + the HF path without the
    adapter name: ``q_proj.lora_A.default.weight`` -> ``base_model.model.[...]q_proj.lora_A.weight``,
    ``score.modules_to_save.default.weight`` -> ``base_model.model.score.weight``) -- what
    ``get_peft_model_state_dict`` writes.
    """
    if ".base_layer." in name:
        return name.replace(".base_layer.", ".")
    if ".original_module." in name:
        return name.replace(".original_module.", ".")
    saved = f".modules_to_save.{adapter}."
    if saved in name:
        return PEFT_PREFIX + name.replace(saved, ".")
    parts = name.split(".")
    if adapter in parts and any(p.startswith("lora_") for p in parts):
        return PEFT_PREFIX + ".".join(p for p in parts if p != adapter)
    return name


def is_adapter_key(name: str) -> bool:
    """Whether ``name`` (an :func:`hf_key`) is an adapter tensor (LoRA or a module PEFT trains in full)."""
    return name.startswith(PEFT_PREFIX)


# ---------------------------------------------------------------------------------------------------- the plan
@dataclass
class LoraPlan:
    """PEFT's resolved decision for the whole model: the config and the full module names it wraps."""

    config: object  # peft.LoraConfig with target_modules / modules_to_save as PEFT resolved them
    targets: frozenset[str]  # modules that get LoRA layers (full names in the HF task model)
    saved: frozenset[str]  # modules PEFT trains in full (modules_to_save)

    def inside(self, names: frozenset[str], prefix: str, local: dict) -> list[str]:
        """The names of ``names`` below HF prefix ``prefix`` that exist in a layer (local names, sorted)."""
        return sorted(n[len(prefix):] for n in names if n.startswith(prefix) and n[len(prefix):] in local)


def _linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the modules LoRA can adapt as linear layers (``nn.Linear``, transformers' ``Conv1D``)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def plan(meta_model: nn.Module, peft_config) -> LoraPlan | None:
    """PEFT's resolution of ``peft_config`` on a meta-device copy of the task model (``None``: no LoRA)."""
    if peft_config is None:
        return None
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper
    from peft.utils.error import NoMatchingPeftModuleError

    if not isinstance(peft_config, LoraConfig):
        raise LoraConfigError(f"peft_config={type(peft_config).__name__}; hfpipe pipelines take a peft.LoraConfig "
                              "(other PEFT methods are not supported). Fix: pass LoraConfig(r=..., ...).")
    if peft_config.use_dora or peft_config.target_parameters or peft_config.layer_replication:
        raise LoraConfigError("peft_config uses DoRA, target_parameters or layer_replication, which hfpipe does not "
                              "support yet; use plain LoRA on target_modules.")
    model = copy.deepcopy(meta_model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's meta-device and gradient-checkpointing notes
            peft_model = get_peft_model(model, copy.deepcopy(peft_config), low_cpu_mem_usage=True)
    except NoMatchingPeftModuleError:
        raise LoraConfigError(
            f"target_modules={peft_config.target_modules!r} matches no module of this {type(meta_model).__name__}; "
            f"its linear modules are {_linear_names(meta_model)}. Fix: name some of them (e.g. "
            "--lora-target-modules q_proj,v_proj) or use 'all-linear'.") from None
    base = peft_model.get_base_model()
    targets = frozenset(n for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)
                        and not isinstance(m, ModulesToSaveWrapper))
    saved = frozenset(n for n, m in base.named_modules() if isinstance(m, ModulesToSaveWrapper))
    embeddings = {n for n in targets if isinstance(base.get_submodule(n).get_base_layer(), nn.Embedding)}
    if embeddings:
        raise LoraConfigError(f"target_modules reach the embedding(s) {sorted(embeddings)}; LoRA on embeddings is not "
                              "supported in pipelines yet. Fix: target the linear modules only (e.g. 'all-linear').")
    return LoraPlan(peft_model.peft_config[ADAPTER], targets, saved)


def split_peft_model(model, peft_config=None):
    """``(HF model, LoraConfig, source or None)``: a ``PeftModel`` becomes its base model, its active adapter's config
    and a state dict under :func:`hf_key` names (base weights by HF name, its adapter by PEFT key), so the pipeline
    starts from exactly that adapter. Anything else passes through with ``peft_config``."""
    try:
        from peft import PeftModel
    except ImportError:  # peft not installed: nothing can be a PeftModel
        return model, peft_config, None
    if not isinstance(model, PeftModel):
        return model, peft_config, None
    if peft_config is not None:
        raise LoraConfigError(f"to_pipeline got a PeftModel and a peft_config (r={peft_config.r}); the PeftModel "
                              "already carries its config. Fix: pass one of them.")
    adapter = model.active_adapter
    base = model.get_base_model()
    state = {hf_key(k, adapter): v for k, v in base.state_dict().items()}
    return base, model.peft_config[adapter], StateDictSource(state)


# ------------------------------------------------------------------------------------------------ per layer
def wrap(module: nn.Module, builder, hf_prefix: str, index: int) -> nn.Module:
    """Apply the builder's LoRA plan to one materialised layer module whose HF names start with ``hf_prefix``:
    freeze it, inject PEFT LoRA layers into the targeted modules inside it and wrap the modules PEFT trains in full,
    initialised as PEFT does under the layer's seed (so the initial adapter does not depend on the stage count),
    then load adapter tensors the builder's source has (a PeftModel's adapter). No plan: ``module`` unchanged."""
    lora = getattr(builder, "lora", None)
    if lora is None:
        return module
    from peft import inject_adapter_in_model
    from peft.utils.other import _set_trainable

    whole = hf_prefix[:-1]
    if whole and (whole in lora.targets or whole in lora.saved):
        raise LoraConfigError(f"LoRA targets or modules_to_save name {whole!r}, which is a whole pipeline layer "
                              f"({type(module).__name__}); wrapping it is not supported yet. Fix: leave it out of "
                              "target_modules / modules_to_save.")
    for p in module.parameters():
        p.requires_grad_(False)
    local = dict(module.named_modules())
    targets, saved = lora.inside(lora.targets, hf_prefix, local), lora.inside(lora.saved, hf_prefix, local)
    if not targets and not saved:
        return module
    meta = torch.device(builder.device).type == "meta"
    seed = builder.layer_seed(index)
    fork = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with fork, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "fan_in_fan_out is set to False but the target module is Conv1D"
        if seed is not None:
            torch.manual_seed(seed)
        if targets:
            layer_config = dataclasses.replace(lora.config, target_modules=targets, modules_to_save=None,
                                               exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                                               trainable_token_indices=None)
            inject_adapter_in_model(layer_config, module, adapter_name=ADAPTER, low_cpu_mem_usage=meta)
        if saved:
            _set_trainable(module, ADAPTER, module_names=saved, inference_mode=False)
    if not meta:
        _load_adapter(module, builder.source, hf_prefix)
    return module


def _load_adapter(module: nn.Module, source, hf_prefix: str) -> None:
    if source is None:
        return
    with torch.no_grad():
        for local, p in module.named_parameters():
            key = hf_key(hf_prefix + local)
            if not is_adapter_key(key):
                continue
            tensor = source.get(key)
            if tensor is None:
                continue
            if tuple(tensor.shape) != tuple(p.shape):
                raise LoraConfigError(f"adapter tensor {key!r} has shape {tuple(tensor.shape)} in the source but "
                                      f"{tuple(p.shape)} in the pipeline; the adapter was made with another r or "
                                      "model. Fix: use the LoraConfig the adapter was trained with.")
            p.copy_(tensor.to(p.dtype))


# ---------------------------------------------------------------------------------------------- whole stages
def mark_stage(pipe, embeddings) -> None:
    """Stage-level LoRA bookkeeping for an ``HFPipelineModule``: the output of its ``embeddings`` layers requires a
    gradient (so activation checkpointing of the first blocks still reaches their adapters, as HF's
    ``enable_input_require_grads``), and a stage with nothing to train says so once."""
    if getattr(pipe.hfpipe_builder, "lora", None) is None:
        return
    for module in embeddings:
        module.register_forward_hook(_require_grad)
    if not any(p.requires_grad for p in pipe.parameters()):
        warnings.warn(f"LoRA: pipeline stage {pipe.stage_id} holds no targeted module and nothing to train; "
                      "its layers stay frozen.")
        # The engine still needs an optimizer on every stage (torch refuses an empty parameter list; DeepSpeed's
        # bf16 optimizer a stage without any gradient): one scalar outside every layer (so no checkpoint name
        # table, HF name or export sees it) that the stage's first layer adds times zero to its output, so it gets
        # an exact zero gradient and the output is unchanged.
        idle = nn.Parameter(torch.zeros(1))
        pipe.register_parameter(IDLE_STAGE_PARAMETER, idle)
        first = next(module for _, module, _ in pipe.local_layers())
        first.register_forward_hook(lambda module, inputs, output: _add_zero_times(idle, output))


def _add_zero_times(param: nn.Parameter, output):
    if torch.is_grad_enabled() and isinstance(output, tuple) and output and output[0].is_floating_point():
        return (output[0] + (param.sum() * 0).to(output[0].dtype), *output[1:])
    return output


def _require_grad(module, inputs, output):
    if torch.is_grad_enabled() and isinstance(output, tuple) and output and output[0].is_floating_point():
        output[0].requires_grad_(True)
    return output


def trainable_count(model: nn.Module) -> int:
    """Trainable parameters (elements) of a module: a pipeline stage (an idle stage's placeholder not counted) or
    a ``PeftModel``."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n != IDLE_STAGE_PARAMETER)
