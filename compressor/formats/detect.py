"""What a model path holds, read from its content (never the extension), and the file names of compressor's own
folders (written by :mod:`compressor.formats.save`, read by :mod:`compressor.formats.compressed`).

Only regular files are opened (a FIFO would block forever); a zip archive with compressed or oversized members
(a zip bomb: torch stores its members uncompressed) or failing checksums is refused before torch reads it.
"""

from __future__ import annotations

import os
import pickletools
import stat
import zipfile
from pathlib import Path

from compressor.core.errors import CompressorError
from compressor.core.fileio import regular_file
from compressor.data.readers import SAFETENSORS_MAX_HEADER
from compressor.formats.onnx_graph import is_onnx

# The files of compressor's own folders (written by compressor.formats.save, read by compressor.formats.compressed).
FORMAT = "compressor-model"
VERSION = 1
WEIGHTS, PLAN, META, STRUCTURE = "model.safetensors", "plan.json", "compressor.json", "model.pt"
INDEX = "model.safetensors.index.json"  # a Hugging Face folder's weights as shards (compress --stream)

# What load_model reports as Loaded.format.
FORMATS = ("torch-module", "state-dict", "safetensors", "hf-folder", "gguf", "compressor", "torch-export", "onnx")
GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file (llama.cpp's gguf spec)
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 (non-zip) torch.save file


def detect_format(path: Path) -> str:
    """"compressor", "hf-folder", "torch-zip", "torch-legacy", "pickle", "torch-export", "safetensors" or
    "gguf", read from the content; anything else raises :class:`CompressorError`."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CompressorError(f"'{path}' does not exist", "check the path") from None
    except OSError as err:  # a symlink loop, a path through a file, no permission
        raise CompressorError(f"'{path}' cannot be read ({err.strerror})", "check the path") from None
    if stat.S_ISDIR(mode):
        check_folder(path)
        if (path / META).is_file():
            return "compressor"
        if (path / "config.json").is_file():
            return "hf-folder"
        if (path / PLAN).is_file() and ((path / WEIGHTS).is_file() or (path / INDEX).is_file()):
            raise CompressorError(f"folder '{path}' holds only weights and their plan (compress --stream of a bare "
                                  ".safetensors), not a model", "load them into your own module with "
                                  "compressor.load_into(folder, model)")
        raise CompressorError(f"folder '{path}' is neither a Hugging Face model (config.json + "
                              "*.safetensors) nor a folder written by compressor (compressor.json)",
                              "pass a model file, a Hugging Face model folder or a `compress` output folder")
    size = regular_file(path, "model file").stat().st_size
    if size == 0:
        raise CompressorError(f"'{path}' is empty (0 bytes)",
                              "pass the model file itself; it may have been cut off while copying")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return _zip_format(path)
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    if head[:1] == b"\x80":  # pickle protocol 2+
        return "torch-legacy" if _is_torch_legacy(path) else "pickle"
    header_len = int.from_bytes(head[:8], "little")
    if len(head) == 9 and head[8:9] == b"{" and 2 <= header_len <= SAFETENSORS_MAX_HEADER:
        return "safetensors"
    if is_onnx(path):  # `compress` itself sends ONNX files elsewhere: this is another command
        raise CompressorError(f"'{path}' is an ONNX model, which only `compress MODEL.onnx` (and its analyze "
                              "and apply) take", "compress it with: compress MODEL.onnx --energy 0.9")
    what = ("a text/JSON file" if head.lstrip()[:1] in (b"{", b"[")
            else "not a model file (not a torch checkpoint, safetensors file or model folder)")
    raise CompressorError(f"'{path}' is {what}",
                          "pass a file written by torch.save or safetensors, a GGUF file or a Hugging Face model "
                          "folder")


def check_folder(path: Path) -> None:
    """Refuse a model folder holding an entry that is not a regular file or folder (a FIFO would block
    the first read forever, a device never end) or a link that leads nowhere (a loop, a dangling link)."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as err:
        raise CompressorError(f"folder '{path}' cannot be read ({err.strerror})", "check the path") from None
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode
        except OSError as err:
            raise CompressorError(f"'{entry.path}' in the model folder cannot be read ({err.strerror}: a "
                                  "broken or looping link?)", "repair or re-download the model folder") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            regular_file(entry.path, "the model folder's file")  # raises, naming what it is


def _zip_format(path: Path) -> str:
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            # torch stores members uncompressed, so no member can be larger than the archive: a
            # compressed or oversized one is a zip bomb (testzip would inflate it all).
            odd = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED or i.file_size > size]
            if odd:
                raise CompressorError(f"'{path}' is a zip archive with {len(odd)} compressed or oversized "
                                      f"member(s) ({', '.join(odd[:3])}), which torch.save never writes",
                                      "pass a file written by torch.save")
            bad = z.testzip()  # torch does not check the CRCs itself: flipped bits would load silently
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CompressorError(f"'{path}' is a damaged zip archive ({err})",
                              "the file is truncated or corrupt: save or copy it again") from None
    if bad is not None:
        raise CompressorError(f"'{path}' is a damaged zip archive (member {bad} fails its checksum)",
                              "the file is corrupt: save or copy it again")
    leaves = {n.rsplit("/", 1)[-1] for n in names}
    if "archive_format" in leaves or "serialized_exported_program.json" in leaves:
        return "torch-export"
    if "data.pkl" in leaves:
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        raise CompressorError(f"'{path}' is a NumPy .npz archive, not a model",
                              "pass it as --example-inputs, or pass a model file")
    raise CompressorError(f"'{path}' is a zip archive but not a torch checkpoint (no data.pkl)",
                          "pass a file written by torch.save")


def _is_torch_legacy(path: Path) -> bool:
    # The first of the pickles a pre-zip torch.save writes is torch's magic number; genops only parses.
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("LONG1", "LONG", "INT", "LONG4"):
                    return arg == TORCH_LEGACY_MAGIC
    except Exception:
        return False
    return False
