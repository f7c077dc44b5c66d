"""Latency-aware ranks: is a layer's factored form *faster* than the dense one, measured, not assumed.

Fewer multiply-adds is not lower latency: two small products can cost more than one large one (the
digits CNN at 0.71x the MACs ran at 1.26x the dense latency). So, per layer kind, layer configuration,
input shape and thread count, this module times the dense layer and its factored form as tiny ONNX
graphs in onnxruntime and finds the **break-even rank**: the largest rank whose factored form is still
faster, by at least a margin (:data:`FASTER_BELOW`; 0: never). A plan's layer whose rank lies above
it stays dense (:func:`keep_slow_layers_dense`).

    decisions = latency_decisions(model, plan, example_inputs, threads=2)
    keep_slow_layers_dense(plan, decisions)              # then rewrite(model, plan) as usual

Measurements are robust on a busy machine: the two graphs run in alternating blocks (dense first, then
factored first), :data:`ROUNDS` rounds, and the median of the per-round ratios decides. Break-even ranks
are cached in a JSON file per machine and onnxruntime version, in ``$COMPRESSOR_CACHE_DIR`` or
``~/.cache/compressor`` (written atomically; a missing, corrupt or read-only cache only costs time).
The timer is injectable (``timer=``), so the choice can be tested with a fake latency table.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.fileio import atomic_write_text
from compressor.core.handlers import handler_for
from compressor.core.hooks import captured_inputs
from compressor.core.plan import Plan
from compressor.core.rewrite import empty_factored
from compressor.core.svd import max_saving_rank
from compressor.data.inputs import eval_mode, flatten
from compressor.formats.onnx_graph import feeds
from compressor.formats.runtime import session

CACHE_ENV = "COMPRESSOR_CACHE_DIR"  # overrides the user cache folder (~/.cache/compressor)
ROUNDS = 7  # alternating dense/factored rounds per comparison; the median ratio decides
# Each round times enough runs of a graph to take about this long: longer than a scheduler time slice,
# so that on a busy machine every block averages over the same preemptions.
BLOCK_S = 0.02
MAX_BLOCK_RUNS = 2000
# A factored layer counts as faster only when measured at most this fraction of the dense latency: the
# margin keeps noise on a busy machine from factoring layers whose two forms run about equally fast.
FASTER_BELOW = 0.95
WARMUP = 3
# The bisection stops when the break-even rank is known to within this fraction of the layer's
# largest saving rank (or to 1): finer steps cost measurements and change no decision that matters.
RANK_TOLERANCE = 1 / 64
CACHE_VERSION = 1


@dataclass
class Comparison:
    """Two ONNX graphs timed side by side: medians in ms, and the median of per-round ``b / a`` ratios."""

    a_ms: float
    b_ms: float
    ratio: float
    rounds: int
    # The lower quartile of the per-round ratios (None: not measured, the median alone decides).
    low: float | None = None

    @property
    def slower(self) -> bool:
        """``b`` measured slower than ``a``: in the median and in three rounds of four. Why not the median
        alone: on a loaded machine a file as fast as dense timed 1.04x in one search and below 1 in the next,
        so a size limit's choice flipped with the noise; what is slower in most rounds is slower."""
        return self.ratio >= 1.0 and (self.low is None or self.low >= 1.0)

    def to_dict(self) -> dict[str, float]:
        return {"a_ms": round(self.a_ms, 5), "b_ms": round(self.b_ms, 5), "ratio": round(self.ratio, 4),
                "rounds": self.rounds}


# (graph a, graph b, inputs, threads) -> their comparison; tests inject a fake one
Timer = Callable[[Path, Path, Any, int], Comparison]




def compare_onnx(a: str | Path, b: str | Path, inputs: Any, threads: int, rounds: int = ROUNDS) -> Comparison:
    """Time ONNX graphs ``a`` and ``b`` on the same ``inputs`` in alternating blocks (a then b, b then a, ...)
    so that a busy machine slows both alike; returns per-run medians and the median per-round ratio b/a."""
    sa, sb = session(a, threads=threads), session(b, threads=threads)
    fa, fb = feeds(sa, inputs), feeds(sb, inputs)
    runs = {}
    for name, s, f in (("a", sa, fa), ("b", sb, fb)):
        for _ in range(WARMUP):
            s.run(None, f)
        t0 = time.perf_counter()
        s.run(None, f)
        runs[name] = max(1, min(MAX_BLOCK_RUNS, int(BLOCK_S / max(time.perf_counter() - t0, 1e-6))))
    n = max(runs.values())  # the same block length for both: ratios compare like with like

    def block(s, f) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            s.run(None, f)
        return (time.perf_counter() - t0) * 1e3 / n

    ta, tb, ratios = [], [], []
    for i in range(rounds):
        if i % 2 == 0:
            x, y = block(sa, fa), block(sb, fb)
        else:
            y, x = block(sb, fb), block(sa, fa)
        ta.append(x)
        tb.append(y)
        ratios.append(y / x)
    low = statistics.quantiles(ratios, n=4)[0] if len(ratios) > 1 else ratios[0]
    return Comparison(statistics.median(ta), statistics.median(tb), statistics.median(ratios), rounds, low)


# ------------------------------------------------------------------------------------------ cache


def cache_dir() -> Path:
    """``$COMPRESSOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/compressor``, else ``~/.cache/compressor``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compressor"


def machine_id() -> str:
    """What latency depends on besides the layer: the machine (host, CPU model, cores) and onnxruntime."""
    import onnxruntime

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = json.dumps([platform.node(), platform.machine(), cpu, os.cpu_count(), onnxruntime.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LatencyTable:
    """Measured break-even ranks of this machine, kept in ``latency-<machine id>.json`` of :func:`cache_dir`.

    Each :meth:`put` re-reads the file and writes the merged table atomically, so concurrent runs lose at
    most each other's newest entries and never leave a half-written file. An unreadable file is ignored
    and an unwritable folder only means the next run measures again.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else cache_dir() / f"latency-{machine_id()}.json"
        self.entries: dict[str, dict[str, Any]] = self._read()
        self.writes = 0

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.entries = {**self._read(), **self.entries, key: value}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"version": CACHE_VERSION, "entries": self.entries},
                                                    indent=1, sort_keys=True) + "\n")
            self.writes += 1
        except OSError:
            pass  # a read-only home: the measurement is kept for this run only


# ------------------------------------------------------------------------------------ break-even


def layer_inputs(model: nn.Module, inputs: Any, names: set[str]) -> dict[str, torch.Tensor]:
    """The input tensor each named layer receives on its first call when ``model`` runs on ``inputs``."""
    from compressor.data.inputs import call

    seen: dict[str, torch.Tensor] = {}

    def first(name: str, args: tuple) -> None:
        if name not in seen and args and isinstance(args[0], torch.Tensor):
            seen[name] = args[0].detach().clone()

    with captured_inputs({n: m for n, m in model.named_modules() if n in names}, first), eval_mode(model), \
            torch.no_grad():
        call(model, inputs)
    return seen


def layer_key(module: nn.Module, x: torch.Tensor, threads: int) -> str:
    """Cache key of one layer: its kind and configuration (``repr``: sizes, kernel, stride, ...), the input's
    shape and dtype, and the threads."""
    return json.dumps([handler_for(module).kind, repr(module), list(x.shape), str(x.dtype), threads])


def _export_layer(module: nn.Module, x: torch.Tensor, path: Path) -> Path:
    from compressor.export.onnx import export_onnx

    return export_onnx(module, x, path, dynamic_batch=False, exporter="legacy")


def break_even(module: nn.Module, x: torch.Tensor, *, threads: int, table: LatencyTable | None = None,
               timer: Timer | None = None) -> dict[str, Any]:
    """The largest rank at which ``module``'s factored form runs faster than it on input ``x`` (0: at no
    rank), found by bisection over ``1 .. max saving rank`` assuming the factored latency grows with the
    rank; ``{"break_even", "ratios": {rank: factored / dense}, "threads"}``, cached in ``table``."""
    from compressor.export.onnx import onnx_ready

    table = table if table is not None else LatencyTable()
    timer = timer or compare_onnx
    module, x, _ = onnx_ready(module, x)  # timed as it will be exported (bfloat16 widened to float32)
    key = layer_key(module, x, threads)
    if (hit := table.get(key)) is not None:
        return hit
    m, n = handler_for(module).weight_matrix(module).shape
    top = max_saving_rank(m, n)
    ratios: dict[int, float] = {}
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="compressor-latency-") as tmp:
        dense = _export_layer(module, x, Path(tmp) / "dense.onnx")

        def faster(rank: int) -> bool:
            layer = empty_factored(module, rank)
            with torch.no_grad():  # small finite weights: uninitialised memory could hold denormals
                for p in layer.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            ratios[rank] = timer(dense, _export_layer(layer, x, Path(tmp) / f"rank{rank}.onnx"), x, threads).ratio
            return ratios[rank] < FASTER_BELOW

        if top < 1 or not faster(1):
            best = 0
        elif faster(top):
            best = top
        else:
            lo, hi = 1, top  # faster at lo, not at hi
            while hi - lo > max(1, int(top * RANK_TOLERANCE)):
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if faster(mid) else (lo, mid)
            best = lo
    entry = {"break_even": best, "max_saving_rank": top, "threads": threads, "input_shape": list(x.shape),
             "ratios": {str(r): round(v, 4) for r, v in sorted(ratios.items())}}
    table.put(key, entry)
    return entry


def latency_decisions(model: nn.Module, plan: Plan, inputs: Any, *, threads: int,
                      table: LatencyTable | None = None, timer: Timer | None = None,
                      log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """For every layer ``plan`` factors (``model`` is the dense model the plan was made for): its rank, the
    measured break-even rank at the input it receives on ``inputs`` (the user's batch shape), and whether
    the factored form is faster (``faster``; None when ``inputs`` never reach the layer)."""
    from compressor.export.onnx import onnx_ready

    table = table if table is not None else LatencyTable()
    names = {lp.name for lp in plan.factored}
    xs = layer_inputs(model, inputs, names)
    out: dict[str, dict[str, Any]] = {}
    for lp in plan.factored:
        x = xs.get(lp.name)
        if x is None:
            out[lp.name] = {"rank": lp.rank, "faster": None, "break_even": None}
            continue
        layer, x, _ = onnx_ready(model.get_submodule(lp.name), x)  # widened once, as break_even times it
        cached = table.get(layer_key(layer, x, threads)) is not None
        be = break_even(layer, x, threads=threads, table=table, timer=timer)
        if log and not cached:
            log(f"latency  {lp.name} {'x'.join(map(str, x.shape))}: break-even rank {be['break_even']} "
                f"of {be['max_saving_rank']} (measured)")
        out[lp.name] = {"rank": lp.rank, "break_even": be["break_even"], "faster": lp.rank <= be["break_even"],
                        "input_shape": list(x.shape), "ratios": be["ratios"]}
    return out


def keep_slow_layers_dense(plan: Plan, decisions: dict[str, dict[str, Any]]) -> list[str]:
    """Leave dense every layer of ``plan`` whose factored form was measured slower (``faster`` False); the
    plan's notes say how many and why. Returns their names. Layers not measured are left as planned."""
    slow = [name for name, d in decisions.items() if d.get("faster") is False]
    for name in slow:
        lp, d = plan.layer(name), decisions[name]
        lp.reason = (f"rank {lp.rank} kept dense: slower than dense in onnxruntime at input "
                     f"{'x'.join(map(str, d['input_shape']))} (measured break-even rank {d['break_even']})")
        lp.rank, lp.factored = None, False
        lp.params_after, lp.macs_after = lp.params_before, lp.macs_before
    if slow:
        plan.notes.append(f"latency-aware: {len(slow)} layer(s) kept dense because their factored form was "
                          "measured slower than the dense layer at the example input shape")
    return slow


# ------------------------------------------------------------------------------- whole files


# A latency ratio this far (absolute) from the multiply-add ratio is called out in reports.
LATENCY_MAC_GAP = 0.1


def latency_vs_macs(dense_onnx: str | Path, files: dict[str, str | Path], inputs: Any, *, threads: int,
                    macs_ratio: float | None, timer: Timer | None = None) -> dict[str, Any]:
    """Each exported file timed side by side with the dense model's ``dense_onnx`` on ``inputs``: its
    latency ratio next to the multiply-add ratio, and in words where the two differ by more than
    :data:`LATENCY_MAC_GAP` (fp16 and int8 files compute what fp32 does, so they share its MAC ratio)."""
    timer = timer or compare_onnx
    names, tensors = flatten(inputs)
    out: dict[str, Any] = {"threads": threads, "rounds": ROUNDS, "statistic": "median of per-round ratios, "
                           "dense and compressed runs alternating",
                           "inputs": ", ".join(f"{n} {'x'.join(map(str, t.shape))}"
                                               for n, t in zip(names, tensors, strict=True)),
                           "macs_ratio": macs_ratio, "files": {}, "differ": [], "slower_than_dense": []}
    for name, path in files.items():
        c = timer(Path(dense_onnx), Path(path), inputs, threads)
        out["files"][name] = {"dense_ms": round(c.a_ms, 5), "ms": round(c.b_ms, 5), "latency_ratio": round(c.ratio, 4)}
        if c.slower:
            out["slower_than_dense"].append(name)
        if macs_ratio is not None and abs(c.ratio - macs_ratio) > LATENCY_MAC_GAP:
            how = "slower" if c.ratio > macs_ratio else "faster"
            out["differ"].append(f"{name}: latency {c.ratio:.2f}x dense against {macs_ratio:.2f}x the multiply-adds "
                                 f"({how} than the multiply-adds suggest)")
    return out


# --------------------------------------------------------------------------------- int8 choice

# Two int8 files of one model (dynamic, static QDQ) whose worst-sample cosines to the model are this close
# count as equally faithful, and the faster is recommended; further apart, the more faithful one is.
INT8_COSINE_TOLERANCE = 0.01
INT8_RULE = (f"among the files that passed validation, those within {INT8_COSINE_TOLERANCE} worst-sample cosine (to "
             "model.onnx, all on the same inputs) of the most faithful; of those, the lowest latency measured side by "
             "side with model.onnx")


def recommend_int8(fp32_onnx: str | Path, files: dict[str, tuple[str | Path, float, bool]], inputs: Any, *,
                   threads: int, timer: Timer | None = None) -> dict[str, Any]:
    """Which of several int8 files of one model to ship: ``files`` maps a name to (path, worst-sample cosine
    to the model, validation passed); each is timed side by side with ``fp32_onnx`` on ``inputs`` and the
    choice follows :data:`INT8_RULE` (``recommended`` None when none passed)."""
    timer = timer or compare_onnx
    rows = {}
    for name, (path, cosine, passed) in files.items():
        c = timer(Path(fp32_onnx), Path(path), inputs, threads)
        rows[name] = {"ms": round(c.b_ms, 5), "fp32_ms": round(c.a_ms, 5), "latency_ratio": round(c.ratio, 4),
                      "cosine": cosine, "passed": passed}
    ok = [n for n, r in rows.items() if r["passed"]]
    recommended = None
    if ok:
        best = max(rows[n]["cosine"] for n in ok)
        close = [n for n in ok if rows[n]["cosine"] >= best - INT8_COSINE_TOLERANCE]
        recommended = min(close, key=lambda n: rows[n]["latency_ratio"])
    names, tensors = flatten(inputs)
    return {"recommended": recommended, "rule": INT8_RULE, "threads": threads, "rounds": ROUNDS,
            "inputs": ", ".join(f"{n} {'x'.join(map(str, t.shape))}" for n, t in zip(names, tensors, strict=True)),
            "files": rows}
