"""Loading compressor's own folders (:func:`compressor.formats.save.save`'s): the architecture, then the plan's
factored layers (no SVD), then the weights; and :func:`load_into`, an output folder's factored weights loaded into
the user's own module (for outputs that carry no architecture)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.plan import Plan
from compressor.core.rewrite import build_factored
from compressor.data.readers import load_safetensors
from compressor.formats.detect import FORMAT, INDEX, META, PLAN, STRUCTURE, VERSION, WEIGHTS
from compressor.formats.hf import hf_config, hf_module, hf_tokenizer, read_json
from compressor.formats.loaded import Loaded, infer_example_inputs
from compressor.formats.pickles import TRUST_FIX
from compressor.formats.torch_files import assign_weights, build_from_arch, torch_load


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
