"""Checkpoints: lazy, stage-local reading of HF safetensors checkpoints.

``resolve_pretrained`` turns a local folder or a hub id into ``(config, model class, source)``. The source opens the
safetensors files lazily with ``safe_open`` and reads only the tensors a rank asks for, so each pipeline stage reads
only its own layers (``bytes_read`` counts what was read).

Status: ``convert`` / ``export`` (issue 4, items 2-5) are not written yet.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing files or does not match the model."""


class SafetensorsSource:
    """Weights read lazily from ``model.safetensors`` or a sharded ``model.safetensors.index.json``.

    ``get(hf_name)`` returns the tensor (cast to ``dtype`` when given) or ``None``. Names are tried as given, then with
    the model's ``base_model_prefix`` added or removed (a ``BertModel`` checkpoint loaded for a task model and the
    reverse), then through the model's tied weights (HF omits ``lm_head.weight`` when it is tied to the embedding).
    """

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype | None = None, base_model_prefix: str = "",
                 tied: dict[str, str] | None = None):
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

    def keys(self):
        return self.weight_map.keys()

    def _resolve(self, name: str) -> str | None:
        candidates = [name]
        p = self.base_model_prefix
        if p:
            candidates.append(name[len(p) + 1:] if name.startswith(p + ".") else f"{p}.{name}")
        if name in self.tied:
            candidates.append(self.tied[name])
        for c in candidates:
            if c in self.weight_map:
                return c
        return None

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
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # offline and not cached, unknown repo, ...
        raise CheckpointError(
            f"could not resolve {path_or_hub_id!s} as a local folder or a cached hub model ({type(e).__name__}: {e}). "
            "Fix: pass a folder saved with save_pretrained, or download the model first."
        ) from e


def _config_dtype(config):
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None) if dt != "auto" else None
    return dt if isinstance(dt, torch.dtype) else None


def _tied_map(config, model_class) -> dict[str, str]:
    """``{tied name: source name}`` from a meta-device copy of the model (parameters that are the same object)."""
    try:
        with torch.device("meta"):
            model = model_class(config)
    except Exception:
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
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; expected an HF model folder.")
    config = AutoConfig.from_pretrained(folder)
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        if not archs:
            raise CheckpointError(f"{folder}/config.json has no 'architectures'; pass model_class=.")
        import transformers

        model_class = getattr(transformers, archs[0], None)
        if model_class is None:
            raise CheckpointError(f"transformers has no class {archs[0]!r} (config.architectures of {folder}).")
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:
        model_class = mapping[type(config)]
    source = SafetensorsSource(folder, dtype=_config_dtype(config),
                               base_model_prefix=getattr(model_class, "base_model_prefix", "") or "",
                               tied=_tied_map(config, model_class))
    return config, model_class, source
