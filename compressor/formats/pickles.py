"""What a pickle would run, found without running (or importing) anything it names.

A torch file is a pickle: loading it calls the globals it names. :func:`pickle_globals` lists them by
parsing the opcodes, and :func:`safe_class` decides from the *name alone* whether one is a torch or
compressor layer class that weights-only loading may rebuild. The decision never imports the module a
file names (importing ``torch.utils.model_dump.__main__`` runs a program): a name is looked up only
in modules that are already imported, under an allow-list of prefixes.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
import sys
from pathlib import Path

import torch
from torch import nn

import compressor.core.layers
import compressor.layers  # noqa: F401  (the names folders written by compressor 0.1 pickled)
from compressor.core.errors import CompressorError

TRUST_FIX = "pass --trust-pickle (trust_pickle=True) if you trust this file"
# Modules whose nn.Module classes may be rebuilt from a file without a flag; matched on the name only.
SAFE_PREFIXES = ("torch.nn.", "torch.ao.nn.")
OUR_MODULES = ("compressor.core.layers", "compressor.layers")


def safe_class(name: str) -> type | None:
    """The ``nn.Module`` class a global ``module.Class`` names when it is torch's or compressor's own
    and its module is already imported; else None. Never imports anything."""
    module, _, attr = name.rpartition(".")
    if not module or not attr or not (module in OUR_MODULES or module.startswith(SAFE_PREFIXES)):
        return None
    if "__main__" in module.split("."):
        return None  # a program's entry point, never a layer class
    loaded = sys.modules.get(module)  # an imported module has already run: looking is free
    obj = getattr(loaded, attr, None) if loaded is not None else None
    return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None


def is_safe_global(name: str) -> bool:
    """Whether a global a pickle names is a torch or compressor ``nn.Module`` class (safe to rebuild)."""
    return safe_class(name) is not None


def pickle_globals(path: Path, legacy: bool = False) -> list[str]:
    """The globals (``module.name``) a torch file needs beyond torch's own weights-only allowlist,
    listed without loading it."""
    if not legacy:  # named as Python 3 resolves them: protocol 2 writes subprocess.Popen as commands.Popen
        return [py3_name(*g.rsplit(".", 1)) for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)]
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
            found.append(py3_name(*arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            found.append(py3_name(*strings[-2:]) if len(strings) >= 2 else "<a global named indirectly>")
        elif op.name.startswith("EXT"):
            found.append(f"<copyreg extension {arg}>")
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def py3_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 unpickling resolves it (protocol-2 pickles name ``__builtin__.set``)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def refuse_unsafe(path: Path, unsafe: list[str], what: str = "file",
                  which: str = " that are not torch's own") -> None:
    shown = ", ".join(unsafe[:4]) + (f" and {len(unsafe) - 4} more" if len(unsafe) > 4 else "")
    raise CompressorError(f"'{path}' is a pickled {what} whose loading would run code from "
                          f"{len(unsafe)} global(s){which}: {shown}", TRUST_FIX)
