"""The whole job, as one Python call the command-line tool is a thin shell over:

    report = compressor.compress("model.pt", energy=0.95)      # load -> analyze -> rewrite -> export -> report

Each ``mode`` runs a prefix of that chain: ``"analyze"`` (spectra and plan only), ``"apply"`` (re-apply an
edited plan), ``"export"`` (ONNX of the model as it is), ``"compress"`` (everything).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from compressor.analysis.analyze import analyze
from compressor.core.errors import CompressorError
from compressor.core.output import OutputDir, check_not_over_inputs
from compressor.core.plan import Plan
from compressor.core.rewrite import rewrite
from compressor.core.threads import LINALG_THREADS, thread_budget, torch_threads
from compressor.formats.onnx_graph import is_onnx, onnx_head
from compressor.jobs.compress_onnx import compress_onnx
from compressor.jobs.exports import edge_folder, export_files, latency_warnings, ort_threads
from compressor.jobs.fidelity import LOW_FIDELITY_COSINE, LowFidelityWarning, low_fidelity_warning
from compressor.jobs.loading import (
    calibration_batches,
    example_inputs,
    generation_prompts,
    held_out_batches,
    probe_inputs,
    weights_only_model,
    with_pooled_output,
)
from compressor.jobs.options import Options, check_run, options_from
from compressor.jobs.perplexity import eval_protocol, measure_perplexity
from compressor.report.report import Report, StepTimes, build_report, write_report

if TYPE_CHECKING:
    from compressor.formats.load import Loaded


def default_out(source: Path) -> Path:
    """``<model stem>.compressed/`` beside the input (for a folder: beside the folder)."""
    source = Path(source)
    stem = source.name if source.is_dir() else source.stem
    return source.parent / f"{stem}.compressed"


def compress(source: str | Path, out: str | Path | None = None, *, mode: str = "compress",
             options: Options | None = None, **kwargs: Any) -> Report:
    """Run the job on the model at ``source``, writing into ``out``; returns its :class:`Report`
    (``report.to_dict()`` is ``report.json``).

    Options may be given as an :class:`Options` or as its field names (``energy=0.95``). The input is
    never modified; the output folder appears only when every step succeeded.
    """
    opts = options_from(options, kwargs)
    check_run(opts, mode, Path(source))  # the cheap checks first: a bad option should not wait for a model
    with thread_budget(opts.threads):
        return _job(Path(source), out, mode, opts)


@dataclass
class _Job:
    """What the load step gives the later ones: the model (or a weights-only stand-in) and what it is fed."""

    loaded: Loaded
    model: nn.Module
    weights_only: bool
    opts: Options
    calibration: list | None
    held_out: list | None
    protocol: Any  # the evaluation text's windows (compressor.data.perplexity.Protocol), or None
    prompts: tuple[list[list[int]], str] | None  # a --kv-cache export's prompts and where they come from


def _job(source: Path, out: str | Path | None, mode: str, opts: Options) -> Report:
    out = Path(out) if out is not None else default_out(source)
    check_not_over_inputs(out, [("model", source), ("calibration file", opts.calibration),
                                ("example inputs", opts.example_inputs), ("plan file", opts.plan_path),
                                ("evaluation text", opts.eval_text), ("held-out inputs", opts.eval_inputs)])
    OutputDir(out, opts.force).check()
    if is_onnx(source) or onnx_head(source):  # a truncated ONNX file is told as one by read_onnx
        return compress_onnx(source, out, mode, opts, shapes=opts.shapes(), low_fidelity=LOW_FIDELITY_COSINE)
    timings = StepTimes()
    job = _load(source, opts)
    opts, model = job.opts, job.model
    timings.step("load")

    with OutputDir(out, opts.force) as tmp:
        plan, original = _analyze_and_rewrite(job, mode, tmp, timings)
        exports, inputs = _export(job, mode, original, plan, tmp, source, timings)
        perplexities = None
        if job.protocol is not None:
            perplexities = measure_perplexity(job.protocol, original, model, tmp, opts.variants, opts.threads,
                                              opts.progress)
            timings.step("perplexity")
        # analyze rewrites nothing: its parameter counts are what the plan would give.
        planned = (plan.totals()["params_before"], plan.totals()["params_after"]) if mode == "analyze" else None
        report = build_report(source=source, out=out, mode=mode, loaded=job.loaded, plan=plan,
                              original=original, compressed=model, exports=exports, timings=timings,
                              options=opts, folder=tmp, params=planned)
        report.perplexity = perplexities
        report.warnings = latency_warnings(report.latency)
        cosine = (report.fidelity or {}).get("cosine_mean")
        if cosine is not None and cosine < LOW_FIDELITY_COSINE and plan is not None:
            report.warnings.append(low_fidelity_warning(cosine, original, model, plan, inputs, opts,
                                                        report.fidelity.get("inputs", "the example inputs")))
            warnings.warn(report.warnings[-1]["message"], LowFidelityWarning, stacklevel=2)
        if opts.plots and plan is not None:
            report.plots = _plots(model if mode == "analyze" else original, plan, tmp)
        write_report(report, tmp)
    return report


def _load(source: Path, opts: Options) -> _Job:
    """The model and every input the run reads, each refused in one line before the slow steps."""
    from compressor.formats.load import load_model  # imported here: loading pulls optional libraries on demand

    with torch_threads(LINALG_THREADS if opts.threads is None else None):  # weight-only work (core.threads)
        loaded = load_model(source, trust_pickle=opts.trust_pickle, arch=opts.arch)
    model = loaded.model if loaded.model is not None else weights_only_model(loaded.state_dict)
    weights_only = loaded.model is None
    model.eval()
    opts = with_pooled_output(opts, loaded)
    calibration = calibration_batches(loaded, opts)
    if calibration is not None and not weights_only:
        from compressor.data.inputs import check_fits

        check_fits(model, calibration, f"the calibration inputs in '{opts.calibration}'")
    held_out = held_out_batches(loaded, opts, weights_only)
    protocol = None
    if opts.eval_text is not None:
        if weights_only:
            raise CompressorError("an evaluation text needs a model to run, and the input holds weights only",
                                  "leave out eval_text", cli_fix="leave out --eval-text")
        protocol = eval_protocol(loaded, opts)
    prompts = generation_prompts(loaded, model, weights_only, opts) if opts.kv_cache else None
    return _Job(loaded, model, weights_only, opts, calibration, held_out, protocol, prompts)


def _analyze_and_rewrite(job: _Job, mode: str, tmp: Path, timings: StepTimes) -> tuple[Plan | None, nn.Module]:
    """The plan (None in mode "export"), written into ``tmp``; in modes "compress" and "apply" the model
    rewritten by it in place and saved. Returns the plan and the original model (a copy, when rewritten)."""
    model, opts = job.model, job.opts
    if mode not in ("compress", "analyze", "apply"):
        return None, model
    plan = _plan(model, opts, mode, job.calibration, probe_inputs(job.loaded, opts, job.weights_only))
    timings.step("analyze")
    if opts.latency_aware and not job.weights_only and mode != "analyze":
        from compressor.export.latency import keep_slow_layers_dense, latency_decisions

        keep_slow_layers_dense(plan, latency_decisions(model, plan, example_inputs(job.loaded, opts),
                                                       threads=ort_threads(opts)))
        timings.step("latency")
    plan.to_json(tmp / "plan.json")
    if mode == "analyze":
        return plan, model
    if not plan.factored and any(lp.reason.startswith(f"rank {lp.policy_rank} kept dense: slower")
                                 for lp in plan.layers):
        raise CompressorError("no layer would be factored: every factored form was measured slower than "
                              "its dense layer at the example input shape",
                              "leave out latency_aware to compress for size alone, or try a larger batch",
                              cli_fix="leave out --latency-aware to compress for size alone, or try a "
                                      "larger --input-shape batch")
    if not plan.factored:
        raise CompressorError(
            "no layer would be factored: every candidate rank saves no parameters "
            f"({plan.totals()['layers_supported']} factorizable layers)",
            "lower --energy or --rank, or use --target to choose a parameter budget")
    original = copy.deepcopy(model)
    rewrite(model, plan)
    timings.step("rewrite")
    _save(model, tmp, plan, job.loaded)
    timings.step("save")
    return plan, original


def _export(job: _Job, mode: str, original: nn.Module, plan: Plan | None, tmp: Path, source: Path,
            timings: StepTimes) -> tuple[dict[str, Any], Any]:
    """The ONNX files (and edge/) of modes "compress", "apply" and "export", validated; returns what the
    report takes of them and the example inputs they were validated on (None: nothing exported)."""
    model, opts = job.model, job.opts
    if mode not in ("compress", "apply", "export"):
        return {}, None
    if job.weights_only:
        if opts.edge:
            raise CompressorError("an edge folder needs the ONNX files, and the input holds weights only",
                                  "pass arch='package.module:factory' to build the model, or leave out edge",
                                  cli_fix="pass --arch package.module:factory to build the model, or leave "
                                          "out --edge")
        return {"skipped": "the input holds weights only; pass --arch package.module:factory to build the model "
                           "for export"}, None
    inputs = example_inputs(job.loaded, opts)
    exports = export_files(model, original, inputs, tmp, plan, opts, job.calibration, job.held_out, job.prompts)
    timings.step("export")
    if opts.edge:
        exports["edge"] = edge_folder(model, original, inputs, tmp, opts, source, exports)
        timings.step("edge")
    return exports, inputs


def _plan(model: nn.Module, opts: Options, mode: str, calibration: list | None, probe=None) -> Plan:
    extra = {"calibration": calibration, "outputs": opts.outputs} if calibration is not None else {}
    if mode == "apply":
        return analyze(model, plan=Plan.from_json(opts.plan_path), progress=opts.progress, **extra)
    return analyze(model, **opts.policy(), rank_multiple=opts.rank_multiple, include=opts.include,
                   exclude=opts.exclude, progress=opts.progress, fold_batchnorm=not opts.keep_batchnorm,
                   example_inputs=probe, pivoted=opts.pivoted, **extra)


def _save(model: nn.Module, folder: Path, plan: Plan, loaded) -> None:
    from compressor.formats.save import save

    save(model, folder, plan, source=loaded, atomic=False)  # the OutputDir publishes the folder


def _plots(model: nn.Module, plan: Plan, folder: Path) -> list[str]:
    from compressor.report.plots import plot_spectra

    return [str(Path(p).relative_to(folder)) for p in plot_spectra(model, plan, folder)]

