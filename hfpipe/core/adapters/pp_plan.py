"""The automatic adapter: any family whose transformers config declares ``base_model_pp_plan``.

transformers 5 lists, per family, the base model's pipeline-able parts in order, e.g. Llama's
``{"embed_tokens": ..., "layers": ..., "norm": ...}`` or GPT-NeoX's
``{"embed_in": ..., "emb_dropout": ..., "layers": ..., "final_layer_norm": ...}``. That is all hfpipe needs: the
first entry is the token embedding, the ``ModuleList`` is the blocks, entries after it are the final modules, and
anything else (dropout, scaling, rotary) is run by the family's own forward in the embedding stage. Blocks are called
the way these families' forwards call them (mask per ``config.layer_types`` or sliding window, rotary
``position_embeddings`` from the base model's ``rotary_emb``).

``VERIFIED_FAMILIES`` are checked against HF in the test-suite; other families with a plan are accepted with a
warning that asks the user to run ``hfpipe verify`` once. What the adapter cannot reproduce is refused here, before
any layer is built, with one line: attention kinds without a mask builder (linear / indexed attention), bidirectional
encoders (attention ``is_causal=False``), several rotary embeddings, plans naming modules the model lacks, and the
families in ``REFUSED_FAMILIES``. ``benchmarks/family_sweep.py`` runs every plan family of the installed transformers
through ``hfpipe verify`` and keeps these refusals honest (table in the README).
"""

from __future__ import annotations

import warnings

from torch import nn

from hfpipe.core.adapters.base import Adapter, UnsupportedModelError

#: Families whose pipeline matches HF exactly in our tests (loss and every gradient, p = 1, 2, 4).
VERIFIED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt_neox", "phi3", "olmo2",
                     "starcoder2", "mixtral", "gemma3_text")


#: Families whose config declares ``base_model_pp_plan`` but whose pipeline does not match HF (found by
#: ``benchmarks/family_sweep.py`` on transformers 5.24): refused before anything is built, with the reason.
REFUSED_FAMILIES: dict[str, str] = {
    "gemma4_text": "its forward computes per-layer token inputs (embed_tokens_per_layer, per_layer_model_projection) "
                   "that every block takes besides the hidden states, which the automatic adapter does not carry",
    "gemma3n_text": "its blocks take per-layer token inputs and AltUp predictions besides the hidden states, and "
                    "share KV caches across layers, which the automatic adapter does not carry",
}


def _submodule(base: nn.Module, path: str):
    try:
        return base.get_submodule(path)
    except AttributeError:
        return None


class PPPlanAdapter(Adapter):
    model_types = ()

    def __init__(self, config, model_class, meta_model):
        plan = dict(getattr(config, "base_model_pp_plan", None) or {})
        if not plan:
            raise UnsupportedModelError(f"{config.model_type} declares no base_model_pp_plan.")
        refused = REFUSED_FAMILIES.get(config.model_type)
        if refused is not None:
            raise UnsupportedModelError(
                f"{config.model_type} is refused by the automatic base_model_pp_plan adapter: {refused} "
                "(benchmarks/family_sweep.py); register a custom adapter (hfpipe.core.adapters.register_adapter).")
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                f"{config.model_type} has use_bidirectional_attention=True: its blocks attend both ways with masks the "
                "automatic adapter does not build; set config.use_bidirectional_attention=False (causal LM) or "
                "register a custom adapter.")
        base = meta_model.base_model  # the model itself for a base model (LlamaModel)
        names = list(plan)
        missing = [n for n in names if _submodule(base, n) is None]
        if missing:
            raise UnsupportedModelError(
                f"base_model_pp_plan of {config.model_type} names {missing}, which {type(base).__name__} does not "
                "have; the automatic adapter cannot follow it. Register a custom adapter "
                "(hfpipe.core.adapters.register_adapter).")
        layers = [n for n in names if isinstance(base.get_submodule(n), nn.ModuleList)]
        if len(layers) != 1:
            raise UnsupportedModelError(
                f"base_model_pp_plan of {config.model_type} has {len(layers)} block lists ({layers}); the automatic "
                "adapter needs exactly one. Register a custom adapter (hfpipe.core.adapters.register_adapter)."
            )
        self.layers_path = layers[0]
        self.embed_path = names[0]
        if not isinstance(base.get_submodule(self.embed_path), nn.Embedding):
            raise UnsupportedModelError(
                f"the first entry of {config.model_type}'s base_model_pp_plan ({self.embed_path!r}) is not a token "
                "embedding; register a custom adapter for this family."
            )
        self.final_paths = tuple(names[names.index(self.layers_path) + 1:])
        self.aux_paths = tuple(n for n in ("rotary_emb",) if getattr(base, n, None) is not None)
        extra_rotary = [n for n, m in base.named_children() if "rotary" in n and n not in self.aux_paths]
        if extra_rotary:
            raise UnsupportedModelError(
                f"{config.model_type} has several rotary embeddings ({['rotary_emb'] + extra_rotary}) chosen per block "
                "inside its forward; the automatic adapter cannot reproduce that. Register a custom adapter."
            )
        bidirectional = sorted({type(m).__name__ for m in base.get_submodule(self.layers_path).modules()
                                if getattr(m, "is_causal", None) is False})
        if bidirectional:
            raise UnsupportedModelError(
                f"{config.model_type} is a bidirectional encoder ({bidirectional[0]}.is_causal=False); the automatic "
                "adapter builds causal masks. Register a custom adapter (hfpipe.core.adapters.register_adapter).")
        super().__init__(config, model_class, meta_model)
        for index in range(self.num_blocks):  # an attention kind without a mask builder: refused here, not mid-run
            try:
                self.mask_function(index)
            except UnsupportedModelError as e:
                raise UnsupportedModelError(f"{config.model_type}: {e}") from None
        if config.model_type not in VERIFIED_FAMILIES:
            warnings.warn(
                f"{config.model_type} is converted by the automatic base_model_pp_plan adapter but is not in hfpipe's "
                f"verified list {list(VERIFIED_FAMILIES)}; run `hfpipe verify` on it once before training.",
                stacklevel=3,
            )
