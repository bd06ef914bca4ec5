"""The pipeline layers: thin ``nn.Module`` wrappers around the family's own HF modules.

Every layer takes and returns one tuple; what travels between layers is ``(hidden_states, attention_mask,
position_ids[, input_ids])``: one float tensor that always receives a gradient, the rest int64. Masks (4D causal /
sliding / bidirectional) and rotary embeddings are recomputed on each block from these, so no float tensor without a
gradient and no bool tensor ever crosses a stage. Across a stage boundary the tuple travels packed
(:func:`pack_boundary`): one float tensor, the 0/1 mask as an extra channel of the hidden states, positions
recomputed by the receiving stage -- DeepSpeed sends every tensor of a tuple as its own blocking message.

Each layer knows its HF names (``hf_names()``: local parameter/buffer name -> HF state-dict key), which is the one
table that loading, gradient comparison, checkpoint conversion and export share. What other modules need to know
about a layer -- its kind, whether activation checkpointing may wrap it, how a plan names it -- is a class attribute
(:class:`LayerTraits`), so nothing outside a layer class compares class names.
"""

from __future__ import annotations

import enum
from typing import ClassVar

import torch
from torch import nn

from hfpipe.core import lora, quantize
from hfpipe.core.meta import copy_without, materialize


def _prefixed(module: nn.Module, local_prefix: str, hf_prefix: str) -> dict[str, str]:
    names = {}
    # LoRA hook: names inside PEFT-wrapped modules map to HF names (base weights) or PEFT keys (adapters)
    for name, _ in module.named_parameters():
        names[f"{local_prefix}{name}"] = lora.hf_key(f"{hf_prefix}{name}")
    for name, _ in module.named_buffers():
        names[f"{local_prefix}{name}"] = lora.hf_key(f"{hf_prefix}{name}")
    return names


def pack_boundary(inputs: tuple) -> torch.Tensor | tuple:
    """What a stage sends to the next: ``(hidden, attention_mask, position_ids, *rest)`` -> ``[batch, seq, hidden + 1]``
    in the hidden states' dtype, the attention mask as the last channel (0/1 is exact in every float dtype).

    The positions are left out: every family's positions are a function of the mask (``Adapter.position_ids``), so
    :func:`unpack_boundary` recomputes them. ``rest`` (the int64 input ids of decoder sequence classification)
    follows as its own tensors. The mask channel's gradient is zero, so the backward message is the hidden states'
    gradient plus one zero channel.
    """
    hidden, attention_mask, _position_ids, *rest = inputs
    packed = torch.cat((hidden, attention_mask.unsqueeze(-1).to(hidden.dtype)), dim=-1)
    return (packed, *rest) if rest else packed


def unpack_boundary(adapter, received: torch.Tensor | tuple) -> tuple:
    """Inverse of :func:`pack_boundary` on the receiving stage: ``(hidden, attention_mask, position_ids, *rest)``."""
    packed, *rest = received if isinstance(received, tuple) else (received,)
    hidden = packed[..., :-1].contiguous()  # a slice has row stride hidden + 1; some blocks .view() their input
    attention_mask = packed[..., -1].detach().long()
    return (hidden, attention_mask, adapter.position_ids(attention_mask, attention_mask), *rest)


class LayerKind(enum.Enum):
    """What a pipeline layer is, for the cost model, plans and manifests (``LayerKind.BLOCK.value == "block"``)."""

    EMBEDDING = "embedding"
    PRELUDE = "prelude"  # a per-block helper layer in front of its block (DeBERTa's shared relative table)
    BLOCK = "block"
    FINAL = "final"
    HEAD = "head"


class LayerTraits:
    """What other modules ask about a layer, as class attributes of the layer (never its class name)."""

    kind: ClassVar[LayerKind]
    #: The layer's name in manifests, plans and ``type:<regex>`` partitioning (default: the class name).
    layer_name: ClassVar[str] = ""
    #: DeepSpeed activation checkpointing may wrap it (blocks; never the embedding, whose gradient it would cut).
    checkpointable: ClassVar[bool] = False
    #: ``"whole"`` block, or its ``"attention"`` / ``"mlp"`` half.
    part: ClassVar[str] = "whole"
    #: ``balanced:blocks`` may start a stage here (not between the two halves of a block).
    starts_block: ClassVar[bool] = True
    #: Block children this layer computes (``None``: all of them) and whether attention is among them (costs).
    owned_children: ClassVar[tuple[str, ...] | None] = None
    has_attention: ClassVar[bool] = False
    #: How ``hfpipe plan`` lists it (``None``: with its block, ``B3``; halves as ``B3.attn`` / ``B3.mlp``).
    plan_label: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "layer_name" not in cls.__dict__:
            cls.layer_name = cls.__name__


class PipeLayer(LayerTraits, nn.Module):
    """Base: subclasses build their HF submodules from the builder's meta model in ``__init__``."""

    def __init__(self, builder, index: int):
        super().__init__()
        self.builder = builder  # plain object (not a submodule): adapter, head, weight source, seed
        self.index = index

    @property
    def adapter(self):
        return self.builder.adapter

    def _materialize(self, meta_module: nn.Module, local_prefix: str, hf_prefix: str) -> nn.Module:
        names = {k[len(local_prefix):]: v for k, v in _prefixed(meta_module, local_prefix, hf_prefix).items()}
        module = materialize(meta_module, self.builder.init_owner, self.builder.source, names,
                             seed=self.builder.layer_seed(self.index), device=self.builder.device)
        module = quantize.quantize(module, self.builder, hf_prefix)  # QLoRA hook: no-op without a 4-bit plan
        module = lora.wrap(module, self.builder, hf_prefix, self.index)  # LoRA hook: no-op without a LoRA plan
        return quantize.adapters_in_fp32(module, self.builder)  # QLoRA: PEFT's adapter dtype; no-op without 4 bits

    def hf_names(self) -> dict[str, str]:
        raise NotImplementedError


class TokenEmbedding(PipeLayer):
    """The token embedding table alone, so that it can be tied to the LM head with a ``TiedLayerSpec``.

    Input: ``(input_ids, attention_mask, *extra_inputs)``. Output: ``(inputs_embeds, attention_mask, position_ids,
    *extra_inputs[, input_ids])``.
    """

    kind = LayerKind.EMBEDDING
    plan_label = "embed"

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

    kind = LayerKind.EMBEDDING
    plan_label = "embed"

    def __init__(self, builder, index: int):
        super().__init__(builder, index)
        a = self.adapter
        self._prefix = a.hf_prefix("")
        self.base = self._materialize(a.body_shell(), "", self._prefix)
        #: Llama, Mistral, Qwen2, ...: the decoder shell hands ``inputs_embeds`` on unchanged, and its mask and
        #: rotary work is redone by every block anyway, so it is skipped.
        self.passthrough = bool(a.embed_path) and self._returns_its_input()

    def _returns_its_input(self) -> bool:
        """Whether this decoder shell (no parameters) returns ``inputs_embeds`` bit for bit, checked once on a small
        padded input in training mode, so that embedding scaling, dropout or position embeddings all answer no."""
        if any(True for _ in self.base.parameters()):
            return False
        device = next(self.base.buffers(), torch.empty(0)).device
        dtype = next((b.dtype for b in self.base.buffers() if b.is_floating_point()), torch.float32)
        hidden = self.adapter.config.hidden_size
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type), \
                torch.no_grad():
            torch.manual_seed(0)
            x = torch.randn(2, 5, hidden, device=device, dtype=dtype)
            mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]], device=device)
            try:
                out = self.adapter.shell_forward(self.base, {"inputs_embeds": x, "attention_mask": mask})
            except Exception:  # a shell that cannot run on this probe keeps running for real
                return False
        return out.shape == x.shape and bool(torch.equal(out, x))

    def hf_names(self):
        return _prefixed(self.base, "base.", self._prefix)

    def forward(self, inputs):
        a = self.adapter
        if self.passthrough:
            return inputs
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

    kind = LayerKind.BLOCK
    checkpointable = True
    has_attention = True

    def __init__(self, builder, index: int, block_index: int):
        super().__init__(builder, index)
        a = self.adapter
        self.block_index = block_index
        path = self._blocks_path()
        self._prefix = a.hf_prefix(f"{path}.{block_index}")
        meta_layer = a.meta_base.get_submodule(path)[block_index]
        self.layer = self._materialize(self._own_part(meta_layer), "", self._prefix)
        if self.has_attention:
            self.aux = nn.Module()
            for path in a.aux_paths:
                meta_aux = a.meta_base.get_submodule(path)
                setattr(self.aux, path.replace(".", "_"),
                        materialize(builder.meta_copy(meta_aux), builder.init_owner, device=builder.device))

    def _blocks_path(self) -> str:
        """Where the HF blocks live in the body (encoder-decoders: one list per stack)."""
        return self.adapter.layers_path

    def _own_part(self, meta_layer: nn.Module) -> nn.Module:
        """The (meta) module this layer computes: the whole block."""
        return self.builder.meta_copy(meta_layer)

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

    kind = LayerKind.FINAL
    plan_label = "norm"

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
        if builder.head.uses_pooler and a.pooler_path and getattr(a.meta_base, a.pooler_path, None) is not None:
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


# ------------------------------------------------------------------------------------------------- half-blocks
#: The two halves of a standard pre-norm block ``h += attn(norm1(h)); h += mlp(norm2(h))``: the children each owns
#: (the ``owned_children`` of :class:`AttentionHalfBlock` and :class:`MLPHalfBlock`).
HALF_BLOCK_CHILDREN = {"attention": ("input_layernorm", "self_attn"), "mlp": ("post_attention_layernorm", "mlp")}


class _ZeroBranch(nn.Module):
    """Stands in for the branch a half does not own. It returns exact zeros, so ``residual + branch`` is the residual
    bit for bit and the family's own block ``forward`` runs unchanged (no re-implemented maths, no kwargs guessed)."""

    def __init__(self, attention: bool):
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.attention else zeros


def half_module(layer: nn.Module, part: str) -> nn.Module:
    """A copy of block ``layer`` that computes only its ``part`` ("attention" | "mlp") half."""
    other = "mlp" if part == "attention" else "attention"
    norm, branch = HALF_BLOCK_CHILDREN[other]
    return copy_without(layer, {norm: nn.Identity(), branch: _ZeroBranch(other == "attention")})


def _tiny_config(config):
    """``config`` shrunk to a few thousand parameters (same family, same flags) for the half-block self-check."""
    import copy

    tiny = copy.deepcopy(config)
    shrink = {"hidden_size": 16, "intermediate_size": 24, "moe_intermediate_size": 24,
              "shared_expert_intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 8, "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4,
              "num_experts_per_tok": 2}
    for name, value in shrink.items():
        if getattr(tiny, name, None) is not None:
            setattr(tiny, name, value)
    tiny._attn_implementation = "eager"
    return tiny


def _halves_match(block_class: type, config) -> bool:
    """Numerical self-check on a tiny real instance: attention half then MLP half == the whole block."""
    tiny = _tiny_config(config)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        with torch.device("cpu"):
            try:
                layer = block_class(tiny, 0)
            except TypeError:
                layer = block_class(tiny)
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
        layer.eval()
        hidden = torch.randn(2, 5, tiny.hidden_size)
        position_ids = torch.arange(5).unsqueeze(0).expand(2, 5)
        rotary = (torch.randn(2, 5, 8), torch.randn(2, 5, 8))
        kwargs = {"attention_mask": None, "position_ids": position_ids, "position_embeddings": rotary}
        whole = layer(hidden, **kwargs)
        attn = half_module(layer, "attention")(hidden, **kwargs)
        attn = attn[0] if isinstance(attn, tuple) else attn
        split = half_module(layer, "mlp")(attn)
        whole = whole[0] if isinstance(whole, tuple) else whole
        split = split[0] if isinstance(split, tuple) else split
        return bool(torch.allclose(whole, split, rtol=1e-6, atol=1e-6)) and not torch.equal(whole, hidden)


def supports_half_blocks(adapter) -> bool:
    """Whether this family's blocks are split into an attention half and an MLP half (see :class:`HalfBlock`).

    Decided once per family and configuration, never by where cuts fall: every block has exactly the children
    ``input_layernorm, self_attn, post_attention_layernorm, mlp`` (Llama, Mistral, Qwen2, ...; not Gemma-2 with its
    extra norms, nor parallel-residual GPT-NeoX) *and* running the two halves in a row gives the block's output on a
    tiny real instance. An adapter may force the answer with a ``half_blocks = True/False`` class attribute.
    """
    forced = getattr(adapter, "half_blocks", None)
    if forced is not None:
        return bool(forced)
    if not adapter.causal:
        return False
    blocks = adapter.meta_base.get_submodule(adapter.layers_path)
    expected = {c for pair in HALF_BLOCK_CHILDREN.values() for c in pair}
    if len(blocks) == 0 or any(set(dict(b.named_children())) != expected for b in blocks):
        return False
    try:
        return all(_halves_match(cls, adapter.config) for cls in {type(b) for b in blocks})
    except Exception:  # any family whose block cannot be built or called this way keeps whole blocks
        return False


class HalfBlock(Block):
    """One half of a pre-norm block (``part`` = "attention" or "mlp"): only the hidden state crosses between the two
    halves, so a stage boundary may fall inside a block. Parameters keep their HF names
    (``model.layers.{i}.self_attn.q_proj.weight``, ...)."""

    def _own_part(self, meta_layer: nn.Module) -> nn.Module:
        return half_module(meta_layer, self.part)


class AttentionHalfBlock(HalfBlock):
    """``h + self_attn(input_layernorm(h))`` (with the block's mask and rotary embeddings, as the family computes)."""

    part, plan_label = "attention", "attn"
    owned_children = HALF_BLOCK_CHILDREN["attention"]


class MLPHalfBlock(HalfBlock):
    """``h + mlp(post_attention_layernorm(h))``."""

    part, plan_label = "mlp", "mlp"
    owned_children = HALF_BLOCK_CHILDREN["mlp"]
    starts_block = False
    has_attention = False

    def forward(self, inputs):
        hidden, *rest = inputs
        out = self.layer(hidden)
        return (out[0] if isinstance(out, tuple) else out, *rest)
