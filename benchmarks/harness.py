"""Pieces shared by the benchmarks: the 1F1B ideal, environment capture, JSON/Markdown/PNG writing, a layer cost
that does not compete for CPU cores (sleep), and a hand-written DeepSpeed ``PipelineModule`` of a Llama model (the
"bare" baseline that hfpipe is measured against).

The bare module is what a careful user would write by hand for one family (like Megatron-DeepSpeed's
``GPTModelPipe``): only ``hidden_states`` crosses a stage, positions are ``arange`` and the causal mask is SDPA's
``is_causal`` -- so it cannot handle padding, but it is the cheapest correct pipeline for the benchmark's unpadded
batches. hfpipe carries ``(hidden, attention_mask, position_ids)`` and rebuilds mask and rotary embeddings per
block; the benchmarks measure what that generality costs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Iterable, Sequence

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ the physics
def ideal_step_time(num_micro_batches: int, num_stages: int, t_forward: float, t_backward: float) -> float:
    """Step time of a perfectly balanced 1F1B (or GPipe) schedule with free communication: the critical path
    holds ``m + p - 1`` forward and ``m + p - 1`` backward slots."""
    if num_micro_batches < 1 or num_stages < 1:
        raise ValueError(f"need num_micro_batches >= 1 and num_stages >= 1, got m={num_micro_batches}, "
                         f"p={num_stages}.")
    return (num_micro_batches + num_stages - 1) * (t_forward + t_backward)


def bubble_fraction(num_micro_batches: int, num_stages: int) -> float:
    """Idle share of the ideal schedule: ``(p - 1) / (m + p - 1)``."""
    return (num_stages - 1) / (num_micro_batches + num_stages - 1)


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


# ------------------------------------------------------------------------------------------------ environment
def environment() -> dict:
    """Device, versions and machine load, for the report header."""
    import deepspeed
    import transformers

    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line(script: str | None = None, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces a run, with paths inside the repository made relative to it."""
    script = script or sys.argv[0]
    argv = list(sys.argv[1:] if argv is None else argv)
    args = [os.path.relpath(a, REPO) if os.path.isabs(a) and a.startswith(REPO) else a
            for a in [os.path.abspath(script), *argv]]
    return " ".join(["python", *[a if " " not in a else repr(a) for a in args]])


# --------------------------------------------------------------------------------------------------- reports
def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def ms(value: float) -> str:
    """``value`` with two decimals, without the ``-0.00`` of a tiny negative difference."""
    return f"{0.0 if abs(value) < 0.005 else value:.2f}"


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: ``(key, header, format)``; a missing or ``None`` value prints as ``-``."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else (format(value, fmt) if fmt else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_efficiency(rows: Sequence[dict], path: str, title: str) -> str:
    """Efficiency (ideal / measured) vs micro-batches, one line per (variant, p), with the bubble-only bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    stages = sorted({r["p"] for r in rows})
    colors = dict(zip(stages, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for p in stages:
        ms = sorted({r["m"] for r in rows if r["p"] == p})
        bound = [m / (m + p - 1) for m in ms]
        ax.plot(ms, bound, ":", color=colors[p], label=f"p={p} bubble bound m/(m+p-1)")
        for variant, style in (("bare", "s--"), ("bare-tuple", "^-."), ("bare-packed", "v:"), ("hfpipe", "o-")):
            pts = sorted((r["m"], r["useful_fraction"]) for r in rows if r["p"] == p and r["variant"] == variant)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, color=colors[p], label=f"p={p} {variant}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("useful work / measured step time")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- a fixed layer cost
class Sleep(torch.autograd.Function):
    """Identity whose forward sleeps ``t_forward`` and whose backward sleeps ``t_backward`` seconds: a layer cost
    that is exact and does not compete for CPU cores, so four ranks on two cores behave like four devices."""

    @staticmethod
    def forward(ctx, x, t_forward: float, t_backward: float):
        ctx.t_backward = t_backward
        time.sleep(t_forward)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.t_backward)
        return grad, None, None


def inject_sleep(module: nn.Module, t_forward: float, t_backward: float):
    """Forward hook: the first tensor of ``module``'s output (a tensor or a tuple) goes through :class:`Sleep`."""

    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (Sleep.apply(output[0], t_forward, t_backward), *output[1:])
        return Sleep.apply(output, t_forward, t_backward)

    return module.register_forward_hook(hook)


class _StageClock:
    """When this rank's current forward / backward pass started (a stage runs one pass at a time)."""

    def __init__(self, t_forward: float, t_backward: float):
        self.t_forward, self.t_backward = t_forward, t_backward
        self.forward_start = self.backward_start = 0.0


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sleep_until(deadline: float) -> None:
    left = deadline - time.perf_counter()
    if left > 0:
        time.sleep(left)


class _PadForward(torch.autograd.Function):
    """At the stage's output: forward waits until ``t_forward`` after the pass began; backward (the first thing the
    stage's backward pass runs) starts the backward clock."""

    @staticmethod
    def forward(ctx, x, clock: _StageClock):
        ctx.clock = clock
        _sleep_until(clock.forward_start + clock.t_forward)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.backward_start = time.perf_counter()
        return grad, None


class _PadBackward(torch.autograd.Function):
    """At the stage's input: backward (the last thing the stage's backward pass runs) waits until ``t_backward``
    after the backward pass began."""

    @staticmethod
    def forward(ctx, x, clock: _StageClock):
        ctx.clock = clock
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _sleep_until(ctx.clock.backward_start + ctx.clock.t_backward)
        return grad, None


def _through(fn, value, clock):
    """``fn`` applied to the first floating-point tensor of ``value`` (a tensor or a tuple)."""
    if isinstance(value, tuple):
        i = next(i for i, t in enumerate(value) if torch.is_tensor(t) and t.is_floating_point())
        return (*value[:i], fn.apply(value[i], clock), *value[i + 1:])
    return fn.apply(value, clock)


def fix_stage_cost(pipe, t_forward: float, t_backward: float) -> _StageClock:
    """Pad this rank's stage so that every forward pass takes exactly ``t_forward`` and every backward pass exactly
    ``t_backward`` seconds, the layers' own work included (it must be shorter): a fixed, known cost per micro-batch,
    so the 1F1B ideal ``(m + p - 1)(t_F + t_B)`` is exact and whatever a step adds to it is the pipeline's own
    (messages, waits, loss, reductions, optimizer). The padding sleeps, so ranks do not compete for cores.

    The window opens when the stage's ``forward`` is called and closes on its output; the backward window opens on
    the output's gradient and closes on the gradient of the stage's first float tensor (the received activations,
    or on the first stage the embedding's output)."""
    clock = _StageClock(t_forward, t_backward)
    inner = pipe.forward

    def forward(x):
        clock.forward_start = time.perf_counter()
        if pipe.stage_id > 0 or getattr(pipe, "active_chunk", 0):  # a received input (DualPipeV: rank 0's chunk 1)
            x = _through(_PadBackward, x, clock)
        return _through(_PadForward, inner(x), clock)

    pipe.forward = forward  # instance attribute: nn.Module.__call__ calls it
    if pipe.stage_id == 0:
        pipe.forward_funcs[0].register_forward_hook(lambda _m, _a, out: _through(_PadBackward, out, clock))
    return clock


# ------------------------------------------------------------------------------- the hand-written baseline
class BareEmbedding(nn.Module):
    def __init__(self, config, carry_ints: bool = False):
        super().__init__()
        self.carry_ints = carry_ints
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        nn.init.normal_(self.embed_tokens.weight, std=config.initializer_range)  # as LlamaPreTrainedModel

    def forward(self, input_ids):
        hidden = self.embed_tokens(input_ids)
        if not self.carry_ints:
            return hidden
        # what hfpipe carries across stages besides the hidden states (mask, positions), to price the messages
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids).contiguous()
        if self.carry_ints == "packed":  # both in one int64 tensor: one message instead of two
            return hidden, torch.stack([torch.ones_like(input_ids), positions])
        return hidden, torch.ones_like(input_ids), positions


class BareBlock(nn.Module):
    """One ``LlamaDecoderLayer``; rotary from ``arange`` positions, causal mask from SDPA's ``is_causal``."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.layer = LlamaDecoderLayer(config, layer_idx)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        for module in self.layer.modules():  # as LlamaPreTrainedModel._init_weights
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=config.initializer_range)

    def forward(self, hidden):
        rest = ()
        if isinstance(hidden, tuple):
            hidden, *rest = hidden
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        out = self.layer(hidden, attention_mask=None, position_ids=positions,
                         position_embeddings=self.rotary_emb(hidden, positions))
        out = out[0] if isinstance(out, tuple) else out
        return (out, *rest) if rest else out


class BareNorm(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden):
        return self.norm(hidden[0] if isinstance(hidden, tuple) else hidden)


def bare_lm_head(embedding: BareEmbedding, hidden):
    return hidden @ embedding.embed_tokens.weight.t()


def bare_hidden_out(embedding: BareEmbedding, hidden):
    """Last layer when the loss is chunked: hand the loss the hidden states and the (tied) output weight."""
    return hidden, embedding.embed_tokens.weight


def causal_lm_loss(logits, labels):
    """HF's causal-LM loss on full logits (upcast to fp32, shift by one, mean over tokens)."""
    logits = logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                       ignore_index=-100)


def chunked_causal_lm_loss(outputs, labels, chunk_tokens: int = 1024):
    """The same loss from ``(hidden, weight)`` without materialising full logits: the projection and the fp32
    cross-entropy run over ``chunk_tokens`` tokens at a time, each chunk recomputed in backward
    (``torch.utils.checkpoint``), so at most one chunk of ``chunk_tokens x vocab`` logits is ever alive."""
    from torch.utils.checkpoint import checkpoint

    hidden, weight = outputs
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    count = (y != -100).sum().clamp(min=1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for lo in range(0, h.shape[0], chunk_tokens):
        total = total + checkpoint(_chunk_loss_sum, h[lo:lo + chunk_tokens], weight, y[lo:lo + chunk_tokens],
                                   use_reentrant=False)
    return total / count


def _chunk_loss_sum(h, weight, y):
    logits = (h @ weight.t()).float()
    return nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum")


def bare_llama_pipeline(config, num_stages: int, chunked_loss: bool = False, carry_ints: bool = False, **kwargs):
    """A hand-written ``PipelineModule`` for a (tied) Llama: embedding, blocks, norm, tied head; stages balanced
    by block count (``type:BareBlock``). ``carry_ints`` also sends an int64 mask and positions between stages
    (unused), the messages hfpipe sends; ``carry_ints="packed"`` sends both stacked in one tensor."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    if not getattr(config, "tie_word_embeddings", False):
        raise ValueError("bare_llama_pipeline is written for tied embeddings (Llama-3.2-1B); set "
                         "config.tie_word_embeddings=True.")
    config._attn_implementation = "sdpa"
    layers = [TiedLayerSpec("embed", BareEmbedding, config, carry_ints, tied_weight_attr=["embed_tokens.weight"])]
    layers += [LayerSpec(BareBlock, config, i) for i in range(config.num_hidden_layers)]
    layers.append(LayerSpec(BareNorm, config))
    head = bare_hidden_out if chunked_loss else bare_lm_head
    layers.append(TiedLayerSpec("embed", BareEmbedding, config, forward_fn=head,
                                tied_weight_attr=["embed_tokens.weight"]))
    loss_fn = chunked_causal_lm_loss if chunked_loss else causal_lm_loss
    return PipelineModule(layers=layers, num_stages=num_stages, loss_fn=loss_fn, partition_method="type:BareBlock",
                          **kwargs)
