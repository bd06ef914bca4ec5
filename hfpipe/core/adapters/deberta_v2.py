"""DeBERTa-v2/v3: relative position embeddings shared by every block, across stages.

Each DeBERTa block reads the encoder's (LayerNorm'ed) relative position table. In the pipeline that table is one
``TiedLayerSpec("deberta_rel", ...)`` module placed in front of every block: DeepSpeed builds it once per stage and
sums its gradients over the stages that hold it, exactly like HF's single shared parameter. The table it outputs is a
float, so a stage may never start between it and its block (``cut_allowed=False``). The relative positions (ints)
and the 4D mask are recomputed per block; block 0 also runs the encoder's ``conv`` (when ``conv_kernel_size > 0``)
on its own input, as ``DebertaV2Encoder.forward`` does.
"""

from __future__ import annotations

from deepspeed.pipe import TiedLayerSpec
from torch import nn

from hfpipe.core.layers import Block, LayerKind, PipeLayer, _prefixed
from hfpipe.core.adapters.base import UnsupportedModelError
from hfpipe.core.adapters.encoders import EncoderAdapter
from hfpipe.core.adapters.registry import register_adapter

REL_KEY = "deberta_rel"


class RelativeEmbedding(PipeLayer):
    """``encoder.rel_embeddings`` (+ ``encoder.LayerNorm``): appends the normalised table to the tuple."""

    kind = LayerKind.PRELUDE

    def __init__(self, builder, index: int):
        super().__init__(builder, index)
        a = self.adapter
        enc = a.meta_base.encoder
        self._prefix = a.hf_prefix("encoder")
        self.rel_embeddings = self._materialize(builder.meta_copy(enc.rel_embeddings), "",
                                                self._prefix + "rel_embeddings.")
        self.LayerNorm = (self._materialize(builder.meta_copy(enc.LayerNorm), "", self._prefix + "LayerNorm.")
                          if "layer_norm" in enc.norm_rel_ebd else None)

    def hf_names(self):
        names = _prefixed(self.rel_embeddings, "rel_embeddings.", self._prefix + "rel_embeddings.")
        if self.LayerNorm is not None:
            names.update(_prefixed(self.LayerNorm, "LayerNorm.", self._prefix + "LayerNorm."))
        return names

    def forward(self, inputs):
        hidden, attention_mask, position_ids, *rest = inputs
        rel = self.rel_embeddings.weight
        if self.LayerNorm is not None:
            rel = self.LayerNorm(rel)
        return (hidden, attention_mask, position_ids, rel, *rest)


class DebertaBlock(Block):
    """One ``DebertaV2Layer`` fed with the shared relative table; block 0 also owns the encoder's ``conv``. A block
    like any other (checkpointable, named ``Block`` in manifests and ``type:`` partitioning)."""

    layer_name = "Block"

    def __init__(self, builder, index: int, block_index: int):
        super().__init__(builder, index, block_index)
        enc = self.adapter.meta_base.encoder
        self.conv = None
        if block_index == 0 and enc.conv is not None:
            self._conv_prefix = self.adapter.hf_prefix("encoder.conv")
            self.conv = self._materialize(builder.meta_copy(enc.conv), "", self._conv_prefix)

    def hf_names(self):
        names = super().hf_names()
        if self.conv is not None:
            names.update(_prefixed(self.conv, "conv.", self._conv_prefix))
        return names

    def forward(self, inputs):
        hidden, attention_mask, position_ids, *rest = inputs
        rel = None
        if self.adapter.relative_attention:
            rel, *rest = rest
        enc = self.adapter.meta_base.encoder
        mask4d = enc.get_attention_mask(attention_mask)
        relative_pos = enc.get_rel_pos(hidden)
        out, _ = self.layer(hidden, mask4d, query_states=None, relative_pos=relative_pos, rel_embeddings=rel,
                            output_attentions=False)
        if self.conv is not None:
            out = self.conv(hidden, out, attention_mask)
        return (out, attention_mask, position_ids, *rest)


@register_adapter
class DebertaV2Adapter(EncoderAdapter):
    model_types = ("deberta-v2",)
    block_class = DebertaBlock

    def validate(self) -> None:
        super().validate()
        if getattr(self.meta_base, "z_steps", 0) > 1:
            raise UnsupportedModelError("DeBERTa with z_steps > 1 re-runs its last block; hfpipe does not support it.")

    @property
    def relative_attention(self) -> bool:
        return bool(getattr(self.meta_base.encoder, "relative_attention", False))

    def body_shell(self) -> nn.Module:
        # DebertaV2Encoder.forward cannot run without blocks: the shell keeps the embeddings only.
        shell = nn.Module()
        shell.embeddings = self.builder_meta_copy(self.meta_base.embeddings)
        return shell

    @staticmethod
    def builder_meta_copy(module):
        import copy

        return copy.deepcopy(module)

    def shell_forward(self, shell, inputs):
        # DebertaV2Model.forward, up to the encoder
        return shell.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"),
                                position_ids=None, mask=inputs["attention_mask"], inputs_embeds=None)

    def block_prelude(self, builder, block_index: int, index: int):
        """The tied relative table in front of each block (``None`` without relative attention)."""
        if not self.relative_attention:
            return None
        enc = self.meta_base.encoder
        params = sum(p.numel() for p in enc.rel_embeddings.parameters())
        if "layer_norm" in enc.norm_rel_ebd:
            params += sum(p.numel() for p in enc.LayerNorm.parameters())
        spec = TiedLayerSpec(REL_KEY, RelativeEmbedding, builder, index,
                             tied_weight_attr=[n for n, _ in _meta_rel_params(enc)])
        return spec, RelativeEmbedding, params if block_index == 0 else 0


def _meta_rel_params(enc):
    out = [(f"rel_embeddings.{n}", p) for n, p in enc.rel_embeddings.named_parameters()]
    if "layer_norm" in enc.norm_rel_ebd:
        out += [(f"LayerNorm.{n}", p) for n, p in enc.LayerNorm.named_parameters()]
    return out
