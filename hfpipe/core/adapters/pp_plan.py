"""The automatic adapter: any family whose transformers config declares ``base_model_pp_plan``.

transformers 5 lists, per family, the base model's pipeline-able parts in order, e.g. Llama's
``{"embed_tokens": ..., "layers": ..., "norm": ...}`` or GPT-NeoX's
``{"embed_in": ..., "emb_dropout": ..., "layers": ..., "final_layer_norm": ...}``. That is all hfpipe needs: the
first entry is the token embedding, the ``ModuleList`` is the blocks, entries after it are the final modules, and
anything else (dropout, scaling, rotary) is run by the family's own forward in the embedding stage. Blocks are called
the way these families' forwards call them (mask per ``config.layer_types`` or sliding window, rotary
``position_embeddings`` from the base model's ``rotary_emb``).

``VERIFIED_FAMILIES`` are checked against HF in the test-suite; other families with a plan are accepted with a
warning that asks the user to run ``hfpipe verify`` once.
"""

from __future__ import annotations

import warnings

from torch import nn

from hfpipe.core.adapters.base import Adapter, UnsupportedModelError

#: Families whose pipeline matches HF exactly in our tests (loss and every gradient, p = 1, 2, 4).
VERIFIED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt_neox", "phi3", "olmo2",
                     "starcoder2", "mixtral")


class PPPlanAdapter(Adapter):
    model_types = ()

    def __init__(self, config, model_class, meta_model):
        plan = dict(getattr(config, "base_model_pp_plan", None) or {})
        if not plan:
            raise UnsupportedModelError(f"{config.model_type} declares no base_model_pp_plan.")
        base = getattr(meta_model, meta_model.base_model_prefix)
        names = list(plan)
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
        super().__init__(config, model_class, meta_model)
        if config.model_type not in VERIFIED_FAMILIES:
            warnings.warn(
                f"{config.model_type} is converted by the automatic base_model_pp_plan adapter but is not in hfpipe's "
                f"verified list {list(VERIFIED_FAMILIES)}; run `hfpipe verify` on it once before training.",
                stacklevel=3,
            )
