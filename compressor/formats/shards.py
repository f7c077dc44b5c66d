"""Safetensors checkpoints read tensor by tensor and written shard by shard, never held whole.

    ckpt = Checkpoint.open("llama-folder")        # a file, or a folder with model.safetensors.index.json
    w = ckpt.tensor("model.layers.0.mlp.up_proj.weight")   # read through a memory map, this tensor only

A sharded Hugging Face folder names its shards in ``model.safetensors.index.json`` (``weight_map``: tensor
name -> shard file); a folder with one ``model.safetensors`` or a single ``.safetensors`` file is one shard.
:class:`ShardWriter` writes tensors in the order given into shards of at most ``max_bytes`` each plus the
same kind of index; each shard is written atomically, one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_file, atomic_write_text, file_in_folder, regular_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' max_shard_size: shards are written a tensor at a time


@dataclass
class TensorInfo:
    """Where one tensor lies and what it is, read from the shard's header (no data read)."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Checkpoint:
    """The tensors of a safetensors checkpoint, by name, in the order of its files and their headers."""

    path: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Read the headers of a ``.safetensors`` file or of every shard of a model folder."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            index = path / INDEX
            if index.is_file():
                files = index_files(path, index)[0]
            elif (path / SINGLE).is_file():
                files = [file_in_folder(path, path / SINGLE, "checkpoint shard")]
            else:
                raise CompressorError(f"folder '{path}' has neither {INDEX} nor {SINGLE}",
                                      "pass a safetensors file or a Hugging Face folder of safetensors shards")
        else:
            files = [regular_file(path, "model file")]
        ckpt = cls(path, files=files)
        for f in files:
            try:
                with safe_open(f, framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                        sl = handle.get_slice(name)
                        if name in ckpt.tensors:
                            raise CompressorError(f"tensor '{name}' is stored twice ({ckpt.tensors[name].file.name} "
                                                  f"and {f.name})", "repair or re-download the checkpoint")
                        ckpt.tensors[name] = TensorInfo(name, f, tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])
            except CompressorError:
                raise
            except Exception as err:  # safetensors raises its own error types for a damaged header
                raise CompressorError(f"'{f}' is not a readable safetensors file ({str(err)[:120]})",
                                      "repair or re-download the checkpoint") from None
        return ckpt

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``, copied out of the memory-mapped file (only its own bytes are read)."""
        from safetensors import safe_open

        with safe_open(self.tensors[name].file, framework="pt") as handle:
            return handle.get_tensor(name)

    def fingerprint(self) -> str:
        """Identifies the checkpoint's content: a SHA-256 of every byte of every file (read in chunks, never
        whole), with the file names. A byte changed in place with size and mtime restored is detected;
        the cost is one read of the checkpoint (53 s for 13.48 GB on a busy machine here:
        benchmarks/results/streaming.md)."""
        h = hashlib.sha256()
        for f in self.files:
            with open(f, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            h.update(f"{f.name}\0{digest}\0".encode())
        return h.hexdigest()


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def index_files(folder: Path, index: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files a safetensors index names (each a file in ``folder``), and its ``weight_map``."""
    try:
        data = json.loads(regular_file(index, "checkpoint index").read_text())
        weight_map = data["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CompressorError(f"'{index}' is not a safetensors index (no \"weight_map\")",
                              "repair or re-download the checkpoint") from None
    files = []
    for name in names:
        if Path(name).name != name or not (folder / name).exists():
            raise CompressorError(f"'{index}' names the shard '{name}', which is not a file in the folder",
                                  "repair or re-download the checkpoint")
        files.append(file_in_folder(folder, folder / name, "checkpoint shard"))  # no link out, no FIFO
    return files, weight_map


_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class ShardWriter:
    """Tensors planned in order (name, shape, dtype and how to load them), then written into
    ``model-0000i-of-0000N.safetensors`` shards of at most ``max_bytes`` (a larger tensor gets a shard of
    its own) and ``model.safetensors.index.json`` in ``folder``; a single shard is ``model.safetensors``.

    Each shard is written as the safetensors format lays it out (header, then the tensors' bytes) one
    tensor at a time: only one tensor is in memory at once, whatever the shard size.
    """

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.shards: list[list[_Planned]] = []
        self.total = 0
        self._size = 0

    def add(self, name: str, shape: Iterable[int], dtype: torch.dtype, load: Callable[[], torch.Tensor]) -> None:
        """Plan one tensor; ``load()`` is called when its shard is written."""
        item = _Planned(name, tuple(shape), dtype, load)
        if not self.shards or (self._size and self._size + item.nbytes > self.max_bytes):
            self.shards.append([])
            self._size = 0
        self.shards[-1].append(item)
        self._size += item.nbytes
        self.total += item.nbytes

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Plan a tensor already in memory (it is held until written)."""
        self.add(name, tensor.shape, tensor.dtype, lambda: tensor)

    def close(self) -> list[Path]:
        """Write every shard (each atomically) and the index; returns the files written."""
        n = len(self.shards)
        if n <= 1:
            path = self.folder / SINGLE
            _write_safetensors(path, self.shards[0] if self.shards else [])
            return [path]
        weight_map, out = {}, []
        for i, items in enumerate(self.shards, 1):
            path = self.folder / f"model-{i:05d}-of-{n:05d}.safetensors"
            _write_safetensors(path, items)
            out.append(path)
            weight_map.update(dict.fromkeys((it.name for it in items), path.name))
        atomic_write_text(self.folder / INDEX, json.dumps({"metadata": {"total_size": self.total},
                                                           "weight_map": weight_map}, indent=2) + "\n")
        return [*out, self.folder / INDEX]


def _write_safetensors(path: Path, items: list[_Planned]) -> None:
    """A safetensors file written tensor by tensor: the header (8-byte length, JSON padded to 8 bytes)
    from the planned shapes, then each tensor's bytes as it is loaded (checked against its plan)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for it in items:
        header[it.name] = {"dtype": _NAMES[it.dtype], "shape": list(it.shape),
                           "data_offsets": [offset, offset + it.nbytes]}
        offset += it.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for it in items:
            t = it.load()
            if tuple(t.shape) != it.shape or t.dtype != it.dtype:
                raise ValueError(f"tensor '{it.name}' is {t.dtype} {list(t.shape)}, planned as "
                                 f"{it.dtype} {list(it.shape)}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
