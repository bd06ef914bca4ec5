"""Hand adapters for encoder families without ``base_model_pp_plan``: BERT, RoBERTa, DistilBERT.

Their transformers 5 forwards all build a bidirectional mask with ``create_bidirectional_mask`` and call each layer
as ``layer(hidden, attention_mask, **kwargs)``, so the description is only where the parts live.
"""

from __future__ import annotations

from hfpipe.core.adapters.base import Adapter
from hfpipe.core.adapters.registry import register_adapter


class EncoderAdapter(Adapter):
    """What every bidirectional encoder shares: the embeddings stay in the embedding stage (``BodyShell``), no final
    modules after the blocks, BERT-style ``token_type_ids`` as an extra input."""

    layers_path = "encoder.layer"
    embed_path = None
    final_paths = ()
    causal = False
    extra_input_names = ("token_type_ids",)


@register_adapter
class BertAdapter(EncoderAdapter):
    model_types = ("bert", "roberta", "xlm-roberta", "camembert")
    pooler_path = "pooler"


@register_adapter
class DistilBertAdapter(EncoderAdapter):
    model_types = ("distilbert",)
    layers_path = "transformer.layer"
    extra_input_names = ()
