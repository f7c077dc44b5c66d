"""Tensors from files: example inputs, calibration and training tensors, safetensors weights.

Every reader opens regular files only, never unpickles anything but tensors (``weights_only``), and
refuses tensors that claim more data than the file holds (:func:`check_tensor_sizes`), so a small file
can never fill memory.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import regular_file

ExampleInputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def damaged(path: Path, err: Exception) -> CompressorError:
    """The one-line error for a file a library failed to parse."""
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return CompressorError(f"could not read '{path}': it is truncated or corrupt ({first})",
                           "save or copy the file again")


def check_tensor_sizes(path: Path, named) -> None:
    """Refuse tensors that claim more data than the file holds.

    A tensor is a view of a storage; one whose shape needs more elements than its storage has (stride 0,
    as ``torch.zeros(1).expand(20000, 20000)`` saves: 1.5 KB on disk, 1.6 GB once copied) or views that
    together cover far more than all storages would blow up memory the first time anything copies them.
    """
    storages: dict[int, int] = {}
    views: dict[tuple, int] = {}
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.is_meta or t.numel() == 0:
            continue
        nbytes, held = t.numel() * t.element_size(), t.untyped_storage().nbytes()
        if nbytes > held - t.storage_offset() * t.element_size():
            raise CompressorError(f"'{path}' holds tensor '{name}' of shape {list(t.shape)} "
                                  f"({nbytes:,} bytes) stored in only {held:,} bytes (an expanded or "
                                  "overlapping view), which would fill memory when copied",
                                  "save real weights: torch.save({k: v.contiguous() ...}) from a model you trust")
        storages[t.untyped_storage().data_ptr()] = held
        views[(t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)] = nbytes
    if sum(views.values()) > 2 * sum(storages.values()) + (1 << 20):
        raise CompressorError(f"'{path}' holds {len(views)} tensors that view the same data many times "
                              f"over ({sum(views.values()):,} bytes from {sum(storages.values()):,} stored)",
                              "save each weight once, as a model's state_dict does")


def load_safetensors(path: Path, device=None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, its header checked against the file before the library reads it."""
    size = regular_file(path, "weights file").stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            raw = f.read(min(n, SAFETENSORS_MAX_HEADER))
    except OSError as err:
        raise CompressorError(f"cannot read '{path}' ({err.strerror})",
                              "check the file's permissions, or save or copy it again") from None
    try:
        header = json.loads(raw)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        raise CompressorError(f"'{path}' is a damaged safetensors file (its header is cut off or not "
                              "valid JSON)", "the file is truncated or corrupt: save or copy it again"
                              ) from None
    if 8 + n + end > size:
        raise CompressorError(f"'{path}' is a truncated safetensors file ({size} bytes, header says "
                              f"{8 + n + end})", "save or copy the file again")
    from safetensors.torch import load_file
    try:
        tensors = load_file(path, device=str(device) if device is not None else "cpu")
    except Exception as err:
        raise damaged(path, err) from None
    if not tensors:
        raise CompressorError(f"'{path}' is a safetensors file with no tensors", "pass the model's weights")
    return tensors


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` -> ``(1, 3, 224, 224)``."""
    parts = str(text).strip().lower().split("x")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise CompressorError(f"input shape '{text}' is not sizes joined by 'x'",
                              "write it like 1x3x224x224 (positive whole numbers)")
    return tuple(int(p) for p in parts)


def load_example_inputs(path: str | Path) -> ExampleInputs:
    """Example inputs from a ``.pt`` (weights-only), ``.npz``/``.npy`` or ``.safetensors`` file: a tensor,
    a tuple of tensors, or a dict of named tensors (``arr_0``, ``arr_1``, ... or ``0``, ``1``, ...
    become a tuple, in order)."""
    path = regular_file(path, "example inputs file")
    if path.stat().st_size == 0:
        raise CompressorError(f"example inputs file '{path}' is empty", "check the path")
    with open(path, "rb") as f:
        head = f.read(9)
    import numpy as np
    try:
        if head[:6] == b"\x93NUMPY":
            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        elif head[:4] == b"PK\x03\x04" and _is_npz(path):
            with np.load(path, allow_pickle=False) as arrays:
                obj = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
        elif head[:4] == b"PK\x03\x04":
            obj = torch.load(path, weights_only=True,
                             map_location=None if torch.cuda.is_available() else "cpu")
        elif head[8:9] == b"{":
            obj = load_safetensors(path)
        else:
            raise CompressorError(f"example inputs file '{path}' is not a .pt, .npz or .safetensors file",
                                  "save the inputs with torch.save, numpy.savez or safetensors")
    except CompressorError:
        raise
    except Exception as err:
        raise CompressorError(f"could not read example inputs from '{path}' ({str(err)[:160]})",
                              "save them with torch.save (tensors only), numpy.savez or safetensors"
                              ) from None
    example = _as_example(obj, path)
    tensors = (example.items() if isinstance(example, dict) else
               [("0", example)] if isinstance(example, torch.Tensor) else enumerate(example))
    check_tensor_sizes(path, ((str(k), t) for k, t in tensors))  # a stride-0 input is copied by export
    return example


def _is_npz(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return all(n.endswith(".npy") for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _as_example(obj: Any, path: Path) -> ExampleInputs:
    bad = CompressorError(f"example inputs in '{path}' are not a tensor, a list/tuple of tensors or a dict "
                          "of named tensors", "save e.g. torch.save((x,), 'inputs.pt')")
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return tuple(obj)
    if isinstance(obj, dict) and obj and all(isinstance(t, torch.Tensor) for t in obj.values()):
        keys = list(obj)
        for prefix in ("arr_", ""):
            if keys == [f"{prefix}{i}" for i in range(len(keys))]:
                return obj[keys[0]] if len(keys) == 1 else tuple(obj[k] for k in keys)
        return dict(obj)
    raise bad


def split_inputs(example: ExampleInputs) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """``(args, kwargs)`` to call a model with: ``model(*args, **kwargs)``."""
    if isinstance(example, dict):
        return (), dict(example)
    return (example,) if isinstance(example, torch.Tensor) else tuple(example), {}
