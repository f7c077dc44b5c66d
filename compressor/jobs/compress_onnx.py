"""The compress job for an ONNX file: read the graph -> analyze its weights -> factor them in the graph ->
validate against the ORIGINAL graph in onnxruntime -> variants -> report. :func:`compressor.jobs.compress.compress`
sends ``.onnx`` inputs (detected by content) here; the plan and report are the torch path's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from compressor.analysis.onnx_model import OnnxModel, analyze_onnx
from compressor.core.errors import CompressorError
from compressor.core.output import OutputDir
from compressor.core.plan import Plan
from compressor.core.rewrite import rewrite
from compressor.report.report import Report, StepTimes, build_report, write_report

# Float graph inputs without --example-inputs are validated on random normal inputs, symbolic axes this long.
SYMBOLIC_AXIS = 2
# The most elements made for one such input (256 MiB of float32): a declared shape beyond it is refused.
MAX_EXAMPLE_ELEMENTS = 1 << 26


def compress_onnx(source: Path, out: Path, mode: str, opts: Any, *, shapes: list[tuple[int, ...]],
                  low_fidelity: float) -> Report:
    """Run ``mode`` ("compress", "analyze" or "apply") on the ONNX file ``source`` with the job's ``opts``
    (``shapes``: its checked --input-shape values); a cosine below ``low_fidelity`` adds a warning."""
    from compressor.export.onnx import VARIANTS, qdq_choice, validate_onnx, write_variant
    from compressor.export.onnx_factor import write_factored
    from compressor.formats.load import Loaded
    from compressor.formats.onnx_graph import read_onnx
    from compressor.jobs.int8 import calibrated_on, checked_on, int8_choice

    if mode == "export":
        raise CompressorError(f"'{source}' is already an ONNX model", "compress it: compress MODEL.onnx --energy 0.9")
    if opts.keep_fp16:
        raise CompressorError("--keep-fp16 measures int8 sensitivity on a torch model; an ONNX input has none",
                              "leave out --keep-fp16")
    if opts.arch or opts.trust_pickle:
        raise CompressorError("--arch and --trust-pickle are for torch files; an ONNX file needs neither",
                              "leave them out")
    timings = StepTimes()
    step = timings.step

    graph = read_onnx(source)
    model = OnnxModel(graph)  # refuses a graph with nothing to factor
    check_outputs(graph, opts.outputs)
    calibration = None
    if opts.calibration is not None:
        from compressor.data.calibration import load_calibration

        calibration = load_calibration(opts.calibration, samples=opts.calibration_samples)
    inputs = example_inputs(graph, opts, shapes, calibration) if mode != "analyze" else None
    held_out = held_out_batches(graph, source, opts.eval_inputs) if opts.eval_inputs is not None else None
    step("load")
    loaded = Loaded(None, "onnx", source)
    with OutputDir(out, opts.force) as tmp:
        extra = {"calibration": calibration, "outputs": opts.outputs} if calibration is not None else {}
        if mode == "apply":
            plan = analyze_onnx(model, plan=Plan.from_json(opts.plan_path), progress=opts.progress, **extra)
        else:
            plan = analyze_onnx(model, **opts.policy(), rank_multiple=opts.rank_multiple, include=opts.include,
                                exclude=opts.exclude, progress=opts.progress, **extra)
        step("analyze")
        plan.to_json(tmp / "plan.json")
        plots = None
        if opts.plots:  # of the weights as they are: before the rewrite
            from compressor.report.plots import plot_spectra

            plots = [str(Path(p).relative_to(tmp)) for p in plot_spectra(model, plan, tmp)]
        exports: dict[str, Any] = {}
        totals = plan.totals()
        if mode != "analyze":
            if not plan.factored:
                raise CompressorError(
                    "no layer would be factored: every candidate rank saves no parameters "
                    f"({totals['layers_supported']} factorizable layers)",
                    "lower --energy or --rank, or use --target to choose a parameter budget")
            rewrite(model, plan)
            factors = {lp.name: (model.get_submodule(lp.name).up.weight, model.get_submodule(lp.name).down.weight)
                       for lp in plan.factored}
            path = write_factored(graph, factors, tmp / "model.onnx")
            step("rewrite")
            batch_variant = dynamic_batch(graph)
            # Against the original graph the outputs differ by the approximation: judged by fidelity, not atol.
            exports["onnx"] = validate_onnx(path, source, inputs, atol=None, batch_variant=batch_variant)
            exports["fidelity"] = graph_fidelity(source, path, held_out, inputs, opts)
            real = first_batch(graph, calibration) if calibration else inputs
            for kind in opts.variants:  # each variant against the fp32 file it rounds, as the torch path does
                v = VARIANTS[kind]
                written = write_variant(kind, path, tmp / f"model.{kind}.onnx", calibration=calibration or [inputs])
                if v.calibrated:
                    exports[f"{kind}_settings"] = {**(qdq_choice(written) or {}), "calibrated_on": calibrated_on(opts),
                                                   "validated_on": checked_on(opts)}
                # A calibrated variant is checked on real inputs when there are any (as compress does).
                exports[kind] = validate_onnx(written, path, real if v.calibrated else inputs, atol=None,
                                              min_cosine=v.min_cosine, variant=kind, batch_variant=batch_variant)
            if "int8" in exports and "qdq" in exports:
                exports["int8_choice"] = int8_choice(exports, tmp, inputs, real, opts)
            step("export")
            if opts.edge:  # against model.onnx as the variants are; fidelity against the original graph
                from compressor.export.edge import build_edge, sha256

                exports["edge"] = build_edge(tmp, path, inputs, threads=opts.threads or 1,
                                             origin={"source": str(source), "command": opts.command,
                                                     "plan": "plan.json", "plan_sha256": sha256(tmp / "plan.json")},
                                             fidelity_reference=source, batch_variant=batch_variant,
                                             atol=opts.atol)
                step("edge")
        report = build_report(source=source, out=out, mode=mode, loaded=loaded, plan=plan, original=None,
                              compressed=None, exports=exports, timings=timings, options=opts, folder=tmp,
                              params=(totals["params_before"], totals["params_after"]))
        report.warnings, report.plots = [], plots
        cosine = (report.fidelity or {}).get("cosine_mean")
        if cosine is not None and cosine < low_fidelity:
            problem = (f"the compressed graph keeps cosine {cosine:.3f} to the original on "
                       f"{report.fidelity['inputs']}, below {low_fidelity}: its outputs are plainly different")
            report.warnings.append({"kind": "low_fidelity", "cosine": cosine, "threshold": low_fidelity,
                                    "message": f"{problem}; try calibration=..., exclude=[...] or a milder policy",
                                    "cli": f"{problem}; try --calibration FILE, --exclude LAYER or a milder policy"})
        write_report(report, tmp)
    return report


def graph_fidelity(source: Path, path: Path, held_out: list | None, inputs: Any, opts: Any) -> dict[str, Any]:
    """The factored graph's fidelity to the original: on the held-out samples when there are any, else on
    the example inputs; says which, and which outputs were compared."""
    from compressor.data.inputs import num_samples
    from compressor.export.onnx_factor import onnx_fidelity

    result: dict[str, Any] = onnx_fidelity(source, path, held_out or [inputs], opts.outputs)
    result["inputs"] = (f"{sum(num_samples(b) for b in held_out)} held-out samples from "
                        f"{Path(opts.eval_inputs).name}" if held_out else "the example inputs")
    result["compared"] = ", ".join(opts.outputs) or "every floating-point output"
    return result


def check_outputs(graph, outputs) -> None:
    """Refuse output names the graph does not compute (before the slow steps); a pooled sentence embedding
    (``sentence_embedding:mean``) is computed from the first output, as on the torch path."""
    from compressor.data.inputs import is_pooled

    have = [o.name for o in graph.model.graph.output]
    missing = [n for n in outputs if n not in have and not is_pooled(n)]
    if missing:
        raise CompressorError(f"the graph has no output named {', '.join(repr(n) for n in missing)} "
                              f"(it computes {', '.join(have)})", f"name outputs the graph computes: {have[0]!r}",
                              cli_fix=f"pass --output with an output the graph computes: --output {have[0]}")


def held_out_batches(graph, source: Path, path: Path) -> list:
    """The batches of --eval-inputs (tensors, read as calibration files are), one sample each for a graph
    whose batch axis is fixed (the batch at 1 of many exports), checked on the original graph before the
    slow steps."""
    from compressor.data.calibration import load_calibration
    from compressor.data.inputs import num_samples, take
    from compressor.export.onnx_files import first_line, onnx_outputs, onnx_session

    batches = load_calibration(path)
    if not dynamic_batch(graph):
        batches = [take(b, slice(i, i + 1)) for b in batches for i in range(num_samples(b))]
    try:
        onnx_outputs(onnx_session(source), take(batches[0], slice(0, 1)))
    except CompressorError:
        raise
    except Exception as err:  # onnxruntime's own types: the wrong shape or type for this graph
        raise CompressorError(f"the held-out inputs in '{path}' do not fit the graph ({first_line(err)})",
                              "pass tensors shaped and typed like the graph's inputs, keyed by its input "
                              "names") from None
    return batches


def dynamic_batch(graph) -> bool:
    """Whether every graph input's first axis is symbolic (so a batch one larger can be validated)."""
    for i in graph.inputs():
        dims = i.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return False
    return True


def first_batch(graph, calibration: list) -> Any:
    """The first calibration batch, or its first sample for a graph whose batch axis is fixed (at 1)."""
    from compressor.data.inputs import take

    return calibration[0] if dynamic_batch(graph) else take(calibration[0], slice(0, 1))


def example_inputs(graph, opts: Any, shapes: list[tuple[int, ...]], calibration: list | None) -> Any:
    """The inputs to validate with: --input-shape or --example-inputs, else the first calibration batch,
    else random normal tensors for a graph whose inputs are all float."""
    from compressor.data.readers import load_example_inputs

    if shapes:
        g = torch.Generator().manual_seed(0)
        tensors = tuple(torch.randn(s, generator=g) for s in shapes)
        return tensors[0] if len(tensors) == 1 else tensors
    if opts.example_inputs is not None:
        return load_example_inputs(opts.example_inputs)
    if calibration:
        return first_batch(graph, calibration)
    g = torch.Generator().manual_seed(0)
    made = {}
    for i in graph.inputs():
        tt = i.type.tensor_type
        if tt.elem_type != 1:  # not float: random values would not be valid inputs (token ids, masks)
            raise CompressorError(f"cannot make example inputs for graph input '{i.name}' (not float)",
                                  "pass --example-inputs FILE (tensors keyed by graph input names) or "
                                  "--calibration FILE")
        shape = [d.dim_value if d.HasField("dim_value") else SYMBOLIC_AXIS for d in tt.shape.dim]
        if math.prod(shape) > MAX_EXAMPLE_ELEMENTS:
            raise CompressorError(f"graph input '{i.name}' is declared {shape}: random example inputs of that shape "
                                  f"would take {4 * math.prod(shape) / 2**30:,.0f} GiB",
                                  "pass --input-shape with a small shape, or --example-inputs FILE")
        made[i.name] = torch.randn(shape, generator=g)
    return made
