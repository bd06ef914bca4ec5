"""Pipeline checkpoints on disk: ``convert`` an HF model into one, ``export`` one back into an HF folder.

* ``convert`` writes a DeepSpeed pipeline checkpoint (``<tag>/layer_XX-model_states.pt`` per layer, one
  ``mp_rank_XX_model_states.pt`` per stage, ``latest``) plus ``hfpipe.json``, ``config.json`` and the tokenizer,
  building one layer at a time, so memory stays at one layer whatever the model size.
* ``export`` turns such a checkpoint (converted, or saved by ``engine.save_checkpoint`` / ``PipelineTrainer``) into an
  HF folder: ``config.json``, sharded safetensors, tokenizer; tied weights dropped as ``save_pretrained`` does.

Reading checkpoints (stage-locally, by HF name) is ``hfpipe.core.weights``; this module only writes. Both folders
appear only when complete (a temporary folder, renamed at the end).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from hfpipe._version import __version__
from hfpipe.core.builder import prepare, stage_parts
from hfpipe.core.lora import ADAPTER_WEIGHTS, AdapterSource, adapter_config, is_adapter_folder, save_adapter
from hfpipe.core.validate import check_finite
from hfpipe.core.weights import (FORMAT, FORMAT_VERSION, MANIFEST, build_layer, check_manifest, checkpoint_config,
                                checkpoint_root_and_tag, CheckpointError, commit_output, is_pipeline_checkpoint,
                                layer_file, layer_list, local_folder, parse_dtype, PipelineCheckpointSource,
                                prepare_output, read_manifest, resolve_pretrained, saved_by_deepspeed, saved_names,
                                tied_map)

DEFAULT_TAG = "global_step0"
#: Files copied next to the weights (tokenizer, generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
              "merges.txt", "added_tokens.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model",
              "spm.model", "generation_config.json", "chat_template.jinja")

#: the fix a refusal of non-finite weights names
NONFINITE_FIX = ("the weights are damaged (a corrupt file, or a diverged run); use another copy or checkpoint, or "
                 "pass --allow-nonfinite (allow_nonfinite=True) to write them anyway")


def manifest_for(builder, infos, *, parts=None, partition_method=None, dtype=None, source=None, **extra) -> dict:
    a = builder.adapter
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "hfpipe_version": __version__,
        "source": None if source is None else str(source), "model_type": a.config.model_type,
        "architecture": a.model_class.__name__, "num_blocks": a.num_blocks, "num_layers": len(infos),
        "layers": layer_list(infos),
        "partition": None if parts is None else {
            "method": partition_method if isinstance(partition_method, str) else list(partition_method or []),
            "num_stages": len(parts) - 1, "parts": list(parts)},
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        **({"lora": lora_manifest(builder)} if getattr(builder, "lora", None) is not None else {}),
        **extra,
    }


def lora_manifest(builder) -> dict:
    """The manifest entry of a LoRA pipeline: PEFT's config and the base model the layer files leave out (they hold
    the adapter only: frozen weights are re-read from the base)."""
    config = builder.lora.config.to_dict()
    return {"peft_config": json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, (set, frozenset))
                                                  else str(v))),
            "base_model": getattr(builder.adapter.config, "_name_or_path", None) or None, "adapter_only": True}


def write_manifest(folder, builder, infos, **kwargs) -> dict:
    """Write ``hfpipe.json`` + ``config.json`` next to a pipeline checkpoint (what ``export`` needs)."""
    folder = Path(folder)
    manifest = manifest_for(builder, infos, **kwargs)
    config = copy.deepcopy(builder.adapter.config)
    config.architectures = [builder.adapter.model_class.__name__]
    config.save_pretrained(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _builder_for_checkpoint(root: Path, model=None, model_class=None):
    """The (meta) builder of the model a checkpoint holds: from its manifest + config.json, or from ``model``."""
    manifest = read_manifest(root)
    if model is None:
        model, model_class = checkpoint_config(root, manifest, model_class)
    elif isinstance(model, (str, os.PathLike)) and Path(model).is_file():  # a config.json
        from transformers import AutoConfig

        model = AutoConfig.from_pretrained(model)
    if isinstance(model, (str, os.PathLike)):
        config, model_class, _ = resolve_pretrained(model, model_class)
        model = config
    builder = prepare(model, model_class)
    if manifest is not None:
        builder.adapter.follow_checkpoint(manifest)
    infos = builder.layers()
    if manifest is not None:
        check_manifest(manifest, builder, infos, root)
    return builder, infos, manifest


# --------------------------------------------------------------------------------------------------- writing
#: the temp + rename helpers live in core (``hfpipe.core.lora.save_adapter`` writes atomically too)
_prepare_output, _commit_output = prepare_output, commit_output


def _copy_side_files(src: Path | None, dst: Path) -> None:
    if src is None:
        return
    for name in SIDE_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, dst / name)


def _progress(iterable, desc: str, enabled: bool, unit: str = "layer"):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, disable=not enabled)


def convert(model, output_dir, *, num_stages: int = 1, partition_method="balanced", dtype=None, model_class=None,
            overwrite: bool = False, tag: str = DEFAULT_TAG, seq_len: int | None = None, progress: bool = True,
            allow_nonfinite: bool = False) -> dict:
    """Write ``model`` (an HF folder / Hub id, or a model instance) as a DeepSpeed pipeline checkpoint.

    ``output_dir`` gets ``latest``, ``<tag>/layer_XX-model_states.pt`` for every layer, one
    ``<tag>/mp_rank_XX_model_states.pt`` per stage (what ``PipelineEngine.load_checkpoint`` looks for first), the
    manifest ``hfpipe.json``, ``config.json`` and the tokenizer files. Layers are built and written one at a time,
    so peak memory is about one layer. The folder appears only when complete (temporary folder + rename).
    Weights the source does not hold (a fresh task head) are initialised as HF does and listed in the manifest's
    ``missing_keys``. Returns the manifest.
    """
    import deepspeed
    from deepspeed.pipe import TiedLayerSpec

    target_dtype = parse_dtype(dtype)
    source_folder = None
    if isinstance(model, (str, os.PathLike)):
        source_folder = local_folder(model)
    builder = prepare(model, model_class)
    source = builder.source
    if source is None:
        raise CheckpointError("convert needs weights: pass an HF model folder, a Hub id or a model instance, not a "
                              "bare config.")
    source.dtype = target_dtype if target_dtype is not None else source.dtype
    infos = builder.layers()
    parts = stage_parts(builder, infos, num_stages, partition_method, seq_len=seq_len)
    out, tmp = _prepare_output(output_dir, overwrite)
    try:
        tag_dir = tmp / tag
        tag_dir.mkdir()
        available = set(source.keys())
        tied_cache: dict[str, dict] = {}
        missing, used, dtypes = [], set(), set()
        for i, info in _progress(list(enumerate(infos)), "convert", progress):
            spec = info.spec
            if not saved_by_deepspeed(spec):
                continue
            key = spec.key if isinstance(spec, TiedLayerSpec) else None
            if key is not None and key in tied_cache:
                state = tied_cache[key]
            else:
                layer = build_layer(spec, builder)
                for hf in saved_names(layer).values():
                    found = source._resolve(hf)
                    if found is None:
                        missing.append(hf)
                    else:
                        used.add(found)
                state = {}
                for k, v in layer.state_dict().items():
                    v = v.detach()
                    if target_dtype is not None and v.is_floating_point():
                        v = v.to(target_dtype)
                    state[k] = v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
                    if v.is_floating_point():
                        dtypes.add(str(v.dtype).replace("torch.", ""))
                del layer
                if not allow_nonfinite:
                    check_finite(state.items(), f"convert of {source_folder or type(model).__name__}, layer {i} "
                                 f"({info.name})", fix=NONFINITE_FIX)
                if key is not None:
                    tied_cache[key] = state
            torch.save(state, tag_dir / layer_file(i))
            del state
        tied_cache.clear()
        for stage in range(num_stages):
            torch.save({"module": None, "optimizer": None, "lr_scheduler": None, "data_sampler": None,
                        "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
                        "global_steps": 0, "global_samples": 0, "dp_world_size": 1, "mp_world_size": num_stages,
                        "ds_version": deepspeed.__version__, "hfpipe_converted": True},
                       tag_dir / f"mp_rank_{stage:02d}_model_states.pt")
        (tmp / "latest").write_text(tag)
        unused = sorted(available - used)
        missing = sorted(set(missing))
        manifest = write_manifest(
            tmp, builder, infos, parts=parts, partition_method=partition_method,
            dtype=",".join(sorted(dtypes)) or None,
            source=model if isinstance(model, (str, os.PathLike)) else type(model).__name__, tag=tag,
            missing_keys=missing, unused_keys=unused)
        _copy_side_files(source_folder, tmp)
        _commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if missing:
        print(f"hfpipe convert: {len(missing)} weights not in the source were initialised as HF does: "
              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return manifest


def export(checkpoint, output_dir, *, dtype=None, max_shard_size="5GB", overwrite: bool = False, model=None,
           model_class=None, progress: bool = True, merge_lora: bool = False, allow_nonfinite: bool = False) -> str:
    """Write a pipeline checkpoint as an HF folder that ``AutoModelFor<Task>.from_pretrained`` loads.

    ``checkpoint`` is a folder written by ``convert``, a ``PipelineTrainer`` ``checkpoint-N`` folder, or any
    ``engine.save_checkpoint`` folder (its ``latest`` tag, or a tag folder); without ``hfpipe.json`` / ``config.json``
    next to it, ``model`` (an HF folder or config.json) says which model it holds. Tied weights are written once, as
    ``save_pretrained`` does; ``dtype`` casts floating-point tensors. The folder appears only when complete.

    LoRA: a trainer checkpoint of a LoRA run holds the adapter only; it exports as a PEFT adapter folder, or with
    ``merge_lora`` as the merged full model (:func:`merge_adapter`; base: ``model`` or the one its manifest names).
    ``checkpoint`` may also be a PEFT adapter folder, with ``merge_lora`` and ``model`` = its base.
    """
    if is_adapter_folder(checkpoint):
        if not merge_lora:
            raise CheckpointError(f"{checkpoint} is already a PEFT adapter folder; to write the merged model pass "
                                  "merge_lora=True (--merge-lora) and the base model (--model BASE).")
        return merge_adapter(checkpoint, model, output_dir, model_class=model_class, dtype=dtype,
                             max_shard_size=max_shard_size, overwrite=overwrite)
    root, tag = checkpoint_root_and_tag(checkpoint)
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("lora"):
        return _export_lora(root, tag, manifest, output_dir, merge_lora=merge_lora, base_model=model,
                            model_class=model_class, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    if merge_lora:
        raise CheckpointError(f"{checkpoint} holds no LoRA adapter (its {MANIFEST} has no 'lora' entry), so there is "
                              "nothing to merge. Fix: drop --merge-lora, or pass a LoRA checkpoint-N / adapter folder.")
    builder, infos, manifest = _builder_for_checkpoint(root, model, model_class)
    source = PipelineCheckpointSource(tag, dtype=parse_dtype(dtype)).bind(builder)
    expected = hf_weight_names(builder.adapter, source.keys(), root)

    def read():
        state = {name: source.get(name).contiguous() for name in _progress(expected, "export", progress, unit="tensor")}
        if not allow_nonfinite:
            check_finite(state.items(), f"export of {root}", fix=NONFINITE_FIX)
        return state

    return write_hf_folder(builder.adapter, read, output_dir, max_shard_size=max_shard_size, overwrite=overwrite,
                           side_files=root)


def hf_weight_names(adapter, names, where) -> list[str]:
    """The weights an HF folder of ``adapter``'s model holds (tied copies once, as ``save_pretrained`` writes them),
    checked against ``names`` (what the pipeline has, by HF name): a missing or extra weight is an error."""
    tied = tied_map(adapter.config, adapter.model_class, adapter.meta_model)
    expected = [k for k in adapter.meta_model.state_dict() if k not in tied]
    have = {k for k in names if k not in tied}
    missing, extra = sorted(set(expected) - have), sorted(have - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where}: the pipeline layers give no weight for {missing[:5]} and weights "
                              f"{extra[:5]} that {adapter.model_class.__name__} does not have; this is an hfpipe bug "
                              "for this family -- please report it.")
    return expected


def write_hf_folder(adapter, read_state, output_dir, *, max_shard_size="5GB", overwrite: bool = False,
                    side_files=None) -> str:
    """Write ``read_state()`` (``{HF name: tensor}``, called once the output folder is prepared) as an HF folder of
    ``adapter``'s model: sharded safetensors under ``save_pretrained``'s names and layouts, ``config.json`` (dtype from
    the weights), the tokenizer files found in ``side_files``. The folder appears only when complete. One writer for
    ``export`` and the trainer's export of live weights."""
    from huggingface_hub import save_torch_state_dict

    out, tmp = _prepare_output(output_dir, overwrite)
    try:
        state = read_state()
        floats = {t.dtype for t in state.values() if t.is_floating_point()}
        state = _to_checkpoint_names(adapter.meta_model, state)
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        del state
        config = copy.deepcopy(adapter.config)
        config.architectures = [adapter.model_class.__name__]
        if len(floats) == 1:
            config.dtype = str(floats.pop()).replace("torch.", "")
        config.save_pretrained(tmp)
        _copy_side_files(side_files, tmp)
        _commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def _to_checkpoint_names(meta_model, state: dict) -> dict:
    """The key names (and layouts) ``save_pretrained`` writes: transformers' own reverse of its loading conversions."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    return dict(revert_weight_conversion(meta_model, state))


# ------------------------------------------------------------------------------------------------------ LoRA
def _lora_builder(root: Path, manifest: dict, model_class=None):
    """The meta builder of a LoRA checkpoint: the model its config.json names, with the manifest's LoRA config."""
    from peft import LoraConfig

    config, model_class = checkpoint_config(root, manifest, model_class)
    lora_config = LoraConfig(**{k: v for k, v in manifest["lora"]["peft_config"].items()
                                if k in LoraConfig.__dataclass_fields__ and k != "peft_type"})
    builder = prepare(config, model_class, peft_config=lora_config)
    check_manifest(manifest, builder, builder.layers(), root)
    return builder


def _export_lora(root: Path, tag: Path, manifest: dict, output_dir, *, merge_lora: bool, base_model, model_class,
                 dtype, max_shard_size, overwrite: bool) -> str:
    """A LoRA checkpoint's adapter (read from its layer files by PEFT key) as an adapter folder, or merged."""
    import tempfile

    builder = _lora_builder(root, manifest, model_class)
    source = PipelineCheckpointSource(tag, dtype=parse_dtype(dtype)).bind(builder)
    state = {}
    for key in builder.lora.shapes:
        if source._resolve(key) is None:
            raise CheckpointError(f"{root}: no layer file holds adapter tensor {key!r}; the checkpoint does not match "
                                  "its own manifest (was it written by another hfpipe version?).")
        state[key] = source.get(key)
    base = base_model or manifest["lora"].get("base_model")
    if not merge_lora:
        return save_adapter(builder.lora.config, state, output_dir, base,
                            extra=lambda tmp: _copy_side_files(root, Path(tmp)), overwrite=overwrite)
    if base is None:
        raise CheckpointError(f"{root} names no base model in its {MANIFEST}; pass the base (--model BASE).")
    if not overwrite and Path(output_dir).is_dir() and any(Path(output_dir).iterdir()):
        prepare_output(output_dir, overwrite)  # the usual error, before merging anything
    with tempfile.TemporaryDirectory() as adapter_dir:
        save_adapter(builder.lora.config, state, adapter_dir, base,
                     extra=lambda tmp: _copy_side_files(root, Path(tmp)))
        return merge_adapter(adapter_dir, base, output_dir, model_class=model_class, dtype=dtype,
                             max_shard_size=max_shard_size, overwrite=overwrite)


def merge_adapter(adapter, base, output_dir, *, model_class=None, dtype=None, max_shard_size="5GB",
                  overwrite: bool = False) -> str:
    """The base model with the PEFT adapter folder ``adapter`` merged in, as an HF folder ``from_pretrained`` loads:
    ``PeftModel.from_pretrained(AutoModelFor<Task>.from_pretrained(base), adapter).merge_and_unload()`` -- PEFT's
    own merge -- written by ``save_pretrained`` (plus the tokenizer of the adapter folder, else of the base).
    ``base`` defaults to the adapter's ``base_model_name_or_path``. Refused, with the reason: an adapter that does
    not fit the base (names both), a base stored in 4 bits (merging would round the update away). The whole model
    is loaded on this process, as ``from_pretrained`` does."""
    from peft import PeftModel

    adapter_cfg = adapter_config(adapter)
    named = adapter_cfg.base_model_name_or_path
    base = base or named
    if not base:
        raise CheckpointError(f"{adapter}: adapter_config.json names no base_model_name_or_path; pass the base "
                              "model (--model BASE).")
    folder = local_folder(base)
    if (folder / MANIFEST).is_file() or is_pipeline_checkpoint(folder):
        raise CheckpointError(f"--model {base}: a pipeline checkpoint; merging needs the base as an HF folder or Hub "
                              "id. Fix: `hfpipe export` it first and pass that folder.")
    config, cls, _ = resolve_pretrained(folder, model_class)
    quant = getattr(config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    if quant:
        raise CheckpointError(f"base {base} is stored quantised ({quant.get('quant_method', 'bitsandbytes')}); "
                              "merging into it would round the merged weights back to the quantised grid and lose "
                              "the adapter's update. Fix: merge onto the full-precision base (--model that folder).")
    builder = prepare(config, cls, peft_config=adapter_cfg)  # meta: the shapes PEFT gives this base
    AdapterSource(None, str(Path(adapter) / ADAPTER_WEIGHTS), str(adapter)).check(builder.lora, str(base), named)
    out, tmp = prepare_output(output_dir, overwrite)
    try:
        kwargs = {"dtype": parse_dtype(dtype)} if parse_dtype(dtype) is not None else {}
        model = cls.from_pretrained(folder, **kwargs)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        del model, merged
        _copy_side_files(folder, tmp)
        _copy_side_files(Path(adapter), tmp)
        commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)
