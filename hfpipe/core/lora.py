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
import json
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from hfpipe.core.weights import StateDictSource, WeightSource

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
    adapter = getattr(args, "peft_adapter", None)
    if getattr(args, "merge_lora", False) and getattr(args, "load_in_4bit", False):
        raise LoraConfigError("--merge_lora with --load_in_4bit: merging into the 4-bit base would round the merged "
                              "weights back to 4 bits and lose most of the adapter's update. Fix: drop --merge_lora "
                              "and merge output_dir/final onto the full-precision base afterwards: hfpipe export "
                              "OUT/final --merge-lora --model BASE --output MERGED.")
    if adapter and args.peft_config:
        raise LoraConfigError(f"--peft_adapter {adapter!r} and --peft_config {args.peft_config!r}: the adapter "
                              "carries its own config. Fix: pass one of them.")
    if not args.peft_config and not adapter and args.lora_r == 0:
        if getattr(args, "merge_lora", False):
            raise LoraConfigError("--merge_lora is set but LoRA is off. Fix: add --lora_r R or --peft_adapter, or "
                                  "drop --merge_lora.")
        if given:
            raise LoraConfigError(f"--{next(iter(given))} is set but LoRA is off. Fix: add --lora_r R (e.g. 8) or "
                                  "--peft_config adapter_config.json.")
        return None
    from peft import LoraConfig

    if args.peft_config or adapter:
        config = adapter_config(adapter) if adapter else read_peft_config(args.peft_config)
        what = f"--peft_adapter {adapter!r}" if adapter else f"--peft_config {args.peft_config!r}"
        for flag, value in given.items():
            value = module_names(value) if flag in ("lora_target_modules", "lora_modules_to_save") else value
            if not _same(value, getattr(config, LORA_FLAGS[flag])):
                raise LoraConfigError(f"--{flag} {value!r} disagrees with {LORA_FLAGS[flag]}="
                                      f"{getattr(config, LORA_FLAGS[flag])!r} in {what}. "
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


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(config, state: dict, output_dir: str, base_model: str | None = None, *, extra=None,
                 overwrite: bool = True) -> str:
    """A PEFT adapter folder: ``config`` written by PEFT (``LoraConfig.save_pretrained``, ``inference_mode`` on and
    ``base_model_name_or_path`` = ``base_model`` when given, as ``PeftModel.save_pretrained`` does) and the adapter
    tensors of ``state`` (:func:`is_adapter_key` names: PEFT's own keys) as ``adapter_model.safetensors``;
    ``extra(folder)`` adds files (model card, tokenizer). The folder appears only when complete (temp + rename)."""
    from safetensors.torch import save_file

    from hfpipe.core.weights import atomic_folder

    config = dataclasses.replace(config, inference_mode=True,
                                 base_model_name_or_path=base_model or config.base_model_name_or_path)
    tensors = {k: v.contiguous() for k, v in sorted(state.items()) if is_adapter_key(k)}
    with atomic_folder(output_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if extra is not None:
            extra(str(tmp))
    return str(output_dir)


# ------------------------------------------------------------------------------------------- an adapter in
def is_adapter_folder(path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS))


def _adapter_file(path, name: str) -> str:
    """``name`` inside the adapter ``path`` (a folder, or a Hub id read through the local cache / the Hub)."""
    if os.path.isdir(path):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise LoraConfigError(f"peft_adapter {path!r} has no {name}; expected a PEFT adapter folder "
                                  "(PeftModel.save_pretrained: adapter_config.json + adapter_model.safetensors).")
        return file
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(os.fspath(path), name)
    except Exception as exc:  # offline and not cached, unknown repo, no such file
        raise LoraConfigError(f"peft_adapter {path!r} is no folder and its {name} could not be read from the Hub "
                              f"({type(exc).__name__}). Fix: pass a PEFT adapter folder or a Hub id holding one."
                              ) from None


def adapter_config(path, peft_config=None):
    """The trainable ``LoraConfig`` of the adapter at ``path`` (``inference_mode`` off); a ``peft_config`` given
    besides must agree with it on ``r``, ``lora_alpha`` and ``target_modules``."""
    config = dataclasses.replace(read_peft_config(_adapter_file(path, ADAPTER_CONFIG)), inference_mode=False)
    if peft_config is not None:
        for field in ("r", "lora_alpha", "target_modules"):
            if not _same(getattr(peft_config, field), getattr(config, field)):
                raise LoraConfigError(f"peft_config {field}={getattr(peft_config, field)!r} disagrees with "
                                      f"{field}={getattr(config, field)!r} of peft_adapter {path!r}. Fix: pass "
                                      "only the adapter (its config comes with it).")
        if config.task_type is None:
            config = dataclasses.replace(config, task_type=peft_config.task_type)
    return config


def _same_model(a: str, b: str) -> bool:
    """Whether two ``_name_or_path`` values name the same model: the same string or folder, or the same last path
    part (a Hub id and a downloaded copy of it, ``meta-llama/Llama-3-8B`` and ``/models/Llama-3-8B``). A heuristic
    on names only; the shapes check (:meth:`AdapterSource.check`) is the strict one."""
    if a == b:
        return True
    if os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b):
        return True
    last = [os.path.basename(x.replace("\\", "/").rstrip("/")).lower() for x in (a, b)]
    return last[0] == last[1]


class AdapterSource(WeightSource):
    """A base weight source plus a PEFT ``adapter_model.safetensors``: adapter keys (:func:`is_adapter_key`) are read
    from the adapter file with ``safe_open``, one tensor at a time and only those a rank's layers ask for
    (``names_read`` counts them), everything else from the base source."""

    def __init__(self, base, file: str, where: str):
        from safetensors import safe_open

        self.base, self.file, self.where = base, file, where
        self.names_read: list[str] = []
        self._handle = None
        with safe_open(file, framework="pt") as f:  # the header only: names and shapes
            self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    @property
    def dtype(self):
        return getattr(self.base, "dtype", None)

    @dtype.setter
    def dtype(self, value):
        if self.base is not None:
            self.base.dtype = value

    def keys(self):
        return set(self.shapes) | set(self.base.keys() if self.base is not None else ())

    def _resolve(self, name: str):
        if is_adapter_key(name):
            return name if name in self.shapes else None
        return self.base._resolve(name) if self.base is not None else None

    def get(self, name: str):
        if not is_adapter_key(name):
            return self.base.get(name) if self.base is not None else None
        if name not in self.shapes:
            return None
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(self.file, framework="pt")
        self.names_read.append(name)
        return self._handle.get_tensor(name)

    def check(self, lora: LoraPlan, model_name: str, base_name: str | None) -> None:
        """The adapter must fit the model: its ``base_model_name_or_path`` names this model (when both are known)
        and its tensors are exactly the adapter tensors PEFT gives this model, shape for shape."""
        if base_name and model_name and not _same_model(base_name, model_name):
            raise LoraConfigError(f"peft_adapter {self.where!r} was trained on base_model_name_or_path={base_name!r} "
                                  f"but the model is {model_name!r}. Fix: load the adapter onto its base model (or "
                                  "correct base_model_name_or_path in its adapter_config.json).")
        expected = lora.shapes
        wrong = [k for k in sorted(self.shapes) if k in expected and self.shapes[k] != expected[k]]
        extra = sorted(set(self.shapes) - set(expected))
        missing = sorted(set(expected) - set(self.shapes))
        if wrong or extra or missing:
            first = (f"tensor {wrong[0]!r} has shape {self.shapes[wrong[0]]} in the adapter but "
                     f"{expected[wrong[0]]} in the model" if wrong else
                     f"the adapter holds {extra[:3]}, which the model does not have" if extra else
                     f"the adapter lacks {missing[:3]}, which the model has")
            raise LoraConfigError(f"peft_adapter {self.where!r} (base_model_name_or_path={base_name!r}) does not fit "
                                  f"the model {model_name or '(unnamed)'!r}: {first} ({len(wrong)} shape mismatches, "
                                  f"{len(extra)} unexpected, {len(missing)} missing). Fix: load the adapter onto the "
                                  "model it was trained on.")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None
        return state


def attach_adapter(builder, path) -> AdapterSource:
    """Make the adapter at ``path`` (folder or Hub id) the source of ``builder``'s adapter tensors, after checking
    that it fits the model (:meth:`AdapterSource.check`); the base weights still come from the builder's source.
    ``builder.lora`` must come from :func:`adapter_config` of the same adapter."""
    if getattr(builder, "lora", None) is None:
        raise LoraConfigError("attach_adapter needs a builder with a LoRA plan (peft_config from adapter_config).")
    with open(_adapter_file(path, ADAPTER_CONFIG)) as f:
        base_name = json.load(f).get("base_model_name_or_path")
    source = AdapterSource(builder.source, _adapter_file(path, ADAPTER_WEIGHTS), os.fspath(path))
    source.check(builder.lora, getattr(builder.adapter.config, "_name_or_path", "") or "", base_name)
    builder.source = source
    return source


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
    #: PEFT's adapter state-dict keys (``get_peft_model_state_dict``) and their shapes, from the meta model
    shapes: dict = dataclasses.field(default_factory=dict)

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
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
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
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    return LoraPlan(peft_model.peft_config[ADAPTER], targets, saved, shapes)


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


def adapter_only(pipe) -> bool:
    """Whether a pipeline's checkpoints hold the adapter only (LoRA: DeepSpeed's ``exclude_frozen_parameters`` on
    save, ``load_module_strict=False`` on load; the frozen base comes from the source the pipeline was built from)."""
    return getattr(getattr(pipe, "hfpipe_builder", None), "lora", None) is not None
