"""Safetensors checkpoints read tensor by tensor and written shard by shard, never held whole.

    ckpt = Checkpoint.open("llama-folder")        # a file, or a folder with model.safetensors.index.json
    w = ckpt.tensor("model.layers.0.mlp.up_proj.weight")   # read through a memory map, this tensor only

A sharded Hugging Face folder names its shards in ``model.safetensors.index.json`` (``weight_map``: tensor
name -> shard file); a folder with one ``model.safetensors`` or a single ``.safetensors`` file is one shard.
:class:`ShardWriter` writes tensors in the order given into shards of at most ``max_bytes`` each plus the
same kind of index; each shard is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_file, atomic_write_text, regular_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Output shards of at most 1 GiB: a shard's tensors are held until it is written, so this bounds the
# rewrite's memory (transformers' own default, 5 GB, would exceed a 4 GiB budget by itself).
DEFAULT_SHARD_BYTES = 2**30


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
                files = _index_files(path, index)
            elif (path / SINGLE).is_file():
                files = [path / SINGLE]
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
        """Identifies the checkpoint's content cheaply: each file's name, size, modification time and
        header (names, dtypes, shapes, offsets). Reading every byte of a 13 GB checkpoint would take
        minutes; a file rewritten in place with the same header, size and mtime is not detected."""
        h = hashlib.sha256()
        for f in self.files:
            st = os.stat(f)
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = fh.read(n)
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode() + header)
        return h.hexdigest()


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _index_files(folder: Path, index: Path) -> list[Path]:
    try:
        data = json.loads(regular_file(index, "checkpoint index").read_text())
        weight_map = data["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CompressorError(f"'{index}' is not a safetensors index (no \"weight_map\")",
                              "repair or re-download the checkpoint") from None
    files = []
    for name in names:
        f = folder / name
        if Path(name).name != name or not f.is_file():
            raise CompressorError(f"'{index}' names the shard '{name}', which is not a file in the folder",
                                  "repair or re-download the checkpoint")
        files.append(f)
    return files


class ShardWriter:
    """Tensors written in order into ``model-0000i-of-0000N.safetensors`` shards of at most ``max_bytes``
    (a larger tensor gets a shard of its own) and ``model.safetensors.index.json``, in ``folder``.

    The shard count is known only at the end, so shards are written as ``model-0000i.safetensors`` and
    renamed by :meth:`close`; a single shard becomes ``model.safetensors`` with no index.
    """

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def add_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, t in tensors:
            self.add(name, t)

    def flush(self) -> None:
        """Write the tensors added so far as the next shard, durably, and let them go."""
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.folder / f"model-{len(self.shards) + 1:05d}.safetensors"
        with atomic_file(path) as tmp:
            save_file(self.pending, str(tmp), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, give the shards their final names and write the index; returns the files written."""
        self.flush()
        n = len(self.shards)
        if n == 1:
            final = self.folder / SINGLE
            os.replace(self.shards[0][0], final)
            return [final]
        weight_map, out = {}, []
        for i, (path, names) in enumerate(self.shards, 1):
            final = self.folder / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            out.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        atomic_write_text(self.folder / INDEX, json.dumps({"metadata": {"total_size": self.total},
                                                           "weight_map": weight_map}, indent=2) + "\n")
        return [*out, self.folder / INDEX]
