"""``compress search``: load the model, search the recipes, write the chosen file, the front and the report."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write_text
from compressor.core.threads import thread_budget
from compressor.jobs.results import SearchJobResult
from compressor.search.evaluate import THREADS, output_fidelity
from compressor.search.front import front_markdown, plot_front
from compressor.search.recipes import (
    DEFAULT_INT4_CORRECTIONS,
    DEFAULT_PRECISIONS,
    DEFAULT_TARGETS,
    Constraints,
    default_recipes,
)
from compressor.search.search import SearchResult, search


def copy_chosen(result: SearchResult, folder: Path) -> Path:
    """Copy the chosen ONNX file into ``folder`` as model.onnx / model.fp16.onnx / model.int8.onnx."""
    p = result.chosen
    name = "model.onnx" if p.recipe.precision == "fp32" else f"model.{p.recipe.precision}.onnx"
    dst = Path(folder) / name
    shutil.copyfile(p.onnx, dst)
    os.utime(dst)
    return dst


# ---------------------------------------------------------------------------------------- the job


def run_search(source: str | Path, out: str | Path | None = None, *, constraints: Constraints,
               targets: Sequence[float] = DEFAULT_TARGETS, heal_steps: int = 0,
               precisions: Sequence[str] = DEFAULT_PRECISIONS, keep_fp16: Sequence[int] = (0,),
               int4_corrections: Sequence[str] = DEFAULT_INT4_CORRECTIONS, cache_dir: str | Path | None = None,
               eval_inputs: Path | None = None, options: Any = None,
               log: Callable[[str], None] | None = None) -> SearchJobResult:
    """``compress search``: load the model at ``source``, :func:`search`, and write the chosen ONNX file,
    ``front.json``, the front plots, ``report.json`` and ``report.md`` into ``out`` (all or nothing).
    Returns a :class:`SearchJobResult` (its ``to_dict()`` is ``report.json``).

    ``options`` is a :class:`compressor.jobs.options.Options` (loading, example inputs, calibration, opset).
    Held-out inputs come from ``eval_inputs`` (tensors, or text for Hugging Face models); without it,
    from seeded random inputs shaped like the example inputs (float inputs only).
    """
    from compressor.jobs.options import Options

    opts = options or Options()
    with thread_budget(opts.threads):
        return _search_job(Path(source), out, constraints, targets, heal_steps, precisions, keep_fp16,
                           int4_corrections, cache_dir, eval_inputs, opts, log)


def _search_job(source: Path, out: str | Path | None, constraints: Constraints, targets: Sequence[float],
                heal_steps: int, precisions: Sequence[str], keep_fp16: Sequence[int],
                int4_corrections: Sequence[str], cache_dir: str | Path | None,
                eval_inputs: Path | None, opts: Any, log: Callable[[str], None] | None) -> SearchJobResult:
    from compressor.core.output import OutputDir, check_not_over_inputs
    from compressor.data.inputs import check_fits
    from compressor.formats.load import load_model
    from compressor.formats.onnx_graph import is_onnx
    from compressor.jobs.compress import default_out
    from compressor.jobs.loading import example_inputs, with_pooled_output
    from compressor.jobs.options import check_eval_text
    from compressor.jobs.perplexity import eval_protocol
    from compressor.report.report import versions

    out = Path(out) if out is not None else default_out(source)
    cache_dir = Path(cache_dir) if cache_dir is not None else out.parent / ".compressor-cache"
    # Every check that needs no model comes first: a search takes minutes, a bad option should not.
    check_constraints(constraints)
    opts.validate()  # made valid, and checked again: its fields may have been set since
    check_cache_dir(cache_dir)
    if opts.eval_text is not None:
        check_eval_text(opts, "search", is_onnx(source))
    elif constraints.max_perplexity_ratio is not None:
        raise CompressorError("a perplexity constraint needs an evaluation text to measure perplexity on",
                              "pass eval_text=FILE in the options", cli_fix="pass --eval-text FILE")
    heal = (0, heal_steps) if heal_steps else (0,)
    recipes = default_recipes(targets, calibrated=opts.calibration is not None, heal_steps=heal,
                              precisions=precisions, keep_fp16=keep_fp16, int4_corrections=int4_corrections)
    if opts.calibration is None and any(r.heal_steps or r.keep_fp16 for r in recipes):
        raise CompressorError("healed recipes and recipes keeping layers in fp16 need calibration inputs",
                              "pass calibration inputs with --calibration FILE")
    check_not_over_inputs(out, [("model", source), ("calibration file", opts.calibration),
                                ("example inputs", opts.example_inputs), ("held-out inputs", eval_inputs),
                                ("measurement cache", cache_dir), ("evaluation text", opts.eval_text)])
    OutputDir(out, opts.force).check()
    loaded = load_model(source, trust_pickle=opts.trust_pickle, arch=opts.arch)
    if loaded.model is None:
        raise CompressorError("the input holds weights only, so it cannot be exported",
                              "pass --arch package.module:factory to build the model")
    model = loaded.model.eval()
    opts = with_pooled_output(opts, loaded)  # a sentence-transformers folder: its sentence embedding
    protocol = eval_protocol(loaded, opts) if opts.eval_text is not None else None
    inputs = example_inputs(loaded, opts)
    calibration = None
    if opts.calibration is not None:
        calibration = _load_batches(opts.calibration, loaded, opts.calibration_samples)
        check_fits(model, calibration, f"the calibration inputs in '{opts.calibration}'")
    if eval_inputs is None and calibration is not None:
        # Ranked on data the recipes were not calibrated on: a recipe fit to the same inputs it is scored on
        # looks better than it is (a held-out sentence set ranked two MiniLM files the other way round).
        calibration, held_out, held_out_note = split_held_out(calibration)
    else:
        held_out, held_out_note = _held_out(eval_inputs, inputs, loaded)
    if eval_inputs is not None:
        check_fits(model, held_out, f"the held-out inputs in '{eval_inputs}'")
    evaluation = output_fidelity(model, held_out, opts.outputs)
    evaluation.metric += f" ({held_out_note})"
    with OutputDir(out, opts.force) as tmp:
        result = search(model, inputs, evaluation=evaluation, constraints=constraints, recipes=recipes,
                        cache_dir=cache_dir, calibration=calibration, opset=opts.opset, atol=opts.atol, log=log,
                        threads=opts.threads or THREADS, latency_aware=opts.latency_aware is not False,
                        analyze_options={"outputs": list(opts.outputs)} if opts.outputs else None,
                        perplexity=protocol)
        chosen = copy_chosen(result, tmp)
        edge = None
        if opts.edge:  # the chosen file against itself as the search built it; fidelity against the original
            from compressor.export.edge import build_edge

            edge = build_edge(tmp, chosen, inputs, threads=opts.threads or 1, fidelity_reference=model,
                              origin={"source": str(source), "command": opts.command,
                                      "recipe": result.chosen.recipe.name})
        front = result.to_dict()
        atomic_write_text(tmp / "front.json", json.dumps(front, indent=2) + "\n")
        job = SearchJobResult(source=str(source), format=loaded.format, output=str(out), front=result,
                              file=chosen.name, cache=str(cache_dir), plots=plot_front(front, tmp),
                              command=opts.command, versions=versions(), passed=edge is None or edge["passed"],
                              edge=edge, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        report = job.to_dict()
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(tmp / "report.md", search_markdown(report))
    return job


def check_constraints(constraints: Constraints) -> None:
    """A search needs a constraint, and a fidelity floor it can reach: the job's fidelity (cosine
    similarity, or top-1 agreement, with the original) is at most 1."""
    if constraints == Constraints():
        raise CompressorError("search needs at least one constraint",
                              "pass --max-size, --min-fidelity, --max-latency and/or --max-perplexity-ratio")
    f = constraints.min_fidelity
    if f is not None and not -1 <= f <= 1:
        raise CompressorError(f"min_fidelity {f:g} can never be met: fidelity is a cosine similarity or a "
                              "top-1 agreement with the original model, between -1 and 1",
                              "pass e.g. min_fidelity=0.95", cli_fix="pass e.g. --min-fidelity 0.95")


def check_cache_dir(cache_dir: Path) -> None:
    """The cache must be (or become) a folder: refuse a path that is, or lies inside, a file."""
    for p in (cache_dir, *cache_dir.parents):
        if p.exists():
            if not p.is_dir():
                raise CompressorError(f"the cache path '{cache_dir}' is not a folder ('{p}' is a file)",
                                      "pass a folder for the cache with --cache DIR, or leave it out")
            return


def _load_batches(path: Path, loaded: Any, samples: int | None = None) -> list[Any]:
    """Batches of model inputs from a file: compressor.data.calibration's loader (tensors or text), or, in a build
    without it, one batch of tensors read by compressor.load."""
    try:
        from compressor.data.calibration import load_calibration
    except ImportError:
        from compressor.formats.load import load_example_inputs

        return [load_example_inputs(path)]
    return load_calibration(path, tokenizer=loaded.tokenizer, samples=samples)


def split_held_out(calibration: list[Any]) -> tuple[list[Any], list[Any], str]:
    """``(fit, held_out, note)``: the calibration batches without a quarter of their samples (at least one),
    which are held out to score the recipes. Whole batches when there are several, else rows of the one."""
    from compressor.data.inputs import num_samples, take

    if len(calibration) >= 2:
        k = max(1, len(calibration) // 4)
        fit, held = calibration[:-k], calibration[-k:]
    else:
        rows = num_samples(calibration[0])
        if rows < 2:
            raise CompressorError("one calibration sample cannot both calibrate and score the recipes",
                                  "pass more calibration samples, or held-out inputs with --eval-inputs FILE")
        k = max(1, rows // 4)
        fit, held = [take(calibration[0], slice(0, rows - k))], [take(calibration[0], slice(rows - k, rows))]
    n = sum(num_samples(b) for b in held)
    return fit, held, f"{n} calibration samples held out (not calibrated on; --eval-inputs gives others)"


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
    from compressor.report.report import edge_markdown

    c = report["chosen"]
    lines = [f"# compressor search: {Path(report['source']['path']).name}", "",
             f"Chosen: **{c['name']}** -> `{c['file']}`: {c['size_bytes'] / 1e6:.2f} MB "
             f"({c['size_bytes'] / report['front']['fp32_bytes']:.3f} of the dense fp32 export), fidelity "
             f"{c['fidelity']:.5f}, "
             + ("" if c.get("perplexity") is None else
                f"perplexity {c['perplexity']:.4f} ({c['perplexity_ratio']:.4f}x dense fp32), ")
             + f"latency {c['latency_ms']:.2f} ms, onnxruntime validation "
             f"{'PASS' if c['passed'] else 'FAIL'}.", "",
             front_markdown(report["front"], report["plots"]),
             *(edge_markdown(report["edge"]) if report.get("edge") else []),
             "## Provenance", "", f"- command: `{report.get('command')}`", f"- date: {report['date']}",
             f"- cache: `{report['cache']}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)
