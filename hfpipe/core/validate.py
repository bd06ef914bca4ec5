"""Checks of model files and weights that run before anything trusts them.

``safetensors`` itself refuses a corrupt header but maps a truncated file until a read past its end fails (or, with
the header intact and bytes damaged, reads garbage that may be NaN); transformers reads a malformed ``config.json``
with a raw ``JSONDecodeError``. These checks turn each into one line naming the file, what is wrong and the fix, and
they are cheap: the header and file size only, or one ``isfinite`` pass over tensors that are being copied anyway.
Written by hand because neither library offers a "validate this file" call.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch

#: bytes per element of each safetensors dtype code
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class ModelFileError(ValueError):
    """A model file (safetensors, config.json) that cannot be what it claims; the message names the file and fix."""


class NonFiniteError(ValueError):
    """Weights or a loss holding NaN or Inf where a finite value is required."""


def check_safetensors(path: str | os.PathLike) -> dict:
    """The header of the safetensors file ``path``, after checking that it parses and that every tensor's byte range
    fits its dtype x shape and lies inside the file (a truncated download or copy fails here, not mid-load)."""
    path = Path(path)
    size = path.stat().st_size
    fix = "download or copy the file again"
    if size < 8:
        raise ModelFileError(f"{path}: {size} bytes is too short for a safetensors file (8-byte header length "
                             f"first); {fix}.")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(_MAX_HEADER, size - 8):
            raise ModelFileError(f"{path}: the header claims {n} bytes but the file has {size - 8} after the length "
                                 f"field; the file is truncated or not safetensors; {fix}.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{path}: the safetensors header is not valid JSON ({type(exc).__name__}); the file "
                                 f"is damaged; {fix}.") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: the safetensors header is a {type(header).__name__}, not a mapping; {fix}.")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            count = 1
            for d in info["shape"]:
                count *= int(d)
            want = count * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path}: tensor {name!r} has a malformed header entry {info!r}; {fix}.") from None
        if stop - start != want:
            raise ModelFileError(f"{path}: tensor {name!r} ({info['dtype']} {info['shape']}) needs {want} bytes but "
                                 f"its header gives {stop - start}; the file is damaged; {fix}.")
        if stop > data:
            raise ModelFileError(f"{path}: tensor {name!r} ends at byte {stop} of the data but the file holds "
                                 f"{data}; the file is truncated; {fix}.")
    return header


def read_config_json(path: str | os.PathLike) -> dict:
    """``config.json`` as a dict, or one error line naming the file and the JSON problem."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); fix or "
                             "replace the file (it is the model's config).") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: expected a JSON object of model settings, got a {type(value).__name__}; fix "
                             "or replace the file.")
    return value


def nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int]]:
    """``(name, number of NaN/Inf entries)`` for each floating-point tensor of ``named`` that has any."""
    bad = []
    for name, t in named:
        if t is not None and t.is_floating_point() and t.device.type != "meta":
            n = int((~torch.isfinite(t.detach())).sum())
            if n:
                bad.append((name, n))
    return bad


def check_finite(named: Iterable[tuple[str, torch.Tensor]], where: str, *, fix: str) -> None:
    """Raise :class:`NonFiniteError` naming the first tensors of ``named`` that hold NaN or Inf."""
    bad = nonfinite(named)
    if bad:
        shown = ", ".join(f"{n} ({k} value{'s' if k > 1 else ''})" for n, k in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3
                                                                      else "")
        raise NonFiniteError(f"{where}: non-finite weights (NaN/Inf) in {shown}; {fix}.")
