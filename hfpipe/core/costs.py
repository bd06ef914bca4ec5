"""What each pipeline layer costs to run and to hold, from the config alone (meta-device modules, no weights).

The pipeline runs at the pace of its slowest stage, so stages should be balanced by *work*, not by parameter count:
the token embedding weighs as much as an LM head but costs almost nothing to run, while the head's vocabulary-sized
matmul and loss cost about two blocks. The one idea here: read the work off the layer's own (meta) modules, so that
every family is covered without per-family formulas --

* matmul FLOPs per token = 2 x the layer's >=2-D weights (embedding tables excluded; stacked or listed MoE experts
  scaled by ``top_k / num_experts``; a tied LM head uses the embedding table);
* attention adds its quadratic term 4 x heads x head_dim x (keys each query attends to), where that number follows
  the family's own mask choice per block (causal, sliding window, bidirectional) and the attention kernel
  (``"flash"``: masked keys are skipped; ``"dense"``: every query meets every key, as eager/SDPA-math on CPU);
* element-wise work (norms, activations, residual adds, softmax over the vocabulary for the loss) is a small
  per-element term.

Backward costs twice the forward (input and weight gradients); the embedding's backward is only its scatter-add.
Activation checkpointing re-runs each block's forward once more.

Memory per stage follows the 1F1B schedule: stage ``s`` of ``p`` holds up to ``min(m, p - s)`` micro-batches of
activations; parameters, gradients and Adam states per precision (fp32, or bf16 with fp32 master weights as
DeepSpeed's bf16 optimizer keeps them), optimizer states divided over ``dp`` ranks with ZeRO-1. These are estimates
for planning, not an allocator trace: buffers of the framework, fragmentation and communication are not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from deepspeed.pipe import TiedLayerSpec
from torch import nn

from hfpipe.core import quantize
from hfpipe.core.batches import make_batch, micro_batches
from hfpipe.core.dsconfig import check_zero_stage
from hfpipe.core.heads import PipelineLoss, TiedLMHead, task_shell
from hfpipe.core.layers import LayerKind, TokenEmbedding

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ATTENTION_KERNELS = ("flash", "dense")

#: FLOPs per element for element-wise work (norm: mean-square, rsqrt, scale; loss: exp, sum, log over the vocab).
NORM_FLOPS = 8
ELEMENTWISE_FLOPS = 4
LOSS_FLOPS_PER_LOGIT = 6


@dataclass
class LayerCost:
    index: int
    name: str
    kind: LayerKind
    part: str
    block: int | None
    params: int  # parameters resident with this layer (a tied LM head counts its copy of the embedding)
    forward_flops: float  # one micro-batch
    flops: float  # forward + backward (+ recomputation with activation checkpointing), one micro-batch
    activation_bytes: float  # kept for backward per micro-batch (without activation checkpointing)
    checkpoint_bytes: float  # kept per micro-batch with activation checkpointing
    trainable: int | None = None  # of ``params``, those with gradients and optimizer states (None: all; LoRA: adapters)
    quantized: int = 0  # of ``params``, those stored in 4 bits (QLoRA: hfpipe.core.quantize)
    quantized_bytes: float = 0.0  # bytes per 4-bit parameter, quantisation statistics included

    @property
    def trainable_params(self) -> int:
        return self.params if self.trainable is None else self.trainable

    def as_dict(self) -> dict:
        return {**asdict(self), "kind": self.kind.value}


@dataclass
class Workload:
    """What one micro-batch looks like and how it is run."""

    seq_len: int = 4096
    micro_batch_size: int = 1
    dtype: str = "bf16"
    activation_checkpointing: bool = False
    attention_kernel: str = "flash"
    #: encoder-decoders: decoder (target) tokens per example; ``seq_len`` is then the source length (default: equal)
    target_len: int | None = None

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {sorted(DTYPE_BYTES)}.")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel={self.attention_kernel!r}; expected one of {ATTENTION_KERNELS}.")
        if self.seq_len < 1 or self.micro_batch_size < 1:
            raise ValueError(f"seq_len={self.seq_len}, micro_batch_size={self.micro_batch_size}; both must be >= 1.")

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch_size


def default_seq_len(config) -> int:
    """The sequence length to plan for when none is given: the model's context, capped at 4096."""
    return int(min(getattr(config, "max_position_embeddings", None) or 2048, 4096))


# ------------------------------------------------------------------------------------------------ module walking
def _top_k(config) -> int:
    for name in ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def _module_work(module: nn.Module | None, config) -> tuple[float, float, int]:
    """``(matmul FLOPs per token, output features per token, norm count)`` of a (meta) module subtree."""
    if module is None:
        return 0.0, 0.0, 0
    top_k = _top_k(config)
    scale: dict[int, float] = {}  # id(param) -> active fraction (MoE experts)
    for name, sub in module.named_modules():
        if name.rsplit(".", 1)[-1] != "experts":
            continue
        if isinstance(sub, nn.ModuleList) and len(sub):
            for p in sub.parameters():
                scale[id(p)] = min(1.0, top_k / len(sub))
        else:
            for p in sub.parameters(recurse=False):
                if p.dim() == 3:
                    scale[id(p)] = min(1.0, top_k / p.shape[0])
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    matmul = out = 0.0
    seen = set()
    for p in module.parameters():
        if id(p) in seen or id(p) in embeddings or p.dim() < 2:
            continue
        seen.add(id(p))
        frac = scale.get(id(p), 1.0)
        matmul += 2.0 * p.numel() * frac
        # output features per token (GPT-2's Conv1D stores weights transposed: the estimate stays close)
        out += p.shape[-2] * frac * p.shape[0] if p.dim() == 3 else p.shape[0] * frac
    norms = sum(1 for m in module.modules() if "norm" in type(m).__name__.lower())
    return matmul, out, norms


def _attention_context(adapter, block: int, seq_len: int, kernel: str) -> float:
    """Mean number of keys one query is multiplied with in block ``block``."""
    if kernel == "dense":
        return float(seq_len)
    if not adapter.causal:
        return float(seq_len)
    window = None
    try:
        fn = adapter.mask_function(block).__name__
    except Exception:
        fn = "create_causal_mask"
    if "sliding" in fn or "chunked" in fn:
        window = getattr(adapter.config, "sliding_window", None) or getattr(adapter.config, "attention_chunk_size", None)
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2.0
    # positions < window see i+1 keys, the rest see window keys
    return (window * (window + 1) / 2.0 + (seq_len - window) * window) / seq_len


def _attention_dims(config) -> tuple[int, int]:
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(heads), int(head_dim)


# -------------------------------------------------------------------------------------------------- per layer
def layer_costs(builder, workload: Workload | None = None, **workload_kwargs) -> list[LayerCost]:
    """Cost of every layer of ``builder.layers()`` (``hfpipe.core.builder.prepare(model_or_config, model_class)``).
    A meta-device builder with a LoRA plan (``hfpipe plan``'s) also gets each layer's trainable count
    (:func:`trainable_params`); other builders (``to_pipeline``'s, which only need FLOPs) leave it ``None``."""
    w = workload or Workload(**workload_kwargs)
    a, config = builder.adapter, builder.adapter.config
    if a.encoder_decoder:
        return _with_quantized(builder, _encdec_layer_costs(builder, w))
    hidden = int(config.hidden_size)
    heads, head_dim = _attention_dims(config)
    act_b = DTYPE_BYTES[w.dtype]
    T = float(w.tokens)
    blocks = a.meta_base.get_submodule(a.layers_path)
    infos = builder.layers()
    embed = a.meta_base.get_submodule(a.embed_path) if a.embed_path else None
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    trainable = trainable_params(builder, infos) if torch.device(builder.device).type == "meta" else None
    costs = []
    for index, info in enumerate(infos):
        params = info.num_params
        act_elems = ckpt_elems = 0.0
        bwd_factor, recompute = 2.0, 0.0
        layer = info.layer
        if layer.kind is LayerKind.BLOCK:
            block = blocks[info.block]
            children = layer.owned_children
            subtree = block if children is None else nn.ModuleList([getattr(block, c) for c in children])
            has_attn = layer.has_attention
            matmul, out, norms = _module_work(subtree, config)
            fwd = T * (matmul + ELEMENTWISE_FLOPS * out + NORM_FLOPS * norms * hidden + hidden)
            act_elems = T * (hidden + out + norms * hidden)
            if has_attn:
                ctx = _attention_context(a, info.block, w.seq_len, w.attention_kernel)
                fwd += T * ctx * heads * (4.0 * head_dim + 5.0)
                if w.attention_kernel == "dense":
                    act_elems += T * heads * w.seq_len  # the attention probabilities
            ckpt_elems = T * hidden
            recompute = 1.0 if w.activation_checkpointing else 0.0
        elif layer.kind is LayerKind.PRELUDE:  # a shared per-block table (DeBERTa's relative positions): norm over its rows
            fwd = float(info.num_params) * NORM_FLOPS
            act_elems = ckpt_elems = float(info.num_params)
        elif issubclass(layer, TokenEmbedding):
            fwd, bwd_factor = T * hidden, 1.0  # a gather; backward is a scatter-add into the table
            act_elems = ckpt_elems = T * 4  # the int64 ids (in units of the activation dtype: close enough)
        elif layer.kind is LayerKind.EMBEDDING:  # BodyShell: positions, scaling, embedding norm/dropout (encoders: tables)
            shell = a.body_shell()
            matmul, out, norms = _module_work(shell, config)
            fwd = T * (matmul + ELEMENTWISE_FLOPS * (out + 2 * hidden) + NORM_FLOPS * norms * hidden)
            act_elems = ckpt_elems = T * hidden * (1 + norms)
        elif layer.kind is LayerKind.FINAL:
            modules = nn.ModuleList([m for _, m in a.final_modules()])
            matmul, out, norms = _module_work(modules, config)
            fwd = T * (matmul + ELEMENTWISE_FLOPS * out + NORM_FLOPS * norms * hidden)
            pooler = getattr(a.meta_base, a.pooler_path, None) if a.pooler_path else None
            if builder.head.uses_pooler and isinstance(pooler, nn.Module):  # applied to one vector per example
                fwd += w.micro_batch_size * _module_work(pooler, config)[0]
            act_elems = ckpt_elems = T * hidden * (1 + norms)
        else:  # head
            if issubclass(layer, TiedLMHead):
                matmul, out = 2.0 * embed.weight.numel(), float(embed.weight.shape[0])
                params = embed.weight.numel()
            else:
                matmul, out, _ = _module_work(task_shell(a), config)
            rows = T
            if builder.head.uses_pooler and not a.causal:  # encoder classification: one pooled vector per example
                rows = float(w.micro_batch_size)
            fwd = rows * (matmul + ELEMENTWISE_FLOPS * out)
            if builder.head.causal:
                fwd += T * LOSS_FLOPS_PER_LOGIT * vocab
                if builder.loss_chunk_tokens is not None:
                    # hfpipe.core.heads.ChunkedLogits: only the hidden states stay (added below); each chunk's logits
                    # are transient and the head runs again in backward
                    recompute = 1.0
                else:  # logits in the compute dtype, their fp32 copy for the loss and its gradient
                    act_elems = ckpt_elems = T * vocab * (1 + 8 / act_b)
            else:
                act_elems = ckpt_elems = rows * out
            act_elems += T * hidden
            ckpt_elems += T * hidden
        flops = fwd * (1.0 + bwd_factor + recompute)
        costs.append(LayerCost(index, info.name, layer.kind, layer.part, info.block, int(params), fwd, flops,
                               act_elems * act_b, ckpt_elems * act_b, trainable[index] if trainable else None))
    return _with_quantized(builder, costs)


def _with_quantized(builder, costs: list[LayerCost]) -> list[LayerCost]:
    """``costs`` with each layer's 4-bit parameters under a meta-device builder's QLoRA plan
    (``hfpipe.core.quantize.quantized_params``; ``hfpipe plan --load-in-4bit``); otherwise unchanged."""
    if torch.device(builder.device).type != "meta" or getattr(builder, "quantization", None) is None:
        return costs
    per = quantize.bytes_per_param(builder.quantization.config)
    for c, n in zip(costs, quantize.quantized_params(builder)):
        c.quantized, c.quantized_bytes = n, per
    return costs


def _encdec_layer_costs(builder, w: Workload) -> list[LayerCost]:
    """:func:`layer_costs` for an encoder-decoder (``hfpipe.core.adapters.encdec``): encoder layers work on the
    ``seq_len`` source tokens, decoder layers on the ``target_len`` target tokens; every decoder block also projects
    the encoder output to cross-attention keys and values (source tokens) and attends from each target token to every
    source token. The encoder output rides along with the decoder's activations through the decoder stages."""
    a, config = builder.adapter, builder.adapter.config
    hidden = int(config.d_model if hasattr(config, "d_model") else config.hidden_size)
    heads = int(getattr(config, "num_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "d_kv", None) or hidden // heads)
    act_b = DTYPE_BYTES[w.dtype]
    src, tgt = w.seq_len, w.target_len or w.seq_len
    tokens = {"encoder": float(src * w.micro_batch_size), "decoder": float(tgt * w.micro_batch_size)}
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    infos = builder.layers()
    trainable = trainable_params(builder, infos) if torch.device(builder.device).type == "meta" else None
    per_head = 4.0 * head_dim + 5.0
    costs = []
    for index, info in enumerate(infos):
        layer, params = info.layer, info.num_params
        stack = getattr(layer, "stack", "decoder")  # None: the shared table, embedding both
        T = tokens.get(stack, 0.0)
        bwd_factor, recompute, ckpt = 2.0, 0.0, None
        if layer.kind is LayerKind.BLOCK:
            block = a.blocks(stack)[info.block - (0 if stack == "encoder" else a.num_encoder_blocks)]
            matmul, out, norms = _module_work(block, config)
            fwd = T * (matmul + ELEMENTWISE_FLOPS * out + NORM_FLOPS * norms * hidden + hidden)
            act = T * (hidden + out + norms * hidden)
            if stack == "encoder":
                fwd += T * src * heads * per_head  # bidirectional self-attention
            else:
                kv = sum(2.0 * p.numel() for path in a.cross_kv_paths for p in block.get_submodule(path).parameters()
                         if p.dim() >= 2)
                fwd += (tokens["encoder"] - T) * kv  # cross keys/values are projected from the source tokens
                ctx = float(tgt) if w.attention_kernel == "dense" else (tgt + 1) / 2.0
                fwd += T * (ctx + src) * heads * per_head  # causal self-attention + cross-attention to every source
                act += tokens["encoder"] * 2 * hidden  # cross-attention keys and values
                if w.attention_kernel == "dense":
                    act += T * heads * (tgt + src)
            if stack == "encoder" and w.attention_kernel == "dense":
                act += T * heads * src
            ckpt = T * hidden
            recompute = 1.0 if w.activation_checkpointing else 0.0
        elif layer.kind is LayerKind.PRELUDE:  # T5's relative-position bias: a gather of heads x L x L per micro-batch
            n = float(w.micro_batch_size * (src if stack == "encoder" else tgt) ** 2 * heads)
            fwd, bwd_factor, act = n, 1.0, n
        elif stack is None:  # the shared table: both gathers; backward is a scatter-add into the table
            fwd, bwd_factor = (tokens["encoder"] + tokens["decoder"]) * hidden, 1.0
            act = (tokens["encoder"] + tokens["decoder"]) * 4
        elif layer.kind is LayerKind.EMBEDDING or layer.kind is LayerKind.FINAL:  # stack shell / final norm
            module = a.stack_shell(stack) if layer.kind is LayerKind.EMBEDDING else nn.ModuleList(
                [getattr(a.stack(stack), n) for n in a.stack_final_names])
            matmul, out, norms = _module_work(module, config)
            fwd = T * (matmul + ELEMENTWISE_FLOPS * (out + 2 * hidden) + NORM_FLOPS * norms * hidden)
            act = T * hidden * (1 + norms)
        else:  # LM head and loss over the target tokens
            out_emb = a.meta_model.get_output_embeddings()
            fwd = T * (2.0 * out_emb.weight.numel() + ELEMENTWISE_FLOPS * vocab + LOSS_FLOPS_PER_LOGIT * vocab)
            params = params or out_emb.weight.numel()
            act = T * vocab * (1 + 8 / act_b) + T * hidden
        # what crosses the stage: the encoder output travels with the decoder's hidden states
        if stack == "decoder" and layer.kind is not LayerKind.HEAD:
            act += tokens["encoder"] * hidden * (0 if layer.kind is LayerKind.BLOCK else 1)
        flops = fwd * (1.0 + bwd_factor + recompute)
        costs.append(LayerCost(index, info.name, layer.kind, layer.part, info.block, int(params), fwd, flops,
                               act * act_b, (ckpt if ckpt is not None else act) * act_b,
                               trainable[index] if trainable else None))
    return costs


def trainable_params(builder, infos=None) -> list[int] | None:
    """Trainable parameters of each layer under the builder's LoRA plan (``None``: no plan, everything trains): each
    layer is built on the meta device exactly as its stage builds it (PEFT's own layers, no weights), so the count
    is PEFT's -- r x (in + out) per adapted linear, plus the modules PEFT trains in full."""
    if getattr(builder, "lora", None) is None:
        return None
    if torch.device(builder.device).type != "meta":
        raise ValueError(f"builder.device={builder.device!r}; counting LoRA parameters builds every layer, so it "
                         "expects a meta-device builder. Fix: prepare(..., device='meta').")
    return [sum(p.numel() for p in info.spec.build().parameters() if p.requires_grad)
            for info in (infos if infos is not None else builder.layers())]


# ------------------------------------------------------------------------------------------------- per stage
def optimizer_bytes_per_param(dtype: str, dp: int = 1, zero_stage: int = 0) -> dict[str, float]:
    """Bytes per parameter for weights, gradients and optimizer (Adam) states on one rank.

    fp32: weights 4, gradients 4, Adam m and v 8. bf16: weights 2, gradients 2, and with the fp32 master copy
    DeepSpeed's bf16 optimizer keeps: master weights 4, fp32 gradients 4, Adam 8. ZeRO-1 divides the optimizer part
    over the ``dp`` data-parallel ranks (ZeRO-2/3 do not combine with pipeline parallelism).
    """
    check_zero_stage(zero_stage, key="zero_stage", fix="use --zero-stage 0 or 1")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPE_BYTES)}.")
    w = DTYPE_BYTES[dtype]
    opt = 8.0 + (8.0 if w < 4 else 0.0)
    if zero_stage == 1:
        opt /= max(1, dp)
    return {"params": float(w), "grads": float(w), "optimizer": opt}


def in_flight(stage: int, num_stages: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B."""
    return max(1, min(micro_batches, num_stages - stage))


def stage_memory(costs: Sequence[LayerCost], start: int, stop: int, stage: int, num_stages: int, *,
                 micro_batches: int, dtype: str = "bf16", dp: int = 1, zero_stage: int = 0,
                 activation_checkpointing: bool = False) -> dict[str, float]:
    """Estimated bytes on one rank of stage ``stage`` owning layers ``[start, stop)``. Frozen parameters (LoRA's
    base: ``LayerCost.trainable`` below ``params``) hold their weights only: no gradient, optimizer state or master
    copy."""
    layers = costs[start:stop]
    per = optimizer_bytes_per_param(dtype, dp, zero_stage)
    params = sum(c.params for c in layers)
    trainable = sum(c.trainable_params for c in layers)
    held = in_flight(stage, num_stages, micro_batches)
    act = 0.0
    transient = 0.0
    for c in layers:
        if c.kind is LayerKind.HEAD:  # computed and consumed by its backward right away on the last stage
            transient += c.activation_bytes
        else:
            act += c.checkpoint_bytes if (activation_checkpointing and c.kind is LayerKind.BLOCK) else c.activation_bytes
    if activation_checkpointing:  # one block's full activations while it is recomputed
        transient += max((c.activation_bytes for c in layers if c.kind is LayerKind.BLOCK), default=0.0)
    out = {k: (params if k == "params" else trainable) * v for k, v in per.items()}
    out["params"] -= sum(c.quantized * (per["params"] - c.quantized_bytes) for c in layers)  # 4-bit weights (QLoRA)
    out["activations"] = held * act + transient
    out["total"] = sum(out.values())
    return out


def stage_flops(costs: Sequence[LayerCost], parts: Sequence[int]) -> list[float]:
    return [sum(c.flops for c in costs[parts[s]:parts[s + 1]]) for s in range(len(parts) - 1)]


# --------------------------------------------------------------------------------------------- measured profile
def profile_layers(builder, seq_len: int, micro_batch_size: int = 1, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Measured seconds of forward + backward of every layer, each timed on its own in this process.

    The measured counterpart of :func:`layer_costs` for ``partition_method="balanced"`` (``to_pipeline(...,
    layer_costs=profile_layers(...))``), when FLOPs mislead (memory-bound layers, unusual kernels). Every layer is
    built for real (random weights unless the builder has a source), so use it for models that fit this machine.
    Returns the median over ``repeats`` runs after ``warmup`` runs; CPU time of the process on CPU (robust to
    other jobs on the machine), wall time with synchronisation on CUDA.
    """
    import statistics
    import time
    from types import SimpleNamespace

    cuda = str(builder.device).startswith("cuda")

    def clock():
        if cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    infos = builder.layers()
    tied: dict = {}
    calls = []
    for info in infos:
        spec = info.spec
        if isinstance(spec, TiedLayerSpec):
            module = tied.setdefault(spec.key, spec.build())
            fn = (lambda m, f: (lambda x: f(m, x)))(module, spec.forward_fn) if spec.forward_fn else module
        else:
            module = spec.build()
            fn = module
        module.train()
        calls.append((fn, module))
    config = builder.adapter.config
    batch = make_batch(config, builder.head, micro_batch_size, seq_len)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])  # full sequences, as in training
    if "labels" in batch and batch["labels"].dim() == 2:
        batch["labels"] = batch["input_ids"].clone() if builder.head.causal else batch["labels"]
    fake_pipe = SimpleNamespace(head=builder.head, input_names=builder.adapter.input_names)
    inputs, labels = micro_batches(batch, fake_pipe, 1)[0]
    inputs = tuple(t.to(builder.device) for t in inputs)
    labels = tuple(t.to(builder.device) for t in labels)
    loss_fn = PipelineLoss(builder.head, config)
    seconds = []
    x = inputs
    for i, (fn, module) in enumerate(calls):
        last = i == len(calls) - 1
        runs = []
        for r in range(warmup + repeats):
            x_in = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in x)
            start = clock()
            out = fn(x_in)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if last:
                loss_fn(out, labels).backward()
            else:
                floats = [t for t in dict.fromkeys(outs) if torch.is_tensor(t) and t.requires_grad]
                torch.autograd.backward(floats, [torch.ones_like(t) for t in floats])
            runs.append(clock() - start)
            module.zero_grad(set_to_none=True)
        seconds.append(statistics.median(runs[warmup:]))
        x = tuple(t.detach() for t in outs) if not last else x
    return seconds
