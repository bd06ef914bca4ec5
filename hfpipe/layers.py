"""The pipeline layers: thin ``nn.Module`` wrappers around the family's own HF modules.

Every layer takes and returns one tuple; what travels between layers (and across stage boundaries) is
``(hidden_states, attention_mask, position_ids[, input_ids])``: one float tensor that always receives a gradient,
the rest int64. Masks (4D causal / sliding / bidirectional) and rotary embeddings are recomputed on each block from
these, so no float tensor without a gradient and no bool tensor ever crosses a stage.

Each layer knows its HF names (``hf_names()``: local parameter/buffer name -> HF state-dict key), which is the one
table that loading, gradient comparison, checkpoint conversion and export share.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters.base import materialize


def _prefixed(module: nn.Module, local_prefix: str, hf_prefix: str) -> dict[str, str]:
    names = {}
    for name, _ in module.named_parameters():
        names[f"{local_prefix}{name}"] = f"{hf_prefix}{name}"
    for name, _ in module.named_buffers():
        names[f"{local_prefix}{name}"] = f"{hf_prefix}{name}"
    return names


class PipeLayer(nn.Module):
    """Base: subclasses build their HF submodules from the builder's meta model in ``__init__``."""

    #: Layer kind, used by cost models and ``type:`` partitioning.
    kind = "layer"

    def __init__(self, builder, index: int):
        super().__init__()
        self.builder = builder  # plain object (not a submodule): adapter, head, weight source, seed
        self.index = index

    @property
    def adapter(self):
        return self.builder.adapter

    def _materialize(self, meta_module: nn.Module, local_prefix: str, hf_prefix: str) -> nn.Module:
        names = {k[len(local_prefix):]: v for k, v in _prefixed(meta_module, local_prefix, hf_prefix).items()}
        return materialize(meta_module, self.builder.init_owner, self.builder.source, names,
                           seed=self.builder.layer_seed(self.index), device=self.builder.device)

    def hf_names(self) -> dict[str, str]:
        raise NotImplementedError


class TokenEmbedding(PipeLayer):
    """The token embedding table alone, so that it can be tied to the LM head with a ``TiedLayerSpec``.

    Input: ``(input_ids, attention_mask, *extra_inputs)``. Output: ``(inputs_embeds, attention_mask, position_ids,
    *extra_inputs[, input_ids])``.
    """

    kind = "embedding"

    def __init__(self, builder, index: int):
        super().__init__(builder, index)
        a = self.adapter
        self._prefix = a.hf_prefix(a.embed_path)
        self.embed = self._materialize(builder.meta_copy(a.meta_base.get_submodule(a.embed_path)), "", self._prefix)

    def hf_names(self):
        return _prefixed(self.embed, "embed.", self._prefix)

    def forward(self, inputs):
        input_ids, attention_mask, *extra = inputs
        position_ids = self.adapter.position_ids(input_ids, attention_mask)
        out = (self.embed(input_ids), attention_mask, position_ids, *extra)
        if self.builder.carry_input_ids:
            out = out + (input_ids,)
        return out


class BodyShell(PipeLayer):
    """The family's base model with its blocks, final modules and pooler removed.

    Running its own ``forward`` gives exactly the hidden states HF feeds to the first block (position embeddings,
    scaling, embedding norms and dropout included), without hfpipe re-implementing any of it. For decoders it
    follows :class:`TokenEmbedding` and is called with ``inputs_embeds``; for encoders it is the first layer and
    holds the embeddings itself.
    """

    kind = "embedding"

    def __init__(self, builder, index: int):
        super().__init__(builder, index)
        a = self.adapter
        self._prefix = f"{a.base_prefix}."
        self.base = self._materialize(a.body_shell(), "", self._prefix)

    def hf_names(self):
        return _prefixed(self.base, "base.", self._prefix)

    def forward(self, inputs):
        a = self.adapter
        if a.embed_path:  # decoder: (inputs_embeds, attention_mask, position_ids, *rest)
            inputs_embeds, attention_mask, position_ids, *rest = inputs
            hidden = a.shell_forward(self.base, {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask})
            return (hidden, attention_mask, position_ids, *rest)
        input_ids, attention_mask, *extra = inputs
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        kwargs.update(zip(a.extra_input_names, extra))
        hidden = a.shell_forward(self.base, kwargs)
        out = (hidden, attention_mask, a.position_ids(input_ids, attention_mask))
        if self.builder.carry_input_ids:
            out = out + (input_ids,)
        return out


class Block(PipeLayer):
    """One HF block (``layer``) plus per-stage helpers without parameters (``aux``: rotary embeddings)."""

    kind = "block"

    def __init__(self, builder, index: int, block_index: int):
        super().__init__(builder, index)
        a = self.adapter
        self.block_index = block_index
        self._prefix = a.hf_prefix(f"{a.layers_path}.{block_index}")
        meta_layer = a.meta_base.get_submodule(a.layers_path)[block_index]
        self.layer = self._materialize(builder.meta_copy(meta_layer), "", self._prefix)
        self.aux = nn.Module()
        for path in a.aux_paths:
            meta_aux = a.meta_base.get_submodule(path)
            setattr(self.aux, path.replace(".", "_"),
                    materialize(builder.meta_copy(meta_aux), builder.init_owner, device=builder.device))

    def hf_names(self):
        return _prefixed(self.layer, "layer.", self._prefix)

    def forward(self, inputs):
        hidden, attention_mask, position_ids, *rest = inputs
        hidden = self.adapter.call_block(self, self.block_index, hidden, attention_mask, position_ids)
        return (hidden, attention_mask, position_ids, *rest)


class Final(PipeLayer):
    """Final norm / output projection of the body (and the pooler when the head needs it).

    Output: ``(hidden_states, pooled_or_hidden, attention_mask, position_ids, *rest)``; it always sits on the same
    stage as the head, so the extra float never crosses a boundary.
    """

    kind = "final"

    def __init__(self, builder, index: int):
        super().__init__(builder, index)
        a = self.adapter
        self.final = nn.ModuleList()
        self._prefixes = []
        for path, meta in a.final_modules():
            prefix = a.hf_prefix(path)
            self._prefixes.append(prefix)
            self.final.append(self._materialize(builder.meta_copy(meta), "", prefix))
        self.pooler = None
        if builder.head.uses_pooler and a.pooler_path and a.meta_base.get_submodule(a.pooler_path) is not None:
            self._pooler_prefix = a.hf_prefix(a.pooler_path)
            self.pooler = self._materialize(builder.meta_copy(a.meta_base.get_submodule(a.pooler_path)), "",
                                            self._pooler_prefix)

    def hf_names(self):
        names = {}
        for i, (mod, prefix) in enumerate(zip(self.final, self._prefixes)):
            names.update(_prefixed(mod, f"final.{i}.", prefix))
        if self.pooler is not None:
            names.update(_prefixed(self.pooler, "pooler.", self._pooler_prefix))
        return names

    def forward(self, inputs):
        hidden, attention_mask, position_ids, *rest = inputs
        for mod in self.final:
            hidden = mod(hidden)
        pooled = self.pooler(hidden) if self.pooler is not None else hidden
        return (hidden, pooled, attention_mask, position_ids, *rest)
