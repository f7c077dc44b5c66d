"""The model card: ``README.md`` in an output folder, as Hugging Face reads one (YAML front matter, then
what the model is, how it was made and what it costs), from the run's own report.

The source folder's card describes the original model, not this one; where the output holds a copy of it
(``compress --stream`` copies a folder's small files), it is kept as :data:`BASE_CARD` and our card links it,
so nothing a user wrote is overwritten or lost.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from compressor.core.fileio import atomic_write_text
from compressor.export.onnx import validation_keys

CARD = "README.md"
BASE_CARD = "README.base_model.md"
MARK = "<!-- written by compressor -->"  # tells our card from one copied in from the source folder
HUB_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")  # a Hugging Face cache folder


def base_model(source: str | Path) -> str | None:
    """The Hub id of the model at ``source`` when its path says it (a Hugging Face cache snapshot, or a
    folder compressor wrote whose card names one); None when it is not known."""
    m = HUB_SNAPSHOT.search(Path(source).as_posix())
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    card = Path(source) / CARD
    if card.is_file() and card.stat().st_size < 1 << 20:
        text = card.read_text(encoding="utf-8", errors="replace")
        found = re.search(r"^base_model: (\S+)$", text, re.MULTILINE)
        if MARK in text and found:
            return found.group(1)
    return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def render_card(folder: Path, facts: dict[str, Any]) -> str:
    """The card of the output ``folder``; ``facts``: a run's report (``report.json`` as a dict) or a heal
    summary (``heal.json``)."""
    healed = "before" in facts and "after" in facts
    source = str(facts.get("source", {}).get("path") if isinstance(facts.get("source"), dict) else facts.get("source"))
    base = base_model(source)
    library = ("sentence-transformers" if (folder / "modules.json").is_file() else
               "transformers" if (folder / "config.json").is_file() else None)
    tags = ["compressor", "low-rank", "svd", *(["distillation"] if healed else [])]
    front = ["---", *([f"base_model: {base}"] if base else []),
             *([f"library_name: {library}"] if library else []), "tags:", *(f"- {t}" for t in tags), "---", ""]
    # The folder being written has a temporary name; the card names the output as the run was told it.
    where = str(facts.get("output") or folder)
    lines = [MARK, "# " + Path(where).name, ""]
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"The model at `{source}`"
    plan = _plan_totals(folder, facts)
    if healed:
        lines += [f"{origin} after compressor's low-rank factorization, healed by training against the original "
                  "(`compress heal`).", ""]
    else:
        lines += [f"{origin} with its weight matrices factored by compressor: each chosen layer `W` is replaced by "
                  "two thin layers (`down`: input -> rank, `up`: rank -> output) from a truncated SVD"
                  + (f" ({facts['method']})" if facts.get("method") else "") + ".", ""]
    lines += ["## Use it", "", "```python", "import compressor  # registers the factored layers with transformers"]
    if library == "sentence-transformers":
        lines += ["from sentence_transformers import SentenceTransformer", "",
                  f'model = SentenceTransformer("{where}")']
    elif library == "transformers":
        lines += ["from transformers import AutoModel", "", f'model = AutoModel.from_pretrained("{where}")']
    else:
        lines += ["", f'model = compressor.load("{where}")']
    lines += ["```", "", "Without `import compressor`, transformers refuses to load the folder (it would otherwise "
              "fill the factored layers with random weights).", ""]
    lines += ["## What was done", ""]
    if plan:
        lines += [f"- parameters: {plan['params_before']:,} -> {plan['params_after']:,} "
                  f"({plan['params_after'] / max(plan['params_before'], 1):.1%})",
                  f"- layers factored: {plan['layers_factored']} of {plan['layers_supported']} factorizable; "
                  f"{plan['removed_fraction']:.1%} of their weights removed"]
    if facts.get("policy"):
        shown = {k: v for k, v in facts["policy"].items() if v not in ([], None)}
        lines.append("- rank policy: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    if (facts.get("calibration") or {}).get("samples"):
        lines.append(f"- data-aware factors, calibrated on {facts['calibration']['samples']} samples")
    lines += ["", "## Measured", ""]
    lines += _measured(facts, healed) or ["- nothing was measured in this run (see report.md)"]
    sizes = {name: (folder / name).stat().st_size for name in sorted(p.name for p in folder.iterdir())
             if name.endswith((".safetensors", ".onnx", ".data"))}
    if sizes:
        lines += ["", "| file | size |", "|---|---:|", *(f"| {n} | {_mb(s)} |" for n, s in sizes.items())]
    lines += ["", "## How it was made", ""]
    command = facts.get("command")
    lines += [f"```\n{command}\n```" if command else "From Python (compressor's API); the options are in "
              + ("heal.json." if healed else "report.json.")]
    version = (facts.get("versions") or {}).get("compressor")
    lines += ["", f"compressor {version}" if version else "compressor", ""]
    if (folder / BASE_CARD).is_file():
        lines += [f"The original model's card is kept as [{BASE_CARD}]({BASE_CARD}).", ""]
    return "\n".join(front + lines)


def _plan_totals(folder: Path, facts: dict[str, Any]) -> dict[str, Any] | None:
    if facts.get("plan_totals"):
        return facts["plan_totals"]
    try:  # a healed folder: the plan it was healed with
        return json.loads((folder / "plan.json").read_text(encoding="utf-8"))["totals"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _measured(facts: dict[str, Any], healed: bool) -> list[str]:
    out = []
    if healed:
        for k, v in (facts.get("after") or {}).items():
            before = (facts.get("before") or {}).get(k)
            if isinstance(v, int | float):
                was = f" (before healing: {before:.5g})" if isinstance(before, int | float) else ""
                out.append(f"- {k} on the validation data: {v:.5g}{was}")
        return out
    f = facts.get("fidelity")
    if f:
        what = f.get("compared") or "every output"
        # A difference that was not finite is stored as None (JSON holds no NaN): "n/a", as report.md says it.
        cos, low, rel = (("n/a" if f.get(k) is None else f"{f[k]:.5f}")
                         for k in ("cosine_mean", "cosine_min", "relative_error"))
        out.append(f"- fidelity to the original on {f.get('inputs', 'the example inputs')} ({what}): cosine mean "
                   f"{cos}, min {low}, relative error {rel}")
    for name, p in ((facts.get("perplexity") or {}).get("models") or {}).items():
        if isinstance(p, dict) and p.get("ppl") is not None:
            out.append(f"- perplexity ({name}): {p['ppl']:.4g}")
    for key in validation_keys():
        v = facts.get(key) or {}
        if "passed" in v and "path" in v:
            out.append(f"- {v['path']}: validated against the torch model, "
                       f"{'passed' if v['passed'] else 'FAILED'}")
    for w in facts.get("warnings") or []:
        out.append(f"- warning: {w.get('cli') or w.get('message')}")
    return out


def write_model_card(folder: Path, facts: dict[str, Any]) -> None:
    """Write the card into ``folder`` (being written), first moving a card copied from the source aside."""
    card = folder / CARD
    if card.is_file() and MARK not in card.read_text(encoding="utf-8", errors="replace"):
        card.replace(folder / BASE_CARD)
    atomic_write_text(card, render_card(folder, facts))
