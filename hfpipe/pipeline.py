"""``to_pipeline``: an HF model (or config + class, or a folder) -> ``deepspeed.pipe.PipelineModule``; and
``initialize``, ``deepspeed.initialize`` with the fixes a pipeline of HF layers needs.

The layer list and the stage boundaries come from ``hfpipe.core.builder``; :class:`HFPipelineModule` hands them to
DeepSpeed (``_partition_layers`` takes the precomputed boundaries instead of building every layer to count
parameters) and decides activation checkpointing by the layers' own ``checkpointable`` attribute.
"""

from __future__ import annotations

import os
import socket
from typing import Iterator, Sequence

import torch
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from torch import nn

from hfpipe.core import lora, quantize
from hfpipe.core.builder import LayerInfo, PipelineBuilder, prepare, stage_parts
from hfpipe.core.dsconfig import check_stages_divide, validate_pipeline_ds_config
from hfpipe.core.heads import PipelineLoss
from hfpipe.core.layers import LayerKind
from hfpipe.schedules import VShapeStages, check_schedule


class HFPipelineModule(PipelineModule):
    """A ``PipelineModule`` over an HF model that knows its HF names and partitions without building layers."""

    def __init__(self, builder: PipelineBuilder, infos: list[LayerInfo], parts: list[int], **kwargs):
        self.hfpipe_builder = builder
        self.layer_infos = infos
        self._hfpipe_parts = parts
        super().__init__(layers=[i.spec for i in infos], partition_method="hfpipe", **kwargs)
        # LoRA hook (no-op without LoRA): embedding outputs require grad; a stage with nothing to train says so
        lora.mark_stage(self, [m for _, m, _ in self.local_layers() if m.kind is LayerKind.EMBEDDING])

    def _partition_layers(self, method="hfpipe"):
        self.parts = list(self._hfpipe_parts)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    def _is_checkpointable(self, funcs) -> bool:
        """Activation checkpointing wraps a chunk of layers only when every layer in it says it may be
        (``LayerTraits.checkpointable``: blocks, never the embedding). DeepSpeed's own rule matches class names
        against ``checkpointable_layers``, which missed every block class not named ``Block`` (DeBERTa's)."""
        return all(getattr(f, "checkpointable", False) for f in funcs)

    def get_tied_weights_and_groups(self):
        """DeepSpeed's tied weights, without frozen ones (a LoRA base embedding): the engine all-reduces each tied
        weight's gradient (``_hp_grad`` under bf16, which a frozen weight never gets; cf. DeepSpeed PR #5477)."""
        return [(w, g) for w, g in super().get_tied_weights_and_groups() if w.requires_grad]

    def allreduce_tied_weight_gradients(self):
        """DeepSpeed's all-reduce of tied gradients, skipping frozen tied weights (no gradient to reduce)."""
        import torch.distributed as dist

        for weight, group in self.get_tied_weights_and_groups():
            if weight.grad is not None:
                dist.all_reduce(weight.grad, group=group)

    def forward(self, forward_input):
        """DeepSpeed's stage forward, with the boundary tuple packed into one tensor between stages
        (:func:`hfpipe.core.layers.pack_boundary`): one p2p message per micro-batch and direction instead of three."""
        if self.stage_id > 0:
            forward_input = self.adapter.unpack_boundary(forward_input)
        out = super().forward(forward_input)
        if self.stage_id < self.num_stages - 1:
            out = self.adapter.pack_boundary(out)
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
            idx = self.layer_index(local)
            spec = self._layer_specs[idx]
            if isinstance(spec, TiedLayerSpec):
                yield idx, self.tied_modules[spec.key], f"tied_modules.{spec.key}."
            else:
                yield idx, func, f"{idx}."

    def layer_index(self, local: int) -> int:
        """Global layer index of this stage's ``local``-th layer."""
        return self._local_start + local

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


class DualPipeVModule(VShapeStages, HFPipelineModule):
    """The module of ``schedule="dualpipev"``: ``parts`` cut the model into ``2 x num_stages`` chunks and each rank
    holds two (:class:`hfpipe.schedules.VShapeStages`; rank 0 the first and the last)."""


def _ensure_distributed() -> None:
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
    from hfpipe.launch import init_distributed

    init_distributed()  # deepspeed.init_distributed with hfpipe's timeout (--ddp_timeout; 300 s on CPU)


def to_pipeline(model, *, num_stages: int | None = None, topology=None, partition_method="balanced",
                activation_checkpoint_interval: int = 0, model_class=None, dtype: torch.dtype | None = None,
                seed: int | None = 1234, loss_fn=None, seq_len: int | None = None, micro_batch_size: int = 1,
                layer_costs: Sequence[float] | None = None, loss_chunk_tokens: int | None = None,
                peft_config=None, peft_adapter=None, load_in_4bit: bool = False, quantization_config=None,
                schedule: str | None = None, **pipeline_kwargs) -> HFPipelineModule:
    """Convert an HF model into a ``deepspeed.pipe.PipelineModule``.

    Args:
        model: an HF task model instance (``AutoModelForCausalLM.from_pretrained(...)``, ...), or a config together
            with ``model_class`` (built without weights, initialised like HF), or a folder / Hub id (weights are read
            stage-locally from safetensors), or a pipeline checkpoint (``hfpipe convert``, a trainer
            ``checkpoint-N``; only the stage's layer files are opened).
        num_stages: pipeline stages; the world size must be a multiple (the rest is data parallelism).
        partition_method: ``"balanced"`` (default: the split minimising the slowest stage's forward+backward FLOPs
            under ``hfpipe.core.costs``, cutting between block halves where the family has them), ``"balanced:blocks"``
            (whole blocks per stage), ``"parameters"``, ``"uniform"``, ``"type:<regex>"`` or a list with the first
            layer index of each stage (``hfpipe plan`` shows them side by side).
        activation_checkpoint_interval: checkpoint every N layers (only blocks are checkpointed).
        dtype: cast floating-point parameters after loading.
        seed: per-layer seed for random initialisation (identical at any stage count).
        seq_len, micro_batch_size: the workload ``"balanced"`` partitions for (sequence length default:
            ``min(max_position_embeddings, 4096)``).
        layer_costs: per-layer costs for ``"balanced"`` instead of the FLOP model, e.g. measured seconds from
            ``hfpipe.core.costs.profile_layers``.
        loss_chunk_tokens: causal LM only: compute the training loss over this many tokens at a time, each chunk's
            logits recomputed in backward, so the full ``tokens x vocab`` logits (and their fp32 copy) never exist
            (``hfpipe.core.heads.ChunkedLogits``; same loss as HF up to float summation order). ``None``: HF's loss on
            full logits. Evaluation and generation still return full logits.
        peft_config: a ``peft.LoraConfig``: each stage wraps its own layers with PEFT's LoRA layers
            (``hfpipe.core.lora``; targets and ``modules_to_save`` resolved by PEFT for the whole model), the base
            weights frozen; LoRA initialised as PEFT does under the per-layer ``seed``. A ``peft.PeftModel`` as
            ``model`` does the same with its own config and starts from its adapter weights.
        peft_adapter: a PEFT adapter folder or Hub id (``PeftModel.save_pretrained``) to continue training: its
            config is the LoRA config (``peft_config``, if given too, must agree) and each rank reads only its own
            stage's adapter tensors from ``adapter_model.safetensors``. An adapter made for another base model (its
            ``base_model_name_or_path``, or tensor shapes) is one error naming both.
        load_in_4bit: QLoRA (with ``peft_config``): each stage stores its own frozen linear weights in 4 bits as it
            loads them (bitsandbytes nf4, double quantisation, bf16 compute; ``hfpipe.core.quantize``), the output
            embedding and the modules PEFT trains in full kept as they are. ``quantization_config``: a
            ``transformers.BitsAndBytesConfig(load_in_4bit=True, ...)`` (or its dict) instead of those defaults.
        schedule: ``"dualpipev"`` builds the two-chunk stages that schedule needs (``partition_method`` then splits
            into ``2 x num_stages`` chunks, rank ``r`` holding chunks ``r`` and ``2p-1-r``); pass the same schedule
            to ``initialize``. Other schedules run on the one-chunk module (``None``/``"1f1b"``, ``"zb-h1"``).

    ``torch.distributed`` is initialised through ``deepspeed.init_distributed()`` if it is not yet (gloo on CPU).
    """
    if num_stages is None and topology is None:
        raise ValueError("to_pipeline needs num_stages= (or a DeepSpeed topology=).")
    if peft_adapter is not None:
        peft_config = lora.adapter_config(peft_adapter, peft_config)
    builder = prepare(model, model_class, seed=seed, peft_config=peft_config,
                      quantization_config=quantize.resolve_config(load_in_4bit, quantization_config))
    if peft_adapter is not None:
        lora.attach_adapter(builder, peft_adapter)
    builder.chunk_loss(loss_chunk_tokens)  # before the split: "balanced" costs the chunked head
    infos = builder.layers()
    stages = num_stages if num_stages is not None else topology.get_dim("pipe")
    v_shape = check_schedule(schedule) == "dualpipev" and stages > 1
    if v_shape:
        _check_dualpipev_model(builder, stages)
    parts = stage_parts(builder, infos, 2 * stages if v_shape else stages, partition_method, seq_len=seq_len,
                        micro_batch_size=micro_batch_size, activation_checkpointing=activation_checkpoint_interval > 0,
                        layer_costs=layer_costs)
    _ensure_distributed()
    import torch.distributed as dist

    world = dist.get_world_size()
    if topology is None:
        check_stages_divide(stages, world)
    module_class = DualPipeVModule if v_shape else HFPipelineModule
    pipe = module_class(builder, infos, parts, num_stages=num_stages, topology=topology,
                            loss_fn=loss_fn or PipelineLoss(builder.head, builder.adapter.config),
                            activation_checkpoint_interval=activation_checkpoint_interval, **pipeline_kwargs)
    if dtype is not None:
        for p in pipe.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return pipe


def _check_dualpipev_model(builder: PipelineBuilder, stages: int) -> None:
    """What dualpipev cannot run, refused before any process group starts: fewer blocks than chunks, and a
    boundary of more than one tensor (decoder sequence classification also sends its input ids)."""
    name = builder.adapter.model_class.__name__
    if 2 * stages > builder.adapter.num_blocks:
        raise ValueError(f"schedule='dualpipev' cuts the model into 2 x num_stages = {2 * stages} chunks, but this "
                         f"{name} has {builder.adapter.num_blocks} transformer blocks; use num_stages <= "
                         f"{builder.adapter.num_blocks // 2} or schedule 'zb-h1'.")
    if builder.carry_input_ids:
        raise ValueError(f"schedule='dualpipev' sends one tensor per chunk boundary; this {name} also sends its input "
                         "ids to the head (decoder sequence classification); use schedule 'zb-h1' or '1f1b'.")


def initialize(pipe: HFPipelineModule, config: dict, *, schedule: str | None = None, **kwargs):
    """``deepspeed.initialize`` for an hfpipe pipeline: validates ``config`` first (ZeRO stage, batch sizes, dtypes,
    schedule), passes ``model_parameters``, sets ``engine.has_bool_tensors = False`` (hfpipe sends no bool tensors
    between stages) and, for fp32 with ``gradient_clipping``, clips by the norm of the whole model (DeepSpeed's own
    fp32 path counts only the first stage's gradients, so the clip would depend on where the stages are cut).
    ``schedule``: ``"1f1b"`` (default, DeepSpeed's), ``"zb-h1"`` (zero-bubble, :mod:`hfpipe.schedules`); overrides
    ``"pipeline": {"schedule": ...}`` in ``config``. Returns what ``deepspeed.initialize`` returns."""
    import deepspeed
    import torch.distributed as dist

    from hfpipe.schedules import use_schedule

    if schedule is not None:
        config = {**config, "pipeline": {**(config.get("pipeline") or {}), "schedule": schedule}}
    validate_pipeline_ds_config(config, pipe.num_stages, dist.get_world_size())
    kwargs.setdefault("model_parameters", [p for p in pipe.parameters() if p.requires_grad])
    out = deepspeed.initialize(model=pipe, config=config, **kwargs)
    engine = out[0]
    engine.has_bool_tensors = False
    from hfpipe.launch import guard_batch

    # a peer that stops answering: named; a batch that raised: the engine stays usable (its timers, gradients)
    engine.train_batch = guard_batch(engine, engine.train_batch)
    engine.eval_batch = guard_batch(engine, engine.eval_batch)
    use_schedule(engine, (config.get("pipeline") or {}).get("schedule"))
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
