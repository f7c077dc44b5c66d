"""``compress``: the command-line shell over :func:`compressor.jobs.compress.compress`.

    compress MODEL --energy 0.95            # analyze, factor, export, report (the default command)
    compress analyze MODEL --target 0.4     # spectra and plan only
    compress apply MODEL plan.json          # re-apply an edited plan
    compress export MODEL                   # ONNX of the model as it is
    compress search MODEL --max-size 0.2 --min-fidelity 0.95   # best recipe on the measured front
    compress eval MODEL --text eval.txt     # perplexity of a causal language model
    compress MODEL --max-size 15MB          # the same: a constraint makes the default command a search

Bad input prints one line (the problem and the fix) and exits with code 2; a failed ONNX validation
exits with code 3. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from compressor.cli.common import EXIT_VALIDATION_FAILED, command_line, fail
from compressor.cli.flags import (
    common_options,
    eval_options,
    export_options,
    held_out_option,
    keep_fp16_option,
    latency_option,
    outputs_option,
    policy_options,
    stream_options,
    threads_option,
)
from compressor.cli.group import DefaultGroup
from compressor.cli.heal import heal_cmd
from compressor.cli.lora import lora
from compressor.cli.search import search_cmd
from compressor.cli.summary import stream_summary, summary
from compressor.cli.train import checkpoints
from compressor.core.errors import CompressorError
from compressor.export.onnx import VARIANTS
from compressor.jobs.options import Options


def _run_stream(mode: str, model: Path, kw: dict[str, Any]) -> None:
    """``--stream``: :func:`compressor.jobs.stream.stream_compress`, its summary, errors as one line."""
    from compressor.jobs.stream import stream_compress

    as_json, quiet, debug, out = kw.pop("as_json"), kw.pop("quiet"), kw.pop("debug"), kw.pop("out")
    kw["command"] = command_line()  # for report.md
    try:
        result = stream_compress(model, out, mode="compress" if mode == "compress" else "analyze",
                                 options=Options(**kw, stream=True))
    except CompressorError as err:
        fail(err, debug)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        click.echo(stream_summary(model, result))


def _run(mode: str, model: Path, kw: dict[str, Any]) -> None:
    """Run one mode, print the outcome, and turn errors into one line and an exit code."""
    kw["variants"] = [name for name in VARIANTS if kw.pop(f"variant_{name}", False)]
    if kw.pop("stream", False):
        _run_stream(mode, model, kw)
        return
    from compressor.jobs.compress import compress
    from compressor.jobs.fidelity import LowFidelityWarning

    as_json, quiet, debug, out = kw.pop("as_json"), kw.pop("quiet"), kw.pop("debug"), kw.pop("out")
    kw["command"] = command_line()
    kw["progress"] = False if quiet or as_json else None
    try:
        with warnings.catch_warnings():  # printed below as one `warning:` line, spelled for the CLI
            warnings.simplefilter("ignore", LowFidelityWarning)
            report = compress(model, out, mode=mode, options=Options(**kw))
    except CompressorError as err:
        fail(err, debug)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))  # its "warnings" say what the lines below would
    else:
        if not quiet:
            click.echo(summary(report))
        for warning in report.warnings or []:
            click.echo(f"warning: {warning['cli']}", err=True)
    if not report.passed:
        if not as_json:
            click.echo("error: validation FAILED (see report.md); the output folder was kept for inspection",
                       err=True)
        sys.exit(EXIT_VALIDATION_FAILED)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compressor")
def main() -> None:
    """Shrink a pretrained model by low-rank factorization, export it to ONNX, and report the cost.

    \b
    compress MODEL --energy 0.95      analyze, factor, export, report
    compress MODEL.onnx --energy 0.9  factor an ONNX graph's weights in the graph
    compress analyze MODEL --target 0.4
    compress apply MODEL plan.json
    compress export MODEL
    compress heal DIR --data train.pt
    compress eval MODEL --text eval.txt   perplexity of a causal language model (folder or ONNX file)
    compress search MODEL --max-size 15MB --min-fidelity 0.95
    compress MODEL --max-size 15MB    the same search: a budget instead of a policy
    """


@main.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@policy_options
@export_options
@keep_fp16_option
@latency_option
@eval_options
@held_out_option
@threads_option
@stream_options
@common_options
def run_cmd(model: Path, **kw: Any) -> None:
    """Analyze, factor, export and report (the default command)."""
    _run("compress", model, kw)


@main.command("analyze")
@click.argument("model", type=click.Path(path_type=Path))
@policy_options
@click.option("--plots", is_flag=True, help="Add spectrum and energy plots to the output folder.")
@threads_option
@stream_options
@common_options
def analyze_cmd(model: Path, **kw: Any) -> None:
    """Spectra and plan only: nothing is rewritten."""
    _run("analyze", model, kw)


@main.command("apply")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration inputs (see compress --help).")
@click.option("--calibration-samples", type=int)
@outputs_option
@export_options
@keep_fp16_option
@latency_option
@eval_options
@held_out_option
@threads_option
@common_options
def apply_cmd(model: Path, plan: Path, **kw: Any) -> None:
    """Re-apply a plan (for example one whose ranks you edited) and export."""
    _run("apply", model, {**kw, "plan_path": plan})


@main.command("export")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Calibration inputs: --int4 rounds by GPTQ on them, a --int4-correction is data-aware, --qdq "
                   "calibrates on them (see compress --help).")
@click.option("--calibration-samples", type=int)
@export_options
@eval_options
@threads_option
@common_options
def export_cmd(model: Path, **kw: Any) -> None:
    """Export the model as it is to ONNX and validate it."""
    _run("export", model, kw)


@main.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--text", type=click.Path(path_type=Path), required=True,
              help="The UTF-8 text file to measure on (tokenized once into one stream).")
@click.option("--window", type=int, help="Model positions per window [default: 2048, capped at the model's context].")
@click.option("--stride", type=int,
              help="Text tokens between window starts [default: a window's text tokens, so windows do not overlap].")
@click.option("--max-windows", type=int, help="Only the first N windows.")
@click.option("--bos/--no-bos", default=True, show_default=True, help="Begin each window with the BOS token.")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="For an ONNX file: the folder holding its tokenizer and config.json [default: the file's folder].")
@threads_option
@click.option("--trust-pickle", is_flag=True,
              help="Allow loading a pickled model whose file names code to run (only for files you trust).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def eval_cmd(model: Path, text: Path, as_json: bool, debug: bool, **kw: Any) -> None:
    """Perplexity of a causal language model (a Hugging Face folder, a compressed folder or an ONNX file) on a
    text: the token stream cut into whole windows, exp of the mean negative log-likelihood of every predicted
    token."""
    from compressor.jobs.perplexity import evaluate_perplexity

    try:
        result = evaluate_perplexity(model, text, **kw)
    except CompressorError as err:
        fail(err, debug)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"{model}: perplexity {result.ppl:.4f} (mean NLL {result.mean_nll:.5f}) in {result.seconds:.1f} s\n"
               f"  protocol  {result.describe()}")
    for note in result.notes:
        click.echo(f"  note      {note}")


main.add_command(checkpoints)
main.add_command(heal_cmd)
main.add_command(lora)
main.add_command(search_cmd)
