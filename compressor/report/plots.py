"""Plots of what compression sees and what it costs, as PNG files (needs ``pip install 'compressor[plots]'``).

    paths = plot_spectra(model_or_plan, "out/")     # -> [out/spectra.png, out/energy.png]
    plot_fidelity(rows, "out/fidelity.png")         # fidelity vs size, one line per policy
    plot_latency(rows, "out/latency.png")           # latency ratio vs parameter and MAC ratio

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
state) and written atomically.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write_bytes
from compressor.core.plan import Plan

# Layer groups by name, for transformers (BERT and LLaMA-style names); anything else is grouped by kind.
# Order matters: "attention.output.dense" must be claimed before the generic "output.dense".
GROUPS = (
    ("query", re.compile(r"(^|\.)(query|q_proj|q)$")),
    ("key", re.compile(r"(^|\.)(key|k_proj|k)$")),
    ("value", re.compile(r"(^|\.)(value|v_proj|v)$")),
    ("attention output", re.compile(r"attention\.output\.dense$|(^|\.)(o_proj|out_proj)$")),
    ("intermediate", re.compile(r"intermediate\.dense$|(^|\.)(up_proj|gate_proj|fc1)$")),
    ("output", re.compile(r"(^|\.)output\.dense$|(^|\.)(down_proj|fc2)$")),
    ("pooler", re.compile(r"(^|\.)pooler\.")),
)


def layer_group(name: str, kind: str) -> str:
    """The group a layer is plotted in: its role in a transformer block when the name says, else its kind."""
    if kind == "embedding":
        return "embeddings"
    for group, pattern in GROUPS:
        if pattern.search(name):
            return group
    return kind


def layer_spectra(model: nn.Module | None = None, plan: Plan | None = None) -> dict[str, dict[str, Any]]:
    """``{layer name: {"S", "m", "n", "kind"}}`` for every factorizable layer of a model and/or plan.

    A plan returned by :func:`compressor.analyze` carries its SVDs, which are used as they are (for
    data-aware plans these are the whitened singular values); a plan read from JSON does not, and then
    the model's weights are decomposed. With a plan, only its supported layers are plotted.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise CompressorError(f"cannot plot spectra of a {type(model).__name__}",
                              "pass an nn.Module or the Plan returned by compressor.analyze")
    if plan is None:
        if model is None:
            raise CompressorError("nothing to plot", "pass a model or the plan returned by compressor.analyze")
        from compressor.analysis.analyze import find_layers
        wanted = {c.name: c.kind for c in find_layers(model) if c.skip is None}
    else:
        wanted = {lp.name: lp.kind for lp in plan.layers if lp.supported}
    out = {}
    for name, kind in wanted.items():
        if plan is not None and name in plan._cache:
            lp = plan.layer(name)
            out[name] = {"S": plan._cache[name][0].S.detach().double().cpu(), "m": lp.m, "n": lp.n, "kind": kind}
        elif model is not None:
            from compressor.core.handlers import handler_for
            from compressor.core.svd import compute_dtype
            mod = model.get_submodule(name)
            w = handler_for(mod).weight_matrix(mod).detach()
            S = torch.linalg.svdvals(w.to(compute_dtype(w.dtype)))
            out[name] = {"S": S.double().cpu(), "m": w.shape[0], "n": w.shape[1], "kind": kind}
        else:
            raise CompressorError("this plan holds no singular values (it was read from JSON)",
                                  "pass the model too: plot_spectra(model, plan, out_dir)")
    return out


def plot_spectra(source: nn.Module | Plan, plan_or_dir: Plan | str | Path, out_dir: str | Path | None = None,
                 prefix: str = "") -> list[Path]:
    """Write ``{prefix}spectra.png`` (normalised singular values) and ``{prefix}energy.png`` (cumulative
    spectral energy) with one panel per layer group, each layer a line, the break-even rank dashed.

    Call as ``plot_spectra(model, out_dir)``, ``plot_spectra(plan, out_dir)`` or
    ``plot_spectra(model, plan, out_dir)``. The x axis is the rank as a fraction of the layer's full rank,
    so layers of different shapes share a panel; left of the dashed line a factorization saves
    parameters, right of it, it adds them. Returns the written paths.
    """
    if out_dir is None:
        model, plan, out_dir = (None, source, plan_or_dir) if isinstance(source, Plan) else \
            (source, None, plan_or_dir)
    else:
        model, plan = source, plan_or_dir
    spectra = layer_spectra(model, plan)
    if not spectra:
        raise CompressorError("the model has no factorizable layer to plot",
                              "plot a model with Linear, Conv1d/2d or Embedding layers")
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, sp in spectra.items():
        groups.setdefault(layer_group(name, sp["kind"]), []).append((name, sp))
    title = "whitened (data-aware) spectra" if plan is not None and plan.method != "svd" else "weight spectra"
    out_dir = Path(out_dir)
    paths = []
    for what in ("spectra", "energy"):
        fig = _grid(len(groups))
        for ax, (group, layers) in zip(fig.axes, groups.items(), strict=False):
            for name, sp in layers:
                S = sp["S"]
                x = torch.arange(1, len(S) + 1, dtype=torch.float64) / len(S)
                if what == "spectra":
                    y = S / S[0] if S[0] > 0 else S
                else:
                    sq = S.square()
                    y = sq.cumsum(0) / sq.sum() if sq.sum() > 0 else torch.ones_like(S)
                ax.plot(x.numpy(), y.numpy(), lw=1, alpha=0.6, label=name.rpartition(".")[2] or name)
            for be in sorted({round(sp["m"] * sp["n"] / (sp["m"] + sp["n"]) / min(sp["m"], sp["n"]), 3)
                              for _, sp in layers}):
                ax.axvline(be, color="k", ls="--", lw=1)
            shapes = sorted({f"{sp['m']}x{sp['n']}" for _, sp in layers})
            more = ", ..." if len(shapes) > 3 else ""
            ax.set_title(f"{group} ({len(layers)}: {', '.join(shapes[:3])}{more})", fontsize=9)
            if len(layers) <= 4:  # few enough to tell apart by name
                ax.legend(fontsize=7)
            ax.set_xlim(0, 1)
            ax.set_xlabel("rank / full rank")
            ax.set_ylabel("sigma / sigma_max" if what == "spectra" else "energy kept")
            ax.grid(alpha=0.3)
            if what == "spectra":
                ax.set_yscale("log")
        fig.suptitle(f"{title}: {'singular values' if what == 'spectra' else 'cumulative energy'} "
                     "(dashed: break-even rank)")
        path = out_dir / f"{prefix}{what}.png"
        _save(fig, path)
        paths.append(path)
    return paths


def plot_fidelity(results: Sequence[dict], path: str | Path) -> Path:
    """Fidelity against size, one panel per model, one line per policy.

    Each row: ``model``, ``policy`` (rows of one policy are joined by a line; ``"int8"``, ``"fp16"`` and
    ``"dense"`` are drawn as single reference points), ``size_ratio`` (bytes of the weights relative to
    the dense fp32 model), ``fidelity`` and ``metric`` (the y-axis label).
    """
    models = list(dict.fromkeys(r["model"] for r in results))
    if not models:
        raise CompressorError("no fidelity results to plot", "run the benchmark first")
    fig = _grid(len(models), cols=min(len(models), 2), size=(6, 4.2))
    for ax, model in zip(fig.axes, models, strict=False):
        rows = [r for r in results if r["model"] == model]
        for policy in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["size_ratio"], r["fidelity"]) for r in rows if r["policy"] == policy)
            xs, ys = zip(*pts, strict=True)
            if policy in REFERENCE_MARKERS:
                ax.plot(xs, ys, REFERENCE_MARKERS[policy], ms=9, label=policy)
            else:
                ax.plot(xs, ys, "o-", label=policy)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("weight bytes / dense fp32")
        ax.set_ylabel(rows[0]["metric"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, Path(path))
    return Path(path)


REFERENCE_MARKERS = {"dense": "k*", "int8": "rs", "fp16": "gD"}


def plot_latency(results: Sequence[dict], path: str | Path) -> Path:
    """Latency ratio (compressed / dense) against parameter ratio (left) and multiply-add ratio (right).

    Each row: ``series`` (e.g. ``"onnxruntime, batch 1"``; one marker style each), ``params_ratio``,
    ``macs_ratio``, ``latency_ratio`` and optionally ``label`` (annotated beside the point). Points above
    the dashed diagonal are slower than their MAC count promises; above 1, factoring made it slower.
    """
    if not results:
        raise CompressorError("no latency results to plot", "run the benchmark first")
    fig = _grid(2, cols=2, size=(6, 4.5))
    lo = min(0.9, *(min(r["params_ratio"], r["macs_ratio"], r["latency_ratio"]) for r in results)) - 0.05
    hi = max(1.1, *(max(r["params_ratio"], r["macs_ratio"], r["latency_ratio"]) for r in results)) + 0.05
    for ax, key, label in zip(fig.axes, ("params_ratio", "macs_ratio"),
                              ("parameters / dense", "multiply-adds / dense"), strict=True):
        for series, marker in zip(dict.fromkeys(r["series"] for r in results), "osD^v<>p*h", strict=False):
            rows = [r for r in results if r["series"] == series]
            ax.plot([r[key] for r in rows], [r["latency_ratio"] for r in rows], marker, ls="none",
                    ms=7, alpha=0.8, label=series)
            for r in rows:
                if r.get("label"):
                    ax.annotate(r["label"], (r[key], r["latency_ratio"]), fontsize=6,
                                xytext=(4, 3), textcoords="offset points")
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="latency = ratio")
        ax.axhline(1.0, color="r", lw=1, label="no speed-up")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(label)
        ax.set_ylabel("latency / dense")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("latency of the compressed model relative to dense")
    _save(fig, Path(path))
    return Path(path)


def _grid(n: int, cols: int = 4, size: tuple[float, float] = (4.0, 3.2)):
    from matplotlib.figure import Figure
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows + 0.6), layout="constrained")
    for i in range(n):
        fig.add_subplot(rows, cols, i + 1)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def plot_metric_history(history: Sequence[dict], monitor: str, path: str | Path, best_step: int | None = None,
                        mode: str | None = None) -> Path:
    """The monitored metric over training steps (``history``: ``{"step", "metrics"}`` per evaluation, as a
    checkpoint folder records it), the best step marked."""
    points = [(h["step"], h["metrics"][monitor]) for h in history
              if isinstance(h.get("metrics"), dict) and isinstance(h["metrics"].get(monitor), (int, float))]
    if not points:
        raise CompressorError(f"the run recorded no {monitor} to plot", "train with validation, or pick a "
                              "recorded metric")
    fig = _grid(1, cols=1, size=(6, 4))
    ax = fig.axes[0]
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=4, label=monitor)
    best = [p for p in points if p[0] == best_step]
    if best:
        ax.plot([best[0][0]], [best[0][1]], "r*", ms=14, label=f"best (step {best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel(monitor + (f" ({mode} is better)" if mode else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, Path(path))
    return Path(path)
