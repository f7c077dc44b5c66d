"""The export step of the compress job: model.onnx and its variants validated, the int4 correction, the
key/value-cache files, edge/, and the latency of every file against the dense model's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.plan import Plan
from compressor.data.inputs import map_tensors, num_samples, sequence_axes
from compressor.export.onnx import INT4_ACCURACY_LEVEL
from compressor.jobs.fidelity import output_fidelity
from compressor.jobs.options import Options


def export_files(model: nn.Module, original: nn.Module, inputs, folder: Path, plan: Plan | None,
                 opts: Options, calibration: list | None = None, held_out: list | None = None,
                 prompts: tuple[list[list[int]], str] | None = None) -> dict[str, Any]:
    """model.onnx of ``model`` (validated on ``inputs``), its variants, the key/value-cache files (with
    ``prompts``), the fidelity to ``original`` (on ``held_out`` when given) and, latency-aware, the latency of
    every file; returns what the report takes of them."""
    from compressor.export.onnx import (
        VARIANTS,
        check_factored_graph,
        export_int8,
        export_onnx,
        onnx_ready,
        qdq_choice,
        validate_onnx,
        write_variant,
    )
    from compressor.jobs.int8 import calibrated_on, checked_on, int8_choice
    from compressor.search.sensitivity import int8_sensitivity, most_sensitive

    compressed, original_inputs = model, inputs
    model, inputs, widened = onnx_ready(model, inputs)
    path = export_onnx(model, inputs, folder / "model.onnx", opset=opts.opset,
                       dynamic_axes=sequence_axes(inputs))
    problems = check_factored_graph(path, plan) if plan is not None and plan.factored else []
    result = {"onnx": validate_onnx(path, model, inputs, atol=opts.atol), "graph_problems": problems,
              "notes": [widened] if widened else []}
    # Static int8 fits its activation ranges to the calibration inputs, and random example inputs
    # (--input-shape) fall outside them: a calibrated variant is checked on real inputs when there are any.
    real = inputs if not calibration else map_tensors(  # widened as onnx_ready widens the example inputs
        calibration[0], lambda t: t.float() if t.dtype == torch.bfloat16 else t)
    rounded = _gptq_weights(model, opts, calibration)
    for kind in opts.variants:
        # Rounded weights move outputs by more than --atol; variants are held to a cosine floor.
        v = VARIANTS[kind]
        if kind == "int8" and opts.keep_fp16:
            kept = most_sensitive(int8_sensitivity(model, calibration, outputs=opts.outputs), model,
                                  opts.keep_fp16)
            written = export_int8(path, folder / "model.int8.onnx", keep_fp16=kept)
            result["int8_kept_fp16"] = kept
        elif kind == "int4":
            written, result["int4_correction"], result["int4_settings"] = _int4(model, path, folder, opts,
                                                                                calibration, rounded)
        else:
            written = write_variant(kind, path, folder / f"model.{kind}.onnx", calibration=calibration or [inputs])
            if v.calibrated:
                result[f"{kind}_settings"] = {**(qdq_choice(written) or {}), "calibrated_on": calibrated_on(opts),
                                              "validated_on": checked_on(opts)}
        result[kind] = validate_onnx(written, model, real if v.calibrated else inputs, atol=None,
                                     min_cosine=v.min_cosine, variant=kind)
    if "int8" in result and "qdq" in result:
        result["int8_choice"] = int8_choice(result, folder, inputs, real, opts)
    if prompts is not None:
        result["kv_cache"] = _kv_cache(model, folder, plan, opts, *prompts, rounded)
    if original is not compressed:
        result["fidelity"] = output_fidelity(original, compressed, held_out or [original_inputs], opts.outputs)
        result["fidelity"]["inputs"] = (f"{sum(num_samples(b) for b in held_out)} held-out samples from "
                                        f"{Path(opts.eval_inputs).name}" if held_out else "the example inputs")
    else:
        result["fidelity"] = None
    if opts.latency_aware and original is not compressed:
        result["latency"] = _latency(original, compressed, original_inputs, folder, opts)
    return result


def _gptq_weights(model: nn.Module, opts: Options, calibration: list | None) -> dict[str, torch.Tensor] | None:
    """GPTQ's weights for the int4 files (:func:`compressor.analysis.int4.gptq_int4`) when int4 is written with
    calibration inputs and --int4-rounding gptq; None where the int4 files round to nearest."""
    from compressor.analysis.int4 import gptq_int4

    if "int4" not in opts.variants or calibration is None or opts.int4_rounding != "gptq":
        return None
    return gptq_int4(model, calibration, block_size=opts.int4_block_size, progress=opts.progress)


def _int4(model: nn.Module, path: Path, folder: Path, opts: Options, calibration: list | None,
          weights: dict[str, torch.Tensor] | None) -> tuple[Path, dict[str, Any] | None, dict[str, Any]]:
    """model.int4.onnx, given ``weights`` (GPTQ's) where there are, with the low-rank correction of its rounding
    error when asked (data-aware with calibration inputs); returns the file, the correction's summary and how
    the weights were rounded."""
    from compressor.analysis.int4 import int4_correction, parse_correction
    from compressor.export.onnx import export_int4
    from compressor.jobs.int8 import calibrated_on

    corr = None
    if opts.int4_correction is not None:
        corr = int4_correction(model, block_size=opts.int4_block_size, calibration=calibration,
                               outputs=opts.outputs or None, weights=weights, **parse_correction(opts.int4_correction))
    written = export_int4(path, folder / "model.int4.onnx", block_size=opts.int4_block_size,
                          corrections=corr.factors if corr else None, factors=opts.int4_factors, weights=weights)
    settings = {"block_size": opts.int4_block_size, "rounding": "gptq" if weights else "nearest",
                "gptq_layers": len(weights or {})}
    if weights:
        settings["calibrated_on"] = calibrated_on(opts)
    return written, None if corr is None else {**corr.to_dict(), "factors": opts.int4_factors}, settings


def edge_folder(model: nn.Module, original: nn.Module, inputs, folder: Path, opts: Options, source: Path,
                exports: dict[str, Any]) -> dict[str, Any]:
    """edge/ for the ONNX files just written: validated against the torch model they were exported from,
    fidelity measured against the original, latency at one thread (a device's typical budget) unless
    --threads says otherwise."""
    from compressor.export.edge import build_edge, sha256
    from compressor.export.onnx import onnx_ready

    compressed = model
    model, ready, _ = onnx_ready(model, inputs)
    origin = {"source": str(source), "command": opts.command}
    if (folder / "plan.json").is_file():
        origin.update(plan="plan.json", plan_sha256=sha256(folder / "plan.json"))
    recipes = {"model.int4.onnx": {**exports.get("int4_settings", {}), "block_size": opts.int4_block_size,
                                   "correction": exports.get("int4_correction"),
                                   "accuracy_level": INT4_ACCURACY_LEVEL},
               "model.int8.onnx": {"keep_fp16": exports.get("int8_kept_fp16") or []}}
    reference = onnx_ready(original, inputs)[0] if original is not compressed else None
    return build_edge(folder, model, ready, threads=opts.threads or 1, origin=origin, atol=opts.atol,
                      recipes={k: v for k, v in recipes.items() if (folder / k).is_file()},
                      fidelity_reference=reference)


def _kv_cache(model: nn.Module, folder: Path, plan: Plan | None, opts: Options, prompts: list[list[int]],
              source: str, rounded: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """model_kv.onnx and a model_kv.VARIANT.onnx per written variant, each checked by greedy generation against
    the torch model: fp32 must give the same tokens on every prompt, a variant keeps its cosine floor on the
    prompts' logits (its token agreement is reported). A factored layer must stay two MatMuls."""
    from compressor.export.kv_cache import check_generation, export_kv_onnx, kv_layout, torch_generation
    from compressor.export.onnx import VARIANTS, check_factored_graph, export_int4

    path = export_kv_onnx(model, folder / "model_kv.onnx", opset=opts.opset)
    reference = torch_generation(model, prompts)  # once for every file
    check = check_generation(path, model, prompts, prompt_source=source, threads=opts.threads, reference=reference)
    check.problems += [f"graph: {p}" for p in (check_factored_graph(path, plan) if plan and plan.factored else [])]
    check.passed = not check.problems
    files = {path.name: check.to_dict()}
    for kind in opts.variants:
        v = VARIANTS[kind]
        if v.calibrated:  # static int8 measures activation ranges on model.onnx's inputs, not a cache's
            continue
        dst = folder / f"model_kv.{kind}.onnx"
        # The int4 correction and --keep-fp16 apply to model.int4/int8.onnx only; GPTQ's weights to both int4 files.
        written = (export_int4(path, dst, block_size=opts.int4_block_size, weights=rounded) if kind == "int4"
                   else v.write(path, dst))
        files[written.name] = check_generation(written, model, prompts, same_tokens=False, min_cosine=v.min_cosine,
                                               variant=kind, prompt_source=source, threads=opts.threads,
                                               reference=reference).to_dict()
    return {"layout": kv_layout(model).to_dict(), "files": files}


def ort_threads(opts: Options) -> int:
    """onnxruntime's threads for the run's measurements: --threads, else the search's default."""
    from compressor.search.evaluate import THREADS

    return opts.threads or THREADS


def _latency(original: nn.Module, model: nn.Module, inputs, folder: Path, opts: Options) -> dict[str, Any]:
    """Every written ONNX file timed side by side with the dense model's export, next to the ratio of
    multiply-adds (counted by the handlers on the example inputs)."""
    import tempfile

    from compressor.export.latency import latency_vs_macs
    from compressor.export.measure import count_macs
    from compressor.export.onnx import export_onnx, onnx_ready

    original, _, _ = onnx_ready(original, inputs)  # timed as exported (bfloat16 widened to float32)
    model, inputs, _ = onnx_ready(model, inputs)
    macs = count_macs(original, inputs)["total"]
    files = {p.name: p for p in (folder / "model.onnx", *(folder / f"model.{v}.onnx" for v in opts.variants))}
    with tempfile.TemporaryDirectory(prefix="compressor-dense-") as tmp:
        dense = export_onnx(original, inputs, Path(tmp) / "dense.onnx", opset=opts.opset,
                            dynamic_axes=sequence_axes(inputs))
        return latency_vs_macs(dense, files, inputs, threads=ort_threads(opts),
                               macs_ratio=count_macs(model, inputs)["total"] / macs if macs else None)



def latency_warnings(latency: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The report's warnings about ``latency`` (report.latency): a file measured slower than the dense model
    is said, and a factored model.onnx slower than dense is refused (--latency-aware never hands one back)."""
    if not latency or not latency["slower_than_dense"]:
        return []
    if "model.onnx" in latency["slower_than_dense"]:
        ratio = latency["files"]["model.onnx"]["latency_ratio"]
        raise CompressorError(f"the factored model.onnx ran {ratio:.3f}x the dense model's latency side by side "
                              f"on the example inputs ({latency['inputs']}), although each factored layer "
                              "was measured faster alone; nothing was written",
                              "leave out latency_aware to compress for size alone, or use compressor.search, "
                              "which falls back to a file that is not slower",
                              cli_fix="leave out --latency-aware to compress for size alone, or use compress "
                                      "search, which falls back to a file that is not slower")
    slow = ", ".join(f"{n} ({latency['files'][n]['latency_ratio']:.2f}x)" for n in latency["slower_than_dense"])
    message = (f"measured slower than the dense model side by side: {slow}; the multiply-adds went down "
               "but the latency did not")
    return [{"kind": "slower_than_dense", "message": message + "; try compressor.search "
             "(latency-aware by default) or a milder policy",
             "cli": message + "; try compress search (latency-aware by default) or a milder policy"}]
