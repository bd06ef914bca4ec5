"""The body of an HF model described as a fixed list of pipeline layers.

An adapter says *where* the parts of a family's base model live (token embedding, blocks, final norm, pooler) and
*how* one block is called (which mask, which positions). It never re-implements the family's maths: the embedding
stage runs the family's own base-model ``forward`` with its blocks removed, each block is the family's own layer
module, and the task head (``hfpipe.core.heads``) runs the task model's own ``forward`` on a stub body. So one small
description per family is enough, and families whose transformers config declares ``base_model_pp_plan`` need none
(``hfpipe.core.adapters.pp_plan``).

Every module here is first built on the meta device (free); ``hfpipe.core.meta`` materialises what a rank owns.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from transformers import masking_utils

from hfpipe.core.meta import UnsupportedModelError, copy_without, get_submodule

class Adapter:
    """Describes one family's body. Subclasses set the class attributes; the registry instantiates one per model.

    Paths are relative to the *base* model (``model.model``, ``model.transformer``, ``model.bert``, ...).
    """

    #: ``config.model_type`` values handled by this adapter.
    model_types: tuple[str, ...] = ()
    #: The ``nn.ModuleList`` of blocks.
    layers_path: str = "layers"
    #: Token embedding split into its own layer (decoders: it may be tied to the LM head). ``None`` keeps the
    #: embedding inside the embedding stage (encoders).
    embed_path: str | None = "embed_tokens"
    #: Modules applied after the last block, in order (final norm, output projection).
    final_paths: tuple[str, ...] = ("norm",)
    #: Pooler of the base model (BERT-style), run on the last stage when the head uses ``pooler_output``.
    pooler_path: str | None = None
    #: Block-level helpers that hold no parameters but must exist on every stage (rotary embeddings).
    aux_paths: tuple[str, ...] = ()
    #: Causal decoder (True) or bidirectional encoder (False).
    causal: bool = True
    #: Inputs the first stage takes besides ``input_ids`` and ``attention_mask``.
    extra_input_names: tuple[str, ...] = ()

    #: Layer class for one block (``None``: :class:`hfpipe.core.layers.Block`).
    block_class: type | None = None

    #: An encoder-decoder (``hfpipe.core.adapters.encdec``); tasks and generation ask this attribute.
    encoder_decoder: bool = False

    def pipeline_layers(self, builder):
        """The whole layer list (``hfpipe.core.builder.LayerInfo``) when the family builds its own (encoder-decoders),
        or ``None`` for the standard embedding / blocks / final / head list."""
        return None

    def complete_batch(self, batch: dict) -> dict:
        """``batch`` with inputs the family derives when absent (encoder-decoders: shifted labels)."""
        return batch

    def follow_checkpoint(self, manifest: dict) -> None:
        """Take a layout the weights of a pipeline checkpoint chose and its config cannot say (an encoder-decoder's
        untied LM head), before the layer list is built from a config alone."""

    def pack_boundary(self, inputs: tuple):
        """What a stage sends to the next (:func:`hfpipe.core.layers.pack_boundary`)."""
        from hfpipe.core.layers import pack_boundary

        return pack_boundary(inputs)

    def unpack_boundary(self, received) -> tuple:
        from hfpipe.core.layers import unpack_boundary

        return unpack_boundary(self, received)

    def block_prelude(self, builder, block_index: int, index: int):
        """An extra layer in front of block ``block_index`` (e.g. DeBERTa's shared relative table), as
        ``(spec, layer class, num_params)``, or ``None``. A stage never starts between it and its block."""
        return None

    def __init__(self, config, model_class: type, meta_model: nn.Module):
        self.config = config
        self.model_class = model_class
        self.meta_model = meta_model
        # a base model (``AutoModel``: BertModel, LlamaModel) is its own body, and its HF names carry no prefix
        self.meta_base = meta_model.base_model
        self.base_prefix = meta_model.base_model_prefix if self.meta_base is not meta_model else ""
        self.validate()

    # ----------------------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise :class:`UnsupportedModelError` for configurations that would give a wrong pipeline."""
        if getattr(self.config, "output_router_logits", False):
            raise UnsupportedModelError(
                f"{type(self.meta_model).__name__} has output_router_logits=True: its auxiliary router loss needs the "
                "router logits of every block on the last stage, which a pipeline cannot carry. Set "
                "config.output_router_logits=False (the router still trains through the main loss)."
            )
        if getattr(self.config, "layerdrop", 0.0):
            raise UnsupportedModelError(
                f"config.layerdrop={self.config.layerdrop}: random block skipping changes the schedule per step and "
                "is not supported in a pipeline; set config.layerdrop=0.0."
            )

    @property
    def num_blocks(self) -> int:
        return len(get_submodule(self.meta_base, self.layers_path))

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask") + tuple(self.extra_input_names)

    # ----------------------------------------------------------------------------------------- positions/masks
    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions the family's base model computes when none are given (int64, ``[batch, seq]``)."""
        batch, seq = input_ids.shape
        return torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq).contiguous()

    def mask_function(self, index: int) -> Callable:
        """The transformers mask builder block ``index`` uses (same choice as the family's forward)."""
        if not self.causal:
            return masking_utils.create_bidirectional_mask
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            kind = layer_types[index]
            builders = {
                "full_attention": masking_utils.create_causal_mask,
                "sliding_attention": masking_utils.create_sliding_window_causal_mask,
                "chunked_attention": masking_utils.create_chunked_causal_mask,
            }
            if kind not in builders:
                raise UnsupportedModelError(
                    f"block {index} has layer type {kind!r}; hfpipe supports {sorted(builders)}. Register a custom "
                    "adapter for this family (see hfpipe.core.adapters.register_adapter)."
                )
            return builders[kind]
        if getattr(self.config, "sliding_window", None) is not None and getattr(self.config, "use_sliding_window", True):
            return masking_utils.create_sliding_window_causal_mask
        return masking_utils.create_causal_mask

    def block_mask(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        fn = self.mask_function(index)
        if fn is masking_utils.create_bidirectional_mask:
            return fn(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return fn(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                  position_ids=position_ids)

    def block_kwargs(self, block, index: int, hidden, attention_mask, position_ids) -> dict:
        """Keyword arguments for one HF block call, as the family's forward passes them."""
        mask_fn = self.mask_function(index)
        kwargs = {"attention_mask": self._per_micro_batch(
            mask_fn, hidden, attention_mask, position_ids,
            lambda: self.block_mask(index, hidden, attention_mask, position_ids))}
        if self.causal:  # encoders' forwards pass no computed positions to their layers
            kwargs["position_ids"] = position_ids
        rotary = getattr(block.aux, "rotary_emb", None) if hasattr(block, "aux") else None
        if rotary is not None:
            layer_type = self.rotary_layer_type(rotary, index)
            args = (hidden, position_ids) if layer_type is None else (hidden, position_ids, layer_type)
            kwargs["position_embeddings"] = self._per_micro_batch(
                ("rotary_emb", layer_type), hidden, attention_mask, position_ids, lambda: rotary(*args))
        return kwargs

    def rotary_layer_type(self, rotary, index: int) -> str | None:
        """``config.layer_types[index]`` for a rotary embedding with one table per layer type (Gemma 3: sliding and
        full attention use different bases; its forward computes both and hands each block its own), else ``None``."""
        if "layer_type" not in inspect.signature(type(rotary).forward).parameters:
            return None
        return self.config.layer_types[index]

    def _per_micro_batch(self, key, hidden, attention_mask, position_ids, compute: Callable):
        """``compute()`` once per stage and micro-batch rather than once per block, as the family's own forward does.

        Masks and rotary embeddings depend only on the mask and positions, the hidden states' shape, dtype and device
        and the config; every block of a stage receives the very same ``attention_mask`` / ``position_ids`` tensors
        (the layers pass them along), so a result is reused while those are the same objects. This also saves a
        host-device sync per block on GPU (the SDPA mask check ``padding_mask.all()``). Holding the tensors keeps
        their ids from being reused."""
        memo = self.__dict__.setdefault("_memo", {})
        signature = (tuple(hidden.shape), hidden.dtype, hidden.device, torch.is_grad_enabled(),
                     torch.is_autocast_enabled(hidden.device.type))
        hit = memo.get(key)
        if hit is not None and hit[0] is attention_mask and hit[1] is position_ids and hit[2] == signature:
            return hit[3]
        value = compute()
        memo[key] = (attention_mask, position_ids, signature, value)
        return value

    def call_block(self, block, index: int, hidden, attention_mask, position_ids) -> torch.Tensor:
        out = block.layer(hidden, **self.block_kwargs(block, index, hidden, attention_mask, position_ids))
        return out[0] if isinstance(out, tuple) else out

    # ------------------------------------------------------------------------------------------ embedding stage
    def body_shell(self) -> nn.Module:
        """Meta copy of the base model with no blocks, no final modules and no pooler (and, for decoders, no token
        embedding): its ``forward`` computes exactly the hidden states the first block receives."""
        replace: dict[str, nn.Module | None] = {self.layers_path: nn.ModuleList()}
        for path in self.final_paths:
            replace[path] = nn.Identity()
        if self.pooler_path:
            replace[self.pooler_path] = None
        if self.embed_path:
            replace[self.embed_path] = None
        return copy_without(self.meta_base, replace)

    def shell_forward(self, shell: nn.Module, inputs: dict) -> torch.Tensor:
        out = shell(**inputs, use_cache=False)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def final_modules(self) -> list[tuple[str, nn.Module]]:
        """``(path, meta module)`` of the final modules that exist in this configuration (OPT may have none)."""
        out = []
        for path in self.final_paths:
            parent, _, name = path.rpartition(".")
            module = getattr(get_submodule(self.meta_base, parent), name, None)
            if module is not None:
                out.append((path, module))
        return out

    # ------------------------------------------------------------------------------------------------- naming
    def hf_prefix(self, path: str) -> str:
        prefix = f"{self.base_prefix}." if self.base_prefix else ""
        return f"{prefix}{path}." if path else prefix
