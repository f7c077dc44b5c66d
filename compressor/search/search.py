"""The recipe search: low-rank factoring combined with fp16/int8 storage, chosen on the *measured* front.

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
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.fileio import temp_folder
from compressor.data.inputs import as_batches
from compressor.data.perplexity import Protocol
from compressor.export.latency import LatencyTable, Timer, compare_onnx, keep_slow_layers_dense, latency_decisions
from compressor.export.onnx import DEFAULT_ATOL, DEFAULT_OPSET, VARIANTS, write_variant
from compressor.export.onnx_files import first_line
from compressor.search.cache import CACHE_VERSION, Cache, fingerprint, model_fingerprint
from compressor.search.evaluate import THREADS, Evaluation, onnx_fidelity
from compressor.search.front import Point, SearchResult, choose
from compressor.search.recipes import REFERENCES, Constraints, Recipe, default_recipes
from compressor.search.sensitivity import fake_int8, int8_sensitivity, most_sensitive, remove_fake_int8

# A recipe is skipped before building only when its estimated file is this much above --max-size: the
# estimate (parameters x bytes, scaled by the measured fp32 file) is close but not exact.
SIZE_SLACK = 1.1


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
    opset: int = DEFAULT_OPSET
    threads: int = THREADS
    latency_runs: int = 20
    atol: float = DEFAULT_ATOL
    latency_aware: bool = True
    latency_table: LatencyTable | None = None
    timer: Timer | None = None
    perplexity: Protocol | None = None  # with an evaluation text: every file's perplexity on it

    def key(self) -> str:
        """What every measurement depends on besides the recipe (see :meth:`Cache.name` for the rest)."""
        import onnxruntime

        return fingerprint([CACHE_VERSION, model_fingerprint(self.model), self.example_inputs,
                            self.evaluation.fingerprint, self.latency_inputs,
                            json.dumps(self.analyze_options, sort_keys=True, default=str),
                            self.opset, self.threads, torch.__version__, onnxruntime.__version__]
                           + (["latency-aware"] if self.latency_aware else [])
                           + ([f"perplexity {self.perplexity.key()}"] if self.perplexity is not None else []))

    def data_keys(self) -> dict[str, str]:
        """Keys of what only some recipes depend on: calibration (calibrated ones), healing (healed ones)."""
        heal = json.dumps(self.heal_options, sort_keys=True, default=str)
        return {"calibration": fingerprint(self.calibration)[:8], "heal": fingerprint([self.heal_data, heal])[:8]}


def search(model: nn.Module, example_inputs: Any, *, evaluation: Evaluation, constraints: Constraints,
           recipes: Sequence[Recipe] | None = None, cache_dir: str | Path, latency_inputs: Any = None,
           calibration: Any = None, heal_data: Any = None, heal_options: dict[str, Any] | None = None,
           analyze_options: dict[str, Any] | None = None, opset: int = DEFAULT_OPSET, threads: int = THREADS,
           latency_runs: int = 20, atol: float = DEFAULT_ATOL, log: Callable[[str], None] | None = None,
           latency_aware: bool = True, latency_table: LatencyTable | None = None, timer: Timer | None = None,
           perplexity: Protocol | None = None) -> SearchResult:
    """Measure the candidates that can meet ``constraints`` and return the best (see the module's rule).

    ``recipes`` default to :func:`default_recipes` (calibrated when ``calibration`` is given); the dense
    references are always added. Raises :class:`CompressorError` when no measured point meets the
    constraints, naming the one that cannot be met and the closest point. ``model`` is not modified.

    ``latency_aware`` (the default): each low-rank recipe leaves dense the layers whose factored form was
    measured slower at the shape of ``latency_inputs`` (:mod:`compressor.export.latency`), and the chosen
    file is timed against dense fp32 side by side: one that is slower is set aside and the rule picks
    again, so the search never returns a model slower than dense. ``timer`` and ``latency_table`` replace
    the onnxruntime timer and the per-machine cache (tests). False: size and fidelity alone.

    ``perplexity`` (a causal language model's evaluation text and windows): every file's perplexity on it
    is measured in onnxruntime (:func:`compressor.export.perplexity.onnx_perplexity`), with its ratio to
    the dense fp32 export's, which ``constraints.max_perplexity_ratio`` bounds.
    """
    recipes = list(recipes) if recipes is not None else default_recipes(calibrated=calibration is not None)
    recipes = [*REFERENCES, *[r for r in recipes if r not in REFERENCES]]
    if constraints.max_perplexity_ratio is not None and perplexity is None:
        raise CompressorError("a perplexity constraint needs an evaluation text to measure perplexity on",
                              "pass perplexity=Protocol(read_corpus(FILE, tokenizer), window)",
                              cli_fix="pass --eval-text FILE")
    if any(r.calibrated or r.keep_fp16 for r in recipes) and calibration is None:
        raise CompressorError("calibrated recipes and recipes keeping layers in fp16 need calibration inputs",
                              "pass calibration=...", cli_fix="pass --calibration FILE")
    if any(r.heal_steps for r in recipes) and heal_data is None and calibration is None:
        raise CompressorError("healed recipes need data to distill on", "pass heal_data=... (or calibration)",
                              cli_fix="pass --calibration FILE")
    ctx = BuildContext(model, example_inputs, evaluation,
                       latency_inputs if latency_inputs is not None else example_inputs, calibration,
                       heal_data if heal_data is not None else calibration, dict(heal_options or {}),
                       dict(analyze_options or {}), opset, threads, latency_runs, atol, latency_aware,
                       (latency_table or LatencyTable()) if latency_aware else None, timer, perplexity)
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
        if isinstance(point, str):  # its file does not run: nothing to measure or choose
            if recipe == Recipe("fp32"):
                raise CompressorError(f"the dense fp32 export cannot be measured: {point}",
                                      "report the model: every recipe is measured against this file")
            skipped.append({"recipe": recipe.to_dict(), "name": recipe.name, "reason": point, "built": True})
            say(f"set aside {recipe.name}: {point}")
            continue
        say(f"{'cached' if point.cached else 'measured'} {recipe.name}: {point.size_bytes / 1e6:.2f} MB, "
            f"fidelity {point.fidelity:.5f}, {point.latency_ms:.2f} ms"
            + ("" if point.passed else f", validation FAILED: {'; '.join(point.problems)}"))
        points.append(point)
        if recipe == Recipe("fp32"):
            fp32_bytes = point.size_bytes
    dense_ppl = next((p.perplexity for p in points if p.recipe == Recipe("fp32")), None)
    for p in points:  # also for points from the cache: the ratio is to this search's dense fp32
        p.perplexity_ratio = None if p.perplexity is None or not dense_ppl else p.perplexity / dense_ppl
    rule = ("smallest file meeting every constraint (ties: higher fidelity, then lower latency)"
            if constraints.min_fidelity is not None else
            "highest fidelity meeting every constraint (ties: smaller file, then lower latency)")
    result = SearchResult(None, points, skipped, constraints, rule, evaluation.metric, fp32_bytes, built,
                          {"threads": threads, "runs": latency_runs, "statistic": "median",
                           "inputs": _shape_text(ctx.latency_inputs), "latency_aware": latency_aware},
                          perplexity.summary() if perplexity is not None else None)
    result.chosen = choose(result)
    while latency_aware and result.chosen.recipe != Recipe("fp32"):
        # The per-recipe latencies are separate medians; the final word is a side-by-side comparison.
        check = (timer or compare_onnx)(result.reference("fp32").onnx, result.chosen.onnx, ctx.latency_inputs, threads)
        result.chosen.latency_vs_dense = check.ratio
        if not check.slower:
            break
        say(f"slower   {result.chosen.recipe.name}: {check.ratio:.3f}x the dense fp32 latency side by side "
            f"(in three rounds of four); set aside")
        result.chosen.slower_than_dense = True
        result.chosen = choose(result)
    return result


def _grouped(recipes: Sequence[Recipe]) -> list[Recipe]:
    """References first, then recipes sharing a torch model next to each other (first-seen order)."""
    order: dict[Recipe, list[Recipe]] = {}
    for r in recipes:
        order.setdefault(r.base(), []).append(r)
    return [r for group in order.values() for r in group]


def _factorizable_params(model: nn.Module, analyze_options: dict[str, Any]) -> int:
    from compressor.analysis.analyze import find_layers

    found = find_layers(model, analyze_options.get("include", ()), analyze_options.get("exclude", ()))
    return sum(c.weight_matrix().numel() for c in found if c.skip is None)


def correction_params(model: nn.Module, correction: str | None) -> int:
    """Weights an int4 correction (``"rank=16"``, ``"budget=0.03"``) adds to ``model``'s int4 layers:
    ``rank=R`` costs ``R (m + n)`` per layer (at most its full rank), ``budget=F`` that fraction of their
    weights; ``energy`` is only known once measured (0: the estimate stays a lower bound)."""
    if not correction:
        return 0
    from compressor.analysis.int4 import int4_layers, parse_correction
    from compressor.core.handlers import handler_for

    rule = parse_correction(correction)
    shapes = [tuple(handler_for(m).weight_matrix(m).shape) for m in int4_layers(model).values()]
    if "rank" in rule:
        return sum(min(int(rule["rank"]), m, n) * (m + n) for m, n in shapes)
    if "budget" in rule:
        return int(rule["budget"] * sum(m * n for m, n in shapes))
    return 0


def estimate_size(recipe: Recipe, fp32_bytes: int, factorizable: int, total_params: int,
                  correction: int = 0) -> float:
    """Bytes the recipe's file should take: the fp32 file scaled by parameters kept and bytes per weight,
    plus ``correction`` weights of an int4 correction (stored int8: a byte each)."""
    kept = total_params - (recipe.target or 0.0) * factorizable
    per_param = fp32_bytes / total_params / 4.0  # the fp32 file's bytes per parameter, over 4 bytes a float
    return per_param * (kept * VARIANTS[recipe.precision].bytes_per_param + correction)


def _cannot_fit(recipe: Recipe, c: Constraints, fp32_bytes: int, ctx: BuildContext, total: int) -> str | None:
    if recipe.dense or c.max_size is None:
        return None  # references are always measured
    opts = ctx.analyze_options
    factorizable = _factorizable_params(ctx.model, {**opts, "exclude": [*opts.get("exclude", ()), *recipe.exclude]})
    est = estimate_size(recipe, fp32_bytes, factorizable, total, correction_params(ctx.model, recipe.int4_correction))
    limit = c.size_limit(fp32_bytes)
    if est > SIZE_SLACK * limit:
        return f"estimated {est / 1e6:.2f} MB is clearly above the {limit / 1e6:.2f} MB limit"
    return None


def _build(recipe: Recipe, ctx: BuildContext, cache: Cache, say: Callable[[str], None],
           last_model: dict[Recipe, tuple]) -> Point | str:
    """Build, export, validate and measure one recipe; store the point and its ONNX file in the cache.
    A file that failed validation and does not run in onnxruntime (it does not load, or fails on the
    held-out inputs) cannot be measured: the reason is returned instead, and nothing is cached."""
    from compressor.data.inputs import sequence_axes
    from compressor.export.measure import file_size
    from compressor.export.onnx import export_int8, export_onnx, validate_onnx

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
            # Text models get a dynamic sequence axis: held-out sentences tokenize to other lengths.
            fp32 = cache.store(base, export_onnx(model, ctx.example_inputs, work / "fp32.onnx", opset=ctx.opset,
                                                 dynamic_axes=sequence_axes(ctx.example_inputs)))
        kept: list[str] = []
        if recipe.precision == "fp32":
            path, check = fp32, {"atol": ctx.atol}
        else:
            if recipe.keep_fp16:
                if not sensitivity:  # measured once per model, shared by every keep_fp16 of it
                    say(f"measure  {base.name}: int8 sensitivity of each layer on the calibration inputs")
                    outputs = ctx.analyze_options.get("outputs", ())
                    sensitivity.update(int8_sensitivity(model, ctx.calibration, outputs=outputs))
                kept = most_sensitive(sensitivity, model, recipe.keep_fp16)
                made = export_int8(fp32, work / "int8.onnx", keep_fp16=kept)
            elif recipe.precision == "int4" and (recipe.int4_correction or recipe.calibrated):
                made = _calibrated_int4(recipe, model, fp32, work, ctx)
            else:
                # A calibrated variant (static int8) measures activations on the calibration inputs, else
                # on the example inputs.
                made = write_variant(recipe.precision, fp32, work / f"{recipe.precision}.onnx",
                                     calibration=ctx.example_inputs if ctx.calibration is None
                                     else ctx.calibration)
            path = cache.store(recipe, made)
            # Variants approximate the weights: judged by cosine, as the exporter's own CLI check does.
            check = {"atol": None, "min_cosine": VARIANTS[recipe.precision].min_cosine}
        # Static int8 fits its activation ranges to the calibration inputs: checked on real ones when given.
        calibrated = VARIANTS[recipe.precision].calibrated and ctx.calibration is not None
        checked = as_batches(ctx.calibration)[0] if calibrated else ctx.example_inputs
        v = validate_onnx(path, model, checked, variant=recipe.precision, **check)
        try:
            metrics, latency, ppl = _measure(path, ctx)
        except Exception as err:  # onnxruntime raises its own types; on a file validation passed, a bug
            if v.passed:
                raise
            return f"validation failed ({'; '.join(v.problems)}); not measured ({first_line(err)})"
        point = Point(recipe, file_size(path), metrics["fidelity"], metrics, latency["median_ms"],
                      sum(p.numel() for p in model.parameters()), v.passed, list(v.problems), plan_totals,
                      heal_info, round(time.perf_counter() - start, 2), str(path), kept_fp16=kept, perplexity=ppl)
        cache.put(point)
        return point


def _measure(path: Path, ctx: BuildContext) -> tuple[dict[str, float], dict[str, Any], float | None]:
    """Fidelity on the held-out inputs, latency, and perplexity when there is an evaluation text."""
    from compressor.export.measure import onnx_latency

    metrics = onnx_fidelity(path, ctx.evaluation, ctx.threads)
    latency = onnx_latency(path, ctx.latency_inputs, threads=ctx.threads, warmup=3, runs=ctx.latency_runs)
    ppl = None
    if ctx.perplexity is not None:
        from compressor.export.perplexity import onnx_perplexity

        ppl = onnx_perplexity(path, ctx.perplexity.corpus, **ctx.perplexity.settings(), threads=ctx.threads).ppl
    return metrics, latency, ppl


def _calibrated_int4(recipe: Recipe, model: nn.Module, fp32: Path, work: Path, ctx: BuildContext) -> Path:
    """The int4 file of ``model``: calibrated, its weights rounded by GPTQ on the calibration inputs; with the
    recipe's low-rank correction of its rounding error (data-aware when calibrated)."""
    from compressor.analysis.int4 import gptq_int4, int4_correction, parse_correction
    from compressor.export.onnx import export_int4

    calibration = ctx.calibration if recipe.calibrated else None
    weights = gptq_int4(model, calibration) if calibration is not None else None
    corr = None
    if recipe.int4_correction:
        corr = int4_correction(model, calibration=calibration, outputs=ctx.analyze_options.get("outputs") or None,
                               weights=weights, **parse_correction(recipe.int4_correction))
    return export_int4(fp32, work / "int4.onnx", corrections=corr.factors if corr else None, factors="int8",
                       weights=weights)


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
    if ctx.latency_aware:
        decisions = latency_decisions(ctx.model, plan, ctx.latency_inputs, threads=ctx.threads,
                                      table=ctx.latency_table, timer=ctx.timer, log=say)
        # A lookup table has no multiply for factoring to save, so the per-layer rule always calls its
        # factored form slower, yet it holds most of the bytes of a text model (MiniLM: half) and costs one
        # small MatMul per token: a factored embedding is judged on the whole file instead (the chosen file
        # is timed side by side with dense fp32 below, and set aside if slower).
        decisions = {n: d for n, d in decisions.items() if plan.layer(n).kind != "embedding"}
        if slow := keep_slow_layers_dense(plan, decisions):
            say(f"dense    {recipe.name}: {len(slow)} layer(s) whose factored form is slower stay dense")
    rewrite(model, plan)
    heal_info = None
    if recipe.heal_steps:
        from compressor.train.heal import heal

        say(f"heal     {recipe.name}: {recipe.heal_steps} steps")
        if recipe.qat:
            fake_int8(model)
        # heal_steps are end-to-end steps: a transformer's default block-wise phase would cost more than they do.
        res = heal(model, teacher=ctx.model, data=ctx.heal_data, steps=recipe.heal_steps, progress=False,
                   **{"method": "end-to-end", **ctx.heal_options})
        model = remove_fake_int8(res.model).eval()
        heal_info = {"steps": res.steps, "before": res.before, "after": res.after, "seconds": round(res.seconds, 1)}
    factored = {lp.name: lp.rank for lp in plan.factored}
    return model, {**plan.totals(), "factored_ranks": factored}, heal_info, {}


def _shape_text(inputs: Any) -> str:
    from compressor.data.inputs import flatten

    names, tensors = flatten(inputs)
    return ", ".join(f"{n} {'x'.join(map(str, t.shape))}" for n, t in zip(names, tensors, strict=True))
