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

This module dispatches on the detected format (:mod:`compressor.formats.detect`) to the loaders:
:mod:`compressor.formats.torch_files` (torch files, pickles, ``--arch``), :mod:`compressor.formats.hf` (Hugging
Face folders, GGUF) and :mod:`compressor.formats.compressed` (compressor's own folders). The names in ``__all__``
stay importable from here: the job stages, the package root and the tests import them from this module.
"""


from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.data.readers import load_safetensors
from compressor.formats.compressed import load_compressed, load_into
from compressor.formats.detect import detect_format
from compressor.formats.hf import hf_config, hf_skeleton, hf_tokenizer, load_gguf, load_hf
from compressor.formats.loaded import EXAMPLE_TEXT, Loaded, infer_example_inputs
from compressor.formats.pickles import TRUST_FIX, is_safe_global, pickle_globals, refuse_unsafe, scan_pickle
from compressor.formats.torch_files import (
    assign_weights,
    build_from_arch,
    load_export,
    load_plain_pickle,
    load_torch,
    strip_wrapper_prefix,
)

__all__ = ["EXAMPLE_TEXT", "TRUST_FIX", "Loaded", "detect_format", "hf_config", "hf_skeleton", "hf_tokenizer",
           "is_safe_global", "load", "load_into", "load_model", "pickle_globals", "refuse_unsafe", "scan_pickle"]


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
        loaded = load_hf(path, trust_pickle, device)
    elif kind == "gguf":
        loaded = load_gguf(path, device)
    elif kind == "torch-export":
        loaded = load_export(path, trust_pickle, device)
    elif kind == "pickle":
        loaded = load_plain_pickle(path, trust_pickle)
    elif kind == "safetensors":
        loaded = Loaded(None, "safetensors", path, state_dict=load_safetensors(path, device))
    else:
        loaded = load_torch(path, trust_pickle, device, legacy=kind == "torch-legacy")
    if arch is not None and loaded.format not in ("state-dict", "safetensors", "compressor"):
        raise CompressorError(f"--arch is only for weights-only files, and '{path}' already holds a whole "
                              f"model ({loaded.format})", "drop --arch")
    if loaded.state_dict is not None and arch is not None:
        model = build_from_arch(arch)
        loaded.state_dict = strip_wrapper_prefix(loaded, set(model.state_dict()))
        assign_weights(model, loaded.state_dict, f"the model built by '{arch}'")
        loaded.model = model
        loaded.meta["arch"] = arch
    elif loaded.state_dict is not None:
        loaded.state_dict = strip_wrapper_prefix(loaded)
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
