"""Load: any model file or folder a user hands us, its format detected from the content (never the
extension), without running code from it unless the user says so.

    loaded = load_model("model.pt")                 # -> Loaded(model, state_dict, format, ...)
    loaded = load_model("weights.safetensors", arch="mypkg.models:make_cnn")

Formats: a pickled ``nn.Module`` ("torch-module"; loads without a flag only when every class it names
is torch's own or compressor's), a state_dict ("state-dict" / "safetensors"; a model only with
``arch``), a Hugging Face folder ("hf-folder"), a GGUF file ("gguf": llama.cpp's format, which carries no
code; dequantized to a plain float32 Hugging Face model with its tokenizer), a folder written by
:func:`compressor.save` ("compressor") and ``torch.export`` programs ("torch-export", only with
``trust_pickle``).
Every bad input raises :class:`CompressorError`; the input is only ever read.

Hostile inputs: only regular files are opened (a FIFO would block forever); a folder's own Python code
(``auto_map``) is never run, whatever the flags (``trust_pickle`` is pickle trust, not remote-code
trust); tensors claiming more bytes than they store are refused before anything copies them; a Hugging
Face folder whose weights miss or add keys is refused (transformers would only warn and fill in random
weights); a state_dict saved from DataParallel/DDP (``module.``) or torch.compile (``_orig_mod.``) has
that prefix stripped, with a note.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import pickle
import pickletools
import stat
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.fileio import regular_file
from compressor.core.plan import Plan
from compressor.core.rewrite import build_factored
from compressor.data.readers import (
    SAFETENSORS_MAX_HEADER,
    ExampleInputs,
    check_tensor_sizes,
    damaged,
    load_safetensors,
)
from compressor.formats.onnx_graph import is_onnx
from compressor.formats.pickles import (
    TRUST_FIX,
    is_safe_global,
    pickle_globals,
    refuse_unsafe,
    safe_class,
    scan_pickle,
)

__all__ = ["TRUST_FIX", "Loaded", "is_safe_global", "load", "load_model", "pickle_globals", "refuse_unsafe",
           "scan_pickle"]

# compressor's own folders (written by compressor.formats.save, read by load_compressed below)
FORMAT = "compressor-model"
VERSION = 1
WEIGHTS, PLAN, META, STRUCTURE = "model.safetensors", "plan.json", "compressor.json", "model.pt"
INDEX = "model.safetensors.index.json"  # a Hugging Face folder's weights as shards (compress --stream)


FORMATS = ("torch-module", "state-dict", "safetensors", "hf-folder", "gguf", "compressor", "torch-export", "onnx")
GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file (llama.cpp's gguf spec)
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 (non-zip) torch.save file
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module")  # common training checkpoints
# What nn.DataParallel / DistributedDataParallel and torch.compile put before every state_dict key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
REMOTE_CODE_FIX = ("it cannot be loaded without running that code, which compressor never does; "
                   "load it in Python yourself (trust_remote_code=True) and save a torch model or state_dict")
# Real English text to tokenize into example inputs for text models (2 sequences x 16 tokens).
EXAMPLE_TEXT = ["Low-rank factorization replaces each large weight matrix by two thin ones.",
                "The compressed model should answer almost exactly like the original model does."]
EXAMPLE_TOKENS = 16


@dataclass
class Loaded:
    """What :func:`load_model` found. ``model`` is None only for weights without ``arch``."""

    model: nn.Module | None
    format: str  # one of FORMATS
    source: Path
    state_dict: dict[str, torch.Tensor] | None = None  # weights-only inputs
    example_inputs: ExampleInputs | None = None  # inferred where unambiguous
    tokenizer: Any = None  # Hugging Face folders
    meta: dict[str, Any] = field(default_factory=dict)  # hf_config, arch, plan, needs_trust_pickle, ...


def load_model(path: str | Path, *, trust_pickle: bool = False, arch: str | None = None,
               device: str | torch.device | None = None) -> Loaded:
    """Load a model file or folder (see the module docstring); the model comes back in eval mode.

    ``arch="package.module:factory"`` builds the model a weights-only file belongs to (importing it is
    the caller's explicit choice). ``device`` is where tensors go (default: where they were saved,
    or the CPU when that device is absent).
    """
    path = Path(path)
    kind = detect_format(path)
    if kind == "compressor":
        loaded = load_compressed(path, trust_pickle=trust_pickle, arch=arch, device=device)
    elif kind == "hf-folder":
        loaded = _load_hf(path, trust_pickle, device)
    elif kind == "gguf":
        loaded = _load_gguf(path, device)
    elif kind == "torch-export":
        loaded = _load_export(path, trust_pickle, device)
    elif kind == "pickle":
        loaded = _load_plain_pickle(path, trust_pickle)
    elif kind == "safetensors":
        loaded = Loaded(None, "safetensors", path, state_dict=load_safetensors(path, device))
    else:
        loaded = _load_torch(path, trust_pickle, device, legacy=kind == "torch-legacy")
    if arch is not None and loaded.format not in ("state-dict", "safetensors", "compressor"):
        raise CompressorError(f"--arch is only for weights-only files, and '{path}' already holds a whole "
                              f"model ({loaded.format})", "drop --arch")
    if loaded.state_dict is not None and arch is not None:
        model = build_from_arch(arch)
        loaded.state_dict = _strip_wrapper_prefix(loaded, set(model.state_dict()))
        assign_weights(model, loaded.state_dict, f"the model built by '{arch}'")
        loaded.model = model
        loaded.meta["arch"] = arch
    elif loaded.state_dict is not None:
        loaded.state_dict = _strip_wrapper_prefix(loaded)
    if path.is_dir() and loaded.model is not None:
        from compressor.formats.dropin import pooling

        loaded.meta["pooling"] = pooling(path)  # a sentence-transformers folder: how it pools token outputs
    if loaded.model is not None:
        if loaded.format != "torch-export":  # an exported graph is fixed in the mode it was traced in
            loaded.model.eval()
        if loaded.example_inputs is None:
            loaded.example_inputs = infer_example_inputs(loaded.model, loaded.tokenizer)
    return loaded


def load(path: str | Path, *, trust_pickle: bool = False, arch: str | None = None,
         device: str | torch.device | None = None) -> nn.Module:
    """The ``nn.Module`` in ``path`` (any format :func:`load_model` reads, e.g. a compressed folder)."""
    loaded = load_model(path, trust_pickle=trust_pickle, arch=arch, device=device)
    if loaded.model is None:
        raise CompressorError(f"'{path}' holds only weights (a state_dict), not a model",
                              "pass arch='package.module:factory' (--arch) naming the function that builds "
                              "the model they belong to")
    return loaded.model


# ---------------------------------------------------------------------------------------- detection


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
        if (path / "compressor.json").is_file():
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


# ------------------------------------------------------------------------------------ torch pickles


def torch_load(path: Path, trust_pickle: bool, device=None, legacy: bool = False) -> tuple[Any, bool]:
    """``(object, needed_trust)`` from a torch file: weights-only with torch/compressor module classes
    allowed; a full unpickle (current folder importable) only with ``trust_pickle``."""
    try:
        needed = pickle_globals(path, legacy)
    except Exception as err:
        raise damaged(path, err) from None
    # Legacy (pre-zip) files store each module's source code, which weights-only loading cannot read.
    unsafe = needed if legacy else [g for g in needed if not is_safe_global(g)]
    if unsafe and not trust_pickle:
        refuse_unsafe(path, unsafe)
    if device is None and not torch.cuda.is_available():
        device = "cpu"  # files saved on a GPU still load on a machine without one
    try:
        if unsafe:
            with cwd_importable():
                return torch.load(path, map_location=device, weights_only=False), True
        classes = [safe_class(g) for g in needed]  # all safe: resolved from imported modules only
        with torch.serialization.safe_globals(classes):
            return torch.load(path, map_location=device, weights_only=True), False
    except (ImportError, AttributeError) as err:
        raise CompressorError(f"'{path}' needs code that cannot be found ({err})",
                              "run from the folder that holds the model's code, or add it to PYTHONPATH"
                              ) from None
    except Exception as err:
        if "Unsupported global" in str(err):  # weights-only refusal the pre-scan did not foresee
            refuse_unsafe(path, [str(err).split("GLOBAL", 1)[-1].split()[0]])
        raise damaged(path, err) from None


@contextlib.contextmanager
def cwd_importable():
    """The current folder on ``sys.path`` for the duration, as ``python -m`` has it."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _load_torch(path: Path, trust_pickle: bool, device, legacy: bool) -> Loaded:
    obj, trusted = torch_load(path, trust_pickle, device, legacy)
    return _as_loaded(obj, path, {"needs_trust_pickle": trusted})


def _load_plain_pickle(path: Path, trust_pickle: bool) -> Loaded:
    # pickle.dump(model): no torch allowlist applies (its tensors rebuild through torch.load itself).
    try:
        with open(path, "rb") as f:
            needed = list(dict.fromkeys(scan_pickle(f)))
    except Exception as err:
        raise damaged(path, err) from None
    if needed and not trust_pickle:
        refuse_unsafe(path, needed, "Python object (pickle.dump, not torch.save)", which="")
    try:  # with no globals named, unpickling can only build plain data: nothing runs
        with cwd_importable(), open(path, "rb") as f:
            obj = pickle.load(f)
    except (ImportError, AttributeError) as err:
        raise CompressorError(f"'{path}' needs code that cannot be found ({err})",
                              "run from the folder that holds the model's code, or add it to PYTHONPATH"
                              ) from None
    except Exception as err:
        raise damaged(path, err) from None
    return _as_loaded(obj, path, {"needs_trust_pickle": bool(needed)})


def _as_loaded(obj: Any, path: Path, meta: dict[str, Any]) -> Loaded:
    """The Loaded for an unpickled object: a module, a state_dict (maybe inside a checkpoint), or an error."""
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in CHECKPOINT_KEYS:  # a training checkpoint: {"model": ..., "optimizer": ..., "epoch": ...}
            if isinstance(obj.get(key), nn.Module) or _is_state_dict(obj.get(key)):
                obj, meta["checkpoint_key"] = obj[key], key
                break
    if isinstance(obj, nn.Module):
        check_tensor_sizes(path, obj.state_dict(keep_vars=True).items())
    elif _is_state_dict(obj):
        check_tensor_sizes(path, obj.items())
    if isinstance(obj, nn.Module):
        if any(t.is_meta for t in obj.state_dict().values()):
            raise CompressorError(f"'{path}' holds a model structure without weights (meta tensors)",
                                  "load the folder it belongs to (with model.safetensors)")
        return Loaded(obj, "torch-module", path, meta=meta)
    if _is_state_dict(obj):
        return Loaded(None, "state-dict", path, state_dict=dict(obj), meta=meta)
    what = ("a single tensor" if isinstance(obj, torch.Tensor) else
            "a dict without tensors" if isinstance(obj, dict) else f"a {type(obj).__name__}")
    raise CompressorError(f"'{path}' holds {what}, not a model or a state_dict",
                          "save the model with torch.save(model) or torch.save(model.state_dict())")


def _strip_wrapper_prefix(loaded: Loaded, expected: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The state_dict without the prefix ``nn.DataParallel``/DDP (``module.``) or ``torch.compile``
    (``_orig_mod.``) put before every key, when it has one and (given ``expected``, the model's keys)
    the keys fit only without it; a note in ``loaded.meta["notes"]`` says so."""
    sd = loaded.state_dict
    stripped, removed = dict(sd), ""
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES
                       if stripped and all(k.startswith(p) and len(k) > len(p) for k in stripped)), None)
        if prefix is None or (expected is not None and set(stripped) <= expected):
            break
        stripped = {k[len(prefix):]: v for k, v in stripped.items()}
        removed += prefix
    if not removed or (expected is not None and not set(stripped) <= expected):
        return sd  # nothing to strip, or stripping does not help: assign_weights names the mismatch
    loaded.meta["stripped_prefix"] = removed
    loaded.meta.setdefault("notes", []).append(
        f"every weight name in '{loaded.source}' started with '{removed}' (saved from a "
        f"{'DataParallel/DDP' if removed.startswith('module.') else 'torch.compile'} wrapper); "
        "it was removed")
    return stripped


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _load_export(path: Path, trust_pickle: bool, device) -> Loaded:
    if not trust_pickle:
        raise CompressorError(f"'{path}' is a torch.export program, whose loading runs code it holds",
                              TRUST_FIX)
    try:
        program = torch.export.load(path)
    except Exception as err:
        raise damaged(path, err) from None
    model = program.module()
    if device is not None:
        model.to(device)
    args, kwargs = program.example_inputs or ((), {})
    example = (dict(kwargs) if kwargs and not args else tuple(args) if args and not kwargs else None)
    return Loaded(model, "torch-export", path, example_inputs=example, meta={"needs_trust_pickle": True})


# -------------------------------------------------------------------------------------- safetensors


# -------------------------------------------------------------------------------- architectures


def build_from_arch(arch: str, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Call ``package.module:factory`` (the current folder importable) and load ``state_dict`` strictly."""
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise CompressorError(f"--arch '{arch}' is not of the form package.module:factory",
                              "e.g. --arch mypkg.models:make_cnn")
    with cwd_importable():
        try:
            factory = attrgetter(attr)(importlib.import_module(module_name))
        except (ImportError, AttributeError) as err:
            raise CompressorError(f"cannot import --arch '{arch}' ({err})",
                                  "run from the folder that holds it, or add it to PYTHONPATH") from None
        try:
            model = factory()
        except Exception as err:
            raise CompressorError(f"--arch '{arch}' failed when called ({type(err).__name__}: {err})",
                                  "name a function that takes no arguments and returns the model") from None
    if not isinstance(model, nn.Module):
        raise CompressorError(f"--arch '{arch}' returned a {type(model).__name__}, not an nn.Module",
                              "name a function that builds and returns the model")
    if state_dict is not None:
        assign_weights(model, state_dict, f"the model built by '{arch}'")
    return model


def assign_weights(model: nn.Module, tensors: dict[str, torch.Tensor], what: str = "the model") -> None:
    """Put ``tensors`` into ``model`` by state_dict name, strictly, keeping their dtype and device.

    Tied parameters (one tensor under several names) stay tied and need appear only once in
    ``tensors``, as safetensors writes them. Works on a skeleton with meta tensors too.
    """
    expected = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for name, t in expected.items():
        aliases.setdefault(id(t), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(n in tensors for n in names)]
    unexpected = [n for n in tensors if n not in expected]
    wrong = [f"{n} {list(tensors[n].shape)} vs {list(expected[n].shape)}" for n in tensors
             if n in expected and tensors[n].shape != expected[n].shape]
    if missing or unexpected or wrong:
        parts = [f"{label} {len(items)} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("wrong shape", wrong)) if items]
        raise CompressorError(f"the weights do not fit {what}: " + "; ".join(parts),
                              "pass the architecture (--arch) these weights were saved from")
    new: dict[int, torch.Tensor] = {}

    def source(old: torch.Tensor) -> torch.Tensor:
        return next(tensors[n] for n in aliases[id(old)] if n in tensors)

    for prefix, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{prefix}." if prefix else ""
        for key, old in list(mod._parameters.items()):
            if old is not None and f"{prefix}{key}" in expected:
                if id(old) not in new:
                    new[id(old)] = nn.Parameter(source(old), requires_grad=old.requires_grad)
                mod._parameters[key] = new[id(old)]
        for key, old in list(mod._buffers.items()):
            if old is not None and f"{prefix}{key}" in expected:
                mod._buffers[key] = new.setdefault(id(old), source(old))


# ----------------------------------------------------------------------------------- Hugging Face


def _load_hf(path: Path, trust_pickle: bool, device) -> Loaded:
    check_folder(path)
    config = hf_config(path)
    if not any(path.glob("*.safetensors")) and not trust_pickle:
        raise CompressorError(f"folder '{path}' has config.json but no *.safetensors weights",
                              "convert pickle weights (pytorch_model.bin) to safetensors, or " + TRUST_FIX)
    transformers = hf_module()
    cls = hf_class(config, transformers)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # its load report is ours to give, in one line
    try:  # trust_remote_code=False: never import the folder's code, never ask on stdin
        _check_config_size(path, cls, transformers, trust_pickle)
        model, info = cls.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                          use_safetensors=None if trust_pickle else True,
                                          output_loading_info=True)
    except CompressorError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CompressorError(f"could not load the Hugging Face model in '{path}' ({first})",
                              "check that the folder is complete (config.json + weights)") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    problems = loading_problems(info)
    if problems:
        raise CompressorError(f"the weights in '{path}' do not fit its config.json ({type(model).__name__}): "
                              + "; ".join(problems), "repair or re-download the model folder")
    check_tensor_sizes(path, model.state_dict(keep_vars=True).items())
    if device is not None:
        model.to(device)
    return Loaded(model, "hf-folder", path, tokenizer=hf_tokenizer(path),
                  meta={"hf_config": config, "hf_class": type(model).__name__, "needs_trust_pickle": False})


def loading_problems(info: dict[str, Any]) -> list[str]:
    """What transformers' ``output_loading_info`` says went wrong, one item per kind (missing, unexpected,
    wrong shape), or nothing. transformers only warns and initialises missing weights at random: the model
    would not be the file's."""
    return [f"{label} {len(keys)} ({', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''})"
            for label, keys in (("missing", info.get("missing_keys") or ()),
                                ("unexpected", info.get("unexpected_keys") or ()),
                                ("wrong shape", [str(k[0]) if isinstance(k, tuple) else str(k)
                                                 for k in info.get("mismatched_keys") or ()]))
            if keys]


def _load_gguf(path: Path, device) -> Loaded:
    """A GGUF file (llama.cpp's format: config, tokenizer and weights, often quantized, and no code) as a
    plain float32 Hugging Face model: transformers reads and dequantizes it (``gguf_file=``), then the
    weights go into a model built from the same config without its ``quantization_config``, which
    transformers would otherwise keep (and ``save_pretrained`` refuse), so the model is saved and exported
    like any Hugging Face model."""
    transformers = hf_module()
    if not transformers.utils.is_gguf_available():
        raise CompressorError(f"reading the GGUF file '{path}' needs the gguf package", "pip install gguf")
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    # transformers takes a folder and a file name in it; the file itself was checked by detect_format.
    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name, local_files_only=True,
                 trust_remote_code=False)
    try:
        with _gguf_bar_off():
            quantized, info = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32,
                                                                                output_loading_info=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CompressorError(f"could not load the GGUF file '{path}' ({first})",
                              "pass a GGUF file of a causal language model that transformers supports, "
                              "or convert it to a Hugging Face folder") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    problems = loading_problems(info)
    if problems:
        raise CompressorError(f"the tensors in '{path}' do not fit the model its metadata describes "
                              f"({type(quantized).__name__}): " + "; ".join(problems),
                              "repair or re-download the GGUF file")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(**where)
    except Exception:  # a GGUF file need not carry a tokenizer (then no example inputs either)
        tokenizer = None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(quantized).__name__]  # as save_pretrained writes it; the GGUF names none
    with _parameters_on_meta():  # no random initialisation: every weight comes from the file
        model = type(quantized)._from_config(config)
    assign_weights(model, quantized.state_dict(), f"the model in '{path}'")
    del quantized
    if device is not None:
        model.to(device)
    return Loaded(model, "gguf", path, tokenizer=tokenizer,
                  meta={"hf_config": config.to_dict(), "hf_class": type(model).__name__, "needs_trust_pickle": False})


@contextlib.contextmanager
def _gguf_bar_off() -> Iterator[None]:
    """transformers' GGUF reader draws its own progress bar whatever its logging settings (tqdm reads
    TQDM_DISABLE only at import): switched off for the block, as --quiet must mean quiet."""
    module = sys.modules.get("transformers.modeling_gguf_pytorch_utils") or importlib.import_module(
        "transformers.modeling_gguf_pytorch_utils")
    bar = getattr(module, "tqdm", None)
    if bar is None:
        yield
        return
    module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        module.tqdm = bar


def _check_config_size(path: Path, cls, transformers, trust_pickle: bool) -> None:
    """Refuse a config.json describing a model far bigger than the folder's weights files: transformers
    would allocate (and randomly initialise) every weight the files lack before anyone could check."""
    weights = sum(f.stat().st_size for f in path.iterdir() if f.is_file()
                  and (f.suffix == ".safetensors" or (trust_pickle and f.suffix in (".bin", ".pt", ".pth"))))
    skeleton = hf_skeleton(path, cls)
    params = {id(t): t.numel() * t.element_size() for t in skeleton.state_dict(keep_vars=True).values()}
    needed = sum(params.values())
    if needed > 4 * weights + (1 << 20):  # 4x: fp16 files of an fp32 model, with room to spare
        raise CompressorError(f"'{path / 'config.json'}' describes a model of {needed:,} bytes, but its "
                              f"weights files hold only {weights:,} bytes",
                              "repair or re-download the model folder")


def hf_class(config: dict[str, Any], transformers) -> type:
    """The transformers class a folder's config names (``architectures``), or AutoModel."""
    name = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    return cls


def hf_skeleton(path: Path, cls: type | None = None, *, buffers: bool = False) -> nn.Module:
    """The module tree a Hugging Face folder's config describes, on the meta device (no weights, no
    memory), built as :func:`load_model` builds it; the folder's own code is never run.

    ``buffers``: only the parameters go on the meta device; buffers are computed on the CPU as the model's
    constructor computes them (a rotary embedding's ``inv_freq`` is not stored in the checkpoint), so the
    skeleton can run once its parameters are filled in."""
    transformers = hf_module()
    if cls is None:
        cls = hf_class(hf_config(path), transformers)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    with _parameters_on_meta() if buffers else torch.device("meta"):  # the module tree only: no weights
        return (transformers.AutoModel.from_config(config, trust_remote_code=False)
                if cls is transformers.AutoModel else cls._from_config(config))


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to the meta device at once (a new tensor's
    pages are never touched, so no memory is spent on it); buffers stay where they were made."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def read_json(path: Path, what: str) -> Any:
    """A JSON file a user handed us (a regular file, UTF-8), or one line saying what is wrong with it."""
    regular_file(path, what)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CompressorError(f"'{path}' is not UTF-8 text", "repair or re-download the model folder") from None
    except (ValueError, RecursionError) as err:
        raise CompressorError(f"'{path}' is not valid JSON ({str(err)[:120]})",
                              "repair or re-download the model folder") from None


def hf_config(path: Path) -> dict[str, Any]:
    """A Hugging Face folder's config.json, refused when the folder asks to run its own code."""
    config = read_json(path / "config.json", "model config")
    if not isinstance(config, dict):
        raise CompressorError(f"'{path / 'config.json'}' is not a model config", "pass a model folder")
    for name in ("config.json", "tokenizer_config.json"):
        data = config if name == "config.json" else (read_json(path / name, "tokenizer config")
                                                     if (path / name).exists() else {})
        if isinstance(data, dict) and data.get("auto_map"):
            raise CompressorError(f"'{path}' needs custom Python code from the folder (auto_map in {name})",
                                  REMOTE_CODE_FIX)
    return config


def hf_module():
    try:
        import transformers
    except ImportError:
        raise CompressorError("loading a Hugging Face model folder needs transformers",
                              "pip install 'compressor[hf]'") from None
    # Its per-tensor "Loading weights" bar is noise next to ours; --quiet must mean quiet.
    transformers.utils.logging.disable_progress_bar()
    return transformers


def hf_tokenizer(path: Path):
    """The folder's tokenizer, or None when it has none."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    try:
        return hf_module().AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception:
        return None


# ---------------------------------------------------------------------------------- example inputs


def infer_example_inputs(model: nn.Module, tokenizer=None) -> ExampleInputs | None:
    """Example inputs where the model says unambiguously what it takes, else None.

    A text model with a tokenizer gets 2 real sentences as 16 tokens (``input_ids`` + ``attention_mask``),
    padded on the right; an ``nn.Sequential`` that starts with ``nn.Linear`` gets one random row of its
    input width.
    """
    device = next((p.device for p in model.parameters()), None)
    if tokenizer is not None and getattr(model, "main_input_name", None) == "input_ids":
        # Right padding, whatever the tokenizer's own side (Gemma 3's says left, for batched generation).
        # These inputs feed one forward pass, and in a causal model a left pad's query sees only masked
        # keys: torch's SDPA path returns one thing there, the exported graph another (a tiny Gemma 3 and a
        # tiny Llama: logits 0 vs 0.44 apart; neither runtime gave NaN, and eager attention in torch agreed
        # with the graph), and a model with learned positions (GPT-2) sees every real token shifted (0.35
        # apart from the unpadded sentence on a tiny one). Right-padded, every query sees at least the real
        # tokens before it and a real token's output is exactly the unpadded sentence's. Comparisons leave
        # padding out anyway (compressor.data.inputs.real_tokens).
        side = tokenizer.padding_side
        tokenizer.padding_side = "right"  # an attribute, not the call's padding_side=: older tokenizers lack it
        try:
            enc = tokenizer(EXAMPLE_TEXT, padding="max_length", truncation=True, max_length=EXAMPLE_TOKENS,
                            return_tensors="pt")
        finally:
            tokenizer.padding_side = side
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    if isinstance(model, nn.Sequential) and len(model) and isinstance(model[0], nn.Linear):
        w = model[0].weight
        gen = torch.Generator().manual_seed(0)
        return torch.randn(1, model[0].in_features, generator=gen).to(device=w.device, dtype=w.dtype)
    return None


# ---------------------------------------------------------------------------- compressor's own folders


def load_compressed(directory: str | Path, *, trust_pickle: bool = False, arch: str | None = None,
                    device: str | torch.device | None = None) -> Loaded:
    """Rebuild the model in a folder written by :func:`compressor.formats.save.save`: architecture, then
    the plan's factored layers (no SVD), then the weights."""
    directory = Path(directory)
    try:
        meta = read_json(directory / META, "compressor folder description")
        kind = meta["architecture"]["kind"]
    except CompressorError as err:
        raise CompressorError(f"{err.problem} (the compressed folder is damaged)",
                              "save the compressed model again") from None
    except (KeyError, TypeError):
        raise CompressorError(f"'{directory / META}' is damaged", "save the compressed model again") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CompressorError(f"'{directory}' was written in format {meta.get('format')} version "
                              f"{meta.get('version')}; this compressor reads {FORMAT} version {VERSION}",
                              "save the model again with this version of compressor")
    needs_plan = kind in ("hf", "arch") and meta.get("factored_layers", 0) > 0
    sharded = kind == "hf" and (directory / INDEX).is_file()  # written shard by shard (compress --stream)
    for name in (INDEX if sharded else WEIGHTS, *((PLAN,) if needs_plan else ())):
        if not (directory / name).is_file():
            raise CompressorError(f"'{directory}' lacks {name}", "save the compressed model again")
    plan = Plan.from_json(directory / PLAN) if (directory / PLAN).is_file() else None
    tokenizer, stored_arch, needs_trust = None, None, False
    if kind == "hf":
        model = _build_hf(directory, meta["architecture"])
        tokenizer = hf_tokenizer(directory)
    elif kind in ("structure", "pickle"):
        model, needs_trust = torch_load(directory / STRUCTURE, trust_pickle)
        if not isinstance(model, nn.Module):
            raise CompressorError(f"'{directory / STRUCTURE}' is not a model",
                                  "save the compressed model again")
    elif kind == "arch":
        stored_arch = meta["architecture"]["arch"]
        if arch is None and not trust_pickle:
            raise CompressorError(f"'{directory}' was built by --arch {stored_arch}, and importing it runs "
                                  "that code", f"pass --arch {stored_arch} again, or " + TRUST_FIX)
        model = build_from_arch(arch or stored_arch)
    else:
        raise CompressorError(f"'{directory / META}' names an unknown architecture kind '{kind}'",
                              "save the compressed model again")
    if kind in ("hf", "arch") and plan is not None:
        build_factored(model, plan)
    weights = _sharded_weights(directory, device) if sharded else load_safetensors(directory / WEIGHTS, device)
    assign_weights(model, weights, f"'{directory}'")
    if device is not None:
        model.to(device)  # buffers the weights file does not hold
    model.eval()
    return Loaded(model, "compressor", directory, example_inputs=infer_example_inputs(model, tokenizer),
                  tokenizer=tokenizer,
                  meta={"compressor": meta, "plan": plan, "arch": arch or stored_arch,
                        "needs_trust_pickle": needs_trust})


def load_into(directory: str | Path, model: nn.Module, *, device: str | torch.device | None = None) -> nn.Module:
    """Load an output folder's factored weights into ``model``, your own module of the architecture the
    weights came from, and return it (changed in place, in eval mode).

    For outputs that carry no architecture, such as ``compress --stream`` of a bare ``.safetensors``: the
    layers ``plan.json`` factors are swapped in ``model`` for their factored form (no SVD), then every tensor
    of ``model.safetensors`` (or of the shards its index names) is loaded strictly, in its stored dtype.
    A plan that does not fit ``model`` changes nothing; weights that do not fit after it raise, leaving
    ``model`` rewritten: pass a freshly built module.
    """
    directory = Path(directory)
    sharded = (directory / INDEX).is_file()
    for name in (PLAN, INDEX if sharded else WEIGHTS):
        if not (directory / name).is_file():
            raise CompressorError(f"'{directory}' lacks {name}",
                                  "pass an output folder of compress (it holds plan.json and the weights)")
    build_factored(model, Plan.from_json(directory / PLAN))
    weights = _sharded_weights(directory, device) if sharded else load_safetensors(directory / WEIGHTS, device)
    assign_weights(model, weights, f"'{directory}'")
    if device is not None:
        model.to(device)  # buffers the weights file does not hold
    return model.eval()


def _sharded_weights(directory: Path, device) -> dict[str, torch.Tensor]:
    """Every tensor of the shards ``model.safetensors.index.json`` names, each shard read as
    :func:`load_safetensors` reads one file; a tensor stored twice, or not where the index says, is refused."""
    from compressor.formats.shards import index_files

    files, weight_map = index_files(directory, directory / INDEX)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_safetensors(f, device).items():
            if name in tensors or weight_map.get(name) != f.name:
                raise CompressorError(f"tensor '{name}' in '{f}' is not where '{directory / INDEX}' puts it",
                                      "save the compressed model again")
            tensors[name] = t
    if len(tensors) != len(weight_map):
        raise CompressorError(f"'{directory / INDEX}' names {len(weight_map)} tensors, the shards hold "
                              f"{len(tensors)}", "save the compressed model again")
    return tensors


def _build_hf(directory: Path, info: dict) -> nn.Module:
    transformers = hf_module()
    cls = getattr(transformers, info.get("class", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CompressorError(f"'{directory}' needs the transformers class {info.get('class')!r}, which "
                              "this transformers does not have",
                              "install the transformers version it was saved with")
    hf_config(directory)  # refuses a config.json (or tokenizer) that asks to run the folder's code
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True,
                                                         trust_remote_code=False)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CompressorError(f"could not read the Hugging Face config in '{directory}' ({first})",
                              "save the compressed model again") from None
    kwargs = {"attn_implementation": info["attn_implementation"]} if info.get("attn_implementation") else {}
    return cls._from_config(config, **kwargs)
