"""Checkpoints: stage-local reading of HF weights, DeepSpeed pipeline checkpoints, and export back to HF.

* ``resolve_pretrained`` turns a local folder or a hub id into ``(config, model class, source)``. The source opens the
  safetensors files lazily with ``safe_open`` and reads only the tensors a rank asks for, so each pipeline stage reads
  only its own layers (``bytes_read`` counts what was read). A folder written by ``convert`` (or a trainer
  checkpoint) resolves the same way, through :class:`PipelineCheckpointSource`.
* ``convert`` writes a DeepSpeed pipeline checkpoint (``<tag>/layer_XX-model_states.pt`` per layer, one
  ``mp_rank_XX_model_states.pt`` per stage, ``latest``) plus ``hfpipe.json``, ``config.json`` and the tokenizer,
  building one layer at a time, so memory stays at one layer whatever the model size.
* ``export`` turns such a checkpoint (converted, or saved by ``engine.save_checkpoint`` / ``PipelineTrainer``) into an
  HF folder: ``config.json``, sharded safetensors, tokenizer; tied weights dropped as ``save_pretrained`` does.

Layer files are indexed by the family's fixed layer list (``PipelineBuilder.layers()``), which never depends on the
stage count, so a checkpoint written at one stage count loads at any other. The HF name of every tensor comes from the
layers' own ``hf_names()`` table, shared with loading and gradient checks.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
MANIFEST = "hfpipe.json"
FORMAT = "hfpipe-pipeline-checkpoint"
FORMAT_VERSION = 1
DEFAULT_TAG = "global_step0"
#: Files copied next to the weights (tokenizer, generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
              "merges.txt", "added_tokens.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model",
              "spm.model", "generation_config.json", "chat_template.jinja")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint folder is missing files or does not match the model."""


class _Names:
    """HF name resolution shared by the sources: the name as given, then with the model's ``base_model_prefix`` added
    or removed, then through the model's tied weights."""

    base_model_prefix = ""
    tied: dict[str, str] = {}
    aliases: dict[str, str] = {}  # model name -> stored name (transformers' load-time renamings)

    def keys(self):
        """The stored names."""
        raise NotImplementedError

    def _resolve(self, name: str) -> str | None:
        """The stored name that holds ``name``, or ``None``."""
        stored = self.keys()
        candidates = [name]
        p = self.base_model_prefix
        if p:
            candidates.append(name[len(p) + 1:] if name.startswith(p + ".") else f"{p}.{name}")
        if name in self.tied:
            candidates.append(self.tied[name])
        for c in candidates:
            if c in stored:
                return c
            if c in self.aliases:
                return self.aliases[c]
        return None


class SafetensorsSource(_Names):
    """Weights read lazily from ``model.safetensors`` or a sharded ``model.safetensors.index.json``.

    ``get(hf_name)`` returns the tensor (cast to ``dtype`` when given) or ``None``. Names are tried as given, then with
    the model's ``base_model_prefix`` added or removed (a ``BertModel`` checkpoint loaded for a task model and the
    reverse), then through the model's tied weights (HF omits ``lm_head.weight`` when it is tied to the embedding).
    """

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype | None = None, base_model_prefix: str = "",
                 tied: dict[str, str] | None = None, conversions: tuple[list, list] = ((), ())):
        self.folder = Path(folder)
        self.dtype = dtype
        self.base_model_prefix = base_model_prefix
        self.tied = dict(tied or {})
        self.bytes_read = 0
        self.names_read: list[str] = []
        self._handles = {}
        index = self.folder / SAFE_INDEX
        single = self.folder / SAFE_SINGLE
        if index.is_file():
            self.weight_map = dict(json.loads(index.read_text())["weight_map"])
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {k: SAFE_SINGLE for k in f.keys()}
        else:
            raise CheckpointError(
                f"{self.folder} has neither {SAFE_SINGLE} nor {SAFE_INDEX}; expected an HF model folder saved with "
                "save_pretrained(..., safe_serialization=True). Fix: re-save the model as safetensors."
            )
        # transformers renames some checkpoint keys when loading (GPT-NeoX's embed_out -> lm_head, legacy gamma/beta)
        self.aliases = {}
        renames, converters = conversions
        for key in self.weight_map:
            new = key
            for t in renames:
                new, _ = t.rename_source_key(new)
            if new != key:
                self.aliases[new] = key
            for t in converters:
                if t.rename_source_key(key)[1] is not None:
                    raise CheckpointError(
                        f"{self.folder} stores {key!r} in a layout transformers converts while loading "
                        f"({type(t).__name__}); hfpipe reads such checkpoints only through transformers. Fix: load "
                        "the model with from_pretrained and pass the instance to to_pipeline / hfpipe convert.")

    def keys(self):
        return self.weight_map.keys()

    def get(self, name: str):
        key = self._resolve(name)
        if key is None:
            return None
        shard = self.weight_map[key]
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        tensor = handle.get_tensor(key)
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.names_read.append(key)
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor

    def __getstate__(self):  # safe_open handles are not picklable; reopen lazily
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def _local_folder(path_or_hub_id) -> Path:
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if os.fspath(path_or_hub_id).startswith((".", "/")) or path.suffix:
        raise CheckpointError(f"{path_or_hub_id!s} is not a folder; expected an HF model folder or a hub id.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(os.fspath(path_or_hub_id),
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as e:  # offline and not cached, unknown repo, ...
        raise CheckpointError(
            f"could not resolve {path_or_hub_id!s} as a local folder or a cached hub model ({type(e).__name__}: {e}). "
            "Fix: pass a folder saved with save_pretrained, or download the model first."
        ) from e


def transformers_class(name: str | None, where: str) -> type:
    """The ``transformers`` class called ``name`` (``config.architectures[0]``, ``--model-class``)."""
    import transformers

    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise CheckpointError(f"{where} names no transformers class ({name!r}); pass the model class, e.g. "
                              "AutoModelForCausalLM or BertForSequenceClassification.")
    return cls


def _config_dtype(config):
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None) if dt != "auto" else None
    return dt if isinstance(dt, torch.dtype) else None


def _meta_model(config, model_class):
    try:
        with torch.device("meta"):
            return model_class(copy.deepcopy(config))
    except Exception:
        return None


def _conversions(model) -> tuple[list, list]:
    """transformers' key renamings (applied when loading a checkpoint) and tensor converters for ``model``."""
    if model is None:
        return [], []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming
    except ImportError:  # older transformers: no conversion mappings
        return [], []
    transforms = [t for t in get_model_conversion_mapping(model) if not isinstance(t, PrefixChange)]
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if not isinstance(t, WeightRenaming)])


def _tied_map(config, model_class, model=None) -> dict[str, str]:
    """``{tied name: source name}`` from a meta-device copy of the model (parameters that are the same object)."""
    model = model if model is not None else _meta_model(config, model_class)
    if model is None:
        return {}
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def resolve_pretrained(path_or_hub_id, model_class=None):
    """``(config, concrete model class, SafetensorsSource)`` for a local folder or a hub id (offline from cache)."""
    from transformers import AutoConfig

    folder = _local_folder(path_or_hub_id)
    if (folder / MANIFEST).is_file() or is_pipeline_checkpoint(folder):
        return open_pipeline_checkpoint(folder, model_class=model_class)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; expected an HF model folder.")
    config = AutoConfig.from_pretrained(folder)
    if model_class is None:
        archs = getattr(config, "architectures", None) or [None]
        model_class = transformers_class(archs[0], f"config.architectures of {folder}")
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:
        model_class = mapping[type(config)]
    meta = _meta_model(config, model_class)
    source = SafetensorsSource(folder, dtype=_config_dtype(config),
                               base_model_prefix=getattr(model_class, "base_model_prefix", "") or "",
                               tied=_tied_map(config, model_class, meta), conversions=_conversions(meta))
    return config, model_class, source


# ------------------------------------------------------------------------------------------ pipeline checkpoints
def parse_dtype(value) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ``None`` / ``"auto"`` keep the source's."""
    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return None if value == "auto" else value
    key = str(value).lower().replace("torch.", "")
    if key not in DTYPES:
        raise CheckpointError(f"dtype {value!r} is not supported; use one of fp32, bf16, fp16 (or auto to keep the "
                              "source's dtype).")
    return DTYPES[key]


def layer_file(index: int) -> str:
    """DeepSpeed's name for a layer's weights (``PipelineModule.ckpt_layer_path`` without tensor parallelism)."""
    return f"layer_{index:02d}-model_states.pt"


def _saved_by_deepspeed(spec) -> bool:
    """DeepSpeed writes no file for a tied layer with a ``forward_fn`` (the tied LM head): it is a function call on
    the tied module, whose weights live in the file of the layer that builds it."""
    from deepspeed.pipe import TiedLayerSpec

    return not (isinstance(spec, TiedLayerSpec) and spec.forward_fn is not None)


def _build_layer(spec, builder):
    args = list(spec.module_args)
    args[0] = builder  # every hfpipe layer takes the builder first
    return spec.typename(*args, **spec.module_kwargs)


def saved_names(layer) -> dict[str, str]:
    """``{local name: HF name}`` of what a layer's ``state_dict`` holds (non-persistent buffers are never saved)."""
    keys = set(layer.state_dict().keys())
    return {local: hf for local, hf in layer.hf_names().items() if local in keys}


def meta_layers(builder, infos=None) -> list:
    """``(LayerInfo, meta layer or None)`` for every layer: names and shapes without allocating anything."""
    meta = copy.copy(builder)
    meta.source, meta.device = None, "meta"
    out = []
    for info in infos if infos is not None else builder.layers():
        out.append((info, _build_layer(info.spec, meta) if _saved_by_deepspeed(info.spec) else None))
    return out


def layer_list(infos) -> list[dict]:
    """The family's fixed layer list as the manifest records it."""
    return [{"index": i, "name": info.name, "kind": info.kind, "block": info.block, "part": info.part,
             "file": layer_file(i) if _saved_by_deepspeed(info.spec) else None} for i, info in enumerate(infos)]


def manifest_for(builder, infos, *, parts=None, partition_method=None, dtype=None, source=None, **extra) -> dict:
    from . import __version__

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
        **extra,
    }


def write_manifest(folder, builder, infos, **kwargs) -> dict:
    """Write ``hfpipe.json`` + ``config.json`` next to a pipeline checkpoint (what ``export`` needs)."""
    folder = Path(folder)
    manifest = manifest_for(builder, infos, **kwargs)
    config = copy.deepcopy(builder.adapter.config)
    config.architectures = [builder.adapter.model_class.__name__]
    config.save_pretrained(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _checkpoint_root_and_tag(path) -> tuple[Path, Path]:
    """``(root, tag folder)`` of a DeepSpeed pipeline checkpoint given its root (with ``latest``) or a tag folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; expected a pipeline checkpoint written by `hfpipe convert`, "
                              "PipelineTrainer or engine.save_checkpoint.")
    if any(path.glob("layer_*-model_states.pt")):
        return (path.parent if (path.parent / MANIFEST).is_file() or (path.parent / "latest").is_file() else path), path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not (path / tag).is_dir():
            raise CheckpointError(f"{latest} names tag {tag!r} but {path / tag} does not exist; the checkpoint is "
                                  "incomplete (was the save interrupted?).")
        return path, path / tag
    tags = [d for d in path.iterdir() if d.is_dir() and any(d.glob("layer_*-model_states.pt"))]
    if len(tags) == 1:
        return path, tags[0]
    raise CheckpointError(
        f"{path} is not a DeepSpeed pipeline checkpoint: no 'latest' file and "
        + (f"{len(tags)} tag folders ({', '.join(sorted(t.name for t in tags))}); pass one of them." if tags else
           "no layer_XX-model_states.pt files.") + " Expected the folder written by `hfpipe convert`, PipelineTrainer "
        "(checkpoint-N) or engine.save_checkpoint(dir).")


def is_pipeline_checkpoint(path) -> bool:
    try:
        _checkpoint_root_and_tag(path)
        return True
    except CheckpointError:
        return False


def read_manifest(root) -> dict | None:
    f = Path(root) / MANIFEST
    if not f.is_file():
        return None
    manifest = json.loads(f.read_text())
    if manifest.get("format") != FORMAT or int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{f} is not an hfpipe manifest of format version <= {FORMAT_VERSION} "
                              f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r}); "
                              "upgrade hfpipe.")
    return manifest


def check_manifest(manifest: dict, builder, infos, where) -> None:
    """Raise when a checkpoint's manifest describes another model than ``builder`` (family, class, layer list)."""
    a = builder.adapter
    if manifest["model_type"] != a.config.model_type:
        raise CheckpointError(f"{where} holds a {manifest['model_type']!r} model ({manifest['architecture']}) but the "
                              f"model is {a.config.model_type!r} ({a.model_class.__name__}); pass the matching model.")
    ours = [(d["name"], d["block"], d["part"]) for d in layer_list(infos)]
    theirs = [(d["name"], d["block"], d["part"]) for d in manifest["layers"]]
    if ours != theirs:
        raise CheckpointError(
            f"{where} has {len(theirs)} pipeline layers ({manifest['num_blocks']} blocks, {manifest['architecture']}) "
            f"but {a.model_class.__name__} with this config has {len(ours)} ({a.num_blocks} blocks); the checkpoint was "
            "written for another configuration. Use its config.json (the one next to the checkpoint).")


class PipelineCheckpointSource(_Names):
    """Weights read from a DeepSpeed pipeline checkpoint by HF name: only the layer files a rank asks for are opened
    (memory-mapped), so loading a stage reads only that stage's layers."""

    def __init__(self, builder, tag_dir, dtype: torch.dtype | None = None):
        self.tag_dir = Path(tag_dir)
        self.dtype = dtype
        a = builder.adapter
        self.base_model_prefix = a.base_prefix
        self.tied = _tied_map(a.config, a.model_class, a.meta_model)
        self.table: dict[str, tuple[str, str]] = {}
        for info, layer in meta_layers(builder):
            if layer is None:
                continue
            for local, hf in saved_names(layer).items():
                self.table.setdefault(hf, (layer_file(layer.index), local))
        self.bytes_read = 0
        self.names_read: list[str] = []
        self._files: dict[str, dict] = {}

    def keys(self):
        return self.table.keys()

    def load_file(self, file: str) -> dict:
        state = self._files.get(file)
        if state is None:
            path = self.tag_dir / file
            if not path.is_file():
                raise CheckpointError(f"{path} is missing; the checkpoint is incomplete (every layer has its own "
                                      "file). Re-run the conversion or the save.")
            state = self._files[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return state

    def get(self, name: str):
        key = self._resolve(name)
        if key is None:
            return None
        file, local = self.table[key]
        state = self.load_file(file)
        if local not in state:
            raise CheckpointError(f"{self.tag_dir / file} has no tensor {local!r} (HF name {key}); the checkpoint does "
                                  f"not match this model (found {sorted(state)[:4]}...).")
        tensor = state[local]
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.names_read.append(key)
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


def _builder_for_checkpoint(root: Path, model=None, model_class=None):
    """The (meta) builder of the model a checkpoint holds: from its manifest + config.json, or from ``model``."""
    from .pipeline import prepare

    manifest = read_manifest(root)
    if model is None:
        if not (root / "config.json").is_file():
            raise CheckpointError(f"{root} has no config.json / {MANIFEST}; pass the model it was trained from "
                                  "(model=... / --model FOLDER_OR_CONFIG) so hfpipe knows its layers.")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(root)
        if model_class is None:
            name = (manifest or {}).get("architecture") or (config.architectures or [None])[0]
            model_class = transformers_class(name, f"{root}/{MANIFEST} or config.json")
        model = config
    elif isinstance(model, (str, os.PathLike)) and Path(model).is_file():  # a config.json
        from transformers import AutoConfig

        model = AutoConfig.from_pretrained(model)
    if isinstance(model, (str, os.PathLike)):
        config, model_class, _ = resolve_pretrained(model, model_class)
        model = config
    builder = prepare(model, model_class)
    infos = builder.layers()
    if manifest is not None:
        check_manifest(manifest, builder, infos, root)
    return builder, infos, manifest


def open_pipeline_checkpoint(path, model=None, model_class=None, dtype=None):
    """``(config, model class, PipelineCheckpointSource)`` for a pipeline checkpoint folder (``to_pipeline(path)``)."""
    root, tag = _checkpoint_root_and_tag(path)
    builder, _, _ = _builder_for_checkpoint(root, model, model_class)
    a = builder.adapter
    return a.config, a.model_class, PipelineCheckpointSource(builder, tag, dtype=parse_dtype(dtype))


# --------------------------------------------------------------------------------------------------- writing
def _prepare_output(output_dir, overwrite: bool) -> tuple[Path, Path]:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} exists and is not a folder; choose another --output.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"output folder {out} is not empty; choose a new folder or pass --overwrite "
                              "(overwrite=True) to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return out, tmp


def _commit_output(tmp: Path, out: Path) -> None:
    """Swap the finished temporary folder in; the old folder (``--overwrite``) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
            overwrite: bool = False, tag: str = DEFAULT_TAG, seq_len: int | None = None, progress: bool = True) -> dict:
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

    from .pipeline import prepare, stage_parts

    target_dtype = parse_dtype(dtype)
    source_folder = None
    if isinstance(model, (str, os.PathLike)):
        source_folder = _local_folder(model)
    builder = prepare(model, model_class)
    source = builder.source
    if source is None:
        raise CheckpointError("convert needs weights: pass an HF model folder, a Hub id or a model instance, not a "
                              "bare config.")
    if isinstance(source, (SafetensorsSource, PipelineCheckpointSource)):
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
            if not _saved_by_deepspeed(spec):
                continue
            key = spec.key if isinstance(spec, TiedLayerSpec) else None
            if key is not None and key in tied_cache:
                state = tied_cache[key]
            else:
                layer = _build_layer(spec, builder)
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
           model_class=None, progress: bool = True) -> str:
    """Write a pipeline checkpoint as an HF folder that ``AutoModelFor<Task>.from_pretrained`` loads.

    ``checkpoint`` is a folder written by ``convert``, a ``PipelineTrainer`` ``checkpoint-N`` folder, or any
    ``engine.save_checkpoint`` folder (its ``latest`` tag, or a tag folder); without ``hfpipe.json`` / ``config.json``
    next to it, ``model`` (an HF folder or config.json) says which model it holds. Tied weights are written once, as
    ``save_pretrained`` does; ``dtype`` casts floating-point tensors. The folder appears only when complete.
    """
    from huggingface_hub import save_torch_state_dict

    root, tag = _checkpoint_root_and_tag(checkpoint)
    builder, infos, manifest = _builder_for_checkpoint(root, model, model_class)
    a = builder.adapter
    target_dtype = parse_dtype(dtype)
    source = PipelineCheckpointSource(builder, tag, dtype=target_dtype)
    tied, meta_model = source.tied, a.meta_model
    expected = [k for k in meta_model.state_dict() if k not in tied]
    have = [k for k in source.keys() if k not in tied]
    missing = sorted(set(expected) - set(have))
    extra = sorted(set(have) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{root}: the pipeline layers give no weight for {missing[:5]} and weights "
                              f"{extra[:5]} that {a.model_class.__name__} does not have; this is an hfpipe bug for "
                              "this family -- please report it.")
    out, tmp = _prepare_output(output_dir, overwrite)
    try:
        state = {}
        for name in _progress(expected, "export", progress, unit="tensor"):
            state[name] = source.get(name).contiguous()
        floats = {t.dtype for t in state.values() if t.is_floating_point()}  # after the cast, if any
        state = _to_checkpoint_names(meta_model, state)
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        del state
        config = copy.deepcopy(a.config)
        config.architectures = [a.model_class.__name__]
        if len(floats) == 1:
            config.dtype = str(floats.pop()).replace("torch.", "")
        config.save_pretrained(tmp)
        _copy_side_files(root, tmp)
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
