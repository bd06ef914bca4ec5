"""Meta-device model surgery and materialisation: the few operations every pipeline layer is built with.

A pipeline layer is cut out of the HF model built on the meta device (free: no memory, no init), then only the
layers a rank owns are made real. ``copy_without`` copies a meta model with large parts (all blocks) swapped out
*before* copying; ``materialize`` turns a meta module into a real one: ``to_empty`` + weights from a source + the
family's ``_init_weights`` for whatever the source did not provide (non-persistent buffers such as rotary
``inv_freq`` included) -- the same path HF's own loading takes. torch's ``to_empty`` and transformers'
``_init_weights`` do the work; what is written here is only the bookkeeping of which tensors came from the source.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Mapping

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model (family, head or configuration) cannot be turned into a pipeline."""


def no_model_for_config(config, model_class) -> UnsupportedModelError:
    """The error for an ``AutoModelFor...`` class without a model for ``config``; says the fix when an
    encoder-decoder meets a decoder task or the reverse."""
    from transformers import AutoModelForSeq2SeqLM

    hint = ""
    if getattr(config, "is_encoder_decoder", False) and type(config) in AutoModelForSeq2SeqLM._model_mapping:
        hint = ("; it is an encoder-decoder, which hfpipe runs as AutoModelForSeq2SeqLM only (summarization / "
                "translation: recipes/finetune_summarization.py, recipes/finetune_translation.py)")
    elif model_class is AutoModelForSeq2SeqLM:
        hint = ("; it is not an encoder-decoder (T5, mT5, BART, mBART, Marian): a decoder-only model runs as "
                "AutoModelForCausalLM (the summarization and translation recipes take those too)")
    return UnsupportedModelError(f"{model_class.__name__} has no model for config type {type(config).__name__} "
                                 f"(model_type={config.model_type!r}){hint}.")


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, value: nn.Module | None) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(root, parent_path)
    setattr(parent, name, value)


def shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose child dict can be edited without touching the original (children shared)."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def copy_without(root: nn.Module, replace: Mapping[str, nn.Module | None]) -> nn.Module:
    """Deep-copy ``root`` with the submodules at ``replace``'s paths swapped out *before* copying, so large parts
    (e.g. all blocks) are never copied. Works on meta modules, where this costs only Python objects."""
    clone = shallow_copy(root)
    for path, value in replace.items():
        parts = path.split(".")
        node = clone
        for part in parts[:-1]:  # copy-on-write down the path
            child = shallow_copy(node._modules[part])
            node._modules[part] = child
            node = child
        node._modules[parts[-1]] = value
    return copy.deepcopy(clone)


def materialize(module: nn.Module, init_owner: nn.Module, source=None, hf_names: Mapping[str, str] | None = None,
                seed: int | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Turn a meta ``module`` into a real one on ``device``.

    Parameters and persistent buffers named in ``hf_names`` (local name -> HF name) are read from ``source`` (an
    object with ``get(hf_name) -> Tensor | None``); everything else -- non-persistent buffers included -- is
    initialised by the family's ``_init_weights`` (``init_owner`` is the meta task model), under ``seed`` so that a
    layer's random init does not depend on which rank builds it.
    """
    dtype = getattr(source, "dtype", None)
    if dtype is not None:  # allocate in the dtype the weights arrive in (free on meta; no fp32 copy of a bf16 model)
        module = module.to(dtype=dtype)
    module = module.to_empty(device=device)
    if torch.device(device).type == "meta":  # names and shapes only (checkpoint tables): nothing to load or init
        return module
    loaded = set()
    if source is not None and hf_names:
        state = dict(module.named_parameters())
        state.update(dict(module.named_buffers()))
        with torch.no_grad():
            for local, hf_name in hf_names.items():
                tensor = source.get(hf_name)
                if tensor is None:
                    continue
                target = state[local]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"weight {hf_name!r} has shape {tuple(tensor.shape)} in the source but the model config gives "
                        f"{tuple(target.shape)}; the checkpoint does not match this config."
                    )
                if tensor.dtype != target.dtype:
                    target.data = torch.empty_like(target, dtype=tensor.dtype)
                target.data.copy_(tensor)
                target._is_hf_initialized = True
                loaded.add(local)
    names = {id(t): n for n, t in list(module.named_parameters()) + list(module.named_buffers())}
    fork = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with fork, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        for sub in module.modules():
            own = list(sub.parameters(recurse=False)) + [b for b in sub.buffers(recurse=False) if b is not None]
            if own and all(names.get(id(t)) in loaded for t in own):
                continue
            init_owner._init_weights(sub)
    for tensor in list(module.parameters()) + list(module.buffers()):
        if hasattr(tensor, "_is_hf_initialized"):
            del tensor._is_hf_initialized
    return module


def build_meta_model(config, model_class: type) -> nn.Module:
    """``model_class`` built from a copy of ``config`` on the meta device (no weights, no init)."""
    config = copy.deepcopy(config)
    with torch.device("meta"):
        return model_class._from_config(config)


def is_tied(meta_model: nn.Module) -> bool:
    """Whether the model's output embedding is its input embedding (one parameter)."""
    out, inp = meta_model.get_output_embeddings(), meta_model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight
