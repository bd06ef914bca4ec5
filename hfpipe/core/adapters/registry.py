"""Adapters keyed by ``config.model_type``; families with ``base_model_pp_plan`` need no entry."""

from __future__ import annotations

from hfpipe.core.adapters.base import Adapter, UnsupportedModelError
from hfpipe.core.adapters.pp_plan import VERIFIED_FAMILIES, PPPlanAdapter

_REGISTRY: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` the adapter for each of ``cls.model_types``."""
    if not cls.model_types:
        raise ValueError(f"{cls.__name__}.model_types is empty; list the config.model_type values it handles.")
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_families() -> dict[str, str]:
    """``model_type -> how it is handled`` for every family hfpipe knows (hand adapters and verified plans)."""
    out = {t: cls.__name__ for t, cls in _REGISTRY.items()}
    for t in VERIFIED_FAMILIES:
        out.setdefault(t, "base_model_pp_plan (automatic)")
    return dict(sorted(out.items()))


def family_heads(model_type: str) -> tuple[str, ...]:
    """The heads hfpipe runs for a family (``hfpipe families``): encoder-decoders the seq2seq LM only; decoders the
    causal LM and the classification / QA heads; encoders the classification / QA heads."""
    cls = _REGISTRY.get(model_type)
    if cls is not None and cls.encoder_decoder:
        return ("seq2seq-lm",)
    rest = ("sequence-classification", "token-classification", "question-answering")
    return rest if cls is not None and not cls.causal else ("causal-lm",) + rest


def get_adapter(config, model_class: type, meta_model) -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type](config, model_class, meta_model)
    if getattr(config, "base_model_pp_plan", None):
        return PPPlanAdapter(config, model_class, meta_model)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported: it has no hfpipe adapter and its transformers config declares no "
        f"base_model_pp_plan. Supported: {', '.join(supported_families())}, and any family with a "
        "base_model_pp_plan. To add one, subclass hfpipe.core.adapters.Adapter (set layers_path, embed_path, final_paths, "
        "...) and decorate it with @hfpipe.core.adapters.register_adapter."
    )
