"""Save a compressed model as a folder anyone can load back, and load such folders.

    compressor.save(model, "out/", plan, source=loaded)   # -> out/ with model.safetensors, plan.json, ...
    model = compressor.load("out/")

The folder holds ``model.safetensors`` (the weights, no pickle), ``plan.json`` (the ranks), and
``compressor.json`` saying how to rebuild the architecture, one of:

* ``hf``: a Hugging Face model; ``config.json`` and the tokenizer files are copied in, so the folder
  stands alone, and the factored layers are re-created from ``plan.json`` (no SVD);
* ``structure``: ``model.pt``, the module tree with its weights left out (meta tensors), made only of
  torch's and compressor's classes, so it loads weights-only with no flag;
* ``arch``: a ``package.module:factory`` the user named; importing it again is the user's choice, so
  loading needs ``arch=`` (``--arch``) or ``trust_pickle``;
* ``pickle``: ``model.pt`` naming the user's own classes: it needs ``trust_pickle``, as the original did.

The folder is written beside its target and renamed into place: never half-written.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_folder
from compressor.core.layers import LOW_RANK_TYPES
from compressor.core.plan import Plan
from compressor.core.rewrite import build_factored
from compressor.core.version import __version__
from compressor.formats.load import (
    Loaded,
    assign_weights,
    build_from_arch,
    hf_config,
    hf_module,
    hf_tokenizer,
    infer_example_inputs,
    load_safetensors,
    read_json,
    torch_load,
)
from compressor.formats.pickles import TRUST_FIX, is_safe_global, pickle_globals

FORMAT = "compressor-model"
VERSION = 1
WEIGHTS, PLAN, META, STRUCTURE = "model.safetensors", "plan.json", "compressor.json", "model.pt"


def save(model: nn.Module, directory: str | Path, plan: Plan | None = None, *,
         source: Loaded | None = None, overwrite: bool = False, atomic: bool = True) -> Path:
    """Write ``model`` (and ``plan``) to the folder ``directory`` atomically; returns its path.

    ``source`` is what :func:`compressor.load_model` returned for the original, so the folder can say how
    to rebuild the architecture (HF config and tokenizer, ``arch``). An existing non-empty folder is
    refused unless ``overwrite``. ``atomic=False`` writes straight into ``directory`` (created if
    needed): for a caller that publishes its own temporary folder, which may hold other files.
    """
    directory = Path(directory)
    if not atomic:
        directory.mkdir(parents=True, exist_ok=True)
        _write(model, directory, plan, source)
        return directory
    if directory.exists() and not (directory.is_dir() and not any(directory.iterdir())) and not overwrite:
        raise CompressorError(f"output '{directory}' already exists",
                              "choose another output folder, or pass --force to replace it")
    with atomic_folder(directory, force=True) as tmp:  # an empty folder, or overwrite: replaced
        _write(model, tmp, plan, source)
    return directory


def _write(model: nn.Module, tmp: Path, plan: Plan | None, source: Loaded | None) -> None:
    from safetensors.torch import save_model
    # save_model writes each tied tensor once and makes views contiguous.
    save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
    if plan is not None:
        plan.to_json(tmp / PLAN)
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                            "compressor_version": __version__, "torch_version": torch.__version__,
                            "architecture": _write_architecture(model, tmp, plan, source),
                            "factored_layers": sum(isinstance(m, LOW_RANK_TYPES) for m in model.modules())}
    if source is not None:
        meta["source"] = {"path": str(source.source), "format": source.format}
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")


def _write_architecture(model: nn.Module, tmp: Path, plan: Plan | None, source: Loaded | None) -> dict:
    transformers = sys.modules.get("transformers")  # an HF model means transformers is imported already
    if (transformers is not None and isinstance(model, transformers.PreTrainedModel)
            and getattr(transformers, type(model).__name__, None) is type(model)):
        _check_plan_matches(model, plan)
        model.config.to_json_file(tmp / "config.json")
        tokenizer = source.tokenizer if source is not None else None
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return {"kind": "hf", "class": type(model).__name__,
                "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    torch.save(_meta_copy(model), tmp / STRUCTURE)
    unsafe = [g for g in pickle_globals(tmp / STRUCTURE) if not is_safe_global(g)]
    if not unsafe:
        return {"kind": "structure", "file": STRUCTURE}
    arch = source.meta.get("arch") if source is not None else None
    if arch is not None:
        _check_plan_matches(model, plan)
        (tmp / STRUCTURE).unlink()
        return {"kind": "arch", "arch": arch}
    return {"kind": "pickle", "file": STRUCTURE, "needs_trust_pickle": True, "globals": unsafe}


def _check_plan_matches(model: nn.Module, plan: Plan | None) -> None:
    # These kinds rebuild the factored layers from the plan, so it must name exactly those layers.
    factored = {name for name, mod in model.named_modules() if isinstance(mod, LOW_RANK_TYPES)}
    planned = {lp.name for lp in plan.factored} if plan is not None else set()
    if factored != planned:
        raise CompressorError(f"the plan names {len(planned)} factored layers but the model has "
                              f"{len(factored)}", "pass the plan that was applied to this model")


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and saved buffers are meta tensors (no data)."""
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for key, b in mod._buffers.items():
            # Non-persistent buffers are not in the weights file, so they keep their values here.
            if b is not None and key not in mod._non_persistent_buffers_set and id(b) not in memo:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)




# ------------------------------------------------------------------------------------------- loading


def load_compressed(directory: str | Path, *, trust_pickle: bool = False, arch: str | None = None,
                    device: str | torch.device | None = None) -> Loaded:
    """Rebuild the model in a folder written by :func:`save`: architecture, then the plan's factored
    layers (no SVD), then the weights."""
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
    for name in (WEIGHTS, *((PLAN,) if needs_plan else ())):
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
    assign_weights(model, load_safetensors(directory / WEIGHTS, device), f"'{directory}'")
    if device is not None:
        model.to(device)  # buffers the weights file does not hold
    model.eval()
    return Loaded(model, "compressor", directory, example_inputs=infer_example_inputs(model, tokenizer),
                  tokenizer=tokenizer,
                  meta={"compressor": meta, "plan": plan, "arch": arch or stored_arch,
                        "needs_trust_pickle": needs_trust})


def _build_hf(directory: Path, info: dict) -> nn.Module:
    transformers = hf_module()
    cls = getattr(transformers, info.get("class", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CompressorError(f"'{directory}' needs the transformers class {info.get('class')!r}, which "
                              "this transformers does not have",
                              "install the transformers version it was saved with")
    hf_config(directory)  # refuses a config.json (or tokenizer) that asks to run the folder's code
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CompressorError(f"could not read the Hugging Face config in '{directory}' ({first})",
                              "save the compressed model again") from None
    kwargs = {"attn_implementation": info["attn_implementation"]} if info.get("attn_implementation") else {}
    return cls._from_config(config, **kwargs)
