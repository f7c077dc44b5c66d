"""Recipes: low-rank factoring combined with fp16/int8 storage, chosen on the *measured* front.

    result = search(model, example_inputs, evaluation=output_fidelity(model, held_out),
                    constraints=Constraints(max_size=15e6, min_fidelity=0.95), cache_dir=".compressor-cache")
    result.chosen.recipe, result.chosen.size_bytes, result.chosen.fidelity

A :class:`Recipe` is one way to compress (dense or low-rank at a parameter target, data-aware or not,
optionally healed by distillation, then stored as fp32, fp16 or dynamic int8, where int8 may keep the
few layers that int8 rounding hurts most in fp16). :func:`search` builds the
candidates that can meet the :class:`Constraints`, exports each to ONNX, validates it in onnxruntime, and
measures its file size, its fidelity to the original model on held-out inputs and its latency. Every
measurement (and the ONNX file) is cached by recipe key, so a second search with other constraints
builds nothing it already measured. Dense fp32, fp16 and int8 are always measured, as references.

Choice rule: among the validated candidates that meet every constraint, the *smallest file* wins when a
fidelity floor is given (ties: higher fidelity, then lower latency); otherwise the *most faithful* one
wins (ties: smaller, then faster). When none meets them, :class:`CompressorError` names the constraint
that cannot be met and the closest measured point.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write, atomic_write_text, temp_folder
from compressor.core.handlers import handler_for

PRECISIONS = ("fp32", "fp16", "int8")
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0}
CACHE_VERSION = 2  # 2: calibrated embeddings are token-frequency weighted
# A recipe is skipped before building only when its estimated file is this much above --max-size: the
# estimate (parameters x bytes, scaled by the measured fp32 file) is close but not exact.
SIZE_SLACK = 1.1


# ------------------------------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class Recipe:
    """One way to compress a model; frozen, JSON round-trippable, with a stable cache :meth:`key`.

    ``target``: fraction of the factorizable parameters removed by low-rank factoring (None: dense).
    ``calibrated``: data-aware factors and ranks from calibration inputs. ``heal_steps``: distillation
    steps against the original model before export (0: none). ``exclude``: layer globs never factored.
    ``precision``: how the exported weights are stored (fp16: storage only; int8: onnxruntime dynamic
    quantization, per output channel, of every MatMul/Gemm/Gather weight, so both factors are int8).
    ``qat``: heal through simulated int8 (:func:`fake_int8`), so the factors learn to absorb the rounding
    that int8 export will do. ``keep_fp16`` (int8 only): that many layers stay fp16-stored, those whose
    int8 rounding moves the model's output most per parameter, measured on the calibration inputs
    (:func:`int8_sensitivity`); a dense recipe may keep layers too (mixed precision without low rank).
    """

    precision: str = "fp32"
    target: float | None = None
    calibrated: bool = False
    heal_steps: int = 0
    exclude: tuple[str, ...] = ()
    qat: bool = False
    keep_fp16: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CompressorError(f"recipe precision {self.precision!r} is not one of {PRECISIONS}",
                                  "use fp32, fp16 or int8")
        if self.target is not None and not 0 < self.target < 1:
            raise CompressorError(f"recipe target {self.target} is outside (0, 1)",
                                  "give the fraction of factorizable parameters to remove, e.g. 0.4")
        if self.target is None and (self.calibrated or self.heal_steps or self.exclude):
            raise CompressorError("a dense recipe cannot be calibrated, healed or exclude layers",
                                  "give a low-rank target with those options")
        if isinstance(self.heal_steps, bool) or not isinstance(self.heal_steps, int) or self.heal_steps < 0:
            raise CompressorError(f"heal_steps must be a whole number >= 0, got {self.heal_steps!r}",
                                  "pass e.g. heal_steps=200")
        if self.qat and not self.heal_steps:
            raise CompressorError("quantization-aware healing needs heal steps", "pass heal_steps > 0 with qat")
        if isinstance(self.keep_fp16, bool) or not isinstance(self.keep_fp16, int) or self.keep_fp16 < 0:
            raise CompressorError(f"keep_fp16 must be a whole number >= 0, got {self.keep_fp16!r}",
                                  "pass the number of layers to keep in fp16, e.g. keep_fp16=2")
        if self.keep_fp16 and self.precision != "int8":
            raise CompressorError(f"keep_fp16 applies to int8 recipes, not {self.precision}",
                                  "use precision='int8' with keep_fp16")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def dense(self) -> bool:
        return self.target is None

    @property
    def name(self) -> str:
        """Short and readable: ``dense-int8``, ``lowrank0.4-cal-heal200-int8``, ``dense-int8-fp16x2``."""
        keep = f"fp16x{self.keep_fp16}" if self.keep_fp16 else ""
        if self.dense:
            return "-".join(p for p in (f"dense-{self.precision}", keep) if p)
        parts = [f"lowrank{self.target:g}", "cal" if self.calibrated else "",
                 f"heal{self.heal_steps}" if self.heal_steps else "", "qat" if self.qat else "",
                 "x" + ",".join(self.exclude) if self.exclude else "", self.precision, keep]
        return "-".join(p for p in parts if p)

    def base(self) -> Recipe:
        """The same model stored as fp32: the ONNX export every precision of this recipe derives from."""
        return replace(self, precision="fp32", keep_fp16=0)

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "exclude": list(self.exclude)}
        for newer in ("qat", "keep_fp16"):  # keys of recipes without the newer fields stay as they were
            if not d[newer]:
                del d[newer]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        return cls(**{**d, "exclude": tuple(d.get("exclude", ()))})

    def key(self) -> str:
        """A stable hash of the recipe's fields (not of its name, which is for people)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


REFERENCES = tuple(Recipe(p) for p in PRECISIONS)


def default_recipes(targets: Sequence[float] = (0.2, 0.4, 0.6), *, calibrated: bool = False,
                    heal_steps: Sequence[int] = (0,), precisions: Sequence[str] = PRECISIONS,
                    exclude: Sequence[str] = (), qat: bool = False, keep_fp16: Sequence[int] = (0,)
                    ) -> list[Recipe]:
    """The dense references plus every low-rank ``target x heal_steps x precision`` combination, and with
    ``qat`` the quantization-aware healed int8 recipe of every target and nonzero heal_steps. Each nonzero
    ``keep_fp16`` adds that mixed-precision variant of every int8 recipe, dense int8 included."""
    out = list(REFERENCES)
    for t in targets:
        for h in heal_steps:
            out += [Recipe(p, t, calibrated, h, tuple(exclude)) for p in precisions]
            if qat and h:
                out.append(Recipe("int8", t, calibrated, h, tuple(exclude), qat=True))
    keeps = [k for k in keep_fp16 if k]
    return out + [replace(r, keep_fp16=k) for k in keeps for r in out if r.precision == "int8"]


# -------------------------------------------------------------------------------------- constraints

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_TIME_UNITS = {"ms": 1.0, "s": 1e3, "us": 1e-3}


def parse_size(text: str | float) -> float:
    """``"15MB"`` -> 15e6 bytes; a bare number <= 1 (``"0.2"``) is a fraction of the fp32 export (returned
    as is); a bare number above 1 is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise CompressorError(f"cannot read the size {text!r}",
                              "write it like 15MB, 800KB, 1.2GB, or a fraction of the fp32 file like 0.2")
    value = float(m.group(1))
    return value if not unit and value <= 1 else value * _SIZE_UNITS[unit]


def parse_latency(text: str | float) -> float:
    """``"5ms"`` -> 5.0, ``"0.01s"`` -> 10.0, a bare number is milliseconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", str(text).lower())
    if m is None or m.group(2) not in (*_TIME_UNITS, "") or float(m.group(1)) <= 0:
        raise CompressorError(f"cannot read the latency {text!r}", "write it like 5ms or 0.01s")
    return float(m.group(1)) * _TIME_UNITS.get(m.group(2), 1.0)


@dataclass(frozen=True)
class Constraints:
    """``max_size`` in bytes, or (<= 1) a fraction of the dense fp32 export; ``min_fidelity`` in the
    evaluation's metric; ``max_latency_ms`` the median onnxruntime latency on the latency inputs."""

    max_size: float | None = None
    min_fidelity: float | None = None
    max_latency_ms: float | None = None

    def size_limit(self, fp32_bytes: int) -> float | None:
        if self.max_size is None:
            return None
        return self.max_size * fp32_bytes if self.max_size <= 1 else self.max_size

    def describe(self, fp32_bytes: int | None = None) -> str:
        parts = []
        if self.max_size is not None:
            limit = self.size_limit(fp32_bytes) if fp32_bytes else None
            parts.append(f"size <= {self.max_size:g} of fp32" + (f" ({limit / 1e6:.2f} MB)" if limit else "")
                         if self.max_size <= 1 else f"size <= {self.max_size / 1e6:.2f} MB")
        if self.min_fidelity is not None:
            parts.append(f"fidelity >= {self.min_fidelity:g}")
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        return ", ".join(parts) or "none"


# --------------------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """How fidelity is measured: onnxruntime runs each held-out batch in ``inputs``; ``score`` maps the
    list of per-batch outputs (each a list of numpy arrays) to metrics, ``score(...)["fidelity"]`` the
    one constraints use, described by ``metric``. ``fingerprint`` identifies data and metric in the cache."""

    inputs: list[Any]
    metric: str
    score: Callable[[list[list[np.ndarray]]], dict[str, float]]
    fingerprint: str


def output_fidelity(model: nn.Module, batches: Sequence[Any]) -> Evaluation:
    """Fidelity to ``model``'s own outputs on held-out ``batches``: the mean per-sample cosine of the first
    output, or, when that output is class scores ``(N, C)``, top-1 agreement (cosine is kept as well)."""
    from compressor.export.onnx import torch_outputs

    batches = list(batches)
    refs = [torch_outputs(model, b)[0][1] for b in batches]
    classifier = refs[0].ndim == 2 and refs[0].shape[1] > 1

    def score(outputs: list[list[np.ndarray]]) -> dict[str, float]:
        got = [np.asarray(o[0], dtype=np.float64) for o in outputs]
        cos = np.concatenate([_cosines(g, r) for g, r in zip(got, refs, strict=True)])
        out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}
        if classifier:
            agree = np.concatenate([g.argmax(1) == r.argmax(1) for g, r in zip(got, refs, strict=True)])
            out["top1_agreement"] = float(agree.mean())
        out["fidelity"] = out["top1_agreement"] if classifier else out["cosine"]
        return out

    metric = ("top-1 agreement with the original model's predictions" if classifier else
              "mean per-sample cosine similarity of the outputs to the original model's")
    return Evaluation(batches, metric, score, fingerprint(["output_fidelity", batches, refs]))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    return np.sum(a * b, axis=1) / den


def fingerprint(obj: Any) -> str:
    """A content hash of nested tensors / arrays / dicts / lists / scalars (for cache keys)."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes())
        elif isinstance(x, np.ndarray):
            h.update(f"A{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(f"K{k}".encode())
                feed(x[k])
        elif isinstance(x, list | tuple):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"S{x!r}".encode())

    feed(obj)
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    return fingerprint({**dict(model.state_dict()), "__class__": type(model).__qualname__})


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
        return out


@dataclass
class SearchResult:
    chosen: Point | None
    points: list[Point]  # every measured candidate, references first
    skipped: list[dict[str, Any]]  # {"recipe", "name", "reason"}: not built, and why
    constraints: Constraints
    rule: str
    metric: str
    fp32_bytes: int
    built: int  # candidates built (exported) in this search; the rest came from the cache
    latency: dict[str, Any]

    def reference(self, precision: str) -> Point:
        return next(p for p in self.points if p.recipe == Recipe(precision))

    def to_dict(self) -> dict[str, Any]:
        front = pareto(self.points)
        return {
            "constraints": asdict(self.constraints),
            "constraints_text": self.constraints.describe(self.fp32_bytes),
            "rule": self.rule, "metric": self.metric, "fp32_bytes": self.fp32_bytes, "built": self.built,
            "latency": self.latency,
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


def versus(result: SearchResult, reference: Recipe = Recipe("int8")) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------------- search


@dataclass
class BuildContext:
    """What every candidate of one search shares: the model, its inputs and how it is measured."""

    model: nn.Module
    example_inputs: Any
    evaluation: Evaluation
    latency_inputs: Any
    calibration: Any = None
    heal_data: Any = None
    heal_options: dict[str, Any] = field(default_factory=dict)
    analyze_options: dict[str, Any] = field(default_factory=dict)
    opset: int = 18
    threads: int = 2
    latency_runs: int = 20
    atol: float = 1e-4

    def key(self) -> str:
        """What every measurement depends on besides the recipe (see :meth:`Cache.name` for the rest)."""
        import onnxruntime

        return fingerprint([CACHE_VERSION, model_fingerprint(self.model), self.example_inputs,
                            self.evaluation.fingerprint, self.latency_inputs,
                            json.dumps(self.analyze_options, sort_keys=True, default=str),
                            self.opset, self.threads, torch.__version__, onnxruntime.__version__])

    def data_keys(self) -> dict[str, str]:
        """Keys of what only some recipes depend on: calibration (calibrated ones), healing (healed ones)."""
        heal = json.dumps(self.heal_options, sort_keys=True, default=str)
        return {"calibration": fingerprint(self.calibration)[:8], "heal": fingerprint([self.heal_data, heal])[:8]}


class Cache:
    """Measurements as ``<dir>/<context key>/<name>.json`` beside their ``.onnx`` files; a name is the recipe
    key, plus the calibration / healing data keys for recipes that use them (so changing the healing
    options re-measures healed recipes only)."""

    def __init__(self, root: Path, context_key: str, data_keys: dict[str, str]):
        self.dir = Path(root) / context_key
        self.data_keys = data_keys

    def name(self, recipe: Recipe) -> str:
        uses_calibration = recipe.calibrated or recipe.keep_fp16
        return (recipe.key() + (f"-c{self.data_keys['calibration']}" if uses_calibration else "")
                + (f"-h{self.data_keys['heal']}" if recipe.heal_steps else ""))

    def onnx(self, recipe: Recipe) -> Path:
        return self.dir / f"{self.name(recipe)}.onnx"

    def get(self, recipe: Recipe) -> Point | None:
        path = self.dir / f"{self.name(recipe)}.json"
        if not path.is_file() or not self.onnx(recipe).is_file():
            return None
        try:
            d = json.loads(path.read_text())
            point = Point.from_dict(d["point"])
        except (ValueError, KeyError, TypeError):
            return None  # unreadable entry: measure again
        if point.recipe != recipe:
            return None
        point.cached = True
        return point

    def put(self, point: Point) -> None:
        data = {"format": "compressor-recipe-measurement", "version": CACHE_VERSION, "name": point.recipe.name,
                "point": {**point.to_dict(), "cached": False}}
        atomic_write_text(self.dir / f"{self.name(point.recipe)}.json", json.dumps(data, indent=2) + "\n")

    def store(self, recipe: Recipe, src: Path) -> Path:
        dst = self.onnx(recipe)
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
        return dst


def search(model: nn.Module, example_inputs: Any, *, evaluation: Evaluation, constraints: Constraints,
           recipes: Sequence[Recipe] | None = None, cache_dir: str | Path, latency_inputs: Any = None,
           calibration: Any = None, heal_data: Any = None, heal_options: dict[str, Any] | None = None,
           analyze_options: dict[str, Any] | None = None, opset: int = 18, threads: int = 2,
           latency_runs: int = 20, atol: float = 1e-4, log: Callable[[str], None] | None = None
           ) -> SearchResult:
    """Measure the candidates that can meet ``constraints`` and return the best (see the module's rule).

    ``recipes`` default to :func:`default_recipes` (calibrated when ``calibration`` is given); the dense
    references are always added. Raises :class:`CompressorError` when no measured point meets the
    constraints, naming the one that cannot be met and the closest point. ``model`` is not modified.
    """
    recipes = list(recipes) if recipes is not None else default_recipes(calibrated=calibration is not None)
    recipes = [*REFERENCES, *[r for r in recipes if r not in REFERENCES]]
    if any(r.calibrated or r.keep_fp16 for r in recipes) and calibration is None:
        raise CompressorError("calibrated recipes and recipes keeping layers in fp16 need calibration inputs",
                              "pass calibration=... (--calibration)")
    if any(r.heal_steps for r in recipes) and heal_data is None and calibration is None:
        raise CompressorError("healed recipes need data to distill on", "pass heal_data=... (or calibration)")
    if heal_options:
        from compressor.train.heal import HealConfig

        HealConfig.from_dict(dict(heal_options))  # a bad setting fails now, not after the first recipes
    ctx = BuildContext(model, example_inputs, evaluation,
                       latency_inputs if latency_inputs is not None else example_inputs, calibration,
                       heal_data if heal_data is not None else calibration, dict(heal_options or {}),
                       dict(analyze_options or {}), opset, threads, latency_runs, atol)
    cache = Cache(Path(cache_dir), ctx.key(), ctx.data_keys())
    say = log or (lambda _msg: None)
    points: list[Point] = []
    skipped: list[dict[str, Any]] = []
    built = 0
    fp32_bytes = 0
    total_params = sum(p.numel() for p in model.parameters())
    # The torch model of the last low-rank recipe built: its other precisions reuse it (factoring and
    # healing once per recipe; a later search that only adds a precision builds the model again).
    last_model: dict[Recipe, tuple] = {}
    for recipe in _grouped(recipes):
        if fp32_bytes and (reason := _cannot_fit(recipe, constraints, fp32_bytes, ctx, total_params)):
            skipped.append({"recipe": recipe.to_dict(), "name": recipe.name, "reason": reason})
            say(f"skip     {recipe.name}: {reason}")
            continue
        point = cache.get(recipe)
        if point is None:
            point = _build(recipe, ctx, cache, say, last_model)
            built += 1
        say(f"{'cached' if point.cached else 'measured'} {recipe.name}: {point.size_bytes / 1e6:.2f} MB, "
            f"fidelity {point.fidelity:.5f}, {point.latency_ms:.2f} ms"
            + ("" if point.passed else f", validation FAILED: {'; '.join(point.problems)}"))
        points.append(point)
        if recipe == Recipe("fp32"):
            fp32_bytes = point.size_bytes
    rule = ("smallest file meeting every constraint (ties: higher fidelity, then lower latency)"
            if constraints.min_fidelity is not None else
            "highest fidelity meeting every constraint (ties: smaller file, then lower latency)")
    result = SearchResult(None, points, skipped, constraints, rule, evaluation.metric, fp32_bytes, built,
                          {"threads": threads, "runs": latency_runs, "statistic": "median",
                           "inputs": _shape_text(ctx.latency_inputs)})
    result.chosen = choose(result)
    return result


def _grouped(recipes: Sequence[Recipe]) -> list[Recipe]:
    """References first, then recipes sharing a torch model next to each other (first-seen order)."""
    order: dict[Recipe, list[Recipe]] = {}
    for r in recipes:
        order.setdefault(r.base(), []).append(r)
    return [r for group in order.values() for r in group]


def choose(result: SearchResult) -> Point:
    """The point the rule picks, or :class:`CompressorError` naming what cannot be met."""
    c, fp32 = result.constraints, result.fp32_bytes
    valid = [p for p in result.points if p.passed]
    ok = [p for p in valid if all(p.meets(c, fp32).values())]
    if ok:
        if c.min_fidelity is not None:
            return min(ok, key=lambda p: (p.size_bytes, -p.fidelity, p.latency_ms))
        return min(ok, key=lambda p: (-p.fidelity, p.size_bytes, p.latency_ms))
    if not valid:
        raise CompressorError("no candidate passed onnxruntime validation",
                              "see the problems in the search log and report the model")
    names = {"max_size": "--max-size", "min_fidelity": "--min-fidelity", "max_latency": "--max-latency"}
    alone = [k for k in names if k in valid[0].meets(c, fp32) and not any(p.meets(c, fp32)[k] for p in valid)]
    closest = min(valid, key=lambda p: _violation(p, c, fp32))
    what = (" and ".join(names[k] for k in alone) + " cannot be met by any candidate" if alone else
            "no candidate meets " + " together with ".join(names[k] for k in names if k in closest.meets(c, fp32)))
    raise CompressorError(f"{what} ({c.describe(fp32)}; {len(valid)} measured); the closest is "
                          f"{describe_point(closest, result.metric)}",
                          "relax the constraint, or allow more recipes (other --targets, --heal-steps)")


def describe_point(p: Point, metric: str = "fidelity") -> str:
    return (f"{p.recipe.name} ({p.size_bytes / 1e6:.2f} MB, {metric.split(' ')[0]} {p.fidelity:.4f}, "
            f"{p.latency_ms:.2f} ms)")


def _violation(p: Point, c: Constraints, fp32_bytes: int) -> float:
    """How far ``p`` is from meeting ``c``: the sum of relative shortfalls."""
    v = 0.0
    if c.max_size is not None:
        v += max(0.0, p.size_bytes / c.size_limit(fp32_bytes) - 1)
    if c.min_fidelity is not None:
        v += max(0.0, (c.min_fidelity - p.fidelity) / max(abs(c.min_fidelity), 1e-12))
    if c.max_latency_ms is not None:
        v += max(0.0, p.latency_ms / c.max_latency_ms - 1)
    return v


def _factorizable_params(model: nn.Module, analyze_options: dict[str, Any]) -> int:
    from compressor.analysis.analyze import find_layers

    found = find_layers(model, analyze_options.get("include", ()), analyze_options.get("exclude", ()))
    return sum(c.weight_matrix().numel() for c in found if c.skip is None)


def estimate_size(recipe: Recipe, fp32_bytes: int, factorizable: int, total_params: int) -> float:
    """Bytes the recipe's file should take: the fp32 file scaled by parameters kept and bytes per weight."""
    kept = total_params - (recipe.target or 0.0) * factorizable
    return fp32_bytes * kept / total_params * BYTES_PER_PARAM[recipe.precision] / 4.0


def _cannot_fit(recipe: Recipe, c: Constraints, fp32_bytes: int, ctx: BuildContext, total: int) -> str | None:
    if recipe.dense or c.max_size is None:
        return None  # references are always measured
    opts = ctx.analyze_options
    factorizable = _factorizable_params(ctx.model, {**opts, "exclude": [*opts.get("exclude", ()), *recipe.exclude]})
    est, limit = estimate_size(recipe, fp32_bytes, factorizable, total), c.size_limit(fp32_bytes)
    if est > SIZE_SLACK * limit:
        return f"estimated {est / 1e6:.2f} MB is clearly above the {limit / 1e6:.2f} MB limit"
    return None


def _build(recipe: Recipe, ctx: BuildContext, cache: Cache, say: Callable[[str], None],
           last_model: dict[Recipe, tuple]) -> Point:
    """Build, export, validate and measure one recipe; store the point and its ONNX file in the cache."""
    from compressor.export.measure import file_size, onnx_latency
    from compressor.export.onnx import export_fp16, export_int8, export_onnx, validate_onnx

    start = time.perf_counter()
    cache.dir.mkdir(parents=True, exist_ok=True)
    with temp_folder(cache.dir / "build") as work:
        base = recipe.base()
        if base not in last_model:
            last_model.clear()
            last_model[base] = _model_for(recipe, ctx, say)
        model, plan_totals, heal_info, sensitivity = last_model[base]
        fp32 = cache.onnx(base)
        if not fp32.is_file():  # the fp32 export is shared by every precision of this recipe
            fp32 = cache.store(base, export_onnx(model, ctx.example_inputs, work / "fp32.onnx", opset=ctx.opset))
        kept: list[str] = []
        if recipe.precision == "fp32":
            path, check = fp32, {"atol": ctx.atol}
        else:
            if recipe.keep_fp16:
                if not sensitivity:  # measured once per model, shared by every keep_fp16 of it
                    say(f"measure  {base.name}: int8 sensitivity of each layer on the calibration inputs")
                    sensitivity.update(int8_sensitivity(model, ctx.calibration))
                kept = most_sensitive(sensitivity, model, recipe.keep_fp16)
                made = export_int8(fp32, work / "int8.onnx", keep_fp16=kept)
            else:
                make = export_fp16 if recipe.precision == "fp16" else export_int8
                made = make(fp32, work / f"{recipe.precision}.onnx")
            path = cache.store(recipe, made)
            # Variants approximate the weights: judged by cosine, as the exporter's own CLI check does.
            check = {"atol": None, "min_cosine": _min_cosine(recipe.precision)}
        v = validate_onnx(path, model, ctx.example_inputs, variant=recipe.precision, **check)
        metrics = onnx_fidelity(path, ctx.evaluation, ctx.threads)
        latency = onnx_latency(path, ctx.latency_inputs, threads=ctx.threads, warmup=3, runs=ctx.latency_runs)
        point = Point(recipe, file_size(path), metrics["fidelity"], metrics, latency["median_ms"],
                      sum(p.numel() for p in model.parameters()), v.passed, list(v.problems), plan_totals,
                      heal_info, round(time.perf_counter() - start, 2), str(path), kept_fp16=kept)
        cache.put(point)
        return point


def _min_cosine(precision: str) -> float:
    from compressor.export import onnx as export

    return export.FP16_MIN_COSINE if precision == "fp16" else export.INT8_MIN_COSINE


def _model_for(recipe: Recipe, ctx: BuildContext, say: Callable[[str], None]
               ) -> tuple[nn.Module, dict[str, Any] | None, dict[str, Any] | None]:
    """The torch model a recipe exports: the original (dense) or a factored, maybe healed, copy."""
    if recipe.dense:
        return ctx.model, None, None, {}
    from compressor.analysis.analyze import analyze
    from compressor.core.rewrite import rewrite

    model = copy.deepcopy(ctx.model).eval()
    opts = {**ctx.analyze_options, "exclude": [*ctx.analyze_options.get("exclude", ()), *recipe.exclude]}
    if recipe.calibrated:
        opts["calibration"] = ctx.calibration
    plan = analyze(model, target=recipe.target, progress=False, **opts)
    rewrite(model, plan)
    heal_info = None
    if recipe.heal_steps:
        from compressor.train.heal import HealConfig, heal

        say(f"heal     {recipe.name}: {recipe.heal_steps} steps")
        if recipe.qat:
            fake_int8(model)
        config = HealConfig.from_dict({**ctx.heal_options, "steps": recipe.heal_steps})
        res = heal(model, config, teacher=ctx.model, data=ctx.heal_data, progress=False)
        model = remove_fake_int8(res.model).eval()
        heal_info = {"steps": res.steps, "before": res.before, "after": res.after, "seconds": round(res.seconds, 1)}
    factored = {lp.name: lp.rank for lp in plan.factored}
    return model, {**plan.totals(), "factored_ranks": factored}, heal_info, {}


def fake_int8(model: nn.Module) -> nn.Module:
    """Make every layer of ``model`` that the int8 export quantizes (in place) compute as onnxruntime's
    dynamic int8 does (its handler's ``int8_forward``: weights rounded per output channel, inputs per
    tensor), with straight-through gradients. Undo with :func:`remove_fake_int8`. Attention's
    activation-by-activation products stay float, as in the export. Matches onnxruntime's int8 outputs
    to float rounding (tests/test_recipes.py)."""
    for mod in model.modules():
        _simulate_int8(mod)
    return model


def int8_sensitivity(model: nn.Module, batches: Any, limit: int = 2, outputs: Sequence[str] = ()
                     ) -> dict[str, float]:
    """How much int8 rounding of each layer alone moves ``model``'s compared outputs (relative squared
    change, :func:`compressor.data.inputs.relative_change`) over the first ``limit`` batches, with the
    layer computing as the int8 export will (:func:`fake_int8`). Layers are those whose handler simulates
    int8; the two factors of a factored layer count as one (they are kept or quantized together)."""
    from compressor.core.layers import LOW_RANK_TYPES
    from compressor.data.inputs import as_batches, attention_mask, call, relative_change

    units: dict[str, list[nn.Module]] = {}
    inside = set()
    for name, mod in model.named_modules():  # parents come before their children
        if isinstance(mod, LOW_RANK_TYPES):
            units[name] = [mod.down, mod.up]
            inside.update((id(mod.down), id(mod.up)))
        elif id(mod) not in inside and (h := handler_for(mod)) is not None and h.simulates_int8():
            units[name] = [mod]
    data = as_batches(batches)[:limit]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            refs = [call(model, b) for b in data]
            out = {}
            for name, mods in units.items():
                for m in mods:
                    _simulate_int8(m)
                try:
                    out[name] = relative_change(((call(model, b), r, attention_mask(b))
                                                 for b, r in zip(data, refs, strict=True)), outputs or None)
                finally:
                    for m in mods:
                        m.__dict__.pop("forward", None)
    finally:
        model.train(was_training)
    return out


def most_sensitive(sensitivity: dict[str, float], model: nn.Module, k: int) -> list[str]:
    """The ``k`` layers whose int8 rounding costs most output change per weight: keeping those in fp16
    buys the most fidelity per byte (fp16 storage costs one byte per weight more than int8)."""
    modules = dict(model.named_modules())
    size = {n: sum(p.numel() for p in modules[n].parameters()) for n in sensitivity}
    return sorted(sensitivity, key=lambda n: (-sensitivity[n] / max(size[n], 1), n))[:k]


def remove_fake_int8(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        mod.__dict__.pop("forward", None)
    return model


def _simulate_int8(mod: nn.Module) -> None:
    h = handler_for(mod)
    if h is not None and h.simulates_int8():
        mod.forward = lambda x, mod=mod, h=h: h.int8_forward(mod, x)


def onnx_fidelity(path: str | Path, evaluation: Evaluation, threads: int = 2) -> dict[str, float]:
    """Run ``evaluation``'s held-out batches through the ONNX file at ``path`` and score them."""
    import onnxruntime as ort

    from compressor.data.inputs import flatten

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]
    outputs = []
    for batch in evaluation.inputs:
        names, tensors = flatten(batch)
        feed = dict(zip(names, (t.detach().cpu().numpy() for t in tensors), strict=True))
        outputs.append(session.run(None, {n: feed[n] for n in wanted}))
    return evaluation.score(outputs)


def _shape_text(inputs: Any) -> str:
    from compressor.data.inputs import flatten

    names, tensors = flatten(inputs)
    return ", ".join(f"{n} {'x'.join(map(str, t.shape))}" for n, t in zip(names, tensors, strict=True))


def copy_chosen(result: SearchResult, folder: Path) -> Path:
    """Copy the chosen ONNX file into ``folder`` as model.onnx / model.fp16.onnx / model.int8.onnx."""
    p = result.chosen
    name = "model.onnx" if p.recipe.precision == "fp32" else f"model.{p.recipe.precision}.onnx"
    dst = Path(folder) / name
    shutil.copyfile(p.onnx, dst)
    os.utime(dst)
    return dst


# --------------------------------------------------------------------------------- report and plots


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
             f"- constraints: {result['constraints_text']}",
             f"- rule: {result['rule']}",
             f"- chosen: **{result['chosen'] or 'none'}**",
             f"- built in this run: {result['built']} of {len(pts)} (the rest came from the cache)", "",
             "| recipe | size | vs fp32 | fidelity | other metrics | latency | params | valid | front | "
             "meets | vs dense int8 |",
             "|---|---:|---:|---:|---|---:|---:|---|---|---|---|"]
    for p in sorted(pts, key=lambda p: p["size_bytes"]):
        others = ", ".join(f"{k} {v:.4f}" for k, v in p["metrics"].items() if k != "fidelity")
        meets = "all" if p["meets"] and all(p["meets"].values()) else \
            ", ".join(f"not {k}" for k, ok in p["meets"].items() if not ok) or "-"
        name = f"**{p['name']}** (chosen)" if p["name"] == result["chosen"] else p["name"]
        lines.append(f"| {name} | {p['size_bytes'] / 1e6:.2f} MB | {p['size_bytes'] / fp32:.3f} | "
                     f"{p['fidelity']:.5f} | {others} | {p['latency_ms']:.2f} ms | {p['params']:,} | "
                     f"{'PASS' if p['passed'] else '**FAIL**'} | {'yes' if p['pareto'] else ''} | {meets} | "
                     f"{_vs(p, ref8)} |")
    lines.append("")
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
        lines.append(f"> not built: {s['name']}: {s['reason']}")
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
        axes[0][0].set_title("squares: dense references; circles: low-rank; colour: fp32 / fp16 / int8", fontsize=8)
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
    colors = {"fp32": "tab:blue", "fp16": "tab:green", "int8": "tab:red"}
    for p in points:
        x, y = p[key] * scale, p["fidelity"]
        dense = p["recipe"]["target"] is None
        ax.scatter(x, y, c=colors[p["recipe"]["precision"]], marker="s" if dense else "o", s=60 if dense else 30,
                   edgecolors="black" if dense else "none", alpha=1.0 if p["passed"] else 0.3)
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


# ---------------------------------------------------------------------------------------- the job


def run_search(source: str | Path, out: str | Path | None = None, *, constraints: Constraints,
               targets: Sequence[float] = (0.2, 0.4, 0.6), heal_steps: int = 0,
               precisions: Sequence[str] = PRECISIONS, keep_fp16: Sequence[int] = (0,),
               cache_dir: str | Path | None = None, eval_inputs: Path | None = None, options: Any = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``compress search``: load the model at ``source``, :func:`search`, and write the chosen ONNX file,
    ``front.json``, the front plots, ``report.json`` and ``report.md`` into ``out`` (all or nothing).

    ``options`` is a :class:`compressor.pipeline.Options` (loading, example inputs, calibration, opset).
    Held-out inputs come from ``eval_inputs`` (tensors, or text for Hugging Face models); without it,
    from seeded random inputs shaped like the example inputs (float inputs only).
    """
    from compressor.core.output import OutputDir, check_not_over_inputs
    from compressor.formats.load import load_model
    from compressor.jobs.compress import Options, _example_inputs, default_out
    from compressor.report.report import versions

    opts = options or Options()
    source = Path(source)
    out = Path(out) if out is not None else default_out(source)
    if constraints == Constraints():
        raise CompressorError("search needs at least one constraint",
                              "pass --max-size, --min-fidelity and/or --max-latency")
    cache_dir = Path(cache_dir) if cache_dir is not None else out.parent / ".compressor-cache"
    check_not_over_inputs(out, [("model", source), ("calibration file", opts.calibration),
                                ("example inputs", opts.example_inputs), ("held-out inputs", eval_inputs),
                                ("measurement cache", cache_dir)])
    OutputDir(out, opts.force).check()
    loaded = load_model(source, trust_pickle=opts.trust_pickle, arch=opts.arch)
    if loaded.model is None:
        raise CompressorError("the input holds weights only, so it cannot be exported",
                              "pass --arch package.module:factory to build the model")
    model = loaded.model.eval()
    inputs = _example_inputs(loaded, opts)
    calibration = None
    if opts.calibration is not None:
        calibration = _load_batches(opts.calibration, loaded, opts.calibration_samples)
    held_out, held_out_note = _held_out(eval_inputs, inputs, loaded)
    evaluation = output_fidelity(model, held_out)
    evaluation.metric += f" ({held_out_note})"
    heal = (0, heal_steps) if heal_steps else (0,)
    recipes = default_recipes(targets, calibrated=calibration is not None, heal_steps=heal, precisions=precisions,
                              keep_fp16=keep_fp16)
    with OutputDir(out, opts.force) as tmp:
        result = search(model, inputs, evaluation=evaluation, constraints=constraints, recipes=recipes,
                        cache_dir=cache_dir, calibration=calibration, opset=opts.opset, atol=opts.atol, log=log)
        chosen = copy_chosen(result, tmp)
        front = result.to_dict()
        atomic_write_text(tmp / "front.json", json.dumps(front, indent=2) + "\n")
        plots = plot_front(front, tmp)
        report = {"mode": "search", "source": {"path": str(source), "format": loaded.format},
                  "output": str(out), "chosen": {**result.chosen.to_dict(), "file": chosen.name},
                  "front": front, "cache": str(cache_dir), "plots": plots, "command": opts.command,
                  "versions": versions(), "passed": True,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(tmp / "report.md", search_markdown(report))
    return report


def _load_batches(path: Path, loaded: Any, samples: int | None = None) -> list[Any]:
    """Batches of model inputs from a file: compressor.calibrate's loader (tensors or text), or, in a build
    without it, one batch of tensors read by compressor.load."""
    try:
        from compressor.data.calibration import load_calibration
    except ImportError:
        from compressor.data.readers import load_example_inputs

        return [load_example_inputs(path)]
    return load_calibration(path, tokenizer=loaded.tokenizer, samples=samples)


def _held_out(path: Path | None, example: Any, loaded: Any) -> tuple[list[Any], str]:
    if path is not None:
        return _load_batches(path, loaded), f"held-out inputs from {Path(path).name}"
    from compressor.data.inputs import flatten

    names, tensors = flatten(example)
    if not all(t.is_floating_point() for t in tensors):
        raise CompressorError("the model takes integer inputs (token ids), so random held-out inputs make no sense",
                              "pass held-out inputs with --eval-inputs FILE (tensors, or text for Hugging Face)")
    g = torch.Generator().manual_seed(1)  # the export example used seed 0: these inputs are different
    batches = []
    for _ in range(4):
        fresh = [torch.randn(t.shape, generator=g).to(t.dtype) for t in tensors]
        batches.append(fresh[0] if isinstance(example, torch.Tensor) else
                       dict(zip(names, fresh, strict=True)) if isinstance(example, dict) else tuple(fresh))
    return batches, "4 batches of seeded random normal inputs shaped like the example inputs"


def search_markdown(report: dict[str, Any]) -> str:
    c = report["chosen"]
    lines = [f"# compressor search: {Path(report['source']['path']).name}", "",
             f"Chosen: **{c['name']}** -> `{c['file']}`: {c['size_bytes'] / 1e6:.2f} MB "
             f"({c['size_bytes'] / report['front']['fp32_bytes']:.3f} of the dense fp32 export), fidelity "
             f"{c['fidelity']:.5f}, latency {c['latency_ms']:.2f} ms, onnxruntime validation "
             f"{'PASS' if c['passed'] else 'FAIL'}.", "",
             front_markdown(report["front"], report["plots"]),
             "## Provenance", "", f"- command: `{report.get('command')}`", f"- date: {report['date']}",
             f"- cache: `{report['cache']}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)
