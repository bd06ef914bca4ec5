"""The fixed layer list of a model, and where its stage boundaries fall.

``prepare`` turns an HF model, a config (+ class) or a folder into a :class:`PipelineBuilder`: the family's adapter,
the task head and the weight source, all on the meta device. ``PipelineBuilder.layers()`` lists the family's
layers (:class:`LayerInfo`; fixed per family and config, never per stage count, so checkpoints written at one stage
count load at another), and ``stage_parts`` computes the boundaries itself -- from parameter counts read off
meta-device copies, explicit boundaries, or the cost model -- because DeepSpeed's own ``_partition_layers`` accepts
only three strings and its ``parameters`` method builds every layer on every rank. Nothing here touches
``torch.distributed``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Sequence

from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn

from hfpipe.core import lora as lora_lib
from hfpipe.core import partition as partition_lib
from hfpipe.core import quantize as quantize_lib
from hfpipe.core.adapters import get_adapter
from hfpipe.core.costs import default_seq_len, layer_costs as estimate_costs
from hfpipe.core.heads import BaseModelOutput, Head, TiedLMHead, head_for_class, task_shell
from hfpipe.core.layers import (AttentionHalfBlock, Block, BodyShell, Final, LayerKind, MLPHalfBlock, TokenEmbedding,
                                supports_half_blocks)
from hfpipe.core.meta import UnsupportedModelError, build_meta_model, is_tied, no_model_for_config
from hfpipe.core.weights import StateDictSource, resolve_pretrained

TIE_KEY = "embed"


@dataclass
class LayerInfo:
    """One entry of a family's fixed layer list: its spec, the layer class (which carries the layer's kind and
    capabilities, :class:`hfpipe.core.layers.LayerTraits`) and what partitioning needs."""

    spec: Any
    layer: type  # the PipeLayer subclass (or TiedLMHead) this entry runs
    cut_allowed: bool  # may a stage start at this layer?
    num_params: int  # parameters this layer owns (tied copies count once)
    block: int | None = None  # HF block index (block layers and their preludes)

    @property
    def name(self) -> str:
        """Name in manifests, plans and ``type:<regex>`` partitioning."""
        return self.layer.layer_name

    @property
    def kind(self) -> LayerKind:
        return self.layer.kind

    @property
    def part(self) -> str:
        return self.layer.part


class PipelineBuilder:
    """Everything a layer needs to build itself on the rank that owns it (passed as a ``LayerSpec`` argument)."""

    def __init__(self, adapter, head, source=None, seed: int | None = 1234, device="cpu"):
        self.adapter = adapter
        self.head = head
        self.source = source
        self.seed = seed
        self.device = device
        self.init_owner = adapter.meta_model
        # decoder sequence classification pools on the last non-pad *input id*, so the ids travel to the head
        self.carry_input_ids = head.pools_last_token and adapter.causal
        self.tied = head.causal and adapter.embed_path is not None and is_tied(adapter.meta_model)
        # Fixed per family and config (never per stage count): blocks split into attention / MLP halves so that a
        # stage boundary may fall inside a block (hfpipe.core.layers.supports_half_blocks).
        self.half_blocks = supports_half_blocks(adapter)
        #: causal LM: the training loss runs over this many tokens at a time (``hfpipe.core.heads.ChunkedLogits``)
        self.loss_chunk_tokens: int | None = None
        #: LoRA hook: PEFT's resolved plan (``hfpipe.core.lora.plan``) that every layer applies to itself, or None
        self.lora: lora_lib.LoraPlan | None = None
        #: QLoRA hook: which linear weights each layer stores in 4 bits (``hfpipe.core.quantize.plan``), or None
        self.quantization: quantize_lib.QuantPlan | None = None

    def chunk_loss(self, loss_chunk_tokens: int | None) -> None:
        """Set ``loss_chunk_tokens`` (causal LM only; see ``to_pipeline``), or leave full logits with ``None``."""
        if loss_chunk_tokens is None:
            return
        if not self.head.causal:
            raise ValueError(f"loss_chunk_tokens={loss_chunk_tokens} applies to causal-LM heads; this "
                             f"{self.adapter.model_class.__name__} has a {self.head.name} head, whose logits are "
                             "small. Leave loss_chunk_tokens unset.")
        if isinstance(loss_chunk_tokens, bool) or not isinstance(loss_chunk_tokens, int) or loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens={loss_chunk_tokens!r}; expected a positive number of tokens per "
                             "chunk (e.g. 1024), or None for HF's loss on full logits.")
        self.loss_chunk_tokens = loss_chunk_tokens

    def layer_seed(self, index: int) -> int | None:
        return None if self.seed is None else self.seed + index

    @staticmethod
    def meta_copy(module: nn.Module) -> nn.Module:
        return copy.deepcopy(module)

    def layers(self) -> list[LayerInfo]:
        a = self.adapter
        custom = a.pipeline_layers(self)  # encoder-decoders list their own layers (LayerInfo fields)
        if custom is not None:
            return [LayerInfo(*fields) for fields in custom]
        infos: list[LayerInfo] = []

        def count(module):
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        if a.embed_path:
            embed = a.meta_base.get_submodule(a.embed_path)
            spec = (TiedLayerSpec(TIE_KEY, TokenEmbedding, self, 0, tied_weight_attr=["embed.weight"]) if self.tied
                    else LayerSpec(TokenEmbedding, self, 0))
            infos.append(LayerInfo(spec, TokenEmbedding, True, count(embed)))
            infos.append(LayerInfo(LayerSpec(BodyShell, self, 1), BodyShell, False, count(a.body_shell())))
        else:
            infos.append(LayerInfo(LayerSpec(BodyShell, self, 0), BodyShell, True, count(a.body_shell())))
        blocks = a.meta_base.get_submodule(a.layers_path)
        for b in range(len(blocks)):
            if self.half_blocks:
                for cls in (AttentionHalfBlock, MLPHalfBlock):
                    n = sum(count(getattr(blocks[b], c)) for c in cls.owned_children)
                    infos.append(LayerInfo(LayerSpec(cls, self, len(infos), b), cls, True, n, block=b))
                continue
            prelude = a.block_prelude(self, b, len(infos))
            if prelude is not None:
                spec, cls, n = prelude
                infos.append(LayerInfo(spec, cls, True, n, block=b))
            block_class = a.block_class or Block
            infos.append(LayerInfo(LayerSpec(block_class, self, len(infos), b), block_class, prelude is None,
                                   count(blocks[b]), block=b))
        final_params = sum(count(m) for _, m in a.final_modules())
        if self.head.uses_pooler and a.pooler_path:
            final_params += count(getattr(a.meta_base, a.pooler_path, None))
        infos.append(LayerInfo(LayerSpec(Final, self, len(infos)), Final, True, final_params))
        if self.tied:
            spec = TiedLayerSpec(TIE_KEY, TokenEmbedding, self, 0, forward_fn=TiedLMHead(self),
                                 tied_weight_attr=["embed.weight"])
            infos.append(LayerInfo(spec, TiedLMHead, False, 0))
        elif self.head.base_model:  # AutoModel: the hidden states are the output
            infos.append(LayerInfo(LayerSpec(BaseModelOutput, self, len(infos)), BaseModelOutput, False, 0))
        else:
            shell = task_shell(a)
            infos.append(LayerInfo(LayerSpec(Head, self, len(infos)), Head, False, count(shell)))
        return infos


def compute_parts(method, infos: Sequence[LayerInfo], num_stages: int, num_blocks: int, model_name: str, *,
                  costs: Sequence[float] | None = None) -> list[int]:
    """Stage boundaries for ``method`` (string, or a list of first-layer indices).

    ``"balanced"`` needs ``costs`` (per-layer work, ``hfpipe.core.costs.layer_costs``) and minimises the slowest stage,
    cutting between block halves where the family has them; ``"balanced:blocks"`` keeps whole blocks per stage.
    """
    if num_stages > num_blocks:
        raise ValueError(
            f"num_stages={num_stages} exceeds the {num_blocks} transformer blocks of this {model_name}; "
            f"use num_stages <= {num_blocks}."
        )
    cut_allowed = [i.cut_allowed for i in infos]
    if not isinstance(method, str):
        return partition_lib.from_boundaries(method, len(infos), num_stages, cut_allowed)
    m = method.lower()
    if m == "uniform":
        return partition_lib.uniform(len(infos), num_stages, cut_allowed)
    if m == "parameters":
        return partition_lib.min_max_partition([i.num_params for i in infos], num_stages, cut_allowed)
    if m.startswith("type:"):
        return partition_lib.by_type([i.name for i in infos], method.split(":", 1)[1], num_stages, cut_allowed)
    if m in ("balanced", "balanced:blocks"):
        if costs is None or len(costs) != len(infos):
            raise ValueError(f"partition_method={method!r} needs costs= with one value per layer ({len(infos)}); "
                             "compute them with hfpipe.core.costs.layer_costs(builder, seq_len=...).")
        if m == "balanced:blocks":
            cut_allowed = [c and i.layer.starts_block for c, i in zip(cut_allowed, infos)]
        return partition_lib.balanced(costs, num_stages, cut_allowed)
    raise ValueError(
        f"partition_method={method!r} is not supported; use one of {', '.join(map(repr, partition_lib.METHODS))}, "
        "'type:<regex>' or a list of the first layer index of each stage (e.g. [0, 5, 9])."
    )


def stage_parts(builder: PipelineBuilder, infos: Sequence[LayerInfo], num_stages: int, partition_method, *,
                seq_len: int | None = None, micro_batch_size: int = 1, activation_checkpointing: bool = False,
                layer_costs: Sequence[float] | None = None) -> list[int]:
    """Stage boundaries of ``builder``'s layers; ``"balanced"`` methods estimate per-layer FLOPs when no
    ``layer_costs`` are given."""
    if layer_costs is None and isinstance(partition_method, str) and partition_method.lower().startswith("balanced"):
        layer_costs = [c.flops for c in estimate_costs(
            builder, seq_len=seq_len or default_seq_len(builder.adapter.config), micro_batch_size=micro_batch_size,
            activation_checkpointing=activation_checkpointing)]
    return compute_parts(partition_method, infos, num_stages, builder.adapter.num_blocks,
                         builder.adapter.model_class.__name__, costs=layer_costs)


def resolve_model(model, model_class=None):
    """``(config, concrete model class, source or None)`` from an HF model or a config (+ class)."""
    from transformers import PretrainedConfig, PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model.config, type(model), StateDictSource(model.state_dict())
    if isinstance(model, PretrainedConfig):
        if model_class is None:
            raise ValueError("to_pipeline(config) needs model_class=, e.g. transformers.AutoModelForCausalLM.")
        mapping = getattr(model_class, "_model_mapping", None)
        if mapping is not None:
            try:
                model_class = mapping[type(model)]
            except KeyError:
                raise no_model_for_config(model, model_class) from None
        return model, model_class, None
    if isinstance(model, (str, os.PathLike)):
        return resolve_pretrained(model, model_class)
    raise TypeError(f"to_pipeline expects a PreTrainedModel, a PretrainedConfig or a path; got {type(model).__name__}.")


def prepare(model, model_class=None, *, seed: int | None = 1234, device="cpu", source=None, peft_config=None,
            quantization_config=None):
    """The builder for ``model`` without touching torch.distributed (used by ``to_pipeline`` and ``plan``).

    LoRA hook: ``peft_config`` (a ``peft.LoraConfig``) or a ``PeftModel`` as ``model`` gives the builder PEFT's plan
    (``hfpipe.core.lora``); a PeftModel's own weights, adapter included, are the source. QLoRA hook: a 4-bit
    ``BitsAndBytesConfig`` as ``quantization_config`` gives it the 4-bit plan (``hfpipe.core.quantize``)."""
    model, peft_config, peft_source = lora_lib.split_peft_model(model, peft_config)
    config, model_class, found_source = resolve_model(model, model_class)
    meta = build_meta_model(config, model_class)
    adapter = get_adapter(meta.config, model_class, meta)
    head = head_for_class(model_class)
    source = next((s for s in (source, peft_source, found_source) if s is not None), None)
    builder = PipelineBuilder(adapter, head, source, seed=seed, device=device)
    builder.lora = lora_lib.plan(adapter.meta_model, peft_config)
    builder.quantization = quantize_lib.plan(adapter.meta_model, quantization_config, builder.lora)
    if source is not None:
        source.bind(builder)
    return builder
