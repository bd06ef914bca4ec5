"""Every weight source a pipeline layer loads from, each read by HF name and only for the tensors a rank asks for.

* :class:`StateDictSource`: an HF model the user already holds.
* :class:`SafetensorsSource`: an HF folder / Hub id; ``safe_open`` reads only the tensors a stage needs.
* :class:`PipelineCheckpointSource`: a DeepSpeed pipeline checkpoint (``hfpipe convert``, a trainer
  ``checkpoint-N``, ``engine.save_checkpoint``): only the layer files a stage owns are opened, memory-mapped.

``resolve_pretrained`` turns a folder or Hub id into ``(config, model class, source)``. Layer files are indexed by
the family's fixed layer list (``PipelineBuilder.layers()``), which never depends on the stage count, so a
checkpoint written at one stage count loads at any other; the HF name of every tensor comes from the layers' own
``hf_names()`` table, shared with loading, gradient checks and export. A source learns the model it serves through
``bind(builder)`` (the checkpoint source builds its name table there), so nothing here imports the builder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from hfpipe.core.validate import ModelFileError, check_safetensors, read_config_json

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
MANIFEST = "hfpipe.json"
FORMAT = "hfpipe-pipeline-checkpoint"
FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint folder is missing files or does not match the model."""


# ------------------------------------------------------------------------------------------- atomic folders
def prepare_output(output_dir, overwrite: bool) -> tuple[Path, Path]:
    """``(output folder, fresh temporary folder beside it)``; a non-empty output without ``overwrite`` is an error."""
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


def commit_output(tmp: Path, out: Path) -> None:
    """Swap the finished temporary folder in; the old folder (``--overwrite``) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(output_dir, overwrite: bool = False):
    """Yield a temporary folder to fill; it becomes ``output_dir`` only when the block ends without an error
    (temp + rename: nothing half-written on failure). Written by hand: neither ``huggingface_hub`` nor
    ``safetensors`` offers a folder-level atomic write."""
    out, tmp = prepare_output(output_dir, overwrite)
    try:
        yield tmp
        commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class WeightSource:
    """A source of weights by HF name. Resolution shared by the sources: the name as given, then with the model's
    ``base_model_prefix`` added or removed, then through the model's tied weights. ``dtype`` (when set) is the dtype
    ``get`` returns floating-point tensors in, and the dtype layers are allocated in."""

    dtype: torch.dtype | None = None

    base_model_prefix = ""
    tied: dict[str, str] = {}
    aliases: dict[str, str] = {}  # model name -> stored name (transformers' load-time renamings)

    def keys(self):
        """The stored names."""
        raise NotImplementedError

    def get(self, name: str):
        """The tensor stored for HF name ``name`` (cast to ``dtype``), or ``None``."""
        raise NotImplementedError

    def bind(self, builder) -> "WeightSource":
        """Called once with the model's builder before any layer loads; sources that need the layer list use it."""
        return self

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None and tensor.is_floating_point():
            return tensor.to(self.dtype)
        return tensor

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



class StateDictSource(WeightSource):
    """Weights from an in-memory state dict (an HF model the user already holds)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.state_dict = state_dict

    def keys(self):
        return self.state_dict.keys()

    def _resolve(self, name: str) -> str | None:
        return name if name in self.state_dict else None

    def get(self, name: str):
        tensor = self.state_dict.get(name)
        return None if tensor is None else self._cast(tensor)


class SafetensorsSource(WeightSource):
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
            try:
                self.weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ModelFileError(f"{index} is not a safetensors index (JSON with a \"weight_map\"); the folder is "
                                     "damaged: download or save the model again.") from None
            for shard in sorted(set(self.weight_map.values())):
                if not (self.folder / shard).is_file():
                    raise ModelFileError(f"{self.folder / shard} is missing (listed in {SAFE_INDEX}); the folder is "
                                         "incomplete: download or save the model again.")
                check_safetensors(self.folder / shard)
        elif single.is_file():
            self.weight_map = {k: SAFE_SINGLE for k in check_safetensors(single) if k != "__metadata__"}
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
        return self._cast(tensor)

    def __getstate__(self):  # safe_open handles are not picklable; reopen lazily
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def local_folder(path_or_hub_id) -> Path:
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


def tied_map(config, model_class, model=None) -> dict[str, str]:
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

    folder = local_folder(path_or_hub_id)
    if (folder / MANIFEST).is_file() or is_pipeline_checkpoint(folder):
        return open_pipeline_checkpoint(folder, model_class=model_class)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; expected an HF model folder.")
    read_config_json(folder / "config.json")  # one line for a malformed file, not a JSONDecodeError
    config = AutoConfig.from_pretrained(folder)
    if model_class is None:
        archs = getattr(config, "architectures", None) or [None]
        model_class = transformers_class(archs[0], f"config.architectures of {folder}")
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:
        if type(config) not in mapping:
            from hfpipe.core.meta import no_model_for_config

            raise no_model_for_config(config, model_class)
        model_class = mapping[type(config)]
    meta = _meta_model(config, model_class)
    source = SafetensorsSource(folder, dtype=_config_dtype(config),
                               base_model_prefix=getattr(model_class, "base_model_prefix", "") or "",
                               tied=tied_map(config, model_class, meta), conversions=_conversions(meta))
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


def saved_by_deepspeed(spec) -> bool:
    """DeepSpeed writes no file for a tied layer with a ``forward_fn`` (the tied LM head): it is a function call on
    the tied module, whose weights live in the file of the layer that builds it."""
    from deepspeed.pipe import TiedLayerSpec

    return not (isinstance(spec, TiedLayerSpec) and spec.forward_fn is not None)


def build_layer(spec, builder):
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
        out.append((info, build_layer(info.spec, meta) if saved_by_deepspeed(info.spec) else None))
    return out


def layer_list(infos) -> list[dict]:
    """The family's fixed layer list as the manifest records it."""
    return [{"index": i, "name": info.name, "kind": info.kind.value, "block": info.block, "part": info.part,
             "file": layer_file(i) if saved_by_deepspeed(info.spec) else None} for i, info in enumerate(infos)]


def checkpoint_root_and_tag(path) -> tuple[Path, Path]:
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
        checkpoint_root_and_tag(path)
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


class PipelineCheckpointSource(WeightSource):
    """Weights read from a DeepSpeed pipeline checkpoint by HF name: only the layer files a rank asks for are opened
    (memory-mapped), so loading a stage reads only that stage's layers."""

    def __init__(self, tag_dir, dtype: torch.dtype | None = None, manifest: dict | None = None, where=None):
        self.tag_dir = Path(tag_dir)
        self.dtype = dtype
        self.manifest, self.where = manifest, where
        self.table: dict[str, tuple[str, str]] = {}
        self.shapes: dict[str, tuple | None] = {}
        self.bytes_read = 0
        self.names_read: list[str] = []
        self._files: dict[str, dict] = {}

    def bind(self, builder) -> "PipelineCheckpointSource":
        """Index the layer files by HF name for ``builder``'s model (and check the manifest describes it)."""
        a = builder.adapter
        if self.manifest is not None and (self.manifest.get("lora") or {}).get("adapter_only"):
            where = self.where or self.tag_dir
            raise CheckpointError(f"{where} is a LoRA checkpoint: it holds the adapter only, not the frozen base "
                                  f"({self.manifest['lora'].get('base_model')!r}). Fix: `hfpipe export {where} "
                                  "--output ADAPTER` and to_pipeline(BASE, peft_adapter=ADAPTER), or resume the run "
                                  "with --resume_from_checkpoint.")
        if self.manifest is not None:
            check_manifest(self.manifest, builder, builder.layers(), self.where or self.tag_dir)
        self.base_model_prefix = a.base_prefix
        self.tied = tied_map(a.config, a.model_class, a.meta_model)
        self.table, self.shapes = {}, {}
        for _, layer in meta_layers(builder):
            if layer is None:
                continue
            shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
            for local, hf in saved_names(layer).items():
                self.table.setdefault(hf, (layer_file(layer.index), local))
                self.shapes.setdefault(hf, shapes.get(local))
        return self

    def keys(self):
        return self.table.keys()

    def load_file(self, file: str) -> dict:
        state = self._files.get(file)
        if state is None:
            path = self.tag_dir / file
            if not path.is_file():
                raise CheckpointError(f"{path} is missing; the checkpoint is incomplete (every layer has its own "
                                      "file). Re-run the conversion or the save.")
            try:
                state = self._files[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except (RuntimeError, EOFError, ValueError) as exc:  # truncated or damaged: torch's zip reader fails
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0].rstrip(".")
                raise CheckpointError(f"{path} cannot be read ({first}); the file is truncated or damaged. Re-run "
                                      "the conversion or the save, or use an earlier checkpoint.") from None
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
        want = self.shapes.get(key)
        if want is not None and tuple(tensor.shape) != want:
            raise CheckpointError(f"{self.tag_dir / file}: {key} has shape {list(tensor.shape)} but the model expects "
                                  f"{list(want)}; the checkpoint was written for another configuration. Use its "
                                  "config.json (the one next to the checkpoint).")
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.names_read.append(key)
        return self._cast(tensor)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


def checkpoint_config(root: Path, manifest: dict | None, model_class=None):
    """``(config, model class)`` of the model a pipeline checkpoint holds, from its ``config.json`` and manifest."""
    from transformers import AutoConfig

    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root} has no config.json / {MANIFEST}; pass the model it was trained from "
                              "(model=... / --model FOLDER_OR_CONFIG) so hfpipe knows its layers.")
    config = AutoConfig.from_pretrained(root)
    if model_class is None:
        name = (manifest or {}).get("architecture") or (config.architectures or [None])[0]
        model_class = transformers_class(name, f"{root}/{MANIFEST} or config.json")
    return config, model_class


def open_pipeline_checkpoint(path, model_class=None, dtype=None):
    """``(config, model class, PipelineCheckpointSource)`` for a pipeline checkpoint folder (``to_pipeline(path)``);
    the source checks the manifest against the model when it is bound."""
    root, tag = checkpoint_root_and_tag(path)
    manifest = read_manifest(root)
    config, model_class = checkpoint_config(root, manifest, model_class)
    return config, model_class, PipelineCheckpointSource(tag, dtype=parse_dtype(dtype), manifest=manifest, where=root)
