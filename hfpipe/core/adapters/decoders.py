"""Hand adapters for decoder families without ``base_model_pp_plan``: GPT-2 and OPT.

GPT-2: learned positions and dropout run in the embedding stage (``wpe``, ``drop``); Conv1D blocks are called with
keywords. OPT: positions come from the attention mask (cumulative sum), the base model nests a ``decoder``, and the
final norm may be followed by an output projection.
"""

from __future__ import annotations

import torch

from hfpipe.core.adapters.base import Adapter
from hfpipe.core.adapters.registry import register_adapter


@register_adapter
class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    layers_path = "h"
    embed_path = "wte"
    final_paths = ("ln_f",)


@register_adapter
class OPTAdapter(Adapter):
    model_types = ("opt",)
    layers_path = "decoder.layers"
    embed_path = "decoder.embed_tokens"
    final_paths = ("decoder.final_layer_norm", "decoder.project_out")

    def position_ids(self, input_ids, attention_mask):
        # OPTDecoder.forward: cumsum(mask) * mask - 1
        return (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()
