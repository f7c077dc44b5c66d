"""LoRA jobs on files, one Python call each (``compress lora ...`` is a thin shell over them):

    extract_folder("base/", "tuned/", "adapter/", energy=0.9)   # the adapter explaining tuned - base
    merge_folder("base/", "adapter/", "merged/")                # base + adapter, a model folder again

Adapters are PEFT's two files (:mod:`compressor.train.adapter`); ``extract`` adds ``extract.json`` and
``extract.md`` (per layer: the rank kept and the reconstruction error) beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compressor.core.errors import CompressorError
from compressor.core.output import OutputDir, check_not_over_inputs
from compressor.formats.load import Loaded, load_model
from compressor.formats.save import save
from compressor.train.adapter import Adapter, check_extract_options, check_finite, extract_adapter
from compressor.train.lora import merge_lora


def _load(path: Path, what: str, trust_pickle: bool, arch: str | None) -> Loaded:
    loaded = load_model(path, trust_pickle=trust_pickle, arch=arch)
    if loaded.model is None:
        raise CompressorError(f"the {what} '{path}' holds only weights (a state_dict), not a model",
                              "pass arch='package.module:factory' building the model they belong to",
                              cli_fix="pass --arch package.module:factory building the model they belong to")
    return loaded


def extract_folder(base: str | Path, tuned: str | Path, out: str | Path, *, energy: float | None = None,
                   rank: int | None = None, force: bool = False, trust_pickle: bool = False,
                   arch: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Write the adapter that turns ``base`` into ``tuned`` (see :func:`extract_adapter`) to ``out``, with
    its per-layer report; returns the report."""
    base, tuned, out = Path(base), Path(tuned), Path(out)
    check_not_over_inputs(out, [("base model", base), ("tuned model", tuned)])
    OutputDir(out, force).check()
    check_extract_options(energy, rank)  # before the (slow) loading
    b = _load(base, "base model", trust_pickle, arch)
    t = _load(tuned, "tuned model", trust_pickle, arch)
    adapter, rows, others = extract_adapter(b.model, t.model, energy=energy, rank=rank,
                                            base_model_name_or_path=str(base.resolve()))
    weights = sum(p.numel() * p.element_size() for p in b.model.parameters())
    report = {"command": command, "base": str(base), "tuned": str(tuned), "energy": energy, "rank": rank,
              "adapter_bytes": adapter.num_bytes(), "model_bytes": weights,
              "layers": [vars(r) | {"shape": list(r.shape)} for r in rows],
              "not_in_adapter": others}
    with OutputDir(out, force) as tmp:
        adapter.write_into(tmp)
        (tmp / "extract.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "extract.md").write_text(extract_markdown(report))
    return report


def extract_markdown(report: dict[str, Any]) -> str:
    how = f"energy {report['energy']}" if report["energy"] is not None else f"rank {report['rank']}"
    lines = [f"# LoRA extracted from {report['tuned']} over {report['base']} ({how})", "",
             f"Adapter {report['adapter_bytes']:,} bytes; the base model's weights {report['model_bytes']:,} bytes.",
             "", "Per layer, the truncated SVD of (tuned - base); the error is ||delta - B A|| (Frobenius), "
             "the smallest any adapter of that rank can leave (Eckart-Young).", "",
             "| layer | kind | matrix | rank | of | energy kept | relative error |", "|---|---|---|---|---|---|---|"]
    for r in report["layers"]:
        lines.append(f"| {r['layer']} | {r['kind']} | {r['shape'][0]}x{r['shape'][1]} | {r['rank']} | "
                     f"{r['full_rank']} | {r['energy_kept']:.4f} | {r['rel_error']:.2e} |")
    if report["not_in_adapter"]:
        lines += ["", "Changed but not carried by the adapter (relative change):", ""]
        lines += [f"- {k}: {v:.2e}" for k, v in report["not_in_adapter"].items()]
    if report.get("command"):
        lines += ["", f"Made by: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def merge_folder(base: str | Path, adapter: str | Path, out: str | Path, *, force: bool = False,
                 trust_pickle: bool = False, arch: str | None = None) -> Path:
    """Apply the adapter folder ``adapter`` (compressor's or PEFT's) to ``base``, merge it into the weights
    and save the model to ``out``: a Hugging Face folder for a Hugging Face base, else a folder
    :func:`compressor.load` reads. Returns ``out``."""
    base, adapter, out = Path(base), Path(adapter), Path(out)
    check_not_over_inputs(out, [("base model", base), ("adapter", adapter)])
    OutputDir(out, force).check()
    lora = Adapter.load(adapter)
    loaded = _load(base, "base model", trust_pickle, arch)
    lora.apply(loaded.model)
    merge_lora(loaded.model)
    check_finite(loaded.model, list(lora.layers))  # before any weight is written
    with OutputDir(out, force) as tmp:
        if loaded.format == "hf-folder":
            loaded.model.save_pretrained(tmp, safe_serialization=True)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp)
        else:
            save(loaded.model, tmp, loaded.meta.get("plan"), source=loaded, atomic=False)
    return out
