"""Autoregressive decoding through a pipeline, outside DeepSpeed's fixed training schedule.

``PipelineEngine.eval_batch`` runs one fixed forward schedule, so it cannot generate. Here each stage runs its own
layers (``pipe.forward_funcs``) directly and hands the hidden state to the next stage of the *same* data-parallel
replica with ``torch.distributed.send/recv``; the last stage picks the next token and sends it back to every other
stage of its replica, so that all of them know the new attention mask, positions and which sequences have finished.
Replicas never talk to each other: each generates its own examples.

The one idea: every stage keeps a ``transformers.DynamicCache`` for its own blocks, and blocks are called exactly as
the family's ``forward`` calls them during HF ``generate`` -- ``cache=``, ``use_cache=True``, positions from the
attention-mask cumsum (HF ``_prepare_position_ids_for_generation``), masks from ``transformers.masking_utils`` sized
by the block's own cache layer. So after the prompt each new token costs one token of compute per layer, and greedy
output equals ``model.generate(...)`` token for token (tests/test_generation.py, p = 1, 2, 4, with and without data
parallelism). Only the hidden state crosses stages; masks and positions are rebuilt on every stage.

Decoders, and encoder-decoders (:class:`_Seq2SeqStage`: the encoder runs once, each decoder stage keeps an
``EncoderDecoderCache``); beams are not implemented (greedy and sampling with temperature / top-k / top-p, using
HF's own logits warpers, one pick for both: :func:`_pick_tokens`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from transformers import masking_utils
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from hfpipe.core.layers import BodyShell, LayerKind, TokenEmbedding

__all__ = ["generate", "generate_continuations", "prompts_from_batch"]

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


# ----------------------------------------------------------------------------------------------- stage plumbing
class _Stage:
    """This rank's layers, its neighbours within its data-parallel replica, and its KV cache."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.adapter = pipe.adapter
        self.config = pipe.config
        self._check(pipe)
        topo = pipe._topo
        self.num_stages = topo.get_dim("pipe")
        coord = topo.get_coord(pipe.global_rank)._asdict()
        self.stage = coord["pipe"]
        self.ranks = [topo.get_rank(**{**coord, "pipe": s}) for s in range(self.num_stages)]
        self.is_first = self.stage == 0
        self.is_last = self.stage == self.num_stages - 1
        self.layers = [(pipe.layer_infos[pipe._local_start + i], f) for i, f in enumerate(pipe.forward_funcs)]
        params = [p for p in pipe.parameters() if p.is_floating_point()]
        self.dtype = params[0].dtype if params else torch.float32
        self.device = params[0].device if params else torch.device("cpu")
        self.cache = None
        self._shell_takes_positions = None

    def _check(self, pipe) -> None:
        if self.adapter.encoder_decoder:
            raise ValueError(f"{self.adapter.model_class.__name__} is an encoder-decoder; hfpipe.generation.generate "
                             "runs it through _Seq2SeqStage (call generate(), not _Stage).")
        if not self.adapter.causal:
            raise ValueError(f"generation needs a decoder; {self.adapter.model_class.__name__} is an encoder "
                             "(bidirectional attention). Use a *ForCausalLM model.")
        if not pipe.head.causal:
            raise ValueError(f"generation needs a causal-LM head; this pipeline has a {pipe.head.name!r} head. Build "
                             "it from AutoModelForCausalLM.")

    # -------------------------------------------------------------------------------------------- communication
    def send_hidden(self, hidden: torch.Tensor) -> None:
        dst = self.ranks[self.stage + 1]
        header = torch.tensor(list(hidden.shape) + [_DTYPES.index(hidden.dtype)], dtype=torch.int64)
        dist.send(header, dst)
        dist.send(hidden.contiguous(), dst)

    def recv_hidden(self) -> torch.Tensor:
        src = self.ranks[self.stage - 1]
        header = torch.empty(4, dtype=torch.int64)
        dist.recv(header, src)
        b, t, h, code = header.tolist()
        hidden = torch.empty(b, t, h, dtype=_DTYPES[code], device=self.device)
        dist.recv(hidden, src)
        return hidden

    def share_tokens(self, tokens: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The last stage's chosen tokens, on every stage of the replica."""
        if self.num_stages == 1:
            return tokens
        last = self.ranks[-1]
        if self.is_last:
            for rank in self.ranks[:-1]:
                dist.send(tokens, rank)
            return tokens
        out = torch.empty(batch, dtype=torch.int64)
        dist.recv(out, last)
        return out

    # ------------------------------------------------------------------------------------------------- compute
    def _shell(self, module, hidden, attention_mask, position_ids):
        if self._shell_takes_positions is None:
            self._shell_takes_positions = "position_ids" in inspect.signature(module.base.forward).parameters
        inputs = {"inputs_embeds": hidden, "attention_mask": attention_mask}
        if self._shell_takes_positions:  # learned absolute positions (GPT-2, OPT) must see HF generate's positions
            inputs["position_ids"] = position_ids
        return self.adapter.shell_forward(module.base, inputs)

    def _block(self, module, block_index, hidden, attention_mask, position_ids):
        a = self.adapter
        # the adapter's own kwargs (rotary embeddings, family extras); the mask is rebuilt against the cache
        no_padding = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)  # cheap: mask replaced below
        kwargs = a.block_kwargs(module, block_index, hidden, no_padding, position_ids)
        mask_fn = a.mask_function(block_index)
        kwargs["attention_mask"] = mask_fn(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                           cache=self.cache, position_ids=position_ids, layer_idx=block_index)
        if self.cache is not None:
            kwargs[self._cache_kwarg(module.layer)] = self.cache
            kwargs["use_cache"] = True
            seen = self.cache.get_seq_length(block_index)
        out = module.layer(hidden, **kwargs)
        if self.cache is not None and self.cache.get_seq_length(block_index) == seen:
            raise RuntimeError(
                f"block {block_index} ({type(module.layer).__name__}) did not write to the KV cache passed as "
                f"{self._cache_kwarg(module.layer)!r}; this family takes its cache under another name. Use "
                "use_cache=False, or report the family.")
        return out[0] if isinstance(out, tuple) else out

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _cache_kwarg_of(layer_type: type) -> str:
        # transformers 5 names it ``cache``; some families keep ``layer_past`` (GPT-NeoX) or ``past_key_values``
        names = inspect.signature(layer_type.forward).parameters
        for name in ("cache", "past_key_values", "layer_past", "past_key_value"):
            if name in names:
                return name
        return "cache"

    def _cache_kwarg(self, layer) -> str:
        return self._cache_kwarg_of(type(layer))

    def forward(self, x, attention_mask, position_ids):
        """Run this stage's layers. ``x``: new input ids (first stage) or the previous stage's hidden state;
        ``attention_mask``: the full 2D mask (past + new); ``position_ids``: positions of the new tokens.
        Returns the hidden state, or the last position's logits on the last stage."""
        prefill_mask = attention_mask if x.shape[1] == attention_mask.shape[1] else None
        for info, func in self.layers:
            layer = info.layer
            if issubclass(layer, TokenEmbedding):
                x = func.embed(x)
            elif issubclass(layer, BodyShell):
                x = self._shell(func, x, prefill_mask, position_ids)
            elif layer.kind is LayerKind.BLOCK and layer.has_attention:  # a block or its attention half
                x = self._block(func, info.block, x, attention_mask, position_ids)
            elif layer.kind is LayerKind.BLOCK:  # the MLP half: per token, no cache
                out = func.layer(x)
                x = out[0] if isinstance(out, tuple) else out
            elif layer.kind is LayerKind.FINAL:
                # final norm / projection act per token: only the last position is needed for the next token
                x = func((x[:, -1:], attention_mask, position_ids))
            elif layer.kind is LayerKind.HEAD:
                x = func(x)
            else:
                raise ValueError(f"generation does not know how to run pipeline layer {info.name!r} (layer {info}).")
        return x[:, -1] if isinstance(x, torch.Tensor) and x.dim() == 3 and self.is_last else x


# ---------------------------------------------------------------------------------------------------- helpers
def _unwrap(model):
    """An ``HFPipelineModule`` from a module or a DeepSpeed ``PipelineEngine``."""
    pipe = getattr(model, "module", model)
    if not hasattr(pipe, "layer_infos") or not hasattr(pipe, "forward_funcs"):
        raise TypeError(f"generate expects an hfpipe HFPipelineModule or its PipelineEngine; got "
                        f"{type(model).__name__}.")
    if getattr(pipe, "v_shape", False):  # DualPipeVModule: two chunks per rank, not one run down the stages
        raise ValueError("generate: this pipeline was built with schedule='dualpipev' (each rank holds two chunks, "
                         "the first and the last stage's share on rank 0); generation runs the layers once down the "
                         "stages. Fix: generate from a 1f1b or zb-h1 pipeline of the same weights (export, then "
                         "to_pipeline(folder)), or train with --pipeline_schedule zb-h1.")
    return pipe


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _warpers(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    """HF's own warpers, in HF's order (temperature, top-k, top-p)."""
    warpers = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0; use do_sample=False for greedy decoding.")
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


def _pick_tokens(logits, ids_so_far, warpers, generator, unfinished, pad_token_id) -> torch.Tensor:
    """The last stage's next token per row: argmax, or a draw from HF's warped distribution (``warpers`` not
    ``None``); ``pad_token_id`` for rows that have finished."""
    logits = logits.to(torch.float32)
    if warpers is not None:
        probs = torch.softmax(warpers(ids_so_far, logits), dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    else:
        tokens = logits.argmax(dim=-1)
    return torch.where(unfinished, tokens, torch.full_like(tokens, pad_token_id))


@torch.no_grad()
def generate(model, inputs, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Iterable[int] | None = None, pad_token_id: int | None = None,
             seed: int | None = None, use_cache: bool = True, num_beams: int = 1,
             decoder_start_token_id: int | None = None) -> torch.Tensor:
    """Decode through the pipeline; call it on **every rank** of a replica with that replica's batch.

    Encoder-decoders (T5, BART, ...): ``inputs`` is the source (padded on either side); the encoder runs once, then
    each decoder stage keeps an ``EncoderDecoderCache`` (self-attention and cross-attention caches) for its blocks.
    Returns ``[B, 1 + n]``: ``decoder_start_token_id`` then the generated tokens, as ``model.generate``.

    Args:
        model: the ``HFPipelineModule`` (from ``to_pipeline``) or its DeepSpeed ``PipelineEngine``.
        inputs: left-padded prompt ids ``[B, L]`` -- or a batch dict, see :func:`generate_continuations` (the trainer's
            ``generation_fn(engine, batch)`` contract).
        attention_mask: ``[B, L]`` (1 = token, 0 = padding); ones if omitted.
        max_new_tokens: tokens to add at most; a sequence stops at ``eos_token_id`` (then gets ``pad_token_id``), and
            the loop stops when every sequence of the replica has stopped.
        do_sample, temperature, top_k, top_p: sampling with HF's logits warpers; greedy when ``do_sample=False``.
        eos_token_id, pad_token_id: default to the model config's.
        seed: seeds the sampling generator on the last stage (reproducible sampling); global RNG if ``None``.
        use_cache: per-stage KV cache (default). ``False`` recomputes the whole sequence every step (slow; for
            measuring).

    Returns ``[B, L + n]`` ids (prompt, then generated tokens, ``n <= max_new_tokens``), identical on every stage --
    the same layout as ``transformers`` ``model.generate``.
    """
    if isinstance(inputs, Mapping):
        return generate_continuations(model, inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                      temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                      pad_token_id=pad_token_id, seed=seed, use_cache=use_cache, num_beams=num_beams)
    pipe = _unwrap(model)
    if num_beams != 1:
        raise ValueError(f"num_beams={num_beams}: beam search is not implemented through the pipeline (each stage "
                         "would have to reorder its caches by the last stage's beam choice every step); use "
                         "num_beams=1 (greedy) or do_sample=True.")
    if pipe.adapter.encoder_decoder:
        return _generate_seq2seq(pipe, inputs, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 warpers=_warpers(temperature, top_k, top_p) if do_sample else None,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
                                 decoder_start_token_id=decoder_start_token_id)
    stage = _Stage(pipe)
    config = pipe.config
    input_ids = inputs.to(stage.device)
    batch, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(stage.device).long()
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs left-padded prompts (attention_mask[:, -1] == 0 for some rows: right "
                         "padding); pad on the left (tokenizer.padding_side = 'left').")
    eos = _as_list(eos_token_id if eos_token_id is not None else config.eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    warpers = _warpers(temperature, top_k, top_p) if do_sample else None
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=stage.device).manual_seed(seed)

    was_training = pipe.training
    pipe.eval()
    try:
        # positions exactly as HF generate: cumsum of the mask - 1, padding at 0; then last + 1 per new token
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        stage.cache = DynamicCache(config=config) if use_cache else None
        unfinished = torch.ones(batch, dtype=torch.bool, device=stage.device)
        step_ids, step_pos = input_ids, positions
        for step in range(max_new_tokens):
            x = step_ids if stage.is_first else stage.recv_hidden()
            out = stage.forward(x, attention_mask, step_pos)
            tokens = None
            if stage.is_last:
                tokens = _pick_tokens(out, input_ids, warpers, generator, unfinished, pad_token_id)
            else:
                stage.send_hidden(out)
            tokens = stage.share_tokens(tokens, batch)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=-1)
            if eos:
                unfinished &= ~torch.isin(tokens, torch.tensor(eos, device=tokens.device))
            if not bool(unfinished.any()):
                break
            if use_cache:
                step_ids, step_pos = tokens[:, None], positions[:, -1:]
            else:
                step_ids, step_pos = input_ids, positions
    finally:
        stage.cache = None
        pipe.train(was_training)
    return input_ids


def prompts_from_batch(batch: Mapping[str, torch.Tensor], pad_token_id: int = 0):
    """Left-padded prompts ``(input_ids, attention_mask)`` from a training-format batch.

    With ``labels``, the prompt of a row is its tokens before the first supervised label (``labels != -100``), as
    :mod:`hfpipe.tasks.text2text` builds them; without, the whole (unpadded) row.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    labels = batch.get("labels")
    rows = []
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        if labels is not None:
            supervised = (labels[i] != -100).nonzero()
            if len(supervised):
                keep = keep & (torch.arange(ids.shape[1]) < int(supervised[0]))
        rows.append(ids[i][keep])
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    out_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r):] = r
            out_mask[i, width - len(r):] = 1
    return out, out_mask


def generate_continuations(model, batch: Mapping[str, torch.Tensor], *, max_new_tokens: int = 64,
                           **kwargs) -> torch.Tensor:
    """The trainer's ``generation_fn(engine, batch)``: generated tokens only, ``[B, max_new_tokens]``.

    Prompts come from :func:`prompts_from_batch` (re-padded on the left), so a batch in training format (prompt +
    target + padding, labels -100 on the prompt) can be given as is. Rows are padded with ``pad_token_id`` after
    their end, so every batch has the same width and predictions concatenate across batches.
    """
    pipe = _unwrap(model)
    config = pipe.config
    pad = kwargs.get("pad_token_id")
    if pad is None:
        eos = _as_list(kwargs.get("eos_token_id") if kwargs.get("eos_token_id") is not None else config.eos_token_id)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
        kwargs["pad_token_id"] = pad
    if pipe.adapter.encoder_decoder:  # the source is the prompt; the output starts with decoder_start_token_id
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        out = generate(pipe, ids, mask, max_new_tokens=max_new_tokens, **kwargs)[:, 1:]
    else:
        ids, mask = prompts_from_batch(batch, pad)
        out = generate(pipe, ids, mask, max_new_tokens=max_new_tokens, **kwargs)[:, ids.shape[1]:]
    if out.shape[1] < max_new_tokens:
        out = torch.cat([out, out.new_full((out.shape[0], max_new_tokens - out.shape[1]), pad)], dim=-1)
    return out


# ------------------------------------------------------------------------------------------------ encoder-decoders
class _Seq2SeqStage(_Stage):
    """This rank's part of an encoder-decoder (``hfpipe.core.adapters.encdec``): the encoder pass hands the encoder
    output down the replica's stages (every decoder stage needs it for cross-attention); each decode step then runs
    the decoder layers on the new token with this stage's ``EncoderDecoderCache``, blocks called as the decoder
    stack's forward calls them during HF ``generate`` (masks sized by the block's own cache layer, T5's bias for the
    new query position from HF's ``compute_bias``)."""

    def _check(self, pipe) -> None:
        if not pipe.head.encoder_decoder:
            raise ValueError(f"generation needs a seq2seq LM head; this pipeline has a {pipe.head.name!r} head.")

    def encode(self, input_ids, attention_mask):
        """The encoder's output on every stage of the replica (``None`` before the encoder ends)."""
        a = self.adapter
        enc = None if self.is_first else self.recv_hidden()
        empty = torch.zeros(input_ids.shape[0], 0, a.config.d_model, dtype=self.dtype, device=self.device)
        empty_mask = torch.zeros(input_ids.shape[0], 0, dtype=torch.long, device=self.device)
        x = (enc, attention_mask, empty, empty_mask)
        for info, func in self.layers:
            stack = getattr(info.layer, "stack", None)
            if info.kind is LayerKind.EMBEDDING and stack is None:
                x = (a.token_embeds("encoder", func.embed, input_ids), *x[1:])
            elif stack == "encoder":  # shell, bias + block, final: their own forwards on the encoder half
                x = func(x)
        enc = x[0]
        if not self.is_last:
            self.send_hidden(enc)
        self.encoder_hidden, self.encoder_mask = enc, attention_mask
        self.history = []  # decoder embeddings so far (the decoder shell's positions run over the whole sequence)

    def decode(self, x, decoder_mask):
        """One decode step on this stage: ``x`` is the new token ids (first stage) or the previous stage's hidden
        state; ``decoder_mask`` the full decoder mask (past + new). Returns the hidden state, or logits."""
        a = self.adapter
        enc, enc_mask = self.encoder_hidden, self.encoder_mask
        past = decoder_mask.shape[1] - 1
        config = a.stack("decoder").config
        bias = None
        for info, func in self.layers:
            layer, stack = info.layer, getattr(info.layer, "stack", None)
            if layer.kind is LayerKind.EMBEDDING and stack is None:
                x = a.token_embeds("decoder", func.embed, x)
            elif stack == "encoder":
                continue
            elif layer.kind is LayerKind.EMBEDDING:  # decoder shell: per token, so the last row is the new token's
                self.history.append(x)
                seq = torch.cat(self.history, dim=1)
                x = a.shell_forward("decoder", func.shell, seq, torch.ones(seq.shape[:2], dtype=torch.long,
                                                                           device=seq.device))[:, -1:]
            elif layer.kind is LayerKind.PRELUDE:
                bias = func.bias(x.shape[1], past + x.shape[1], past)
            elif layer.kind is LayerKind.BLOCK:
                idx = func.block_index
                self_mask = masking_utils.create_causal_mask(
                    config=config, inputs_embeds=x, attention_mask=decoder_mask, cache=self.cache.self_attention_cache,
                    layer_idx=idx)
                cross = masking_utils.create_bidirectional_mask(config=config, inputs_embeds=x,
                                                                attention_mask=enc_mask, encoder_hidden_states=enc)
                x = a.decoder_block(func.layer, x, self_mask, enc, cross, bias, cache=self.cache)
                bias = None
            elif layer.kind is LayerKind.FINAL:
                x = func((enc, enc_mask, x, decoder_mask))[2]
            elif layer.kind is LayerKind.HEAD:
                x = func((enc, enc_mask, x, decoder_mask))
        return x[:, -1] if self.is_last else x


def _generate_seq2seq(pipe, input_ids, attention_mask, *, max_new_tokens, do_sample, warpers, eos_token_id,
                      pad_token_id, seed, decoder_start_token_id):
    """:func:`generate` for an encoder-decoder: greedy (or sampled) decoding equal to ``model.generate``'s."""
    stage = _Seq2SeqStage(pipe)
    config = pipe.config
    start = decoder_start_token_id if decoder_start_token_id is not None else getattr(
        config, "decoder_start_token_id", None)
    if start is None:
        raise ValueError(f"{pipe.adapter.model_class.__name__} has no decoder_start_token_id: generation starts every "
                         "target with it. Pass decoder_start_token_id= (mBART: the target language code) or set "
                         "config.decoder_start_token_id.")
    input_ids = input_ids.to(stage.device)
    batch = input_ids.shape[0]
    attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(stage.device).long()
    eos = _as_list(eos_token_id if eos_token_id is not None else config.eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    generator = torch.Generator(device=stage.device).manual_seed(seed) if do_sample and seed is not None else None
    was_training = pipe.training
    pipe.eval()
    try:
        stage.encode(input_ids, attention_mask)
        dec_config = pipe.adapter.stack("decoder").config
        stage.cache = EncoderDecoderCache(DynamicCache(config=dec_config), DynamicCache(config=dec_config))
        out_ids = torch.full((batch, 1), int(start), dtype=torch.long, device=stage.device)
        unfinished = torch.ones(batch, dtype=torch.bool, device=stage.device)
        for _ in range(max_new_tokens):
            x = out_ids[:, -1:] if stage.is_first else stage.recv_hidden()
            out = stage.decode(x, torch.ones_like(out_ids))
            tokens = None
            if stage.is_last:
                tokens = _pick_tokens(out, out_ids, warpers, generator, unfinished, pad_token_id)
            else:
                stage.send_hidden(out)
            tokens = stage.share_tokens(tokens, batch)
            out_ids = torch.cat([out_ids, tokens[:, None]], dim=-1)
            if eos:
                unfinished &= ~torch.isin(tokens, torch.tensor(eos, device=tokens.device))
            if not bool(unfinished.any()):
                break
    finally:
        stage.cache = None
        pipe.train(was_training)
    return out_ids
