"""Task heads on the last stage, and their losses normalised over the *global* batch.

The head layer runs the HF task model's own ``forward`` with its base model swapped for a stub that returns the
hidden states (and pooled output) the pipeline computed. So pooling rules (CLS/pooler, last non-pad token of
decoders), classifier dropout, logit soft-capping, logit scaling, ... are exactly HF's, for every family.

Losses use transformers' own loss functions. DeepSpeed averages the per-micro-batch losses over micro-batches and
data-parallel replicas; to get HF's mean over the label tokens of the whole global batch, the labels tuple carries a
``norm`` tensor = (label items in the global batch) / (micro-batches x dp replicas), and each micro-batch returns
``sum / norm`` (``hfpipe.data.micro_batches`` computes it). Without ``norm`` a micro-batch returns its own mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.loss.loss_utils import (ForCausalLMLoss, ForSequenceClassificationLoss, ForTokenClassification,
                                          fixed_cross_entropy)
from transformers.models.auto import modeling_auto

from .adapters.base import UnsupportedModelError, copy_without, materialize
from .layers import PipeLayer


@dataclass(frozen=True)
class HeadSpec:
    name: str
    #: Label tensors the last stage takes, in order (before the optional ``norm``).
    label_names: tuple[str, ...]
    #: Whether the stub body returns the base model's pooler output.
    uses_pooler: bool = False
    #: Whether the loss sums over items that vary per example (tokens): then ``norm`` is needed for HF's mean.
    token_level: bool = False


CAUSAL_LM = HeadSpec("causal-lm", ("labels",), token_level=True)
SEQUENCE_CLASSIFICATION = HeadSpec("sequence-classification", ("labels",), uses_pooler=True)
TOKEN_CLASSIFICATION = HeadSpec("token-classification", ("labels",), token_level=True)
QUESTION_ANSWERING = HeadSpec("question-answering", ("start_positions", "end_positions"), token_level=True)
HEADS = {h.name: h for h in (CAUSAL_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, QUESTION_ANSWERING)}

_MAPPINGS = (
    (CAUSAL_LM, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    (SEQUENCE_CLASSIFICATION, modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
    (TOKEN_CLASSIFICATION, modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
    (QUESTION_ANSWERING, modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
)


def head_for_class(model_class: type) -> HeadSpec:
    """The head of an HF task model class (``LlamaForCausalLM`` -> causal-lm, ``BertForQuestionAnswering`` -> QA)."""
    name = model_class.__name__
    for head, mapping in _MAPPINGS:
        if name in mapping.values():
            return head
    suffixes = {"ForCausalLM": CAUSAL_LM, "LMHeadModel": CAUSAL_LM, "ForSequenceClassification": SEQUENCE_CLASSIFICATION,
                "ForTokenClassification": TOKEN_CLASSIFICATION, "ForQuestionAnswering": QUESTION_ANSWERING}
    for suffix, head in suffixes.items():
        if name.endswith(suffix):
            return head
    raise UnsupportedModelError(
        f"{name} has no head hfpipe supports; supported heads: {sorted(HEADS)} (the AutoModelForCausalLM, "
        "AutoModelForSequenceClassification, AutoModelForTokenClassification and AutoModelForQuestionAnswering "
        "classes of a supported family)."
    )


class _BodyOutput:
    """What the stub body returns: ``last_hidden_state`` and ``pooler_output``, indexable like a ModelOutput; any
    other field a head may read (cache, hidden_states, attentions, router_logits, ...) is ``None``."""

    def __init__(self, last_hidden_state, pooler_output):
        self.last_hidden_state = last_hidden_state
        self.pooler_output = pooler_output

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def to_tuple(self):
        return (self.last_hidden_state, self.pooler_output)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


class _StubBody(nn.Module):
    """Stands in for the base model inside the task model: returns what the pipeline computed."""

    def __init__(self):
        super().__init__()
        self.output = None

    def forward(self, *args, **kwargs):
        out, self.output = self.output, None
        return out

    def __getattr__(self, name):
        # task models that reach into their body (OPTForCausalLM calls ``self.model.decoder(...)``) get the stub
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return self


def task_shell(adapter) -> nn.Module:
    """Meta copy of the task model with the base model replaced by a stub: only the head's modules remain."""
    shell = copy_without(adapter.meta_model, {adapter.base_prefix: _StubBody()})
    return shell


class Head(PipeLayer):
    """The task head (untied): ``(hidden, pooled, attention_mask, position_ids[, input_ids]) -> logits``."""

    kind = "head"

    def __init__(self, builder, index: int):
        super().__init__(builder, index)
        shell = task_shell(self.adapter)
        stub = shell.get_submodule(self.adapter.base_prefix)
        setattr(shell, self.adapter.base_prefix, None)
        self.shell = materialize(shell, builder.init_owner, builder.source, _names(shell),
                                 seed=builder.layer_seed(index), device=builder.device)
        setattr(self.shell, self.adapter.base_prefix, stub)

    def hf_names(self):
        return {f"shell.{k}": v for k, v in _names(self.shell).items() if not k.startswith(self.adapter.base_prefix)}

    def forward(self, inputs):
        if defers_logits(self.builder):
            return ChunkedLogits(inputs, self._logits, self.builder.loss_chunk_tokens)
        return self._logits(inputs)

    def _logits(self, inputs):
        return run_head(self.shell, self.adapter, self.builder, inputs)


def _names(module: nn.Module) -> dict[str, str]:
    names = {n: n for n, _ in module.named_parameters()}
    names.update({n: n for n, _ in module.named_buffers()})
    return names


def run_head(shell: nn.Module, adapter, builder, inputs):
    hidden, pooled, attention_mask, _position_ids, *rest = inputs
    stub = shell.get_submodule(adapter.base_prefix)
    stub.output = _BodyOutput(hidden, pooled)
    kwargs = {"attention_mask": attention_mask}
    if builder.carry_input_ids:
        kwargs["input_ids"] = rest[-1]
    else:  # the stub ignores it; HF's heads only read its shape
        kwargs["input_ids"] = attention_mask
    out = shell(**kwargs)
    if builder.head is QUESTION_ANSWERING:
        return (out.start_logits, out.end_logits)
    return out.logits


class TiedLMHead:
    """``forward_fn`` of the LM head's ``TiedLayerSpec``: runs the task shell with the tied embedding's weight.

    DeepSpeed builds the tied module (a :class:`hfpipe.layers.TokenEmbedding`) once per stage and sums the tied
    weight's gradients across the stages that hold it, exactly as HF's shared parameter gets both gradients.
    """

    def __init__(self, builder):
        self.builder = builder
        self.shell = None

    def __call__(self, embedding, inputs):
        if self.shell is None:
            adapter = self.builder.adapter
            out_path = _module_path(adapter.meta_model, adapter.meta_model.get_output_embeddings())
            shell = task_shell(adapter)
            extra = [n for n, _ in shell.named_parameters() if not n.startswith(out_path + ".")]
            if extra or getattr(shell.get_submodule(out_path), "bias", None) is not None:
                raise UnsupportedModelError(
                    f"{type(shell).__name__} ties its LM head to the input embedding but the head also has "
                    f"parameters {extra or [out_path + '.bias']}; hfpipe cannot tie such a head. Untie it "
                    "(config.tie_word_embeddings=False) or register a custom adapter."
                )
            self.out = shell.get_submodule(out_path)
            self.shell = shell
        if defers_logits(self.builder):
            return ChunkedLogits(inputs, lambda x: self._logits(embedding, x), self.builder.loss_chunk_tokens)
        return self._logits(embedding, inputs)

    def _logits(self, embedding, inputs):
        self.out.weight = embedding.embed.weight
        return run_head(self.shell, self.builder.adapter, self.builder, inputs)


def _module_path(root: nn.Module, module: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is module:
            return name
    raise UnsupportedModelError(f"{type(root).__name__} has no output embedding module to tie.")


# ---------------------------------------------------------------------------------------------- chunked LM loss
def defers_logits(builder) -> bool:
    """Whether the causal-LM head hands the loss a :class:`ChunkedLogits` instead of full logits: only with
    ``loss_chunk_tokens`` set (``PipelineBuilder.chunk_loss`` allows it for causal-LM heads only) and while autograd
    records (training). Evaluation and generation, which run without gradients, still get logits."""
    return builder.loss_chunk_tokens is not None and torch.is_grad_enabled()


class ChunkedLogits:
    """The causal-LM head's output when the loss is chunked: the head's inputs and ``logits_fn`` (a sequence slice of
    them -> that slice's logits, through the task model's own head: soft-capping and scaling included).

    :meth:`loss` runs the head and an fp32 cross-entropy over ``chunk_tokens`` tokens at a time, each chunk
    recomputed in backward (``torch.utils.checkpoint``), so at most one chunk of ``chunk_tokens x vocab`` logits is
    ever alive instead of the full ``tokens x vocab`` in the model's dtype plus its fp32 copy.
    """

    def __init__(self, inputs: tuple, logits_fn, chunk_tokens: int):
        self.inputs, self.logits_fn, self.chunk_tokens = inputs, logits_fn, int(chunk_tokens)

    def _chunk_loss_sum(self, hidden, targets):
        logits = self.logits_fn((hidden, hidden, *self.inputs[2:])).float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=-100, reduction="sum")

    def loss(self, labels: torch.Tensor, num_items_in_batch: torch.Tensor | None = None) -> torch.Tensor:
        """HF's ``ForCausalLMLoss`` (shift by one, sum over tokens / ``num_items_in_batch``, else the mean)."""
        from torch.utils.checkpoint import checkpoint

        hidden = self.inputs[0]
        targets = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
        step = max(1, self.chunk_tokens // hidden.shape[0])  # sequence positions per chunk, all rows at once
        total = hidden.new_zeros((), dtype=torch.float32)
        for lo in range(0, hidden.shape[1], step):
            total = total + checkpoint(self._chunk_loss_sum, hidden[:, lo:lo + step], targets[:, lo:lo + step],
                                       use_reentrant=False)
        if num_items_in_batch is None:
            return total / (targets != -100).sum()
        return total / torch.as_tensor(num_items_in_batch, device=total.device)


# ---------------------------------------------------------------------------------------------------------- losses
class PipelineLoss:
    """``loss_fn(outputs, labels)`` for the last stage; ``labels`` is ``(label tensors...[, norm])``."""

    def __init__(self, head: HeadSpec, config):
        self.head = head
        self.config = config
        self.__name__ = f"hfpipe_{head.name.replace('-', '_')}_loss"

    def __call__(self, outputs, labels):
        if not isinstance(labels, (tuple, list)):
            labels = (labels,)
        n = len(self.head.label_names)
        norm = labels[n] if len(labels) > n else None
        labels = labels[:n]
        head = self.head
        if isinstance(outputs, ChunkedLogits):
            return outputs.loss(labels[0], norm)
        if head is CAUSAL_LM:
            return ForCausalLMLoss(outputs, labels[0], vocab_size=outputs.shape[-1], num_items_in_batch=norm)
        if head is TOKEN_CLASSIFICATION:
            return ForTokenClassification(outputs, labels[0], self.config, num_items_in_batch=norm)
        if head is SEQUENCE_CLASSIFICATION:
            return ForSequenceClassificationLoss(labels[0], outputs, self.config)
        start_logits, end_logits = outputs
        ignored = start_logits.size(1)
        terms = []
        for i, (logits, pos) in enumerate(((start_logits, labels[0]), (end_logits, labels[1]))):
            pos = pos.reshape(-1).clamp(0, ignored)
            terms.append(fixed_cross_entropy(logits, pos, num_items_in_batch=None if norm is None else norm[i],
                                             ignore_index=ignored))
        return (terms[0] + terms[1]) / 2


def count_items(head: HeadSpec, labels: tuple[torch.Tensor, ...], seq_len: int | None = None) -> torch.Tensor:
    """Label items the loss averages over, for ``labels`` of the whole global batch (shape: [] or [2] for QA)."""
    if head is CAUSAL_LM:
        return (labels[0][..., 1:] != -100).sum().to(torch.float32)
    if head is TOKEN_CLASSIFICATION:
        return (labels[0] != -100).sum().to(torch.float32)
    if head is QUESTION_ANSWERING:
        ignored = seq_len
        return torch.stack([(p.reshape(-1).clamp(0, ignored) != ignored).sum() for p in labels]).to(torch.float32)
    return torch.tensor(float(labels[0].shape[0]))
