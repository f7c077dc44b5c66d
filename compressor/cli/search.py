"""``compress search``: the command-line shell over :func:`compressor.jobs.search.run_search`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from compressor.cli.common import EXIT_VALIDATION_FAILED, command_line, fail
from compressor.cli.flags import EDGE_HELP, common_options, eval_options, latency_option, outputs_option, threads_option
from compressor.core.errors import CompressorError
from compressor.export.onnx import DEFAULT_OPSET
from compressor.jobs.options import Options
from compressor.search.recipes import DEFAULT_INT4_CORRECTIONS, DEFAULT_PRECISIONS, DEFAULT_TARGETS, PRECISIONS


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not numbers separated by commas, e.g. 0.2,0.4,0.6") from None


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = (-1,)
    if any(v < 0 for v in values):
        raise click.BadParameter(f"{option} {text!r} is not whole numbers >= 0 separated by commas, e.g. 0,2,4")
    return values


@click.command("search")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--max-size", help="Largest exported file: 15MB, 800KB, or a fraction of the fp32 export (0.2).")
@click.option("--min-fidelity", type=float, help="Lowest fidelity to the original on held-out inputs (e.g. 0.95).")
@click.option("--max-latency", help="Slowest median onnxruntime latency on the example inputs (5ms, 0.01s).")
@click.option("--max-perplexity-ratio", type=float,
              help="Highest perplexity on --eval-text as a multiple of the dense fp32 export's (e.g. 1.1; causal "
                   "language models).")
@click.option("--targets", default=",".join(map(str, DEFAULT_TARGETS)), show_default=True,
              help="Low-rank parameter targets to try (fractions of the factorizable weights removed).")
@click.option("--precisions", default=",".join(DEFAULT_PRECISIONS), show_default=True,
              help=f"Storage precisions to try, among {','.join(PRECISIONS)}.")
@click.option("--heal-steps", type=int, default=0, show_default=True,
              help="Also try each low-rank recipe healed by this many distillation steps (needs --calibration).")
@click.option("--keep-fp16", default="0", show_default=True,
              help="Also try each int8 recipe keeping this many layers, those int8 rounding hurts most "
                   "(measured on --calibration), in fp16; a comma list such as 2,4.")
@click.option("--int4-corrections", default=",".join(DEFAULT_INT4_CORRECTIONS), show_default=True,
              help="With int4 among --precisions: also try dense and low-rank int4 with each of these low-rank "
                   "corrections of its rounding error (rank=R, energy=E or budget=F; data-aware with --calibration); "
                   "'' for none.")
@click.option("--eval-inputs", type=click.Path(path_type=Path),
              help="Held-out inputs for fidelity (tensors, or text for Hugging Face models) "
                   "[default: seeded random inputs shaped like the example inputs].")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path),
              help="Measurement cache folder [default: .compressor-cache/ beside the output].")
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration inputs (see compress --help).")
@click.option("--calibration-samples", type=int)
@outputs_option
@click.option("--input-shape", "input_shapes", multiple=True, help="Shape of an example input, e.g. 1x3x224x224.")
@click.option("--example-inputs", type=click.Path(path_type=Path), help="Example inputs (.pt/.npz/.safetensors).")
@click.option("--atol", type=float, default=Options.atol, show_default=True, help="fp32 validation tolerance.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True)
@click.option("--edge", is_flag=True, help=EDGE_HELP)
@eval_options
@latency_option
@threads_option
@common_options
def search_cmd(model: Path, max_size: str | None, min_fidelity: float | None, max_latency: str | None,
               max_perplexity_ratio: float | None, targets: str, precisions: str, heal_steps: int, keep_fp16: str,
               int4_corrections: str,
               eval_inputs: Path | None,
               cache_dir: Path | None, **kw: Any) -> None:
    """Measure low-rank x fp32/fp16/int8/int4 recipes (and corrected int4) and keep the best one meeting the
    constraints.

    With --min-fidelity the smallest file meeting every constraint wins; otherwise the most faithful.
    Dense fp32, fp16, int8 and int4 are always measured as references; measurements are cached by recipe.
    """
    from compressor.jobs.search import run_search
    from compressor.search.recipes import Constraints, parse_latency, parse_size

    as_json, quiet, debug, out = kw.pop("as_json"), kw.pop("quiet"), kw.pop("debug"), kw.pop("out")
    kw["command"] = command_line()
    log = None if quiet or as_json else (lambda msg: click.echo(f"  {msg}", err=True))
    try:
        constraints = Constraints(parse_size(max_size) if max_size else None, min_fidelity,
                                  parse_latency(max_latency) if max_latency else None, max_perplexity_ratio)
        report = run_search(model, out, constraints=constraints, targets=_floats(targets),
                            precisions=tuple(p.strip() for p in precisions.split(",")), heal_steps=heal_steps,
                            keep_fp16=_ints(keep_fp16, "--keep-fp16"),
                            int4_corrections=[c.strip() for c in int4_corrections.split(",") if c.strip()],
                            cache_dir=cache_dir, eval_inputs=eval_inputs, options=Options(**kw), log=log)
    except CompressorError as err:
        fail(err, debug)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        c = report.chosen
        ppl = "" if c.perplexity is None else f"perplexity {c.perplexity:.4f} ({c.perplexity_ratio:.4f}x dense), "
        click.echo(f"{model} -> {report.output}/{report.file}: {c.recipe.name}, {c.size_bytes / 1e6:.2f} MB, "
                   f"fidelity {c.fidelity:.5f}, {ppl}{c.latency_ms:.2f} ms "
                   f"({report.front.built} built, {len(report.front.points)} measured)")
        for f in (report.edge or {}).get("variants", []):
            click.echo(f"  {'edge/' + f['file']:<17} {f['size_bytes'] / 1e6:.2f} MB, {f['latency_ms']:.2f} ms at "
                       f"batch 1: {'PASS' if f['validation']['passed'] else 'FAIL'}")
        click.echo(f"  report            {Path(report.output) / 'report.md'}")
    if not report.passed:  # an edge file failed its validation
        click.echo("error: validation FAILED (see report.md); the output folder was kept for inspection", err=True)
        sys.exit(EXIT_VALIDATION_FAILED)

