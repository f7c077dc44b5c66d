"""``compress``: the command-line shell over :func:`compressor.pipeline.compress`.

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
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from compressor.cli.common import fail
from compressor.cli.lora import lora
from compressor.cli.train import checkpoints, heal_config_options
from compressor.core.errors import CompressorError
from compressor.core.output import interrupt_exit_code, interrupt_on_sigterm
from compressor.export.kv_cache import format_generation
from compressor.export.onnx import DEFAULT_OPSET, FACTOR_STORAGE, VARIANTS
from compressor.jobs.compress import Options
from compressor.report.report import VALIDATED, Report, criterion, number
from compressor.search.recipes import DEFAULT_INT4_CORRECTIONS, DEFAULT_PRECISIONS, DEFAULT_TARGETS, PRECISIONS

EXIT_BAD_INPUT = 2
EXIT_VALIDATION_FAILED = 3


# Options that make `compress MODEL ...` a recipe search: a budget rather than a policy.
_CONSTRAINT_OPTIONS = ("--max-size", "--min-fidelity", "--max-latency", "--max-perplexity-ratio")


class DefaultGroup(click.Group):
    """A group whose first argument, when it is not a sub-command, is the MODEL of ``compress run``, or of
    ``compress search`` when a constraint (``--max-size``, ``--min-fidelity``, ``--max-latency``) is given."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            search = any(a.split("=", 1)[0] in _CONSTRAINT_OPTIONS for a in args)
            args = ["search" if search else "run", *args]
        return super().parse_args(ctx, args)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        interrupt_on_sigterm()  # from here on SIGTERM unwinds like Ctrl-C
        with _interrupts_exit():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _interrupts_exit():
            return super().invoke(ctx)


    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """As click's, but a usage error (unknown option, a value of the wrong type) is one line too:
        ``error: <what click says>; see compress [COMMAND] --help``, exit code 2."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rc = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as err:
            name = err.ctx.command_path if err.ctx is not None else "compress"
            click.echo(f"error: {err.format_message().rstrip('.')}; see {name} --help", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
        sys.exit(rc if isinstance(rc, int) else 0)


@contextmanager
def _interrupts_exit() -> Iterator[None]:
    """Ctrl-C, and SIGTERM turned into the same exception, end every command the same way: temporary
    outputs are removed while the exception unwinds, then one line and the shell's code for the signal."""
    try:
        yield
    except KeyboardInterrupt as err:
        if "--debug" in sys.argv[1:]:
            raise
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(interrupt_exit_code(err))


def _options(opts: list[Callable]) -> Callable[[Callable], Callable]:
    """One decorator applying a list of click options, in the order listed in --help."""
    def apply(f: Callable) -> Callable:
        for opt in reversed(opts):
            f = opt(f)
        return f
    return apply


_outputs_option = click.option(
    "--output", "outputs", multiple=True,
    help="A model output that fidelity and sensitivity compare, e.g. last_hidden_state, or a pooled "
         "sentence_embedding:mean[:normalize] (also :cls, :max) (repeatable) [default: a sentence-transformers "
         "folder's pooled embedding, else every floating-point output].")

_policy_options = _options([
    click.option("--energy", type=float, help="Per layer, keep this fraction of spectral energy (0, 1]."),
    click.option("--rank", type=int, help="The same rank for every layer."),
    click.option("--rank-ratio", type=float, help="This fraction of each layer's full rank."),
    click.option("--target", type=float,
                 help="Remove this fraction of the factorizable parameters, allocated across layers."),
    click.option("--rank-multiple", type=int, default=Options.rank_multiple, show_default=True,
                 help="Round ranks up to a multiple of this (hardware friendliness)."),
    click.option("--include", multiple=True, help="Only layers matching this glob (repeatable)."),
    click.option("--exclude", multiple=True, help="Never layers matching this glob (repeatable)."),
    click.option("--calibration", type=click.Path(path_type=Path),
                 help="Calibration inputs for data-aware factors: tensors (.pt/.npz/.safetensors) or, "
                      "for Hugging Face text models, a text file with one sentence per line."),
    click.option("--calibration-samples", type=int, help="Use at most this many calibration samples."),
    click.option("--keep-batchnorm", is_flag=True,
                 help="Do not fold BatchNorms into the convs before them [default: fold, exact in eval mode]."),
    _outputs_option,
])

_common_options = _options([
    click.option("--out", type=click.Path(path_type=Path),
                 help="Output folder [default: <model stem>.compressed/ beside the input]."),
    click.option("--force", is_flag=True, help="Replace the output folder if it exists."),
    click.option("--trust-pickle", is_flag=True,
                 help="Allow loading a pickled model whose file names code to run (only for files you trust)."),
    click.option("--arch", help="package.module:factory building the model for a bare state_dict."),
    click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
    click.option("--quiet", is_flag=True, help="Print nothing but errors and warnings (and --json)."),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
])

_threads_option = click.option(
    "--threads", type=int,
    help="torch (and onnxruntime) threads for every step [default: the tool chooses per operation: SVDs on "
         "one thread, which stays fast on a busy machine].")

_latency_option = click.option(
    "--latency-aware/--no-latency-aware", default=None,
    help="Factor only the layers measured faster than dense in onnxruntime at the example input shape "
         "(break-even ranks cached per machine), and time every file against dense in the report; a model.onnx "
         "slower than dense is refused (a search falls back to a file that is not slower). "
         "[default: on in search, off otherwise]")

_EDGE_HELP = ("Also write edge/: every ONNX file as an onnxruntime .ort file (validated), the operators a reduced "
              "build needs (required_operators.config) and manifest.json (sizes, sha256, versions, batch-1 "
              "latency, fidelity); see docs/edge.md.")

_export_options = _options([
    click.option("--input-shape", "input_shapes", multiple=True,
                 help="Shape of an example input for export, e.g. 1x3x224x224 (repeatable)."),
    click.option("--example-inputs", type=click.Path(path_type=Path),
                 help="Example inputs for export (.pt/.npz/.safetensors)."),
    click.option("--atol", type=float, default=Options.atol, show_default=True,
                 help="Largest absolute difference allowed between onnxruntime and torch outputs."),
    click.option("--opset", type=int, default=Options.opset, show_default=True),
    # One flag per export variant (export.onnx.VARIANTS): --fp16, --int8, ... gathered into `variants`.
    *(click.option(f"--{v.name}", f"variant_{v.name}", is_flag=True,
                   help=f"Also write and validate model.{v.name}.onnx ({v.help}).")
      for v in VARIANTS.values() if v.write is not None),
    click.option("--int4-block-size", type=int, default=Options.int4_block_size, show_default=True,
                 help="With --int4: weights per scale and zero point (a power of two >= 16; smaller: more "
                      "faithful, bigger)."),
    click.option("--int4-correction",
                 help="With --int4: add a low-rank correction of each Linear's 4-bit rounding error: rank=R "
                      "(every layer), energy=E (of the error's spectrum) or budget=F (correction weights worth F "
                      "of the Linear weights, spent where they help most); whitened by --calibration if given."),
    click.option("--int4-factors", type=click.Choice(FACTOR_STORAGE), default=Options.int4_factors,
                 show_default=True, help="With --int4-correction: how its factors are stored."),
    click.option("--kv-cache", is_flag=True,
                 help="Causal LMs: also write model_kv.onnx (past_key_values.N.key/value in, present.N.key/value "
                      "out, as Optimum and onnxruntime-genai lay them out) and a model_kv.VARIANT.onnx per variant, "
                      "checked by greedy generation against the torch model on 10 prompts (the first lines of "
                      "--eval-text or a text --calibration, else built-in ones)."),
    click.option("--plots", is_flag=True, help="Add spectrum and energy plots to the output folder."),
    click.option("--edge", is_flag=True, help=_EDGE_HELP),
])


_held_out_option = click.option(
    "--eval-inputs", type=click.Path(path_type=Path),
    help="Held-out inputs to measure fidelity on instead of the two example inputs: tensors or, for Hugging Face "
         "text models, a text file with one sentence per line (not the calibration sentences).")

_eval_options = _options([
    click.option("--eval-text", type=click.Path(path_type=Path),
                 help="A UTF-8 text file: put the perplexity of the dense model, the compressed model and every "
                      "written ONNX file on it in the report (causal language models; see compress eval)."),
    click.option("--eval-window", type=int,
                 help="With --eval-text: model positions per window [default: 2048, capped at the model's context]."),
    click.option("--eval-stride", type=int,
                 help="With --eval-text: text tokens between window starts [default: a window's, no overlap]."),
    click.option("--eval-max-windows", type=int, help="With --eval-text: only the first N windows."),
    click.option("--eval-bos/--no-eval-bos", default=Options.eval_bos, show_default=True,
                 help="With --eval-text: begin each window with the BOS token."),
])


_stream_options = _options([
    click.option("--stream", is_flag=True,
                 help="Read a safetensors checkpoint (file or sharded Hugging Face folder) tensor by tensor and "
                      "write factored shards, never holding the model; resumable (rerun the same command)."),
    click.option("--svd", type=click.Choice(["exact", "randomized"]), default=Options.svd, show_default=True,
                 help="With --stream: 'randomized' finds only the leading singular triplets (--rank, --rank-ratio, "
                      "--energy, --target with --max-rank), checked per layer by an a-posteriori bound, exact SVD "
                      "where it fails."),
    click.option("--max-rank", type=int, default=Options.max_rank,
                 help="With --stream: no layer gets a rank above N (or stays dense); the randomized SVD then finds "
                      "only N triplets per layer. Needed by --target with --svd randomized."),
    click.option("--workers", type=int, default=Options.workers, show_default=True,
                 help="With --stream: worker processes for the per-layer SVDs (1: in this process)."),
    click.option("--ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                 help="With --stream: run the per-layer work as Ray tasks, on a Ray started here (no ADDRESS) or "
                      "on the cluster at ADDRESS (every node must see the model files at the same path)."),
    click.option("--device", default=Options.device, show_default=True,
                 help="With --stream: where the SVDs run, e.g. cuda (results are byte-identical on one kind only)."),
    click.option("--restart", is_flag=True,
                 help="With --stream: start over, dropping an unfinished run's state instead of continuing it."),
])


def _run_stream(mode: str, model: Path, kw: dict[str, Any]) -> None:
    """``--stream``: :func:`compressor.jobs.stream.stream_compress`, its summary, errors as one line."""
    from compressor.jobs.stream import stream_compress

    as_json, quiet, debug, out = kw.pop("as_json"), kw.pop("quiet"), kw.pop("debug"), kw.pop("out")
    kw["command"] = "compress " + " ".join(shlex.quote(a) for a in sys.argv[1:])  # for report.md
    flags = {"plots": "--plots", "trust_pickle": "--trust-pickle", "arch": "--arch", "outputs": "--output",
             "input_shapes": "--input-shape", "example_inputs": "--example-inputs", "keep_fp16": "--keep-fp16",
             "eval_text": "--eval-text", "eval_inputs": "--eval-inputs", "edge": "--edge", "kv_cache": "--kv-cache"}
    unused = [flag for k, flag in flags.items() if kw.get(k)]
    unused += [f"--{v}" for v in VARIANTS if kw.get(f"variant_{v}")]
    try:
        if unused:
            raise CompressorError(f"{', '.join(unused)} cannot be used with --stream (it writes the plan and "
                                  "the factored weights only)", "leave them out, or run without --stream")
        fields = {k: v for k, v in kw.items() if k in Options.__dataclass_fields__ and k != "progress"}
        summary = stream_compress(model, out, mode="compress" if mode == "compress" else "analyze",
                                  options=Options(**fields))
    except CompressorError as err:
        fail(err, debug)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        t = summary["totals"]
        click.echo(f"{model} (streamed, {summary['shards_in']} shard(s)) -> {summary['output']}/\n"
                   f"  layers factored   {t['layers_factored']} of {t['layers_supported']} factorizable "
                   f"({summary['resumed_layers']} of {summary['layers']} resumed from an earlier run)\n"
                   f"  parameters        {t['params_before']:,} -> {t['params_after']:,}; factorizable weights "
                   f"{t['removed_fraction']:.1%} removed\n"
                   + (f"  calibration       {summary['calibration']['samples']} samples, "
                      f"{summary['calibration']['tokens']} tokens, whitened block by block ({summary['blocks']} "
                      "blocks; no sequential refits or sensitivity probes)\n" if "calibration" in summary else "")
                   + f"  time              analyze {summary['analyze_seconds']:.1f} s"
                   + (f", rewrite {summary['rewrite_seconds']:.1f} s" if "rewrite_seconds" in summary else ""))


def _run(mode: str, model: Path, kw: dict[str, Any]) -> None:
    """Run one mode, print the outcome, and turn errors into one line and an exit code."""
    if kw.pop("stream", False):
        _run_stream(mode, model, kw)
        return
    eval_only = [f"--{k.replace('_', '-')}" for k in ("eval_window", "eval_stride", "eval_max_windows")
                 if kw.get(k) is not None] + (["--no-eval-bos"] if kw.get("eval_bos") is False else [])
    if eval_only and kw.get("eval_text") is None:
        click.echo(f"error: {', '.join(eval_only)}: only with --eval-text; add --eval-text FILE", err=True)
        sys.exit(EXIT_BAD_INPUT)
    stream_only = [f"--{k.replace('_', '-')}" for k in ("ray", "restart", "max_rank") if kw.pop(k, None)]
    stream_only += [f"--{k}" for k in ("svd", "workers", "device") if k in kw and kw.pop(k) != getattr(Options, k)]
    if stream_only:
        click.echo(f"error: {', '.join(stream_only)}: only for streamed runs; add --stream", err=True)
        sys.exit(EXIT_BAD_INPUT)
    kw["variants"] = [name for name in VARIANTS if kw.pop(f"variant_{name}", False)]
    from compressor.jobs.compress import LowFidelityWarning, compress

    as_json, quiet, debug, out = kw.pop("as_json"), kw.pop("quiet"), kw.pop("debug"), kw.pop("out")
    kw["command"] = "compress " + " ".join(shlex.quote(a) for a in sys.argv[1:])
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


def summary(r: Report) -> str:
    """The few lines a person wants after a run."""
    lines = [f"{r.source['path']} ({r.source['format']}) -> {r.output}/"]
    if r.plan_totals:
        t = r.plan_totals
        lines.append(f"  layers factored   {t['layers_factored']} of {t['layers_supported']} factorizable "
                     f"({t['layers_total']} with weight matrices)")
        lines.append(f"  parameters        {r.params_before:,} -> {r.params_after:,} "
                     f"({r.params_ratio:.1%}); factorizable weights {t['removed_fraction']:.1%} removed")
    for note in r.notes or []:
        lines.append(f"  note: {note}")
    if r.fidelity:
        f = r.fidelity
        lines.append(f"  fidelity          cosine to original {number(f['cosine_mean'], '.5f')} "
                     f"(min {number(f['cosine_min'], '.5f')}) on {f.get('inputs', 'the example inputs')}"
                     + (f", {f['compared']}" if f.get("compared") else ""))
    for v in (getattr(r, key) for key in VALIDATED):
        if not v:
            continue
        if "skipped" in v:
            lines.append(f"  onnx              skipped: {v['skipped']}")
            continue
        tol = criterion(v)
        lines.append(f"  {v['path']:<17} {v['size_bytes'] / 1e6:.2f} MB, "
                     f"max abs diff {number(v['max_abs_diff'], '.2e')}, cosine {number(v['cosine'], '.6f')} "
                     f"({tol}): {'PASS' if v['passed'] else 'FAIL'}")
        for problem in v.get("problems") or []:
            lines.append(f"    problem         {problem}")
        if v.get("kept_fp16"):
            lines.append(f"    kept in fp16    {', '.join(v['kept_fp16'])}")
        if v.get("correction"):
            c = v["correction"]
            lines.append(f"    corrected       {sum(1 for x in c['ranks'].values() if x)} layers, "
                         f"{c['parameters']:,} {c['factors']} factor weights "
                         f"({', '.join(f'{k}={x:g}' for k, x in c['rule'].items())})")
        chosen = (v.get("settings") or {}).get("chosen")
        if chosen:
            lines.append(f"    calibrated      {chosen['method']}, float layers "
                         f"{', '.join(chosen['float_layers']) or 'none'}")
    if r.int8_choice:
        c = r.int8_choice
        lines.append(f"  int8 to ship      {c['recommended'] or 'none passed'} (" + ", ".join(
            f"{name} {f['latency_ratio']:.2f}x model.onnx latency" for name, f in c["files"].items()) + ")")
    if r.edge:
        for f in r.edge["variants"]:
            check = f["validation"]
            lines.append(f"  {'edge/' + f['file']:<17} {f['size_bytes'] / 1e6:.2f} MB, {f['latency_ms']:.2f} ms at "
                         f"batch 1, cosine {number(check['vs_model']['cosine'], '.6f')}: "
                         f"{'PASS' if check['passed'] else 'FAIL'}")
    for c in (r.kv_cache or {}).get("files", {}).values():
        lines.append(format_generation(c))
        for problem in c.get("problems") or []:
            lines.append(f"    problem         {problem}")
    if r.perplexity:
        first = next(iter(r.perplexity.results.values()))
        lines.append("  perplexity        " + ", ".join(
            f"{name} {p.ppl:.4f}" + ("" if name == "dense" or r.perplexity.ratio(name) is None
                                     else f" ({r.perplexity.ratio(name):.3f}x)")
            for name, p in r.perplexity.results.items()))
        lines.append(f"    protocol        {first.describe()}")
    lines.append(f"  report            {Path(r.output) / 'report.md'}")
    return "\n".join(lines)


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


_keep_fp16_option = click.option(
    "--keep-fp16", type=int, default=0, show_default=True,
    help="With --int8: keep the N layers whose int8 rounding moves the output most (measured on "
         "--calibration) in fp16, about one byte more per kept weight.")


@main.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@_policy_options
@_export_options
@_keep_fp16_option
@_latency_option
@_eval_options
@_held_out_option
@_threads_option
@_stream_options
@_common_options
def run_cmd(model: Path, **kw: Any) -> None:
    """Analyze, factor, export and report (the default command)."""
    _run("compress", model, kw)


@main.command("analyze")
@click.argument("model", type=click.Path(path_type=Path))
@_policy_options
@click.option("--plots", is_flag=True, help="Add spectrum and energy plots to the output folder.")
@_threads_option
@_stream_options
@_common_options
def analyze_cmd(model: Path, **kw: Any) -> None:
    """Spectra and plan only: nothing is rewritten."""
    _run("analyze", model, kw)


@main.command("apply")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration inputs (see compress --help).")
@click.option("--calibration-samples", type=int)
@_outputs_option
@_export_options
@_keep_fp16_option
@_latency_option
@_eval_options
@_held_out_option
@_threads_option
@_common_options
def apply_cmd(model: Path, plan: Path, **kw: Any) -> None:
    """Re-apply a plan (for example one whose ranks you edited) and export."""
    _run("apply", model, {**kw, "plan_path": plan})


@main.command("export")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Calibration inputs for a data-aware --int4-correction (see compress --help).")
@click.option("--calibration-samples", type=int)
@_export_options
@_eval_options
@_threads_option
@_common_options
def export_cmd(model: Path, **kw: Any) -> None:
    """Export the model as it is to ONNX and validate it."""
    _run("export", model, kw)


@main.command("heal")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Training inputs (.pt/.npz/.safetensors; with 'inputs' and 'targets' for supervised "
                   "healing) or, for text models, a text file of one sentence per line (distillation).")
@click.option("--val", type=click.Path(path_type=Path), help="Held-out data in the same form, to pick the best.")
@click.option("--teacher", type=click.Path(path_type=Path),
              help="Original model for distillation [default: the one the compressed folder records].")
@click.option("--samples", type=int, help="Use at most this many samples of --data and --val.")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), help="Write resumable checkpoints here.")
@click.option("--resume", is_flag=True, help="Continue from the newest valid checkpoint in --checkpoint-dir.")
@click.option("--save-adapter", type=click.Path(path_type=Path),
              help="With --train lora: also write the trained adapters (before merging) to this folder as "
                   "PEFT does (adapter_config.json + adapter_model.safetensors).")
@heal_config_options
@_common_options
def heal_cmd(model: Path, **kw: Any) -> None:
    """Fine-tune a compressed model's factors to win back what truncation lost."""
    from compressor.jobs.compress import heal_folder
    from compressor.train.heal import HealConfig, setting_names

    as_json, quiet, debug, out = kw.pop("as_json"), kw.pop("quiet"), kw.pop("debug"), kw.pop("out")
    kw.pop("arch")
    kw["progress"] = False if quiet or as_json else None
    command = "compress " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        config = HealConfig(**{name: kw.pop(name) for name in setting_names()})
        with warnings.catch_warnings():  # e.g. a damaged checkpoint skipped: one line, not a source listing
            warnings.showwarning = lambda message, *_, **__: click.echo(f"warning: {message}", err=True)
            summary = heal_folder(model, out, command=command, config=config, **kw)
    except CompressorError as err:
        fail(err, debug)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    elif not quiet:
        fmt = ", ".join
        filled = summary["recipe"]["filled"]
        if filled:  # which recipe the model's kind chose
            flags = fmt(f"--{k.replace('_', '-')} {v}" for k, v in filled.items())
            click.echo(f"{summary['recipe']['kind']} defaults: {flags}")
        click.echo(f"{summary['source']} -> {summary['output']}/ ({summary['steps']} steps, best step "
                   f"{summary['best_step']})\n  before  {fmt(f'{k} {v:.4f}' for k, v in summary['before'].items())}"
                   f"\n  after   {fmt(f'{k} {v:.4f}' for k, v in summary['after'].items())}")
        if summary.get("note"):
            click.echo(f"note: {summary['note']}")


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
@_threads_option
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
main.add_command(lora)


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


@main.command("search")
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
@_outputs_option
@click.option("--input-shape", "input_shapes", multiple=True, help="Shape of an example input, e.g. 1x3x224x224.")
@click.option("--example-inputs", type=click.Path(path_type=Path), help="Example inputs (.pt/.npz/.safetensors).")
@click.option("--atol", type=float, default=Options.atol, show_default=True, help="fp32 validation tolerance.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True)
@click.option("--edge", is_flag=True, help=_EDGE_HELP)
@_eval_options
@_latency_option
@_threads_option
@_common_options
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
    kw["command"] = "compress " + " ".join(shlex.quote(a) for a in sys.argv[1:])
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
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        c = report["chosen"]
        ppl = "" if c.get("perplexity") is None else \
            f"perplexity {c['perplexity']:.4f} ({c['perplexity_ratio']:.4f}x dense), "
        click.echo(f"{model} -> {report['output']}/{c['file']}: {c['name']}, {c['size_bytes'] / 1e6:.2f} MB, "
                   f"fidelity {c['fidelity']:.5f}, {ppl}{c['latency_ms']:.2f} ms "
                   f"({report['front']['built']} built, {len(report['front']['points'])} measured)")
        for f in (report.get("edge") or {}).get("variants", []):
            click.echo(f"  {'edge/' + f['file']:<17} {f['size_bytes'] / 1e6:.2f} MB, {f['latency_ms']:.2f} ms at "
                       f"batch 1: {'PASS' if f['validation']['passed'] else 'FAIL'}")
        click.echo(f"  report            {Path(report['output']) / 'report.md'}")
    if not report["passed"]:  # an edge file failed its validation
        click.echo("error: validation FAILED (see report.md); the output folder was kept for inspection", err=True)
        sys.exit(EXIT_VALIDATION_FAILED)
