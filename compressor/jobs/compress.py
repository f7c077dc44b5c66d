"""The whole job, as one Python call the command-line tool is a thin shell over:

    report = compressor.compress("model.pt", energy=0.95)      # load -> analyze -> rewrite -> export -> report

Each ``mode`` runs a prefix of that chain: ``"analyze"`` (spectra and plan only), ``"apply"`` (re-apply an
edited plan), ``"export"`` (ONNX of the model as it is), ``"compress"`` (everything).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressor.analysis.analyze import analyze
from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write_text, regular_file
from compressor.core.output import OutputDir, check_not_over_inputs
from compressor.core.plan import Plan
from compressor.core.rewrite import rewrite
from compressor.core.threads import LINALG_THREADS, thread_budget, torch_threads
from compressor.data.inputs import (
    attention_mask,
    batches_fidelity,
    call,
    cosine_fidelity,
    eval_mode,
    map_tensors,
    num_samples,
    sequence_axes,
)
from compressor.formats.onnx_graph import is_onnx, onnx_head
from compressor.jobs.compress_onnx import compress_onnx
from compressor.jobs.options import Options, check_run, options_from
from compressor.report.report import Report, StepTimes, build_report, write_report

if TYPE_CHECKING:
    from compressor.train.heal import HealConfig
from compressor.export.onnx import INT4_ACCURACY_LEVEL

# Below this mean cosine to the original (on the example inputs) a compressed model's outputs are plainly
# different, and the run says so (report.warnings, a `warning:` line, a LowFidelityWarning).
LOW_FIDELITY_COSINE = 0.9
# How many of the layers that hurt most alone that warning names.
WORST_LAYERS_SHOWN = 3


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


def _job(source: Path, out: str | Path | None, mode: str, opts: Options) -> Report:
    from compressor.formats.load import load_model  # imported here: loading pulls optional libraries on demand

    out = Path(out) if out is not None else default_out(source)
    check_not_over_inputs(out, [("model", source), ("calibration file", opts.calibration),
                                ("example inputs", opts.example_inputs), ("plan file", opts.plan_path),
                                ("evaluation text", opts.eval_text), ("held-out inputs", opts.eval_inputs)])
    OutputDir(out, opts.force).check()
    if is_onnx(source) or onnx_head(source):  # a truncated ONNX file is told as one by read_onnx
        if opts.eval_inputs is not None:
            raise CompressorError("held-out inputs are for torch models; an ONNX input's fidelity is measured on "
                                  "its example inputs", "leave out eval_inputs", cli_fix="leave out --eval-inputs")
        return compress_onnx(source, out, mode, opts, shapes=opts.shapes(), low_fidelity=LOW_FIDELITY_COSINE)
    timings = StepTimes()
    step = timings.step

    with torch_threads(LINALG_THREADS if opts.threads is None else None):  # weight-only work (core.threads)
        loaded = load_model(source, trust_pickle=opts.trust_pickle, arch=opts.arch)
    model = loaded.model if loaded.model is not None else weights_only_model(loaded.state_dict)
    weights_only = loaded.model is None
    model.eval()
    opts = with_pooled_output(opts, loaded)
    calibration = _calibration(loaded, opts)
    if calibration is not None and not weights_only:
        from compressor.data.inputs import check_fits

        check_fits(model, calibration, f"the calibration inputs in '{opts.calibration}'")
    held_out = _held_out(loaded, opts, weights_only)
    protocol = None
    if opts.eval_text is not None:
        if weights_only:
            raise CompressorError("an evaluation text needs a model to run, and the input holds weights only",
                                  "leave out eval_text", cli_fix="leave out --eval-text")
        protocol = eval_protocol(loaded, opts)
    prompts = _generation_prompts(loaded, model, weights_only, opts) if opts.kv_cache else None
    step("load")

    with OutputDir(out, opts.force) as tmp:
        plan = None
        if mode in ("compress", "analyze", "apply"):
            plan = _plan(model, opts, mode, calibration, _probe(loaded, opts, weights_only))
            step("analyze")
            if opts.latency_aware and not weights_only and mode != "analyze":
                from compressor.export.latency import keep_slow_layers_dense, latency_decisions

                keep_slow_layers_dense(plan, latency_decisions(model, plan, example_inputs(loaded, opts),
                                                               threads=_ort_threads(opts)))
                step("latency")
            plan.to_json(tmp / "plan.json")
        original = model
        if mode in ("compress", "apply"):
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
            step("rewrite")
            _save(model, tmp, plan, loaded)
            step("save")
        exports: dict[str, Any] = {}
        inputs = None
        if mode in ("compress", "apply", "export"):
            if weights_only:
                if opts.edge:
                    raise CompressorError("an edge folder needs the ONNX files, and the input holds weights only",
                                          "pass arch='package.module:factory' to build the model, or leave out edge",
                                          cli_fix="pass --arch package.module:factory to build the model, or leave "
                                                  "out --edge")
                exports["skipped"] = ("the input holds weights only; pass --arch package.module:factory "
                                      "to build the model for export")
            else:
                inputs = example_inputs(loaded, opts)
                exports = _export(model, original, inputs, tmp, plan, opts, calibration, held_out, prompts)
                step("export")
                if opts.edge:
                    exports["edge"] = _edge(model, original, inputs, tmp, opts, source, exports)
                    step("edge")
        perplexities = None
        if protocol is not None:
            perplexities = measure_perplexity(protocol, original, model, tmp, opts.variants, opts.threads)
            step("perplexity")
        # analyze rewrites nothing: its parameter counts are what the plan would give.
        planned = (plan.totals()["params_before"], plan.totals()["params_after"]) if mode == "analyze" else None
        report = build_report(source=source, out=out, mode=mode, loaded=loaded, plan=plan,
                              original=original, compressed=model, exports=exports, timings=timings,
                              options=opts, folder=tmp, params=planned)
        report.perplexity = perplexities
        report.warnings = []
        if report.latency and "model.onnx" in report.latency["slower_than_dense"]:
            # --latency-aware never hands back a compressed model slower than the dense one.
            ratio = report.latency["files"]["model.onnx"]["latency_ratio"]
            raise CompressorError(f"the factored model.onnx ran {ratio:.3f}x the dense model's latency side by side "
                                  f"on the example inputs ({report.latency['inputs']}), although each factored layer "
                                  "was measured faster alone; nothing was written",
                                  "leave out latency_aware to compress for size alone, or use compressor.search, "
                                  "which falls back to a file that is not slower",
                                  cli_fix="leave out --latency-aware to compress for size alone, or use compress "
                                          "search, which falls back to a file that is not slower")
        if report.latency and report.latency["slower_than_dense"]:
            slow = ", ".join(f"{n} ({report.latency['files'][n]['latency_ratio']:.2f}x)"
                             for n in report.latency["slower_than_dense"])
            message = (f"measured slower than the dense model side by side: {slow}; the multiply-adds went down "
                       "but the latency did not")
            report.warnings.append({"kind": "slower_than_dense", "message": message + "; try compressor.search "
                                    "(latency-aware by default) or a milder policy",
                                    "cli": message + "; try compress search (latency-aware by default) or a "
                                           "milder policy"})
        cosine = (report.fidelity or {}).get("cosine_mean")
        if cosine is not None and cosine < LOW_FIDELITY_COSINE and plan is not None:
            report.warnings.append(low_fidelity_warning(cosine, original, model, plan, inputs, opts,
                                                        report.fidelity.get("inputs", "the example inputs")))
            warnings.warn(report.warnings[-1]["message"], LowFidelityWarning, stacklevel=2)
        if opts.plots and plan is not None:
            report.plots = _plots(model if mode == "analyze" else original, plan, tmp)
        write_report(report, tmp)
    return report


def with_pooled_output(opts: Options, loaded) -> Options:
    """``opts`` comparing the sentence embedding a sentence-transformers folder pools (what its users
    consume) when no outputs were named: fidelity, sensitivity and the calibrated analysis then measure it."""
    spec = loaded.meta.get("pooling")
    if opts.outputs or not spec:
        return opts
    from compressor.data.inputs import pooled_name

    return dataclasses.replace(opts, outputs=[pooled_name(spec["mode"], spec["normalize"])])


def eval_protocol(loaded, opts: Options):
    """The evaluation text tokenized once and its windows (a :class:`compressor.data.perplexity.Protocol`;
    the window defaults to the model's), refused before the slow steps when the model cannot be measured
    (shared by compress and search)."""
    from compressor.data.perplexity import Protocol, check_protocol, default_window, output_head, read_corpus

    output_head(loaded.model)  # a causal language model, or one line saying it is not
    window = opts.eval_window or default_window(getattr(loaded.model, "config", None))
    check_protocol(window, opts.eval_stride, opts.eval_bos, opts.eval_max_windows, flags="eval-")
    return Protocol(read_corpus(opts.eval_text, loaded.tokenizer), window, opts.eval_stride, opts.eval_bos,
                    opts.eval_max_windows)


def measure_perplexity(protocol, original: nn.Module, compressed: nn.Module, folder: Path,
                       variants: Sequence[str] = (), threads: int | None = None):
    """The perplexity of the dense model, the compressed one (when it differs), ``folder``'s model.onnx and
    its ``variants`` by one protocol (:class:`compressor.report.report.PerplexityReport`)."""
    from compressor.data.perplexity import perplexity
    from compressor.export.perplexity import onnx_perplexity
    from compressor.report.report import PerplexityReport

    corpus, settings = protocol.corpus, protocol.settings()
    results = {"dense": perplexity(original, corpus, **settings)}
    if compressed is not original:
        results["compressed"] = perplexity(compressed, corpus, **settings)
    for path in (folder / "model.onnx", *(folder / f"model.{v}.onnx" for v in variants)):
        if path.is_file():
            results[path.name] = onnx_perplexity(path, corpus, **settings, threads=threads)
    return PerplexityReport(results)


class LowFidelityWarning(UserWarning):
    """The compressed model's outputs are far from the original's (see LOW_FIDELITY_COSINE)."""


def low_fidelity_warning(cosine: float, original: nn.Module, compressed: nn.Module, plan: Plan, inputs,
                         opts: Options, measured_on: str = "the example inputs") -> dict[str, Any]:
    """What to tell the user when fidelity is poor: how poor (``measured_on``: what it was measured on), the
    layers whose factoring alone costs most (measured on ``inputs``: each factored layer swapped alone into
    the original), and what would help. ``message`` spells the fixes for Python, ``cli`` for the command line."""
    damage = layer_damage(original, compressed, [lp.name for lp in plan.factored], inputs, opts.outputs)
    worst = sorted(damage, key=damage.get)[:WORST_LAYERS_SHOWN]
    shown = ", ".join(f"{n} (cosine {damage[n]:.3f} alone)" for n in worst)
    problem = (f"the compressed model keeps cosine {cosine:.3f} to the original on {measured_on}, below "
               f"{LOW_FIDELITY_COSINE}: its outputs are plainly different; the factored layers that cost most "
               f"alone are {shown}")
    data_aware = "" if plan.method != "svd" else " data-aware factors ({}),"
    api = (f"{problem}; try{data_aware.format('calibration=...')} leaving the worst layers dense "
           f"(exclude={worst!r}), or a milder policy")
    cli = (f"{problem}; try{data_aware.format('--calibration FILE')} leaving the worst layers dense "
           f"({' '.join(f'--exclude {n!r}' for n in worst)}), or a milder policy")
    return {"kind": "low_fidelity", "cosine": cosine, "threshold": LOW_FIDELITY_COSINE,
            "worst_layers": {n: damage[n] for n in worst}, "message": api, "cli": cli}


@torch.no_grad()
def layer_damage(original: nn.Module, compressed: nn.Module, names: Sequence[str], inputs,
                 outputs: Sequence[str] = ()) -> dict[str, float]:
    """For each named layer: the mean cosine of ``original``'s compared outputs with only that layer
    replaced by ``compressed``'s version of it, to ``original``'s own (``original`` is restored after each)."""
    with eval_mode(original):
        ref = call(original, inputs)
        out = {}
        for name in names:
            parent_name, _, leaf = name.rpartition(".")
            parent = original.get_submodule(parent_name)
            dense = getattr(parent, leaf)
            setattr(parent, leaf, compressed.get_submodule(name))
            try:
                out[name] = cosine_fidelity(ref, call(original, inputs), outputs or None,
                                            attention_mask(inputs))["cosine_mean"]
            finally:
                setattr(parent, leaf, dense)
    return out


def _calibration(loaded, opts: Options) -> list | None:
    if opts.calibration is None:
        return None
    from compressor.analysis.decoder import is_decoder
    from compressor.data.calibration import load_calibration

    # A causal LM calibrates on sequences cut from the text as one token stream (no padding), 128 tokens each.
    return load_calibration(opts.calibration, tokenizer=loaded.tokenizer, samples=opts.calibration_samples,
                            stream=loaded.model is not None and is_decoder(loaded.model))


def _held_out(loaded, opts: Options, weights_only: bool) -> list | None:
    """The batches of ``opts.eval_inputs`` (read as calibration inputs are: tensors, or text through the
    folder's tokenizer), checked against the model; None without them."""
    if opts.eval_inputs is None:
        return None
    if weights_only:
        raise CompressorError("held-out inputs need a model to run, and the input holds weights only",
                              "leave out eval_inputs", cli_fix="leave out --eval-inputs")
    from compressor.data.calibration import load_calibration
    from compressor.data.inputs import check_fits

    batches = load_calibration(opts.eval_inputs, tokenizer=loaded.tokenizer)
    check_fits(loaded.model, batches, f"the held-out inputs in '{opts.eval_inputs}'")
    return batches


def _plan(model: nn.Module, opts: Options, mode: str, calibration: list | None, probe=None) -> Plan:
    extra = {"calibration": calibration, "outputs": opts.outputs} if calibration is not None else {}
    if mode == "apply":
        return analyze(model, plan=Plan.from_json(opts.plan_path), progress=opts.progress, **extra)
    return analyze(model, **opts.policy(), rank_multiple=opts.rank_multiple, include=opts.include,
                   exclude=opts.exclude, progress=opts.progress, fold_batchnorm=not opts.keep_batchnorm,
                   example_inputs=probe, **extra)


def _probe(loaded, opts: Options, weights_only: bool):
    """Example inputs to find BatchNorm/conv pairs with when there is no calibration data (None: unknown)."""
    if weights_only or opts.keep_batchnorm or opts.calibration is not None:
        return None
    if opts.input_shapes or opts.example_inputs is not None or loaded.example_inputs is not None:
        return example_inputs(loaded, opts)
    return None


def _save(model: nn.Module, folder: Path, plan: Plan, loaded) -> None:
    from compressor.formats.save import save

    save(model, folder, plan, source=loaded, atomic=False)  # the OutputDir publishes the folder


def example_inputs(loaded, opts: Options):
    """The inputs to export and validate with: --input-shape, --example-inputs, or what the model file holds."""
    from compressor.data.readers import load_example_inputs

    if opts.input_shapes:
        # Random inputs in the model's floating dtype (a bfloat16 model cannot take float32 inputs).
        dtype = next((p.dtype for p in (loaded.model.parameters() if loaded.model is not None else ())
                      if p.is_floating_point()), torch.float32)
        g = torch.Generator().manual_seed(0)
        tensors = tuple(torch.randn(s, generator=g).to(dtype) for s in opts.shapes())
        return tensors[0] if len(tensors) == 1 else tensors
    if opts.example_inputs is not None:
        return load_example_inputs(opts.example_inputs)
    if loaded.example_inputs is not None:
        return loaded.example_inputs
    raise CompressorError("cannot tell what inputs this model takes, so it cannot be exported",
                          "pass --input-shape 1x3x224x224 (repeat for several inputs) or --example-inputs FILE")


def _export(model: nn.Module, original: nn.Module, inputs, folder: Path, plan: Plan | None,
            opts: Options, calibration: list | None = None, held_out: list | None = None,
            prompts: tuple[list[list[int]], str] | None = None) -> dict[str, Any]:
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
    for kind in opts.variants:
        # Rounded weights move outputs by more than --atol; variants are held to a cosine floor.
        v = VARIANTS[kind]
        if kind == "int8" and opts.keep_fp16:
            kept = most_sensitive(int8_sensitivity(model, calibration, outputs=opts.outputs), model,
                                  opts.keep_fp16)
            written = export_int8(path, folder / "model.int8.onnx", keep_fp16=kept)
            result["int8_kept_fp16"] = kept
        elif kind == "int4":
            written, result["int4_correction"] = _int4(model, path, folder, opts, calibration)
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
        result["kv_cache"] = _kv_cache(model, folder, plan, opts, *prompts)
    if original is not compressed:
        result["fidelity"] = output_fidelity(original, compressed, held_out or [original_inputs], opts.outputs)
        result["fidelity"]["inputs"] = (f"{sum(num_samples(b) for b in held_out)} held-out samples from "
                                        f"{Path(opts.eval_inputs).name}" if held_out else "the example inputs")
    else:
        result["fidelity"] = None
    if opts.latency_aware and original is not compressed:
        result["latency"] = _latency(original, compressed, original_inputs, folder, opts)
    return result


def _int4(model: nn.Module, path: Path, folder: Path, opts: Options, calibration: list | None
          ) -> tuple[Path, dict[str, Any] | None]:
    """model.int4.onnx, with the low-rank correction of its rounding error when asked (data-aware with
    calibration inputs); returns the file and the correction's summary."""
    from compressor.analysis.int4 import int4_correction, parse_correction
    from compressor.export.onnx import export_int4

    corr = None
    if opts.int4_correction is not None:
        corr = int4_correction(model, block_size=opts.int4_block_size, calibration=calibration,
                               outputs=opts.outputs or None, **parse_correction(opts.int4_correction))
    written = export_int4(path, folder / "model.int4.onnx", block_size=opts.int4_block_size,
                          corrections=corr.factors if corr else None, factors=opts.int4_factors)
    return written, None if corr is None else {**corr.to_dict(), "factors": opts.int4_factors}


def _edge(model: nn.Module, original: nn.Module, inputs, folder: Path, opts: Options, source: Path,
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
    recipes = {"model.int4.onnx": {"block_size": opts.int4_block_size, "correction": exports.get("int4_correction"),
                                   "accuracy_level": INT4_ACCURACY_LEVEL},
               "model.int8.onnx": {"keep_fp16": exports.get("int8_kept_fp16") or []}}
    reference = onnx_ready(original, inputs)[0] if original is not compressed else None
    return build_edge(folder, model, ready, threads=opts.threads or 1, origin=origin, atol=opts.atol,
                      recipes={k: v for k, v in recipes.items() if (folder / k).is_file()},
                      fidelity_reference=reference)


def _generation_prompts(loaded, model: nn.Module, weights_only: bool, opts: Options) -> tuple[list[list[int]], str]:
    """The prompts (token ids) a --kv-cache export is checked on, and where they come from: the first lines of
    the evaluation text, else of a text calibration file (the user's own text), else built-in sentences;
    refused before the slow steps when the model is not a causal LM."""
    from compressor.analysis.decoder import is_decoder
    from compressor.export.kv_cache import GENERATION_PROMPTS, PROMPTS, prompt_token_ids

    if weights_only or not is_decoder(model) or loaded.tokenizer is None:
        raise CompressorError("a key/value cache export is for causal language models with a tokenizer (a Hugging "
                              "Face *ForCausalLM folder or a GGUF file), and this model is not one",
                              "leave out kv_cache", cli_fix="leave out --kv-cache")
    for path in (opts.eval_text, opts.calibration):
        if path is not None and _is_text(path):
            lines = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    lines += [line] if line.strip() else []
                    if len(lines) == PROMPTS:
                        break
            if lines:
                return prompt_token_ids(loaded.tokenizer, lines), f"first {len(lines)} lines of {Path(path).name}"
    return prompt_token_ids(loaded.tokenizer, GENERATION_PROMPTS), "built-in prompts"


def _kv_cache(model: nn.Module, folder: Path, plan: Plan | None, opts: Options, prompts: list[list[int]],
              source: str) -> dict[str, Any]:
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
        # Plain variants: the int4 correction and --keep-fp16 apply to model.int4/int8.onnx only.
        written = export_int4(path, dst, block_size=opts.int4_block_size) if kind == "int4" else v.write(path, dst)
        files[written.name] = check_generation(written, model, prompts, same_tokens=False, min_cosine=v.min_cosine,
                                               variant=kind, prompt_source=source, threads=opts.threads,
                                               reference=reference).to_dict()
    return {"layout": kv_layout(model).to_dict(), "files": files}


def _ort_threads(opts: Options) -> int:
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
        return latency_vs_macs(dense, files, inputs, threads=_ort_threads(opts),
                               macs_ratio=count_macs(model, inputs)["total"] / macs if macs else None)


@torch.no_grad()
def output_fidelity(reference: nn.Module, model: nn.Module, batches: Sequence[Any],
                    outputs: Sequence[str] = ()) -> dict[str, Any]:
    """How close ``model``'s compared outputs are to ``reference``'s on ``batches`` of inputs: per-sample
    cosine (mean and worst) and relative error (:func:`compressor.data.inputs.batches_fidelity`), and which
    outputs were compared (``compared``)."""
    with eval_mode(reference), eval_mode(model):
        result: dict[str, Any] = batches_fidelity(((call(reference, b), call(model, b), attention_mask(b))
                                                   for b in batches), outputs or None)
    result["compared"] = ", ".join(outputs) if outputs else "every floating-point output"
    return result


def _plots(model: nn.Module, plan: Plan, folder: Path) -> list[str]:
    from compressor.report.plots import plot_spectra

    return [str(Path(p).relative_to(folder)) for p in plot_spectra(model, plan, folder)]


def weights_only_model(state_dict: dict[str, torch.Tensor] | None) -> nn.Module:
    """A stand-in module tree for a bare state_dict, so its weights can be analyzed and factored.

    Every ``X.weight`` of 2 dims becomes an ``nn.Linear`` (an embedding table has the same matrix
    view), 3 to 5 dims a ``Conv1d/2d/3d`` whose groups cannot be known (``in == 1`` per group
    is treated as depthwise and left dense); other tensors are kept as plain parameters so totals count
    them. The names are the state_dict's own, so the plan and factored weights match them.
    """
    if not state_dict:
        raise CompressorError("the file holds no tensors", "pass a model or a state_dict of weights")
    root = nn.Module()
    used: set[str] = set()
    for key, tensor in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf != "weight" or tensor.dim() < 2 or not tensor.is_floating_point():
            continue
        bias = state_dict.get(f"{prefix}.bias")
        has_bias = bias is not None and bias.dim() == 1 and bias.shape[0] == tensor.shape[0]
        if tensor.dim() == 2:
            layer: nn.Module = nn.Linear(tensor.shape[1], tensor.shape[0], bias=has_bias, device="meta")
        elif tensor.dim() in (3, 4, 5):
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[tensor.dim() - 3]
            groups = tensor.shape[0] if tensor.shape[1] == 1 and tensor.shape[0] > 1 else 1
            layer = conv(tensor.shape[1] * groups, tensor.shape[0], tuple(tensor.shape[2:]), groups=groups,
                         bias=has_bias, device="meta")
        else:
            continue
        layer.weight = nn.Parameter(tensor, requires_grad=False)
        used.add(key)
        if has_bias:
            layer.bias = nn.Parameter(bias, requires_grad=False)
            used.add(f"{prefix}.bias")
        _place(root, prefix or "weight_matrix", layer)
    for key, tensor in state_dict.items():
        if key not in used:
            prefix, _, leaf = key.rpartition(".")
            holder = _container(root, prefix) if prefix else root
            holder.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
    return root


def _container(root: nn.Module, dotted: str) -> nn.Module:
    node = root
    for part in dotted.split("."):
        if part not in node._modules:
            node.add_module(part, nn.Module())
        node = node._modules[part]
    return node


def _place(root: nn.Module, dotted: str, layer: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    (_container(root, parent) if parent else root).add_module(leaf, layer)


# ------------------------------------------------------------------------------------------- heal


def load_training_data(path: Path, tokenizer=None, samples: int | None = None, seq_len: int | None = None
                       ) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a file: tensors (``.pt``/``.npz``/``.safetensors``) holding either the
    model's inputs alone (targets None: distillation) or ``inputs`` and ``targets`` (also ``x``/``y``);
    or, with a tokenizer, a text file of one sentence per line, or with ``seq_len`` too (a causal language
    model) the text as one token stream cut into ``samples`` sequences of ``seq_len`` tokens, each starting
    with the tokenizer's BOS if it adds one (no padding: every position is a next token to learn)."""
    from compressor.data.readers import load_example_inputs

    path = regular_file(path, "training data file")  # a FIFO would block the read forever
    if tokenizer is not None and _is_text(path):
        from compressor.data.calibration import load_calibration

        if seq_len is None:
            return load_calibration(path, tokenizer=tokenizer, samples=samples), None
        batches = load_calibration(path, tokenizer=tokenizer, samples=samples, max_length=seq_len, stream=True,
                                   bos=True)
        # One set of sequences, so heal batches them by its --batch-size and shuffles sequences, not batches.
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}, None
    data = load_example_inputs(path)
    if isinstance(data, dict):
        for x, y in (("inputs", "targets"), ("x", "y")):
            if set(data) == {x, y}:
                return _cap(data[x], samples), _cap(data[y], samples)
    return _cap(data, samples), None


def _cap(x: Any, samples: int | None) -> Any:
    if samples is None:
        return x
    if isinstance(x, dict):
        return {k: v[:samples] for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(v[:samples] for v in x)
    return x[:samples]


def _is_text(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            f.read(4096)
    except (UnicodeDecodeError, OSError):
        return False
    return True


def heal_folder(source: str | Path, out: str | Path | None = None, *, data: Path, val: Path | None = None,
                teacher: str | Path | None = None, trust_pickle: bool = False, force: bool = False,
                samples: int | None = None, command: str | None = None, config: HealConfig | None = None,
                checkpoint_dir: str | Path | None = None, resume: bool = False,
                progress: bool | None = None, save_adapter: str | Path | None = None) -> dict[str, Any]:
    """Heal the compressed model at ``source`` on the data in files with the settings of ``config``, and
    save it to ``out``.

    Without targets in ``data`` this distils from ``teacher``: by default the original model recorded
    in the compressed folder. Returns a summary (before/after metrics, best step, where it went, and the
    config as JSON), also written to ``heal.json``. ``save_adapter`` (with ``config.train == "lora"``)
    also writes the trained adapters, before merging, to that folder as PEFT writes them; their base
    model is the compressed folder ``source``.
    """
    from compressor.formats.load import load_model
    from compressor.formats.save import save
    from compressor.report.card import write_model_card
    from compressor.report.report import versions
    from compressor.train.heal import HealConfig, heal

    source = Path(source)
    out = Path(out) if out is not None else source.parent / f"{source.name}.healed"
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise CompressorError(f"samples must be a whole number >= 1, got {samples!r}", "pass e.g. --samples 1000")
    if resume and checkpoint_dir is None:
        raise CompressorError("--resume needs the folder of the run to continue",
                              "pass --checkpoint-dir with --resume")
    if checkpoint_dir is not None:
        ck = Path(checkpoint_dir).resolve()
        for folder, what in ((source, "the compressed model's folder"), (out, "the output folder")):
            if ck == folder.resolve() or folder.resolve() in ck.parents:
                raise CompressorError(f"--checkpoint-dir {checkpoint_dir} is {what} or inside it",
                                      "pass --checkpoint-dir a folder of its own")
    inputs = [("model", source), ("training data", data), ("validation data", val), ("teacher", teacher),
              ("checkpoint folder", checkpoint_dir)]
    check_not_over_inputs(out, inputs)
    OutputDir(out, force).check()  # before the (slow) loading and training
    if save_adapter is not None:
        if config is None or config.train != "lora":
            raise CompressorError("only LoRA training has an adapter to save",
                                  "pass config.train='lora' with save_adapter", cli_fix="pass --train lora")
        check_not_over_inputs(save_adapter, [*inputs, ("output folder", out)])
        OutputDir(Path(save_adapter), force).check()
    loaded = load_model(source, trust_pickle=trust_pickle)
    if loaded.model is None:
        raise CompressorError(f"'{source}' holds only weights", "heal a folder written by compress")
    from compressor.train.decoder import is_causal_lm

    seq_len = (config or HealConfig()).seq_len if is_causal_lm(loaded.model) else None
    inputs, targets = load_training_data(data, loaded.tokenizer, samples, seq_len)
    val_data = None
    if val is not None:
        vx, vy = load_training_data(val, loaded.tokenizer, samples, seq_len)
        val_data = (vx, vy) if targets is not None else vx
    teacher_model = None
    # A causal LM learning its text's next tokens (--loss ce) needs no teacher.
    if targets is None and not (seq_len is not None and config is not None and config.loss == "ce"):
        recorded = loaded.meta.get("compressor", {}).get("source", {}).get("path")
        teacher_path = teacher or recorded
        if teacher_path is None or not Path(teacher_path).exists():
            raise CompressorError("distillation needs the original model, and none was given or recorded",
                                  "pass --teacher PATH, or --data with inputs and targets")
        check_not_over_inputs(out, [("teacher", teacher_path)])  # the one the folder records
        teacher_model = load_model(teacher_path, trust_pickle=trust_pickle).model
    with OutputDir(out, force) as tmp:
        result = heal(loaded.model, config, teacher=teacher_model, data=inputs, targets=targets,
                      val_data=val_data, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
        plan = loaded.meta.get("plan")
        save(result.model, tmp, plan, source=loaded, atomic=False)
        summary = {"source": str(source), "output": str(out), "teacher": None if teacher_model is None else
                   str(teacher or recorded), "supervised": targets is not None, "before": result.before,
                   "after": result.after, "best_step": result.best_step, "steps": result.steps,
                   "resumed_from": result.resumed_from, "seconds": round(result.seconds, 2),
                   "note": result.note,
                   "blocks": [{k: v for k, v in b.items() if k != "history"} for b in result.blocks],
                   "history": result.history, "config": result.config.to_dict(),
                   # which kind's defaults the run used, and the settings they filled (the rest were given)
                   "recipe": result.recipe,
                   "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
                   "command": command, "versions": versions()}
        if save_adapter is not None:
            summary["adapter"] = str(save_adapter)
            result.adapter.base_model_name_or_path = str(source.resolve())
        monitor, mode = result.config.monitor, result.config.mode
        if any(isinstance(h.get("metrics", {}).get(monitor), int | float) for h in result.history):
            from compressor.report.plots import plot_metric_history

            plot_metric_history(result.history, monitor, tmp / "metrics.png", result.best_step, mode)
            summary["plot"] = "metrics.png"  # the monitored metric over steps, the best step marked
        atomic_write_text(tmp / "heal.json", json.dumps(summary, indent=2, default=str) + "\n")
        write_model_card(tmp, json.loads(json.dumps(summary, default=str)))
        if save_adapter is not None:  # inside: a failure here publishes neither folder
            with OutputDir(Path(save_adapter), force) as adapter_tmp:
                result.adapter.write_into(adapter_tmp)
    return summary
