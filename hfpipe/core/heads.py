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

import functools

import torch
from torch import nn
from transformers.loss.loss_utils import (ForCausalLMLoss, ForSequenceClassificationLoss, ForTokenClassification,
                                          fixed_cross_entropy)
from transformers.models.auto import modeling_auto

from hfpipe.core import lora
from hfpipe.core.meta import UnsupportedModelError, copy_without, materialize
from hfpipe.core.layers import LayerKind, LayerTraits, PipeLayer


class HeadSpec:
    """A task head kind: what the last stage takes as labels, how HF's loss is computed on the pipeline's outputs,
    and what other modules need to know about it (``causal``, ``per_token_labels``, ...). One instance per kind
    (:data:`CAUSAL_LM`, ...); other modules ask these attributes instead of comparing names."""

    #: Name shown to users (``hfpipe families``, manifests, model cards).
    name: str = ""
    #: Label tensors the last stage takes, in order (before the optional ``norm``).
    label_names: tuple[str, ...] = ("labels",)
    #: Whether the stub body returns the base model's pooler output.
    uses_pooler: bool = False
    #: Whether the loss sums over items that vary per example (tokens): then ``norm`` is needed for HF's mean.
    token_level: bool = False
    #: A causal language-model head: generation, the chunked loss and a tied LM head apply.
    causal: bool = False
    #: Labels hold one entry per token (padded with -100 by collators; the eval loss is a mean over label tokens).
    per_token_labels: bool = False
    #: Decoder families pool on the last non-pad *input id*, so the ids travel to the head.
    pools_last_token: bool = False
    #: The Hub's ``pipeline_tag`` for this task.
    pipeline_tag: str | None = None
    #: An encoder-decoder's LM head (decoder inputs from shifted labels; ``hfpipe.core.adapters.encdec``).
    encoder_decoder: bool = False
    #: A base model (``AutoModel``) without a task head: the last layer returns ``last_hidden_state``.
    base_model: bool = False
    #: PEFT's ``task_type`` for this head (``SEQ_CLS`` makes PEFT train the classifier in full: ``modules_to_save``).
    peft_task_type: str | None = None

    def __repr__(self) -> str:
        return f"<head {self.name}>"

    def outputs(self, out):
        """What the pipeline returns for an HF model output (the logits)."""
        return out.logits

    def loss(self, outputs, labels: tuple, norm, config):
        """HF's loss for ``outputs`` and the label tensors; ``norm`` = items of the global batch per micro-batch."""
        raise NotImplementedError

    def count_items(self, labels: tuple, seq_len: int | None = None) -> torch.Tensor:
        """Label items the loss averages over, for ``labels`` of the whole global batch."""
        return torch.tensor(float(labels[0].shape[0]))

    def random_labels(self, config, ids, mask, lengths, generator, padding: str) -> dict:
        """Random labels for a padded batch ``ids``/``mask`` (``hfpipe.core.batches.make_batch``)."""
        raise NotImplementedError

    def num_classes(self, config) -> int | None:
        """The class count labels index into (``None``: labels are not class indices), for checking data."""
        return None


class CausalLMHead(HeadSpec):
    name, token_level, causal, per_token_labels, pipeline_tag = "causal-lm", True, True, True, "text-generation"
    peft_task_type = "CAUSAL_LM"

    def loss(self, outputs, labels, norm, config):
        return ForCausalLMLoss(outputs, labels[0], vocab_size=outputs.shape[-1], num_items_in_batch=norm)

    def count_items(self, labels, seq_len=None):
        return (labels[0][..., 1:] != -100).sum().to(torch.float32)

    def random_labels(self, config, ids, mask, lengths, generator, padding):
        return {"labels": torch.where(mask.bool(), ids, torch.full_like(ids, -100))}


class SequenceClassificationHead(HeadSpec):
    name, uses_pooler, pools_last_token = "sequence-classification", True, True
    pipeline_tag, peft_task_type = "text-classification", "SEQ_CLS"

    def loss(self, outputs, labels, norm, config):
        return ForSequenceClassificationLoss(labels[0], outputs, config)

    def random_labels(self, config, ids, mask, lengths, generator, padding):
        if config.num_labels == 1:
            return {"labels": torch.randn(ids.shape[0], generator=generator)}
        return {"labels": torch.randint(0, config.num_labels, (ids.shape[0],), generator=generator)}

    def num_classes(self, config):
        return None if config.num_labels == 1 else config.num_labels  # 1: regression


class TokenClassificationHead(HeadSpec):
    name, token_level, per_token_labels, pipeline_tag = "token-classification", True, True, "token-classification"
    peft_task_type = "TOKEN_CLS"

    def loss(self, outputs, labels, norm, config):
        return ForTokenClassification(outputs, labels[0], config, num_items_in_batch=norm)

    def count_items(self, labels, seq_len=None):
        return (labels[0] != -100).sum().to(torch.float32)

    def random_labels(self, config, ids, mask, lengths, generator, padding):
        labels = torch.randint(0, config.num_labels, ids.shape, generator=generator)
        skip = torch.rand(ids.shape, generator=generator) < 0.2  # e.g. non-first sub-tokens
        return {"labels": torch.where(mask.bool() & ~skip, labels, torch.full_like(labels, -100))}

    def num_classes(self, config):
        return config.num_labels


class QuestionAnsweringHead(HeadSpec):
    name, label_names, token_level = "question-answering", ("start_positions", "end_positions"), True
    pipeline_tag, peft_task_type = "question-answering", "QUESTION_ANS"

    def outputs(self, out):
        return (out.start_logits, out.end_logits)

    def loss(self, outputs, labels, norm, config):
        start_logits, end_logits = outputs
        ignored = start_logits.size(1)
        terms = []
        for i, (logits, pos) in enumerate(((start_logits, labels[0]), (end_logits, labels[1]))):
            pos = pos.reshape(-1).clamp(0, ignored)
            terms.append(fixed_cross_entropy(logits, pos, num_items_in_batch=None if norm is None else norm[i],
                                             ignore_index=ignored))
        return (terms[0] + terms[1]) / 2

    def count_items(self, labels, seq_len=None):
        ignored = seq_len
        return torch.stack([(p.reshape(-1).clamp(0, ignored) != ignored).sum() for p in labels]).to(torch.float32)

    def random_labels(self, config, ids, mask, lengths, generator, padding):
        seq_len = ids.shape[1]
        starts = torch.tensor([int(torch.randint(0, n, (1,), generator=generator)) for n in lengths])
        ends = torch.tensor([min(n - 1, int(s) + int(torch.randint(0, 3, (1,), generator=generator)))
                             for s, n in zip(starts, lengths)])
        if padding == "left":
            starts = starts + torch.tensor([seq_len - n for n in lengths])
            ends = ends + torch.tensor([seq_len - n for n in lengths])
        return {"start_positions": starts, "end_positions": ends}


class Seq2SeqLMHead(HeadSpec):
    """Encoder-decoder LM (``AutoModelForSeq2SeqLM``): logits over the decoder positions, labels aligned with them
    (the decoder inputs are the labels shifted right, ``hfpipe.core.adapters.encdec``); HF's cross-entropy."""

    name, token_level, per_token_labels, pipeline_tag = "seq2seq-lm", True, True, "text2text-generation"
    peft_task_type = "SEQ_2_SEQ_LM"
    encoder_decoder = True

    def loss(self, outputs, labels, norm, config):
        logits = outputs.float()
        return fixed_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[0].to(logits.device).reshape(-1),
                                   num_items_in_batch=norm, ignore_index=-100)

    def count_items(self, labels, seq_len=None):
        return (labels[0] != -100).sum().to(torch.float32)

    def random_labels(self, config, ids, mask, lengths, generator, padding):
        """Targets shorter than the sources (``3/4`` of their length), right-padded, with a decoder mask."""
        batch, target_len = ids.shape[0], max(2, (ids.shape[1] * 3) // 4)
        labels = torch.randint(1, config.vocab_size, (batch, target_len), generator=generator)
        dec_mask = torch.zeros(batch, target_len, dtype=torch.long)
        for i in range(batch):
            dec_mask[i, :max(2, target_len - (i * 2) % max(1, target_len // 2))] = 1
        return {"labels": torch.where(dec_mask.bool(), labels, torch.full_like(labels, -100)),
                "decoder_attention_mask": dec_mask}


class BaseModelHead(HeadSpec):
    """A base model (``AutoModel``: ``BertModel``, ``LlamaModel``, an embedding model): the pipeline returns the last
    block's ``last_hidden_state`` (after the final norm), as the HF model does; no labels and no loss of its own (the
    pooler, where the model has one, is kept so that its weights round-trip)."""

    name, label_names, uses_pooler, pipeline_tag = "feature-extraction", (), True, "feature-extraction"
    peft_task_type = "FEATURE_EXTRACTION"
    #: the model is its own body (no task head around it): the last layer returns the hidden states
    base_model = True

    def outputs(self, out):
        return out.last_hidden_state

    def loss(self, outputs, labels, norm, config):
        raise ValueError("a base model (AutoModel) returns last_hidden_state and has no loss; to train, load a task "
                         "class (e.g. AutoModelForSequenceClassification) or pass loss_fn= to to_pipeline.")

    def count_items(self, labels, seq_len=None):
        return torch.tensor(0.0)

    def random_labels(self, config, ids, mask, lengths, generator, padding):
        return {}


CAUSAL_LM = CausalLMHead()
SEQUENCE_CLASSIFICATION = SequenceClassificationHead()
TOKEN_CLASSIFICATION = TokenClassificationHead()
QUESTION_ANSWERING = QuestionAnsweringHead()
SEQ2SEQ_LM = Seq2SeqLMHead()
BASE_MODEL = BaseModelHead()
HEADS = {h.name: h for h in (CAUSAL_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, QUESTION_ANSWERING,
                             SEQ2SEQ_LM, BASE_MODEL)}


def head_named(head: "HeadSpec | str") -> HeadSpec:
    """A head given as itself or by its name (``"causal-lm"``, ...)."""
    if isinstance(head, HeadSpec):
        return head
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(HEADS)}.")
    return HEADS[head]


_MAPPINGS = (
    (CAUSAL_LM, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    (SEQUENCE_CLASSIFICATION, modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
    (TOKEN_CLASSIFICATION, modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
    (QUESTION_ANSWERING, modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
    (SEQ2SEQ_LM, modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
    (BASE_MODEL, modeling_auto.MODEL_MAPPING_NAMES),
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
    if not adapter.base_prefix:  # a base model: no task modules around its body
        return nn.Module()
    shell = copy_without(adapter.meta_model, {adapter.base_prefix: _StubBody()})
    return shell


class Head(PipeLayer):
    """The task head (untied): ``(hidden, pooled, attention_mask, position_ids[, input_ids]) -> logits``."""

    kind = LayerKind.HEAD
    plan_label = "head"

    def __init__(self, builder, index: int):
        super().__init__(builder, index)
        shell = task_shell(self.adapter)
        stub = shell.get_submodule(self.adapter.base_prefix)
        setattr(shell, self.adapter.base_prefix, None)
        self.shell = materialize(shell, builder.init_owner, builder.source, _names(shell),
                                 seed=builder.layer_seed(index), device=builder.device)
        self.shell = lora.wrap(self.shell, builder, "", index)  # LoRA hook: modules_to_save heads; no-op without
        setattr(self.shell, self.adapter.base_prefix, stub)

    def hf_names(self):
        return {f"shell.{k}": lora.hf_key(v) for k, v in _names(self.shell).items()
                if not k.startswith(self.adapter.base_prefix)}

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
    return builder.head.outputs(shell(**kwargs))


class BaseModelOutput(PipeLayer):
    """The last layer of a base model (:class:`BaseModelHead`): ``(hidden, pooled, ...) -> last_hidden_state``; it
    owns no parameters."""

    kind = LayerKind.HEAD
    plan_label = "head"

    def hf_names(self):
        return {}

    def forward(self, inputs):
        return inputs[0]


class TiedLMHead(LayerTraits):
    """``forward_fn`` of the LM head's ``TiedLayerSpec``: runs the task shell with the tied embedding's weight.

    DeepSpeed builds the tied module (a :class:`hfpipe.core.layers.TokenEmbedding`) once per stage and sums the tied
    weight's gradients across the stages that hold it, exactly as HF's shared parameter gets both gradients.
    """

    kind = LayerKind.HEAD
    plan_label = "head"

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
            return ChunkedLogits(inputs, functools.partial(self._logits, embedding), self.builder.loss_chunk_tokens)
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
        labels = tuple(labels[:n])
        if isinstance(outputs, ChunkedLogits):
            return outputs.loss(labels[0], norm)
        return self.head.loss(outputs, labels, norm, self.config)


def count_items(head: HeadSpec, labels: tuple[torch.Tensor, ...], seq_len: int | None = None) -> torch.Tensor:
    """Label items the loss averages over, for ``labels`` of the whole global batch (shape: [] or [2] for QA)."""
    return head.count_items(labels, seq_len)
