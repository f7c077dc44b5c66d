"""Loading torch files: ``torch.save`` checkpoints (weights-only unless every class they name is torch's or
compressor's, or the user trusts the pickle), plain pickles, ``torch.export`` programs, and a weights-only file's
model built by ``--arch`` with the weights assigned strictly.

A state_dict saved from DataParallel/DDP (``module.``) or torch.compile (``_orig_mod.``) has that prefix
stripped, with a note; a training checkpoint's model is found under its usual keys.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import sys
from collections.abc import Iterator
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.data.readers import check_tensor_sizes, damaged
from compressor.formats.loaded import Loaded
from compressor.formats.pickles import TRUST_FIX, is_safe_global, pickle_globals, refuse_unsafe, safe_class, scan_pickle

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module")  # common training checkpoints
# What nn.DataParallel / DistributedDataParallel and torch.compile put before every state_dict key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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
def cwd_importable() -> Iterator[None]:
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


def load_torch(path: Path, trust_pickle: bool, device, legacy: bool) -> Loaded:
    obj, trusted = torch_load(path, trust_pickle, device, legacy)
    return _as_loaded(obj, path, {"needs_trust_pickle": trusted})


def load_plain_pickle(path: Path, trust_pickle: bool) -> Loaded:
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


def strip_wrapper_prefix(loaded: Loaded, expected: set[str] | None = None) -> dict[str, torch.Tensor]:
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


def load_export(path: Path, trust_pickle: bool, device) -> Loaded:
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
