"""Encoder-decoders (T5 / mT5 / T5 v1.1, BART, mBART, Marian) as one fixed pipeline layer list.

The layer list, the same at any stage count (so checkpoints convert, export and resume like the others)::

    Embedding        the shared token table: embeds input_ids and decoder_input_ids (tied to the LM head, unless
                     the weights store a head of their own: T5 v1.1 / Flan-T5 / mT5 checkpoints, untie_if_stored)
    EncoderShell     the encoder stack's own forward with no blocks (positions, embedding norm, dropout)
    [EncoderBias]    T5 only: the encoder's relative position bias, in front of every encoder block
    EncoderBlock x E
    EncoderFinal     the encoder's final norm (T5, mBART; empty for post-norm BART / Marian)
    DecoderShell     the decoder stack's own forward with no blocks
    [DecoderBias]    T5 only, in front of every decoder block
    DecoderBlock x D
    DecoderFinal
    Head             the task model's own forward on a stub body (T5's output scaling, BART's final_logits_bias)

What travels between layers is ``(encoder_hidden, encoder_mask, decoder_hidden, decoder_mask)``: both hidden states
receive gradients, so the decoder embedding is computed once on the first stage (the shared table lives there) and
rides along through the encoder stages, and the encoder output rides along through the decoder stages, where every
block's cross-attention reads it. Across a stage boundary the four travel as **one** tensor
(:meth:`EncDecAdapter.pack_boundary`): ``[batch, S + T, d_model + 1]``, encoder rows then decoder rows, the last
channel the mask (0/1 for encoder rows, 2/3 for decoder rows, exact in every float dtype), so the receiver finds the
split itself. Masks are rebuilt per stage and micro-batch with the functions the stacks' forwards use.

T5's relative position bias: HF's first block of each stack owns ``relative_attention_bias`` and computes the bias,
later blocks reuse it. Here the table is one ``TiedLayerSpec`` module per stack placed in front of every block of the
stack (DeepSpeed builds it once per stage and sums its gradient over the stages that hold it, exactly like HF's one
parameter); it computes the bias with HF's own ``T5Attention.compute_bias``, so a stage that starts mid-stack gets the
very same bias. Block 0 then holds no second copy of the table.
"""

from __future__ import annotations

import copy

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from transformers import masking_utils

from hfpipe.core.adapters.base import Adapter, UnsupportedModelError
from hfpipe.core.adapters.registry import register_adapter
from hfpipe.core.heads import _BodyOutput, _StubBody
from hfpipe.core.layers import Block, LayerKind, LayerTraits, PipeLayer, _prefixed
from hfpipe.core.meta import copy_without, get_submodule, materialize
from hfpipe.core.weights import StateDictSource

EMBED_TIE_KEY = "embed"
#: the four tensors every enc-dec layer takes and returns (preludes append the position bias)
STATE = ("encoder_hidden", "encoder_mask", "decoder_hidden", "decoder_mask")


# ------------------------------------------------------------------------------------------------------- adapter
class EncDecAdapter(Adapter):
    """What the encoder-decoder families share; subclasses say where the parts live and how a block is called."""

    #: an encoder-decoder: tasks and generation ask this, never the family name
    encoder_decoder = True
    causal = False
    half_blocks = False
    embed_path = None
    final_paths = ()
    #: path of the encoder/decoder body inside the task model ("" for T5, whose task model holds the stacks)
    body_prefix: str = "model"
    shared_path: str = "shared"
    blocks_name: str = "layers"
    #: children of a stack run after its blocks, in order
    stack_final_names: tuple[str, ...] = ()
    #: the task-model children the head's stub replaces (the first receives the decoder output)
    head_body_paths: tuple[str, ...] = ("model",)
    #: the family shifts labels with config.decoder_start_token_id (mBART wraps the language code instead)
    needs_decoder_start: bool = True
    #: T5: relative position bias tables shared by the blocks of each stack
    relative_bias: bool = False
    #: decoder-block modules projecting the encoder output to cross-attention keys / values (cost model)
    cross_kv_paths: tuple[str, ...] = ("encoder_attn.k_proj", "encoder_attn.v_proj")

    def __init__(self, config, model_class, meta_model):
        self.config = config
        self.model_class = model_class
        self.meta_model = meta_model
        self.base_prefix = self.body_prefix
        try:
            self.meta_base = get_submodule(meta_model, self.body_prefix)
            self.blocks("encoder"), self.blocks("decoder"), self.shared
        except AttributeError:  # BartForCausalLM, T5ForTokenClassification, T5EncoderModel, BartModel, ...
            p = f"{self.body_prefix}." if self.body_prefix else ""
            raise seq2seq_only(self, f"lacks {p}encoder, {p}decoder or {p}{self.shared_path}") from None
        self.validate()

    def validate(self) -> None:
        name = type(self.meta_model).__name__
        for key in ("layerdrop", "encoder_layerdrop", "decoder_layerdrop"):
            if getattr(self.config, key, 0.0):
                raise UnsupportedModelError(
                    f"config.{key}={getattr(self.config, key)}: random block skipping changes the schedule per step "
                    f"and is not supported in a pipeline; set config.{key}=0.0.")
        if self.needs_decoder_start and getattr(self.config, "decoder_start_token_id", None) is None:
            raise UnsupportedModelError(
                f"{name} has no config.decoder_start_token_id: labels are shifted right behind it to give the "
                "decoder inputs (HF's prepare_decoder_input_ids_from_labels). Set it (T5: the pad id 0; BART: the "
                "EOS id 2) in config.json or on the config before converting.")
        if getattr(self.config, "pad_token_id", None) is None:
            raise UnsupportedModelError(f"{name} has no config.pad_token_id; labels are shifted with it. Set it.")
        if self.meta_model.get_input_embeddings().weight is not self.shared.weight:
            raise UnsupportedModelError(f"{name}: the input embedding is not {self.shared_path}.")
        for stack in ("encoder", "decoder"):
            emb = getattr(self.stack(stack), "embed_tokens", None)
            if emb is not None and emb.weight is not self.shared.weight:
                raise UnsupportedModelError(
                    f"{name}: the {stack} has its own token embedding (e.g. Marian with "
                    "share_encoder_decoder_embeddings=False); hfpipe needs one table shared by encoder and decoder.")

    # --------------------------------------------------------------------------------------------- structure
    @property
    def shared(self) -> nn.Module:
        return get_submodule(self.meta_base, self.shared_path)

    def stack(self, name: str) -> nn.Module:
        return getattr(self.meta_base, name)

    def blocks(self, name: str) -> nn.ModuleList:
        return getattr(self.stack(name), self.blocks_name)

    @property
    def num_encoder_blocks(self) -> int:
        return len(self.blocks("encoder"))

    @property
    def num_blocks(self) -> int:
        return self.num_encoder_blocks + len(self.blocks("decoder"))

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")

    def hf_prefix(self, path: str) -> str:
        full = ".".join(p for p in (self.body_prefix, path) if p)
        return f"{full}." if full else ""

    def max_source_positions(self) -> int | None:
        """Longest source the encoder embeds (``None``: relative positions, no limit)."""
        return getattr(self.config, "max_position_embeddings", None)

    # ------------------------------------------------------------------------------------------------ batches
    def decoder_inputs(self, labels: torch.Tensor) -> torch.Tensor:
        """``decoder_input_ids`` from ``labels`` exactly as the task model shifts them (its own
        ``prepare_decoder_input_ids_from_labels``; it reads only the config)."""
        return type(self.meta_model).prepare_decoder_input_ids_from_labels(self.meta_model, labels=labels)

    def complete_batch(self, batch: dict) -> dict:
        """Fill ``decoder_input_ids`` (shifted labels) and ``decoder_attention_mask`` (ones) when a batch lacks them."""
        batch = dict(batch)
        if "decoder_input_ids" not in batch:
            if "labels" not in batch:
                raise KeyError("an encoder-decoder batch needs labels or decoder_input_ids.")
            batch["decoder_input_ids"] = self.decoder_inputs(batch["labels"])
        batch.setdefault("decoder_attention_mask", torch.ones_like(batch["decoder_input_ids"]))
        return batch

    # -------------------------------------------------------------------------------------------- boundaries
    def pack_boundary(self, inputs: tuple) -> torch.Tensor:
        enc, enc_mask, dec, dec_mask = inputs[:4]
        dtype = enc.dtype
        return torch.cat((torch.cat((enc, enc_mask.unsqueeze(-1).to(dtype)), dim=-1),
                          torch.cat((dec, (dec_mask + 2).unsqueeze(-1).to(dtype)), dim=-1)), dim=1)

    def unpack_boundary(self, received) -> tuple:
        packed = received[0] if isinstance(received, tuple) else received
        channel = packed[..., -1].detach()
        split = int((channel[0] < 2).sum())
        enc = packed[:, :split, :-1].contiguous()
        dec = packed[:, split:, :-1].contiguous()
        return (enc, channel[:, :split].long(), dec, (channel[:, split:] - 2).long())

    # ------------------------------------------------------------------------------------------------ compute
    def token_embeds(self, stack: str, embed: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """What ``stack``'s forward computes from ``ids`` before its shell work: the table lookup, times the stack's
        ``embed_scale`` where the stack (not the table, as BART's scaled embedding does) applies it (Marian)."""
        out = embed(ids)
        scale = getattr(self.stack(stack), "embed_scale", None)
        if scale is not None and not hasattr(embed, "embed_scale"):
            out = out * scale
        return out

    def shell_forward(self, stack: str, shell: nn.Module, embeds, mask) -> torch.Tensor:
        """The stack's forward with no blocks and no final modules: what its first block receives."""
        out = shell(inputs_embeds=embeds, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def stack_shell(self, stack: str) -> nn.Module:
        replace = {self.blocks_name: nn.ModuleList(), "embed_tokens": None}
        for name in self.stack_final_names:
            replace[name] = nn.Identity()
        return copy_without(self.stack(stack), replace)

    def masks(self, stack: str, hidden, mask, enc_hidden=None, enc_mask=None):
        """The 4D masks ``stack``'s forward builds, once per stage and micro-batch (``Adapter._per_micro_batch``)."""
        config = self.stack(stack).config
        if stack == "encoder":
            return self._per_micro_batch("enc_mask", hidden, mask, None, lambda: masking_utils.create_bidirectional_mask(
                config=config, inputs_embeds=hidden, attention_mask=mask))
        self_mask = self._per_micro_batch("dec_mask", hidden, mask, None, lambda: masking_utils.create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=mask, cache=None))
        cross = self._per_micro_batch("cross_mask", hidden, mask, enc_mask, lambda: masking_utils.create_bidirectional_mask(
            config=config, inputs_embeds=hidden, attention_mask=enc_mask, encoder_hidden_states=enc_hidden))
        return self_mask, cross

    def encoder_block(self, layer, hidden, mask4d, bias=None):
        out = layer(hidden, mask4d)
        return out[0] if isinstance(out, tuple) else out

    def decoder_block(self, layer, hidden, self_mask, enc_hidden, cross_mask, bias=None, cache=None):
        out = layer(hidden, self_mask, enc_hidden, encoder_attention_mask=cross_mask, cache=cache,
                    use_cache=cache is not None)
        return out[0] if isinstance(out, tuple) else out

    # ------------------------------------------------------------------------------------------- layer list
    def pipeline_layers(self, builder) -> list:
        """The fixed layer list as ``LayerInfo`` fields ``(spec, layer class, cut_allowed, num_params[, block])``
        (``hfpipe.core.builder`` wraps them), see the module docstring."""
        if not getattr(builder.head, "encoder_decoder", False):
            raise seq2seq_only(self, f"is an encoder-decoder with a {builder.head.name} head")

        def count(module):
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        untie_if_stored(self, builder.source)
        tied = builder.tied = is_tied_head(self)
        infos = []
        spec = (TiedLayerSpec(EMBED_TIE_KEY, SharedEmbedding, builder, 0, tied_weight_attr=["embed.weight"]) if tied
                else LayerSpec(SharedEmbedding, builder, 0))
        infos.append(_info(spec, SharedEmbedding, True, count(self.shared)))
        offset = 0
        for stack, (shell_cls, block_cls, final_cls, bias_cls) in STACK_LAYERS.items():
            infos.append(_info(LayerSpec(shell_cls, builder, len(infos)), shell_cls, True,
                                   count(self.stack_shell(stack))))
            first_prelude = None
            for b, block in enumerate(self.blocks(stack)):
                prelude = self.relative_bias
                if prelude:
                    first_prelude = len(infos) if first_prelude is None else first_prelude
                    table = self.bias_table(stack)
                    spec = TiedLayerSpec(f"{stack}_rel", bias_cls, builder, first_prelude,
                                         tied_weight_attr=["relative_attention_bias.weight"])
                    infos.append(_info(spec, bias_cls, True, count(table) if b == 0 else 0, block=offset + b))
                own = count(block) - (count(self.bias_table(stack)) if prelude and b == 0 else 0)
                infos.append(_info(LayerSpec(block_cls, builder, len(infos), b), block_cls, not prelude, own,
                                       block=offset + b))
            offset += len(self.blocks(stack))
            final = sum(count(getattr(self.stack(stack), n)) for n in self.stack_final_names)
            infos.append(_info(LayerSpec(final_cls, builder, len(infos)), final_cls, True, final))
        if tied:
            infos.append(_info(TiedLayerSpec(EMBED_TIE_KEY, SharedEmbedding, builder, 0,
                                                 forward_fn=TiedSeq2SeqHead(), tied_weight_attr=["embed.weight"]),
                                   TiedSeq2SeqHead, False, 0))
        else:
            infos.append(_info(LayerSpec(Seq2SeqHead, builder, len(infos)), Seq2SeqHead, False,
                                   count(head_shell(self))))
        return infos

    def bias_table(self, stack: str) -> nn.Module:
        raise NotImplementedError

    def init_parents(self, layer, module: nn.Module) -> None:
        """Family-specific init fix-up after materialising ``module`` (T5)."""

    def init_table(self, layer, module: nn.Module, what: str) -> None:
        """Initialise an embedding table the source did not provide, as the task model's ``_init_weights`` would
        (families whose init of a table lives in a branch for its parent module: T5)."""

    def head_placeholders(self) -> dict[str, nn.Module]:
        """Small stand-ins the task model's ``_init_weights`` touches on the head shell's root (dropped after)."""
        return {}

    def follow_checkpoint(self, manifest: dict) -> None:
        """A pipeline checkpoint's LM head is untied when its manifest lists the untied head layer."""
        untie_if_stored(self, manifest=manifest)


def seq2seq_only(adapter, what: str) -> UnsupportedModelError:
    """The error for an encoder-decoder family's class other than its sequence-to-sequence LM."""
    from transformers import AutoModelForSeq2SeqLM

    seq2seq = AutoModelForSeq2SeqLM._model_mapping.get(type(adapter.config), None)
    return UnsupportedModelError(
        f"{adapter.model_class.__name__} {what}; hfpipe runs {adapter.config.model_type} only as a "
        f"sequence-to-sequence LM ({seq2seq.__name__ if seq2seq else 'AutoModelForSeq2SeqLM'}): load it with "
        "AutoModelForSeq2SeqLM and fine-tune it with recipes/finetune_summarization.py or finetune_translation.py.")


def _info(spec, layer, cut_allowed, num_params, block=None) -> tuple:
    return (spec, layer, cut_allowed, num_params, block)


def is_tied_head(adapter) -> bool:
    out = adapter.meta_model.get_output_embeddings()
    return out is not None and out.weight is adapter.shared.weight


def untie_if_stored(adapter, source=None, manifest=None) -> None:
    """Give the meta model its own LM head when the weights have one, as HF does; decided once, from the first
    weight source (or checkpoint manifest) seen.

    The families' models tie the head to the shared table whatever the config says (transformers 5 forces T5's
    ``tie_word_embeddings=True``; ``False`` only turns the output scaling off), but ``from_pretrained`` unties them
    when the checkpoint stores an ``lm_head.weight`` that differs from the table -- every T5 v1.1 / Flan-T5 /
    mT5 checkpoint -- and a model instance may hold two tensors. The same rule here: an HF folder storing a
    different head, an instance whose head is another tensor, or a pipeline checkpoint whose manifest lists the
    untied head layer."""
    manifest = manifest if manifest is not None else getattr(source, "manifest", None)
    if getattr(adapter, "_untie_decided", False) or (source is None and manifest is None):
        return
    adapter._untie_decided = True
    if not is_tied_head(adapter):
        return
    lm_name, table_name = _lm_head_path(adapter) + ".weight", adapter.hf_prefix(adapter.shared_path) + "weight"
    if manifest is not None:
        untied = any(d["name"] == Seq2SeqHead.layer_name for d in manifest["layers"])
    elif isinstance(source, StateDictSource):  # a model instance: two tensors or one (uncast: the state dict itself)
        head, table = source.state_dict.get(lm_name), source.state_dict.get(table_name)
        untied = head is not None and table is not None and head.data_ptr() != table.data_ptr()
    elif source._resolve(lm_name) != lm_name:  # not stored on its own: HF ties it
        return
    else:  # stored on its own: untied when the values differ (from_pretrained's rule)
        head, table = source.get(lm_name), source.get(table_name)
        untied = head is not None and table is not None and not torch.equal(head, table)
    if untied:
        parent, _, name = _lm_head_path(adapter).rpartition(".")
        old = adapter.meta_model.get_output_embeddings()
        with torch.device("meta"):
            setattr(adapter.meta_model.get_submodule(parent) if parent else adapter.meta_model, name,
                    nn.Linear(old.in_features, old.out_features, bias=False))


def _lm_head_path(adapter) -> str:
    out = adapter.meta_model.get_output_embeddings()
    for name, mod in adapter.meta_model.named_modules():
        if mod is out:
            return name
    raise UnsupportedModelError(f"{type(adapter.meta_model).__name__} has no LM head.")


def head_shell(adapter, drop_lm_head: bool = False) -> nn.Module:
    """Meta copy of the task model with its body replaced by stubs (and, tied, without the LM head's weight)."""
    replace = {p: (_StubBody() if i == 0 else None) for i, p in enumerate(adapter.head_body_paths)}
    replace.update(adapter.head_placeholders())
    shell = copy_without(adapter.meta_model, replace)
    if drop_lm_head:
        lm = shell.get_submodule(_lm_head_path(adapter))
        if getattr(lm, "bias", None) is not None:
            raise UnsupportedModelError(f"{type(adapter.meta_model).__name__}: a tied LM head with a bias.")
        del lm.weight
    return shell


def materialize_head(shell, adapter, builder, names, index, layer=None):
    """``materialize`` the head shell, then drop the placeholders its ``_init_weights`` needed."""
    shell = materialize(shell, builder.init_owner, builder.source, names, seed=builder.layer_seed(index),
                        device=builder.device)
    if layer is not None:
        adapter.init_parents(layer, shell)
    for path in adapter.head_placeholders():
        setattr(shell, path, None)
    return shell


def _head_names(shell, adapter) -> dict[str, str]:
    names = {n: n for n, _ in shell.named_parameters()}
    names.update({n: n for n, _ in shell.named_buffers()})
    return {k: v for k, v in names.items() if not any(k.startswith(p + ".") for p in adapter.head_body_paths)}


def run_head(shell, adapter, inputs):
    enc, enc_mask, dec, dec_mask = inputs[:4]
    shell.get_submodule(adapter.head_body_paths[0]).output = _BodyOutput(dec, None)
    out = shell(attention_mask=enc_mask, decoder_input_ids=dec_mask, encoder_outputs=(enc,))
    return out.logits


# -------------------------------------------------------------------------------------------------------- layers
class SharedEmbedding(PipeLayer):
    """The shared token table; embeds the source and the decoder inputs. When the LM head is tied to it, the same
    module (a ``TiedLayerSpec``) also holds the head's other state (BART's ``final_logits_bias``) for the last stage.

    Input ``(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)``."""

    kind = LayerKind.EMBEDDING
    plan_label = "embed"
    layer_name = "Embedding"
    stack = None  # embeds for both stacks

    def __init__(self, builder, index: int):
        super().__init__(builder, index)
        a = self.adapter
        self._prefix = a.hf_prefix(a.shared_path)
        self.head = None  # before init_table, which asks hf_names()
        self.embed = self._materialize(builder.meta_copy(a.shared), "", self._prefix)
        a.init_table(self, self.embed, "shared")
        if builder.tied:
            shell = head_shell(a, drop_lm_head=True)
            self._head_names = _head_names(shell, a)
            self.head = materialize_head(shell, a, builder, self._head_names, index)
            lm = self.head.get_submodule(_lm_head_path(a))
            lm.weight = self.embed.weight

    def hf_names(self):
        names = _prefixed(self.embed, "embed.", self._prefix)
        if self.head is not None:
            lm = _lm_head_path(self.adapter) + "."
            names.update({f"head.{k}": v for k, v in self._head_names.items() if not k.startswith(lm)})
        return names

    def forward(self, inputs):
        input_ids, attention_mask, decoder_input_ids, decoder_mask = inputs
        a = self.adapter
        return (a.token_embeds("encoder", self.embed, input_ids), attention_mask,
                a.token_embeds("decoder", self.embed, decoder_input_ids), decoder_mask)


class TiedSeq2SeqHead(LayerTraits):
    """``forward_fn`` of the tied LM head: the task model's head on the tied embedding module's state."""

    kind = LayerKind.HEAD
    plan_label = "head"
    layer_name = "TiedHead"
    stack = "decoder"

    def __call__(self, embedding, inputs):
        return run_head(embedding.head, embedding.adapter, inputs)


class Seq2SeqHead(PipeLayer):
    """The untied LM head (T5 v1.1 / Flan-T5): the task model's own forward on the decoder output."""

    kind = LayerKind.HEAD
    plan_label = "head"
    stack = "decoder"

    def __init__(self, builder, index: int):
        super().__init__(builder, index)
        shell = head_shell(self.adapter)
        self._names = _head_names(shell, self.adapter)
        self.shell = materialize_head(shell, self.adapter, builder, self._names, index, layer=self)

    def hf_names(self):
        return {f"shell.{k}": v for k, v in self._names.items()}

    def forward(self, inputs):
        return run_head(self.shell, self.adapter, inputs)


class _StackLayer(PipeLayer):
    stack: str = "encoder"


class _Shell(_StackLayer):
    """The stack's own forward with no blocks: positions, embedding norm and dropout exactly as HF."""

    kind = LayerKind.EMBEDDING

    def __init__(self, builder, index: int):
        super().__init__(builder, index)
        a = self.adapter
        self._prefix = a.hf_prefix(self.stack)
        self.shell = self._materialize(a.stack_shell(self.stack), "", self._prefix)

    def hf_names(self):
        return _prefixed(self.shell, "shell.", self._prefix)

    def forward(self, inputs):
        enc, enc_mask, dec, dec_mask = inputs
        a = self.adapter
        if self.stack == "encoder":
            return (a.shell_forward("encoder", self.shell, enc, enc_mask), enc_mask, dec, dec_mask)
        return (enc, enc_mask, a.shell_forward("decoder", self.shell, dec, dec_mask), dec_mask)


class EncoderShell(_Shell):
    stack, plan_label = "encoder", "embed"


class DecoderShell(_Shell):
    stack, plan_label = "decoder", "dec.embed"


class _StackBlock(Block):
    """One HF encoder/decoder block, called as its stack's forward calls it (built as ``core.layers.Block`` builds a
    decoder's block, from the stack's block list)."""

    stack: str = "encoder"

    def __init__(self, builder, index: int, block_index: int):
        super().__init__(builder, index, block_index)
        self.adapter.init_parents(self, self.layer)

    def _blocks_path(self) -> str:
        return f"{self.stack}.{self.adapter.blocks_name}"

    def _own_part(self, meta_layer: nn.Module) -> nn.Module:
        a = self.adapter
        meta = super()._own_part(meta_layer)
        if a.relative_bias and self.block_index == 0:  # the table lives in the tied bias layer in front of the block
            attn = a.bias_owner(meta)
            attn.relative_attention_bias = None
            attn.has_relative_attention_bias = False  # the bias always arrives as position_bias
        return meta

    def forward(self, inputs):
        enc, enc_mask, dec, dec_mask, *bias = inputs
        a = self.adapter
        bias = bias[0] if bias else None
        if self.stack == "encoder":
            enc = a.encoder_block(self.layer, enc, a.masks("encoder", enc, enc_mask), bias)
        else:
            self_mask, cross = a.masks("decoder", dec, dec_mask, enc, enc_mask)
            dec = a.decoder_block(self.layer, dec, self_mask, enc, cross, bias)
        return (enc, enc_mask, dec, dec_mask)


class EncoderBlock(_StackBlock):
    stack = "encoder"


class DecoderBlock(_StackBlock):
    stack = "decoder"


class _Final(_StackLayer):
    kind = LayerKind.FINAL

    def __init__(self, builder, index: int):
        super().__init__(builder, index)
        a = self.adapter
        self.final = nn.ModuleList()
        self._prefixes = []
        for name in a.stack_final_names:
            prefix = a.hf_prefix(f"{self.stack}.{name}")
            self._prefixes.append(prefix)
            self.final.append(self._materialize(builder.meta_copy(getattr(a.stack(self.stack), name)), "", prefix))

    def hf_names(self):
        names = {}
        for i, (mod, prefix) in enumerate(zip(self.final, self._prefixes)):
            names.update(_prefixed(mod, f"final.{i}.", prefix))
        return names

    def forward(self, inputs):
        enc, enc_mask, dec, dec_mask = inputs
        h = enc if self.stack == "encoder" else dec
        for mod in self.final:
            h = mod(h)
        return (h, enc_mask, dec, dec_mask) if self.stack == "encoder" else (enc, enc_mask, h, dec_mask)


class EncoderFinal(_Final):
    stack, plan_label = "encoder", "enc.norm"


class DecoderFinal(_Final):
    stack, plan_label = "decoder", "norm"


class _RelativeBias(_StackLayer):
    """T5's relative position bias of one stack (tied over its blocks): appends HF's ``compute_bias`` output."""

    kind = LayerKind.PRELUDE

    def __init__(self, builder, index: int):
        super().__init__(builder, index)
        a = self.adapter
        attn = a.bias_owner(a.blocks(self.stack)[0])
        self._attn_class = type(attn)
        self.is_decoder = attn.is_decoder
        self.relative_attention_num_buckets = attn.relative_attention_num_buckets
        self.relative_attention_max_distance = attn.relative_attention_max_distance
        self._prefix = a.hf_prefix(f"{self.stack}.{a.blocks_name}.0.{a.bias_path}.relative_attention_bias")
        self.relative_attention_bias = self._materialize(builder.meta_copy(attn.relative_attention_bias), "",
                                                         self._prefix)
        a.init_table(self, self.relative_attention_bias, "relative_attention_bias")

    def _relative_position_bucket(self, *args, **kwargs):
        return self._attn_class._relative_position_bucket(*args, **kwargs)

    def hf_names(self):
        return _prefixed(self.relative_attention_bias, "relative_attention_bias.", self._prefix)

    def bias(self, query_length: int, key_length: int, past: int = 0):
        return self._attn_class.compute_bias(self, query_length, key_length,
                                             device=self.relative_attention_bias.weight.device, past_seen_tokens=past)

    def forward(self, inputs):
        h = inputs[0] if self.stack == "encoder" else inputs[2]
        return (*inputs, self.bias(h.shape[1], h.shape[1]))


class EncoderBias(_RelativeBias):
    stack, plan_label = "encoder", None


class DecoderBias(_RelativeBias):
    stack, plan_label = "decoder", None


STACK_LAYERS = {"encoder": (EncoderShell, EncoderBlock, EncoderFinal, EncoderBias),
                "decoder": (DecoderShell, DecoderBlock, DecoderFinal, DecoderBias)}


# ------------------------------------------------------------------------------------------------------ families
@register_adapter
class T5Adapter(EncDecAdapter):
    """T5, mT5, T5 v1.1 / Flan-T5 (gated GELU, untied head, ``scale_decoder_outputs`` off)."""

    model_types = ("t5", "mt5")
    body_prefix = ""
    blocks_name = "block"
    stack_final_names = ("final_layer_norm", "dropout")
    head_body_paths = ("decoder", "encoder", "shared")
    relative_bias = True
    bias_path = "layer.0.SelfAttention"
    cross_kv_paths = ("layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v")

    def max_source_positions(self):
        return None

    def init_parents(self, layer, module: nn.Module) -> None:
        """From a config (no weights): re-run T5's ``_init_weights`` on modules whose branch initialises their
        children (``T5Attention`` -> q/k/v/o, ``T5DenseActDense`` -> wi/wo, the task model -> lm_head), children
        first as HF's own init does; ``materialize`` visits parents first, so the children's generic init won."""
        b = layer.builder
        if b.source is not None or torch.device(b.device).type == "meta":
            return
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if b.seed is not None:
                torch.manual_seed(b.layer_seed(layer.index) + 7919)
            for sub in reversed(list(module.modules())):
                if next(sub.children(), None) is not None and next(sub.parameters(recurse=False), None) is None:
                    b.init_owner._init_weights(sub)

    def init_table(self, layer, module, what):
        # T5PreTrainedModel._init_weights initialises ``shared`` in its task-model branch and the relative-position
        # table in its T5Attention branch; standing alone, neither table would be initialised at all
        b = layer.builder
        weight = module.weight
        if b.source is not None and b.source.get(layer.hf_names()[next(iter(layer.hf_names()))]) is not None:
            return
        if torch.device(b.device).type == "meta":
            return
        std = self.config.initializer_factor * (1.0 if what == "shared" else self.config.d_model ** -0.5)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if b.seed is not None:
                torch.manual_seed(b.layer_seed(layer.index))
            weight.normal_(0.0, std)

    def head_placeholders(self):
        # T5PreTrainedModel._init_weights(task model) initialises ``shared`` together with an untied lm_head
        with torch.device("meta"):
            return {"shared": nn.Embedding(1, self.config.d_model)}

    def bias_owner(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.bias_path)

    def bias_table(self, stack: str) -> nn.Module:
        return self.bias_owner(self.blocks(stack)[0]).relative_attention_bias

    def stack_shell(self, stack: str) -> nn.Module:
        # T5Stack.forward applies its dropout before the blocks and again after the final norm; the shell is the
        # first one only (the second belongs to EncoderFinal / DecoderFinal)
        shell = nn.Module()
        shell.dropout = copy.deepcopy(self.stack(stack).dropout)
        return shell

    def shell_forward(self, stack, shell, embeds, mask):
        return shell.dropout(embeds)

    def encoder_block(self, layer, hidden, mask4d, bias=None):
        return layer(hidden, attention_mask=mask4d, position_bias=bias)[0]

    def decoder_block(self, layer, hidden, self_mask, enc_hidden, cross_mask, bias=None, cache=None):
        return layer(hidden, self_mask, bias, enc_hidden, cross_mask, None, cache=cache)[0]


@register_adapter
class BartAdapter(EncDecAdapter):
    """BART (post-norm, learned positions, scaled embedding table) and Marian (sinusoidal positions, the stacks
    scale the embedding)."""

    model_types = ("bart", "marian")


@register_adapter
class MBartAdapter(EncDecAdapter):
    """mBART: pre-norm with a final ``layer_norm`` per stack; labels shifted by wrapping the language code."""

    model_types = ("mbart",)
    stack_final_names = ("layer_norm",)
    needs_decoder_start = False
