"""Load: any model file or folder a user hands us, its format detected from the content (never the
extension), without running code from it unless the user says so.

    loaded = load_model("model.pt")                 # -> Loaded(model, state_dict, format, ...)
    loaded = load_model("weights.safetensors", arch="mypkg.models:make_cnn")

Formats: a pickled ``nn.Module`` ("torch-module"; loads without a flag only when every class it names
is torch's own or compressor's), a state_dict ("state-dict" / "safetensors"; a model only with
``arch``), a Hugging Face folder ("hf-folder"), a folder written by :func:`compressor.save`
("compressor") and ``torch.export`` programs ("torch-export", only with ``trust_pickle``).
Every bad input raises :class:`CompressorError`; the input is only ever read.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import importlib
import json
import os
import pickle
import pickletools
import sys
import zipfile
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError

ExampleInputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]

FORMATS = ("torch-module", "state-dict", "safetensors", "hf-folder", "compressor", "torch-export")
TRUST_FIX = "pass --trust-pickle (trust_pickle=True) if you trust this file"
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 (non-zip) torch.save file
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module")  # common training checkpoints
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
        from compressor.formats.save import load_compressed  # save builds on this module
        loaded = load_compressed(path, trust_pickle=trust_pickle, arch=arch, device=device)
    elif kind == "hf-folder":
        loaded = _load_hf(path, trust_pickle, device)
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
        loaded.model = build_from_arch(arch, loaded.state_dict)
        loaded.meta["arch"] = arch
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
    """"compressor", "hf-folder", "torch-zip", "torch-legacy", "pickle", "torch-export" or "safetensors", read
    from the content; anything else raises :class:`CompressorError`."""
    if not path.exists():
        raise CompressorError(f"'{path}' does not exist", "check the path")
    if path.is_dir():
        if (path / "compressor.json").is_file():
            return "compressor"
        if (path / "config.json").is_file():
            return "hf-folder"
        raise CompressorError(f"folder '{path}' is neither a Hugging Face model (config.json + "
                              "*.safetensors) nor a folder written by compressor (compressor.json)",
                              "pass a model file, a Hugging Face model folder or a `compress` output folder")
    if not path.is_file():
        raise CompressorError(f"'{path}' is not a regular file", "pass a model file or folder")
    size = path.stat().st_size
    if size == 0:
        raise CompressorError(f"'{path}' is empty (0 bytes)",
                              "pass the model file itself; it may have been cut off while copying")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return _zip_format(path)
    if head[:1] == b"\x80":  # pickle protocol 2+
        return "torch-legacy" if _is_torch_legacy(path) else "pickle"
    header_len = int.from_bytes(head[:8], "little")
    if len(head) == 9 and head[8:9] == b"{" and 2 <= header_len <= SAFETENSORS_MAX_HEADER:
        return "safetensors"
    what = ("a text/JSON file" if head.lstrip()[:1] in (b"{", b"[")
            else "not a model file (not a torch checkpoint, safetensors file or model folder)")
    raise CompressorError(f"'{path}' is {what}",
                          "pass a file written by torch.save or safetensors, or a Hugging Face model folder")


def _zip_format(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
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


def is_safe_global(name: str) -> bool:
    """Whether a global a pickle names is a torch or compressor ``nn.Module`` class (safe to rebuild)."""
    module, _, attr = name.rpartition(".")
    if not (module == "compressor.core.layers" or module.startswith("torch.")):
        return False  # never import anything else just to look
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def pickle_globals(path: Path, legacy: bool = False) -> list[str]:
    """The globals (``module.name``) a torch file needs beyond torch's own weights-only allowlist,
    listed without loading it."""
    if not legacy:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    from torch._weights_only_unpickler import _get_allowed_globals  # no public API for legacy files
    allowed = set(_get_allowed_globals())
    with open(path, "rb") as f:  # magic number, protocol, sys info, then the object itself
        found = [g for _ in range(4) for g in scan_pickle(f)]
    return list(dict.fromkeys(g for g in found if g not in allowed))


def scan_pickle(f) -> list[str]:
    """Every global one pickle (read from ``f`` up to its STOP) names, found by parsing, not running it.

    Opcodes that can reach code without naming it plainly (a memoised STACK_GLOBAL, the copyreg
    extension registry) are listed as such, so that "no globals" really means "no code".
    """
    found, strings = [], []
    for op, arg, _pos in pickletools.genops(f):
        if op.name in ("GLOBAL", "INST"):
            found.append(_py3_name(*arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            found.append(_py3_name(*strings[-2:]) if len(strings) >= 2 else "<a global named indirectly>")
        elif op.name.startswith("EXT"):
            found.append(f"<copyreg extension {arg}>")
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def _py3_name(module: str, name: str) -> str:
    # Protocol-2 pickles name Python 2 modules (__builtin__.set); unpickling maps them, so do we.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def refuse_unsafe(path: Path, unsafe: list[str], what: str = "file",
                  which: str = " that are not torch's own") -> None:
    shown = ", ".join(unsafe[:4]) + (f" and {len(unsafe) - 4} more" if len(unsafe) > 4 else "")
    raise CompressorError(f"'{path}' is a pickled {what} whose loading would run code from "
                          f"{len(unsafe)} global(s){which}: {shown}", TRUST_FIX)


def torch_load(path: Path, trust_pickle: bool, device=None, legacy: bool = False) -> tuple[Any, bool]:
    """``(object, needed_trust)`` from a torch file: weights-only with torch/compressor module classes
    allowed; a full unpickle (current folder importable) only with ``trust_pickle``."""
    try:
        needed = pickle_globals(path, legacy)
    except Exception as err:
        raise _damaged(path, err) from None
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
        classes = [getattr(importlib.import_module(mod), attr)
                   for mod, _, attr in (g.rpartition(".") for g in needed)]
        with torch.serialization.safe_globals(classes):
            return torch.load(path, map_location=device, weights_only=True), False
    except (ImportError, AttributeError) as err:
        raise CompressorError(f"'{path}' needs code that cannot be found ({err})",
                              "run from the folder that holds the model's code, or add it to PYTHONPATH"
                              ) from None
    except Exception as err:
        if "Unsupported global" in str(err):  # weights-only refusal the pre-scan did not foresee
            refuse_unsafe(path, [str(err).split("GLOBAL", 1)[-1].split()[0]])
        raise _damaged(path, err) from None


def _damaged(path: Path, err: Exception) -> CompressorError:
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return CompressorError(f"could not read '{path}': it is truncated or corrupt ({first})",
                           "save or copy the file again")


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
        raise _damaged(path, err) from None
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
        raise _damaged(path, err) from None
    return _as_loaded(obj, path, {"needs_trust_pickle": bool(needed)})


def _as_loaded(obj: Any, path: Path, meta: dict[str, Any]) -> Loaded:
    """The Loaded for an unpickled object: a module, a state_dict (maybe inside a checkpoint), or an error."""
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in CHECKPOINT_KEYS:  # a training checkpoint: {"model": ..., "optimizer": ..., "epoch": ...}
            if isinstance(obj.get(key), nn.Module) or _is_state_dict(obj.get(key)):
                obj, meta["checkpoint_key"] = obj[key], key
                break
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
        raise _damaged(path, err) from None
    model = program.module()
    if device is not None:
        model.to(device)
    args, kwargs = program.example_inputs or ((), {})
    example = (dict(kwargs) if kwargs and not args else tuple(args) if args and not kwargs else None)
    return Loaded(model, "torch-export", path, example_inputs=example, meta={"needs_trust_pickle": True})


# -------------------------------------------------------------------------------------- safetensors


def load_safetensors(path: Path, device=None) -> dict[str, torch.Tensor]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            raw = f.read(n) if 8 + n <= size else b""  # a damaged length must not make us read (or allocate) it
    except OSError as err:
        raise CompressorError(f"cannot read '{path}' ({err.strerror})",
                              "check the file's permissions, or save or copy it again") from None
    try:
        header = json.loads(raw)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
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
        raise _damaged(path, err) from None
    if not tensors:
        raise CompressorError(f"'{path}' is a safetensors file with no tensors", "pass the model's weights")
    return tensors


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
    try:
        config = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CompressorError(f"'{path / 'config.json'}' is not valid JSON ({err})",
                              "repair or re-download the model folder") from None
    if not isinstance(config, dict):
        raise CompressorError(f"'{path / 'config.json'}' is not a model config", "pass a model folder")
    if not any(path.glob("*.safetensors")) and not trust_pickle:
        raise CompressorError(f"folder '{path}' has config.json but no *.safetensors weights",
                              "convert pickle weights (pytorch_model.bin) to safetensors, or " + TRUST_FIX)
    if config.get("auto_map") and not trust_pickle:
        raise CompressorError(f"'{path}' asks to run its own Python code (auto_map in config.json)",
                              TRUST_FIX)
    transformers = hf_module()
    name = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(path, local_files_only=True, trust_remote_code=trust_pickle,
                                    use_safetensors=None if trust_pickle else True)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CompressorError(f"could not load the Hugging Face model in '{path}' ({first})",
                              "check that the folder is complete (config.json + weights)") from None
    if device is not None:
        model.to(device)
    return Loaded(model, "hf-folder", path, tokenizer=hf_tokenizer(path),
                  meta={"hf_config": config, "hf_class": type(model).__name__,
                        "needs_trust_pickle": bool(trust_pickle and config.get("auto_map"))})


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
        return hf_module().AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:
        return None


# ---------------------------------------------------------------------------------- example inputs


def infer_example_inputs(model: nn.Module, tokenizer=None) -> ExampleInputs | None:
    """Example inputs where the model says unambiguously what it takes, else None.

    A text model with a tokenizer gets 2 real sentences as 16 tokens (``input_ids`` + ``attention_mask``);
    an ``nn.Sequential`` that starts with ``nn.Linear`` gets one random row of its input width.
    """
    device = next((p.device for p in model.parameters()), None)
    if tokenizer is not None and getattr(model, "main_input_name", None) == "input_ids":
        enc = tokenizer(EXAMPLE_TEXT, padding="max_length", truncation=True, max_length=EXAMPLE_TOKENS,
                        return_tensors="pt")
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    if isinstance(model, nn.Sequential) and len(model) and isinstance(model[0], nn.Linear):
        w = model[0].weight
        gen = torch.Generator().manual_seed(0)
        return torch.randn(1, model[0].in_features, generator=gen).to(device=w.device, dtype=w.dtype)
    return None


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
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise CompressorError(f"example inputs file '{path}' does not exist or is empty", "check the path")
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
    return _as_example(obj, path)


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
