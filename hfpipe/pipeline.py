"""``to_pipeline``: an HF model (or config + class) -> ``deepspeed.pipe.PipelineModule``.

The layer list of a family is fixed (it does not depend on the stage count or on where cuts fall), so checkpoints
written at one stage count load at another. ``HFPipelineModule`` computes the stage boundaries itself -- from
parameter counts read off meta-device copies, explicit boundaries, or the cost model -- because DeepSpeed's own
``_partition_layers`` accepts only three strings and its ``parameters`` method builds every layer on every rank.
"""

from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from . import partition as partition_lib
from .adapters import get_adapter
from .adapters.base import UnsupportedModelError
from .heads import CAUSAL_LM, SEQUENCE_CLASSIFICATION, Head, PipelineLoss, TiedLMHead, head_for_class, task_shell
from .layers import (HALF_BLOCK_CHILDREN, AttentionHalfBlock, Block, BodyShell, Final, MLPHalfBlock, TokenEmbedding,
                     pack_boundary, supports_half_blocks, unpack_boundary)

TIE_KEY = "embed"


class StateDictSource:
    """Weights from an in-memory state dict (an HF model the user already holds)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.state_dict = state_dict

    def keys(self):
        return self.state_dict.keys()

    def _resolve(self, name: str) -> str | None:
        return name if name in self.state_dict else None

    def get(self, name: str):
        return self.state_dict.get(name)


@dataclass
class LayerInfo:
    spec: Any
    name: str  # class name, used by ``type:`` partitioning and plans
    kind: str  # embedding | block | final | head
    cut_allowed: bool  # may a stage start at this layer?
    num_params: int  # parameters this layer owns (tied copies count once)
    block: int | None = None  # HF block index (block layers)
    part: str = "whole"  # "whole" block, or its "attention" / "mlp" half (families with half-blocks)


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
        self.carry_input_ids = head is SEQUENCE_CLASSIFICATION and adapter.causal
        self.tied = head is CAUSAL_LM and adapter.embed_path is not None and _is_tied(adapter.meta_model)
        # Fixed per family and config (never per stage count): blocks split into attention / MLP halves so that a
        # stage boundary may fall inside a block (hfpipe.layers.supports_half_blocks).
        self.half_blocks = supports_half_blocks(adapter)
        #: causal LM: the training loss runs over this many tokens at a time (``hfpipe.heads.ChunkedLogits``)
        self.loss_chunk_tokens: int | None = None

    def chunk_loss(self, loss_chunk_tokens: int | None) -> None:
        """Set ``loss_chunk_tokens`` (causal LM only; see ``to_pipeline``), or leave full logits with ``None``."""
        if loss_chunk_tokens is None:
            return
        if self.head is not CAUSAL_LM:
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
        infos: list[LayerInfo] = []

        def count(module):
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        if a.embed_path:
            embed = a.meta_base.get_submodule(a.embed_path)
            spec = (TiedLayerSpec(TIE_KEY, TokenEmbedding, self, 0, tied_weight_attr=["embed.weight"]) if self.tied
                    else LayerSpec(TokenEmbedding, self, 0))
            infos.append(LayerInfo(spec, "TokenEmbedding", "embedding", True, count(embed)))
            infos.append(LayerInfo(LayerSpec(BodyShell, self, 1), "BodyShell", "embedding", False, count(a.body_shell())))
        else:
            infos.append(LayerInfo(LayerSpec(BodyShell, self, 0), "BodyShell", "embedding", True, count(a.body_shell())))
        blocks = a.meta_base.get_submodule(a.layers_path)
        for b in range(len(blocks)):
            if self.half_blocks:
                for cls in (AttentionHalfBlock, MLPHalfBlock):
                    n = sum(count(getattr(blocks[b], c)) for c in HALF_BLOCK_CHILDREN[cls.part])
                    infos.append(LayerInfo(LayerSpec(cls, self, len(infos), b), cls.__name__, "block", True, n,
                                           block=b, part=cls.part))
                continue
            prelude = a.block_prelude(self, b, len(infos))
            if prelude is not None:
                spec, name, n = prelude
                infos.append(LayerInfo(spec, name, "prelude", True, n, block=b))
            idx = len(infos)
            infos.append(LayerInfo(LayerSpec(a.block_class or Block, self, idx, b), "Block", "block",
                                   prelude is None, count(blocks[b]), block=b))
        final_params = sum(count(m) for _, m in a.final_modules())
        if self.head.uses_pooler and a.pooler_path:
            final_params += count(getattr(a.meta_base, a.pooler_path, None))
        infos.append(LayerInfo(LayerSpec(Final, self, len(infos)), "Final", "final", True, final_params))
        if self.tied:
            spec = TiedLayerSpec(TIE_KEY, TokenEmbedding, self, 0, forward_fn=TiedLMHead(self),
                                 tied_weight_attr=["embed.weight"])
            infos.append(LayerInfo(spec, "TiedLMHead", "head", False, 0))
        else:
            shell = task_shell(a)
            infos.append(LayerInfo(LayerSpec(Head, self, len(infos)), "Head", "head", False, count(shell)))
        return infos


def _is_tied(meta_model) -> bool:
    out, inp = meta_model.get_output_embeddings(), meta_model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def compute_parts(method, infos: Sequence[LayerInfo], num_stages: int, num_blocks: int, model_name: str, *,
                  costs: Sequence[float] | None = None) -> list[int]:
    """Stage boundaries for ``method`` (string, or a list of first-layer indices).

    ``"balanced"`` needs ``costs`` (per-layer work, ``hfpipe.costs.layer_costs``) and minimises the slowest stage,
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
                             "compute them with hfpipe.costs.layer_costs(builder, seq_len=...).")
        if m == "balanced:blocks":
            cut_allowed = [c and i.part != "mlp" for c, i in zip(cut_allowed, infos)]
        return partition_lib.balanced(costs, num_stages, cut_allowed)
    raise ValueError(
        f"partition_method={method!r} is not supported; use 'balanced', 'balanced:blocks', 'parameters', 'uniform', "
        "'type:<regex>' or a list of the first layer index of each stage (e.g. [0, 5, 9])."
    )


def stage_parts(builder: PipelineBuilder, infos: Sequence[LayerInfo], num_stages: int, partition_method, *,
                seq_len: int | None = None, micro_batch_size: int = 1, activation_checkpointing: bool = False,
                layer_costs: Sequence[float] | None = None) -> list[int]:
    """Stage boundaries of ``builder``'s layers; ``"balanced"`` methods estimate per-layer FLOPs when no
    ``layer_costs`` are given."""
    if layer_costs is None and isinstance(partition_method, str) and partition_method.lower().startswith("balanced"):
        from .costs import default_seq_len, layer_costs as estimate_costs

        layer_costs = [c.flops for c in estimate_costs(
            builder, seq_len=seq_len or default_seq_len(builder.adapter.config), micro_batch_size=micro_batch_size,
            activation_checkpointing=activation_checkpointing)]
    return compute_parts(partition_method, infos, num_stages, builder.adapter.num_blocks,
                         builder.adapter.model_class.__name__, costs=layer_costs)


class HFPipelineModule(PipelineModule):
    """A ``PipelineModule`` over an HF model that knows its HF names and partitions without building layers."""

    def __init__(self, builder: PipelineBuilder, infos: list[LayerInfo], parts: list[int], **kwargs):
        self.hfpipe_builder = builder
        self.layer_infos = infos
        self._hfpipe_parts = parts
        super().__init__(layers=[i.spec for i in infos], partition_method="hfpipe", **kwargs)

    def _partition_layers(self, method="hfpipe"):
        self.parts = list(self._hfpipe_parts)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    def forward(self, forward_input):
        """DeepSpeed's stage forward, with the boundary tuple packed into one tensor between stages
        (:func:`hfpipe.layers.pack_boundary`): one p2p message per micro-batch and direction instead of three."""
        if self.stage_id > 0:
            forward_input = unpack_boundary(self.adapter, forward_input)
        out = super().forward(forward_input)
        if self.stage_id < self.num_stages - 1:
            out = pack_boundary(out)
        return out

    # ------------------------------------------------------------------------------------------------ metadata
    @property
    def adapter(self):
        return self.hfpipe_builder.adapter

    @property
    def head(self):
        return self.hfpipe_builder.head

    @property
    def config(self):
        return self.adapter.config

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.adapter.input_names

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.head.label_names

    def local_layers(self) -> Iterator[tuple[int, nn.Module, str]]:
        """``(global layer index, module, name prefix in this module's state)`` for layers on this stage."""
        for local, func in enumerate(self.forward_funcs):
            idx = self._local_start + local
            spec = self._layer_specs[idx]
            if isinstance(spec, TiedLayerSpec):
                yield idx, self.tied_modules[spec.key], f"tied_modules.{spec.key}."
            else:
                yield idx, func, f"{idx}."

    def hf_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(HF state-dict name, parameter)`` for every parameter on this stage (tied copies once)."""
        seen = set()
        for _, module, _ in self.local_layers():
            if id(module) in seen:
                continue
            seen.add(id(module))
            params = dict(module.named_parameters())
            for local, hf in module.hf_names().items():
                if local in params:
                    yield hf, params[local]


def _ensure_distributed() -> None:
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:  # a plain `python script.py`: one process, one stage
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


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
                raise UnsupportedModelError(
                    f"{model_class.__name__} has no model for config type {type(model).__name__} "
                    f"(model_type={model.model_type!r})."
                ) from None
        return model, model_class, None
    if isinstance(model, (str, os.PathLike)):
        from .checkpoint import resolve_pretrained

        return resolve_pretrained(model, model_class)
    raise TypeError(f"to_pipeline expects a PreTrainedModel, a PretrainedConfig or a path; got {type(model).__name__}.")


def build_meta_model(config, model_class):
    config = copy.deepcopy(config)
    with torch.device("meta"):
        meta = model_class._from_config(config)
    return meta


def prepare(model, model_class=None, *, seed: int | None = 1234, device="cpu", source=None):
    """The builder for ``model`` without touching torch.distributed (used by ``to_pipeline`` and ``plan``)."""
    config, model_class, found_source = resolve_model(model, model_class)
    meta = build_meta_model(config, model_class)
    adapter = get_adapter(meta.config, model_class, meta)
    head = head_for_class(model_class)
    return PipelineBuilder(adapter, head, source if source is not None else found_source, seed=seed, device=device)


def to_pipeline(model, *, num_stages: int | None = None, topology=None, partition_method="balanced",
                activation_checkpoint_interval: int = 0, model_class=None, dtype: torch.dtype | None = None,
                seed: int | None = 1234, loss_fn=None, seq_len: int | None = None, micro_batch_size: int = 1,
                layer_costs: Sequence[float] | None = None, loss_chunk_tokens: int | None = None,
                **pipeline_kwargs) -> HFPipelineModule:
    """Convert an HF model into a ``deepspeed.pipe.PipelineModule``.

    Args:
        model: an HF task model instance (``AutoModelForCausalLM.from_pretrained(...)``, ...), or a config together
            with ``model_class`` (built without weights, initialised like HF), or a folder / Hub id (weights are read
            stage-locally from safetensors), or a pipeline checkpoint (``hfpipe convert``, a trainer
            ``checkpoint-N``; only the stage's layer files are opened).
        num_stages: pipeline stages; the world size must be a multiple (the rest is data parallelism).
        partition_method: ``"balanced"`` (default: the split minimising the slowest stage's forward+backward FLOPs
            under ``hfpipe.costs``, cutting between block halves where the family has them), ``"balanced:blocks"``
            (whole blocks per stage), ``"parameters"``, ``"uniform"``, ``"type:<regex>"`` or a list with the first
            layer index of each stage (``hfpipe plan`` shows them side by side).
        activation_checkpoint_interval: checkpoint every N layers (only blocks are checkpointed).
        dtype: cast floating-point parameters after loading.
        seed: per-layer seed for random initialisation (identical at any stage count).
        seq_len, micro_batch_size: the workload ``"balanced"`` partitions for (sequence length default:
            ``min(max_position_embeddings, 4096)``).
        layer_costs: per-layer costs for ``"balanced"`` instead of the FLOP model, e.g. measured seconds from
            ``hfpipe.costs.profile_layers``.
        loss_chunk_tokens: causal LM only: compute the training loss over this many tokens at a time, each chunk's
            logits recomputed in backward, so the full ``tokens x vocab`` logits (and their fp32 copy) never exist
            (``hfpipe.heads.ChunkedLogits``; same loss as HF up to float summation order). ``None``: HF's loss on
            full logits. Evaluation and generation still return full logits.

    ``torch.distributed`` is initialised through ``deepspeed.init_distributed()`` if it is not yet (gloo on CPU).
    """
    if num_stages is None and topology is None:
        raise ValueError("to_pipeline needs num_stages= (or a DeepSpeed topology=).")
    builder = prepare(model, model_class, seed=seed)
    builder.chunk_loss(loss_chunk_tokens)  # before the split: "balanced" costs the chunked head
    infos = builder.layers()
    stages = num_stages if num_stages is not None else topology.get_dim("pipe")
    parts = stage_parts(builder, infos, stages, partition_method, seq_len=seq_len, micro_batch_size=micro_batch_size,
                        activation_checkpointing=activation_checkpoint_interval > 0, layer_costs=layer_costs)
    _ensure_distributed()
    import torch.distributed as dist

    world = dist.get_world_size()
    if topology is None and world % stages:
        raise ValueError(f"num_stages={stages} must divide the world size {world} (the rest is data parallelism); "
                         f"launch a multiple of {stages} processes.")
    pipe = HFPipelineModule(builder, infos, parts, num_stages=num_stages, topology=topology,
                            loss_fn=loss_fn or PipelineLoss(builder.head, builder.adapter.config),
                            activation_checkpoint_interval=activation_checkpoint_interval,
                            checkpointable_layers=["Block", "AttentionHalfBlock", "MLPHalfBlock"], **pipeline_kwargs)
    if dtype is not None:
        for p in pipe.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return pipe


def initialize(pipe: HFPipelineModule, config: dict, **kwargs):
    """``deepspeed.initialize`` for an hfpipe pipeline: validates ``config`` first (ZeRO stage, batch sizes, dtypes),
    passes ``model_parameters``, sets ``engine.has_bool_tensors = False`` (hfpipe sends no bool tensors between
    stages) and, for fp32 with ``gradient_clipping``, clips by the norm of the whole model (DeepSpeed's own fp32 path
    counts only the first stage's gradients, so the clip would depend on where the stages are cut). Returns what
    ``deepspeed.initialize`` returns."""
    import deepspeed
    import torch.distributed as dist

    from .dsconfig_check import validate_pipeline_ds_config

    validate_pipeline_ds_config(config, pipe.num_stages, dist.get_world_size())
    kwargs.setdefault("model_parameters", [p for p in pipe.parameters() if p.requires_grad])
    out = deepspeed.initialize(model=pipe, config=config, **kwargs)
    engine = out[0]
    engine.has_bool_tensors = False
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()) and engine.gradient_clipping() > 0:
        engine.clip_fp32_gradients = lambda: _clip_pipeline_grads(engine)
    return out


def _clip_pipeline_grads(engine) -> None:
    """fp32 gradient clipping with the norm of the *whole* model, as HF Trainer computes it.

    DeepSpeed 0.19's fp32 path (``runtime.utils.clip_grad_norm_`` with the pipeline grid as ``mpu``) counts only
    the gradients of the first stage (it keeps parameters of "model-parallel rank 0", which for a pipeline grid is
    stage 0) and would clip every stage by that partial norm. Here: every stage's squared norm, tied copies counted
    once (``ds_pipe_replicated``), summed over the replica's stages. The norm is kept for logging.
    """
    import torch.distributed as dist

    params = [p for p in engine.module.parameters() if p.grad is not None
              and not getattr(p, "ds_pipe_replicated", False)]
    device = params[0].grad.device if params else torch.device("cpu")  # NCCL reduces on the GPU
    sq = torch.zeros(1, dtype=torch.float64, device=device)
    for p in params:
        sq += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(sq, group=engine.grid.get_model_parallel_group())
    norm = float(sq.sqrt())
    engine._global_grad_norm = norm
    coef = min(1.0, engine.gradient_clipping() / (norm + 1e-6))
    if coef < 1.0:
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.detach().mul_(coef)
