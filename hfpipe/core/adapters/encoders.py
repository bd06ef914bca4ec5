"""Hand adapters for encoder families without ``base_model_pp_plan``: BERT, RoBERTa, DistilBERT.

Their transformers 5 forwards all build a bidirectional mask with ``create_bidirectional_mask`` and call each layer
as ``layer(hidden, attention_mask, **kwargs)``, so the description is only where the parts live.
"""

from __future__ import annotations

from hfpipe.core.adapters.base import Adapter
from hfpipe.core.adapters.registry import register_adapter


@register_adapter
class BertAdapter(Adapter):
    model_types = ("bert", "roberta", "xlm-roberta", "camembert")
    layers_path = "encoder.layer"
    embed_path = None
    final_paths = ()
    pooler_path = "pooler"
    causal = False
    extra_input_names = ("token_type_ids",)


@register_adapter
class DistilBertAdapter(Adapter):
    model_types = ("distilbert",)
    layers_path = "transformer.layer"
    embed_path = None
    final_paths = ()
    causal = False
