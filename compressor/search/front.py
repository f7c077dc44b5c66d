"""Measured points, the size / fidelity front, the choice rule, and the front as Markdown and plots."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write
from compressor.export.latency import LATENCY_MAC_GAP
from compressor.search.recipes import Constraints, Recipe

# ------------------------------------------------------------------------------------------- points


@dataclass
class Point:
    """One measured recipe: its exported file, fidelity, latency and whether onnxruntime validated it."""

    recipe: Recipe
    size_bytes: int
    fidelity: float
    metrics: dict[str, float]
    latency_ms: float
    params: int
    passed: bool  # onnx.checker + onnxruntime validation against the torch model it came from
    problems: list[str] = field(default_factory=list)
    plan_totals: dict[str, Any] | None = None
    heal: dict[str, Any] | None = None
    build_s: float = 0.0
    onnx: str = ""  # the cached ONNX file
    cached: bool = False  # True: read from the cache in this search, nothing was built
    kept_fp16: list[str] = field(default_factory=list)  # int8 recipes: the layers stored as fp16
    # Latency-aware searches: latency / dense fp32 latency timed side by side, for the points checked.
    latency_vs_dense: float | None = None
    slower_than_dense: bool = False  # measured so: never chosen
    # With an evaluation text: the file's perplexity on it, and that over the dense fp32 export's.
    perplexity: float | None = None
    perplexity_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recipe"] = self.recipe.to_dict()
        d["name"] = self.recipe.name
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        d = {k: v for k, v in d.items() if k != "name"}
        return cls(**{**d, "recipe": Recipe.from_dict(d["recipe"])})

    def meets(self, c: Constraints, fp32_bytes: int) -> dict[str, bool]:
        """Each given constraint -> whether this point meets it."""
        out = {}
        if c.max_size is not None:
            out["max_size"] = self.size_bytes <= c.size_limit(fp32_bytes)
        if c.min_fidelity is not None:
            out["min_fidelity"] = self.fidelity >= c.min_fidelity
        if c.max_latency_ms is not None:
            out["max_latency"] = self.latency_ms <= c.max_latency_ms
        if c.max_perplexity_ratio is not None:
            out["max_perplexity_ratio"] = (self.perplexity_ratio is not None
                                           and self.perplexity_ratio <= c.max_perplexity_ratio)
        return out


@dataclass
class SearchResult:
    chosen: Point | None
    points: list[Point]  # every measured candidate, references first
    # {"recipe", "name", "reason"}: not built, and why; with "built": True, built but set aside (its file
    # does not run in onnxruntime, so it has no measurement)
    skipped: list[dict[str, Any]]
    constraints: Constraints
    rule: str
    metric: str
    fp32_bytes: int
    built: int  # candidates built (exported) in this search; the rest came from the cache
    latency: dict[str, Any]
    perplexity: dict[str, Any] | None = None  # with an evaluation text: its protocol (Protocol.summary)

    def reference(self, precision: str) -> Point:
        return next(p for p in self.points if p.recipe == Recipe(precision))

    def to_dict(self) -> dict[str, Any]:
        front = pareto(self.points)
        return {
            "constraints": asdict(self.constraints),
            "constraints_text": self.constraints.describe(self.fp32_bytes),
            "rule": self.rule, "metric": self.metric, "fp32_bytes": self.fp32_bytes, "built": self.built,
            "latency": self.latency, "perplexity": self.perplexity,
            "chosen": self.chosen.recipe.name if self.chosen else None,
            "points": [{**p.to_dict(), "pareto": p in front,
                        "meets": p.meets(self.constraints, self.fp32_bytes)} for p in self.points],
            "skipped": self.skipped,
        }


def pareto(points: Iterable[Point]) -> list[Point]:
    """The validated points no other validated point beats on both size and fidelity."""
    ok = [p for p in points if p.passed]
    return [p for p in ok if not any(q.size_bytes <= p.size_bytes and q.fidelity >= p.fidelity and
                                     (q.size_bytes < p.size_bytes or q.fidelity > p.fidelity) for q in ok)]


def beats(p: Point, ref: Point) -> bool:
    """Strictly better than ``ref``: smaller at equal or better fidelity, or more faithful at equal or
    smaller size."""
    return (p.size_bytes < ref.size_bytes and p.fidelity >= ref.fidelity) or \
        (p.fidelity > ref.fidelity and p.size_bytes <= ref.size_bytes)


DENSE_INT8 = Recipe("int8")


def versus(result: SearchResult, reference: Recipe = DENSE_INT8) -> dict[str, Any]:
    """Which measured points strictly beat ``reference`` (dense int8 by default), and the best of them:
    the smallest among those at least as faithful, else the most faithful among those no larger."""
    ref = next(p for p in result.points if p.recipe == reference)
    winners = [p for p in result.points if p.passed and beats(p, ref)]
    out: dict[str, Any] = {"reference": ref.recipe.name, "reference_size_bytes": ref.size_bytes,
                           "reference_fidelity": ref.fidelity, "beaten_by": [p.recipe.name for p in winners]}
    at_least = [p for p in winners if p.fidelity >= ref.fidelity]
    best = min(at_least, key=lambda p: (p.size_bytes, -p.fidelity)) if at_least else \
        max(winners, key=lambda p: (p.fidelity, -p.size_bytes)) if winners else None
    if best is None:  # say how far the nearest point misses: the most faithful point no larger
        smaller = [p for p in result.points if p.passed and p.size_bytes <= ref.size_bytes and p is not ref]
        best = max(smaller, key=lambda p: p.fidelity) if smaller else None
    if best is not None:
        out.update(best=best.recipe.name, beats=best in winners, size_bytes=best.size_bytes,
                   fidelity=best.fidelity, size_change=best.size_bytes / ref.size_bytes - 1,
                   fidelity_change=best.fidelity - ref.fidelity)
    return out


def versus_headline(vs: dict, metric: str, mb_digits: int = 2, digits: int = 5) -> str:
    """One line saying whether the best low-rank point of :func:`versus` beats dense int8, and by how much."""
    if "best" not in vs:
        return "no low-rank point is as small as dense int8"
    verb = "beats" if vs["beats"] else "does NOT beat"
    return (f"{vs['best']} {verb} dense int8 measured in the same run: {vs['size_bytes'] / 1e6:.{mb_digits}f} MB vs "
            f"{vs['reference_size_bytes'] / 1e6:.{mb_digits}f} MB ({vs['size_change']:+.1%} size), {metric} "
            f"{vs['fidelity']:.{digits}f} vs {vs['reference_fidelity']:.{digits}f} "
            f"({vs['fidelity_change']:+.{digits}f})")


def choose(result: SearchResult) -> Point:
    """The point the rule picks, or :class:`CompressorError` naming what cannot be met."""
    c, fp32 = result.constraints, result.fp32_bytes
    valid = [p for p in result.points if p.passed and not p.slower_than_dense]
    ok = [p for p in valid if all(p.meets(c, fp32).values())]
    if ok:
        if c.min_fidelity is not None:
            return min(ok, key=lambda p: (p.size_bytes, -p.fidelity, p.latency_ms))
        return min(ok, key=lambda p: (-p.fidelity, p.size_bytes, p.latency_ms))
    if not valid:
        raise CompressorError("no candidate passed onnxruntime validation",
                              "see the problems in the search log and report the model")
    names = {"max_size": "--max-size", "min_fidelity": "--min-fidelity", "max_latency": "--max-latency",
             "max_perplexity_ratio": "--max-perplexity-ratio"}
    alone = [k for k in names if k in valid[0].meets(c, fp32) and not any(p.meets(c, fp32)[k] for p in valid)]
    closest = min(valid, key=lambda p: _violation(p, c, fp32))
    what = (" and ".join(names[k] for k in alone) + " cannot be met by any candidate" if alone else
            "no candidate meets " + " together with ".join(names[k] for k in names if k in closest.meets(c, fp32)))
    slow = [p.recipe.name for p in result.points if p.slower_than_dense]
    aside = (f"; set aside as measured slower than dense fp32 (latency-aware): {', '.join(slow)}" if slow else "")
    fix = "relax the constraint, or allow more recipes (other --targets, --heal-steps)"
    raise CompressorError(f"{what} ({c.describe(fp32)}; {len(valid)} measured); the closest is "
                          f"{describe_point(closest, result.metric)}{aside}",
                          fix + (", or pass latency_aware=False to choose by size and fidelity alone" if slow else ""),
                          cli_fix=fix + (", or pass --no-latency-aware to choose by size and fidelity alone"
                                         if slow else ""))


def describe_point(p: Point, metric: str = "fidelity") -> str:
    ppl = "" if p.perplexity_ratio is None else f", perplexity {p.perplexity_ratio:.4f}x dense"
    return (f"{p.recipe.name} ({p.size_bytes / 1e6:.2f} MB, {metric.split(' ')[0]} {p.fidelity:.4f}, "
            f"{p.latency_ms:.2f} ms{ppl})")


def _violation(p: Point, c: Constraints, fp32_bytes: int) -> float:
    """How far ``p`` is from meeting ``c``: the sum of relative shortfalls."""
    v = 0.0
    if c.max_size is not None:
        v += max(0.0, p.size_bytes / c.size_limit(fp32_bytes) - 1)
    if c.min_fidelity is not None:
        v += max(0.0, (c.min_fidelity - p.fidelity) / max(abs(c.min_fidelity), 1e-12))
    if c.max_latency_ms is not None:
        v += max(0.0, p.latency_ms / c.max_latency_ms - 1)
    if c.max_perplexity_ratio is not None:
        v += math.inf if p.perplexity_ratio is None else max(0.0, p.perplexity_ratio / c.max_perplexity_ratio - 1)
    return v


# --------------------------------------------------------------------------------- report and plots


def _latency_lines(result: dict[str, Any]) -> list[str]:
    """Latency-aware searches: what the side-by-side check against dense fp32 found."""
    if not result["latency"].get("latency_aware"):
        return ["- latency-aware: off (chosen by size and fidelity alone)"]
    checked = [p for p in result["points"] if p.get("latency_vs_dense") is not None]
    lines = ["- latency-aware: low-rank recipes keep dense the layers whose factored form was measured slower; "
             "the chosen file was timed side by side with dense fp32"]
    lines += [f"  - {p['name']}: {p['latency_vs_dense']:.3f}x the dense fp32 latency"
              + (" (slower: set aside)" if p.get("slower_than_dense") else "") for p in checked]
    return lines


def front_markdown(result: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The measured front as a Markdown section: constraints, rule, chosen point, table and plots.

    ``result`` is :meth:`SearchResult.to_dict`; dense fp32/fp16/int8 are on it as references.
    """
    pts = result["points"]
    fp32 = result["fp32_bytes"]
    ref8 = next((p for p in pts if p["name"] == "dense-int8"), None)
    lines = ["## Measured front: size, fidelity and latency per recipe", "",
             f"- fidelity: {result['metric']} (on held-out inputs, through onnxruntime)",
             f"- latency: {result['latency']['statistic']} of {result['latency']['runs']} onnxruntime runs, "
             f"{result['latency']['threads']} threads, inputs {result['latency']['inputs']}",
             *([f"- perplexity: on `{pp['corpus']}` (sha256 {pp['sha256'][:12]}), {pp['tokens']:,} predicted tokens "
                f"in {pp['windows']} windows of {pp['window']} positions, stride {pp['stride']}, "
                f"{'BOS first in each' if pp['bos'] else 'no BOS'}; through onnxruntime, ratio to dense fp32"]
               if (pp := result.get("perplexity")) else []),
             f"- constraints: {result['constraints_text']}",
             f"- rule: {result['rule']}",
             f"- chosen: **{result['chosen'] or 'none'}**",
             f"- built in this run: {result['built']} of {len(pts)} (the rest came from the cache)",
             *_latency_lines(result), "",
             "| recipe | size | vs fp32 | fidelity | other metrics | latency | latency vs fp32 | MAC ratio | params | "
             "valid | front | meets | vs dense int8 |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---|---|---|---|"]
    dense_ms = next((p["latency_ms"] for p in pts if p["name"] == "dense-fp32"), None)
    differ = []
    for p in sorted(pts, key=lambda p: p["size_bytes"]):
        totals = p.get("plan_totals") or {}
        macs = totals["macs_after"] / totals["macs_before"] if totals.get("macs_before") else 1.0
        lat = p["latency_ms"] / dense_ms if dense_ms else None
        if lat is not None and abs(lat - macs) > LATENCY_MAC_GAP:
            differ.append(f"{p['name']} ({lat:.2f}x the latency, {macs:.2f}x the multiply-adds)")
        others = ", ".join([f"{k} {v:.4f}" for k, v in p["metrics"].items() if k != "fidelity"]
                           + ([f"perplexity {p['perplexity']:.4f} ({p['perplexity_ratio']:.4f}x dense)"]
                              if p.get("perplexity") is not None else []))
        meets = "all" if p["meets"] and all(p["meets"].values()) else \
            ", ".join(f"not {k}" for k, ok in p["meets"].items() if not ok) or "-"
        name = f"**{p['name']}** (chosen)" if p["name"] == result["chosen"] else p["name"]
        lines.append(f"| {name} | {p['size_bytes'] / 1e6:.2f} MB | {p['size_bytes'] / fp32:.3f} | "
                     f"{p['fidelity']:.5f} | {others} | {p['latency_ms']:.2f} ms | "
                     f"{'-' if lat is None else f'{lat:.3f}'} | {macs:.3f} | {p['params']:,} | "
                     f"{'PASS' if p['passed'] else '**FAIL**'} | {'yes' if p['pareto'] else ''} | {meets} | "
                     f"{_vs(p, ref8)} |")
    lines.append("")
    if differ:  # latency vs fp32 from separate medians; MAC ratio of the factorizable layers
        lines += [f"Latency and multiply-adds differ by more than {LATENCY_MAC_GAP}: {', '.join(differ)}", ""]
    seen = set()
    for p in pts:  # one line per low-rank model (its precisions share it)
        ranks = (p.get("plan_totals") or {}).get("factored_ranks")
        base = Recipe.from_dict(p["recipe"]).base().name
        if ranks is not None and base not in seen:
            seen.add(base)
            shown = ", ".join(f"{n} (rank {r})" for n, r in list(ranks.items())[:6])
            more = f" and {len(ranks) - 6} more" if len(ranks) > 6 else ""
            lines.append(f"- {base.removesuffix('-fp32')} factors {len(ranks)} layers: {shown}{more}")
    if seen:
        lines.append("")
    for p in pts:
        if p.get("kept_fp16"):
            lines.append(f"- {p['name']} keeps in fp16: {', '.join(p['kept_fp16'])}")
    if any(p.get("kept_fp16") for p in pts):
        lines.append("")
    for s in result["skipped"]:
        lines.append(f"> {'set aside' if s.get('built') else 'not built'}: {s['name']}: {s['reason']}")
    if result["skipped"]:
        lines.append("")
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _vs(p: dict[str, Any], ref: dict[str, Any] | None) -> str:
    """Size and fidelity relative to dense int8, and whether it strictly beats it."""
    if ref is None or p is ref:
        return "reference" if p is ref else ""
    size = p["size_bytes"] / ref["size_bytes"] - 1
    fid = p["fidelity"] - ref["fidelity"]
    better = (p["size_bytes"] < ref["size_bytes"] and p["fidelity"] >= ref["fidelity"]) or \
        (p["fidelity"] > ref["fidelity"] and p["size_bytes"] <= ref["size_bytes"])
    return f"{size:+.1%} size, {fid:+.4f} fidelity" + (" **beats**" if better else "")


def plot_front(result: dict[str, Any], folder: Path, prefix: str = "front") -> list[str]:
    """``<prefix>_size.png`` (size vs fidelity) and ``<prefix>_latency.png`` (latency vs fidelity) in
    ``folder``; returns their file names. The chosen point is starred, the references labelled. When the
    front also has fp32/fp16 points, a second panel zooms on the int8 points, where the comparison with
    dense int8 is decided, with dense int8's size and fidelity drawn as lines: a point up and to the left
    of both beats it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    int8 = [p for p in result["points"] if p["recipe"]["precision"] == "int8"]
    zoom = 1 < len(int8) < len(result["points"])
    for key, label, scale, suffix in (("size_bytes", "exported file (MB)", 1e-6, "size"),
                                      ("latency_ms", "onnxruntime latency (ms, median)", 1.0, "latency")):
        fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(12 if zoom else 7, 4.5), squeeze=False)
        _draw_front(axes[0][0], result, result["points"], key, scale, suffix)
        axes[0][0].set_title("squares: dense references; circles: low-rank; colour: fp32 / fp16 / int8 / int4",
                             fontsize=8)
        if zoom:
            ax = axes[0][1]
            _draw_front(ax, result, int8, key, scale, suffix)
            ref = next((p for p in int8 if p["name"] == "dense-int8"), None)
            if ref is not None:
                ax.axvline(ref[key] * scale, color="tab:red", ls=":", lw=0.8)
                ax.axhline(ref["fidelity"], color="tab:red", ls=":", lw=0.8)
            ax.set_title("int8 points only; dotted: dense int8 (up and left of both lines beats it)", fontsize=8)
        for ax in axes[0]:
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("fidelity:\n" + textwrap.shorten(result["metric"].split(" (")[0], 60), fontsize=8)
        fig.tight_layout()
        name = f"{prefix}_{suffix}.png"
        atomic_write(Path(folder) / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        names.append(name)
    return names


def _draw_front(ax, result: dict[str, Any], points: list[dict[str, Any]], key: str, scale: float,
                suffix: str) -> None:
    # A precision without a colour of its own (a new export variant) is drawn grey rather than failing.
    colors = {"fp32": "tab:blue", "fp16": "tab:green", "int8": "tab:red", "qdq": "tab:orange", "int4": "tab:purple"}
    for p in points:
        x, y = p[key] * scale, p["fidelity"]
        dense = p["recipe"]["target"] is None
        ax.scatter(x, y, c=colors.get(p["recipe"]["precision"], "tab:gray"), marker="s" if dense else "o",
                   s=60 if dense else 30, edgecolors="black" if dense else "none", alpha=1.0 if p["passed"] else 0.3)
        if dense or p["name"] == result["chosen"]:
            ax.annotate(p["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        if p["name"] == result["chosen"]:
            ax.scatter(x, y, marker="*", s=300, facecolors="none", edgecolors="gold", linewidths=2)
    c = result["constraints"]
    if c["min_fidelity"] is not None:
        ax.axhline(c["min_fidelity"], color="gray", ls="--", lw=0.8)
    limit = c["max_size"] if suffix == "size" else c["max_latency_ms"]
    if limit is not None:
        if suffix == "size" and limit <= 1:
            limit *= result["fp32_bytes"]
        ax.axvline(limit * scale, color="gray", ls="--", lw=0.8)
