"""Save a compressed model as a folder anyone can load back (:func:`compressor.formats.load.load_model`
reads it).

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
from compressor.core.fileio import atomic_folder, atomic_write_text
from compressor.core.layers import LOW_RANK_TYPES
from compressor.core.plan import Plan
from compressor.core.rewrite import factored_table
from compressor.core.version import __version__
from compressor.formats.detect import FORMAT, META, PLAN, STRUCTURE, VERSION, WEIGHTS
from compressor.formats.dropin import copy_sentence_transformers, mark_hf_config
from compressor.formats.loaded import Loaded
from compressor.formats.pickles import is_safe_global, pickle_globals


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
    write_meta(tmp, _write_architecture(model, tmp, plan, source),
               sum(isinstance(m, LOW_RANK_TYPES) for m in model.modules()),
               (str(source.source), source.format) if source is not None else None)


def write_meta(folder: Path, architecture: dict, factored_layers: int,
               source: tuple[str, str] | None = None) -> None:
    """Write ``compressor.json`` (atomically) into ``folder``: how to rebuild the architecture (see
    :func:`hf_architecture`), how many layers the plan factored, and ``(path, format)`` of the original."""
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                            "compressor_version": __version__, "torch_version": torch.__version__,
                            "architecture": architecture, "factored_layers": factored_layers}
    if source is not None:
        meta["source"] = {"path": source[0], "format": source[1]}
    atomic_write_text(folder / META, json.dumps(meta, indent=2) + "\n")


def hf_architecture(model: nn.Module) -> dict | None:
    """The ``architecture`` entry of ``compressor.json`` for a Hugging Face model (a skeleton on the meta
    device will do), or None when ``model`` is not one transformers can rebuild from its config."""
    transformers = sys.modules.get("transformers")  # an HF model means transformers is imported already
    if (transformers is not None and isinstance(model, transformers.PreTrainedModel)
            and getattr(transformers, type(model).__name__, None) is type(model)):
        return {"kind": "hf", "class": type(model).__name__,
                "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    return None


def _write_architecture(model: nn.Module, tmp: Path, plan: Plan | None, source: Loaded | None) -> dict:
    hf = hf_architecture(model)
    if hf is not None:
        _check_plan_matches(model, plan)
        model.config.to_json_file(tmp / "config.json")
        mark_hf_config(tmp, factored_table(plan) if plan is not None else {})  # from_pretrained builds them
        tokenizer = source.tokenizer if source is not None else None
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if source is not None and source.source.is_dir():  # its pooling etc. go with the transformer
            copy_sentence_transformers(source.source, tmp)
        return hf
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
