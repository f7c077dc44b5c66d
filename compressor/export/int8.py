"""The int8 variants: dynamic int8 (onnxruntime ``quantize_dynamic``; chosen layers may stay fp16) and static
int8 in QDQ form (``quantize_static``; the calibration method and the float ends chosen by measurement)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_files
from compressor.core.gptq import GPTQ_ACT_ORDER, GPTQ_DAMP
from compressor.core.handlers import DYNAMIC_INT8_LEVELS
from compressor.data.inputs import as_batches
from compressor.export.fp16 import store_fp16
from compressor.export.graph import weight_uses
from compressor.export.int8_activations import (
    QDQ_FLOAT_ACTIVATIONS,
    QDQ_FLOAT_GAIN,
    bypass_quantizers,
    choose_float_activations,
)
from compressor.export.int8_rounding import ROUNDINGS, restore_layers, rounded_sources
from compressor.export.measure import file_size
from compressor.export.onnx_files import (
    EXTERNAL_DATA_BYTES,
    first_line,
    load_graph,
    onnx_session,
    quiet,
    save_onnx,
)
from compressor.formats.onnx_graph import feeds, module_name
from compressor.formats.runtime import session


def export_int8(src_onnx: str | Path, dst: str | Path, *, keep_fp16: Sequence[str] = ()) -> Path:
    """onnxruntime dynamic quantization of ``src_onnx``: int8 weights (per output channel, in -64..64:
    :data:`compressor.core.handlers.DYNAMIC_INT8_LEVELS` says why), activations quantized at run time. Written
    atomically; returns ``dst``.

    ``keep_fp16`` names torch modules (``"encoder.layer.0.output.dense"``; a factored layer's name means
    both its ``.down`` and ``.up``) left out of quantization: their weights are stored as float16 and
    cast back to float32 like ``export_fp16`` does, one byte more per parameter than int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src_onnx), Path(dst)
    if not src.is_file():
        raise CompressorError(f"ONNX file '{src}' does not exist", "export the model first")
    names = [keep_fp16] if isinstance(keep_fp16, str) else list(keep_fp16)
    exclude = _kept_nodes(load_graph(src).graph, names, src) if names else None
    big = file_size(src) > EXTERNAL_DATA_BYTES
    try:
        with atomic_files(dst) as tmpdir:
            with quiet():
                quantize_dynamic(src, tmpdir / dst.name, weight_type=QuantType.QInt8, per_channel=True,
                                 reduce_range=DYNAMIC_INT8_LEVELS < 127, use_external_data_format=big,
                                 nodes_to_exclude=exclude)
            if exclude:
                import onnx

                model = onnx.load(str(tmpdir / dst.name))
                # The kept nodes' weights, found again in the quantized graph: quantize_dynamic rewrites
                # each Gemm into MatMul (+ Add) named after it, on a transposed copy of the weight.
                inits = [t.name for t in model.graph.initializer]
                kept = {init for init, node, _ in weight_uses(model.graph, inits) if node.name in exclude}
                store_fp16(model.graph, kept)
                for f in list(tmpdir.iterdir()):
                    f.unlink()
                save_onnx(model, tmpdir / dst.name, onnx)
    except Exception as err:
        raise CompressorError(f"int8 quantization of '{src}' failed ({type(err).__name__}: "
                              f"{first_line(err)})", "export without --int8, or report the model") from err
    return dst


def _kept_nodes(graph, names: list[str], src: Path) -> set[str]:
    """Names of the nodes quantize_dynamic must leave alone to keep the layers ``names`` unquantized."""
    layers: dict[str, list] = {}  # module name, without export_onnx's "model." prefix -> [node, ...]
    weights = [t.name for t in graph.initializer if len(t.dims) >= 2]
    for weight, node, path in weight_uses(graph, weights):
        module = module_name(weight, node)
        if module:
            layers.setdefault(module.removeprefix("model."), []).extend([node, *path])
    exclude = set()
    for name in names:
        hits = [m for m in layers if m in (name, f"{name}.down", f"{name}.up")]
        if not hits:
            some = ", ".join(list(layers)[:4])
            raise CompressorError(f"keep_fp16 names '{name}', which is no layer with a weight in '{src}'",
                                  f"name torch modules as in model.named_modules(), e.g. {some}")
        for node in (n for m in hits for n in layers[m]):
            if not node.name:
                raise CompressorError(f"the node of layer '{name}' in '{src}' has no name, so it cannot be "
                                      "left out of quantization", "export the model with export_onnx")
            # quantize_dynamic turns a Gemm into a MatMul named "<gemm>_MatMul" before it quantizes.
            exclude |= {node.name, f"{node.name}_MatMul"} if node.op_type == "Gemm" else {node.name}
    return exclude


# ----------------------------------------------------------------------------- static int8 (QDQ)

# How export_qdq calibrates activation ranges; each is measured and the most faithful kept. onnxruntime's
# "entropy" method is left out: on MobileNetV2 (an earlier run of benchmarks/edge_mobilenetv2.py) one entropy
# export took 193 s against 327 s for all five of export_qdq's attempts, and kept fewer top-1 classes.
QDQ_METHODS = ("minmax", "percentile")
# The "percentile" method's percentile: onnxruntime's default, 99.999, clips too little to matter on
# MobileNetV2, where 99.99 kept mean logit cosine 0.945 against 0.934 on the 64 calibration crops (0.950
# against 0.939 without bias correction).
QDQ_PERCENTILE = 99.99
QDQ_METADATA = "compressor.qdq"  # the ONNX metadata key that records how a QDQ file was chosen
# Ops whose constant weight export_qdq may leave float (the first and last of them in the graph).
_QDQ_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# A candidate more complex than the best so far (a later rounding) must be better on the calibration samples by
# more than chance: its mean per-sample cosine higher by more than QDQ_TIE and by more than QDQ_Z standard
# errors of the paired per-sample differences (the choice record keeps both, "gain" and "noise"). On MobileNetV2's
# 64 calibration crops GPTQ rounding gained 0.001 over nearest, within chance, yet the two files' held-out
# top-1 agreement differed by 0.09 (benchmarks/edge_mobilenetv2.py, its run before this rule; docs/edge.md).
QDQ_TIE = 1e-4
QDQ_Z = 2.0


def export_qdq(src_onnx: str | Path, dst: str | Path, *, calibration: Any, methods: Sequence[str] = QDQ_METHODS,
               roundings: Sequence[str] = ROUNDINGS, bias_correction: bool = True,
               float_activations: int = QDQ_FLOAT_ACTIVATIONS) -> Path:
    """Static int8 of ``src_onnx`` in QDQ form (onnxruntime ``quantize_static``): weights int8 per output
    channel, activations uint8 with ranges calibrated on ``calibration`` (a batch of model inputs or a list
    of them: a tensor, a tuple or a dict each, as the fp32 file takes them). Written atomically; returns ``dst``.

    Chosen by measurement, the mean per-sample cosine of every output to ``src_onnx``'s on the calibration
    batches: first the calibration method among ``methods`` ("minmax", with a moving average over batches,
    or "percentile", at :data:`QDQ_PERCENTILE`), then how weights are rounded to int8 among ``roundings``
    ("nearest", or "gptq": error-compensating rounding fitted to the calibration inputs, on the same grid;
    :mod:`compressor.export.int8_rounding`), then whether the first and/or last weight layer (Conv/Gemm/MatMul,
    in graph order: the stem and the classifier, where int8 often costs most) stay float, with their fp32
    weights and biases; last, which activation tensors (at most ``float_activations``) stay float
    (:mod:`compressor.export.int8_activations`; not for files over 2 GB). A later rounding, a float layer or a
    float activation replaces the simpler candidate only when :func:`clearly_better` than it: by
    :data:`QDQ_TIE` and beyond chance; a float activation, which costs speed, by :data:`QDQ_FLOAT_GAIN`; a
    float layer, which costs its weights' int8 bytes, by :data:`QDQ_FLOAT_GAIN` times its share of the file's
    weights (:func:`_weight_sizes`). What was tried and chosen is in the file's metadata (:func:`qdq_choice`).

    ``bias_correction`` (default on) subtracts from each Conv/Gemm bias the mean output shift that the
    rounding of its weight causes on the calibration inputs (after the rounding, on its own errors)."""
    # Why static QDQ beside dynamic int8: dynamic quantization has no integer convolution kernel path worth
    # having (9.1x the fp32 latency on MobileNetV2, against 0.52x for this), while QDQ pairs around Conv are
    # fused by onnxruntime into integer QLinearConv and are what edge runtimes (XNNPACK, NNAPI, QNN) take.
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src, dst = Path(src_onnx), Path(dst)
    if not src.is_file():
        raise CompressorError(f"ONNX file '{src}' does not exist", "export the model first")
    unknown = [m for m in methods if m not in QDQ_METHODS]
    if unknown or not methods:
        raise CompressorError(f"unknown calibration method(s) {unknown or list(methods)}",
                              f"use some of {', '.join(QDQ_METHODS)}")
    unknown = [r for r in roundings if r not in ROUNDINGS]
    if unknown or not roundings:
        raise CompressorError(f"unknown weight rounding(s) {unknown or list(roundings)}",
                              f"use some of {', '.join(ROUNDINGS)}")
    if calibration is None:
        raise CompressorError("static int8 needs calibration inputs, and none were given",
                              "pass calibration batches (real inputs the model will see)")
    reference = onnx_session(src)
    batches = [feeds(reference, b) for b in as_batches(calibration, "static int8 calibration")]
    expected = [reference.run(None, b) for b in batches]
    graph = load_graph(src).graph
    constants = {t.name for t in graph.initializer}
    weighted = [n for n in graph.node if n.op_type in _QDQ_WEIGHT_OPS and n.name and len(n.input) > 1
                and n.input[1] in constants]
    big = file_size(src) > EXTERNAL_DATA_BYTES
    tried: list[dict[str, Any]] = []
    sources: dict[str, tuple[Path, dict[str, int]]] = {}  # rounding -> (the file quantize_static reads, counts)

    def attempt(method: str, rounding: str, keep: tuple[str, ...], folder: Path) -> dict[str, Any]:
        path = folder / f"candidate{len(tried)}.onnx"
        source = restore_layers(sources[rounding][0], src, keep, folder / f"source{len(tried)}.onnx")
        with quiet():
            quantize_static(source, path, _Batches(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=_calibrate_method(method), nodes_to_exclude=list(keep),
                            use_external_data_format=big,
                            extra_options={"CalibMovingAverage": True} if method == "minmax"
                            else {"CalibPercentile": QDQ_PERCENTILE})
        samples = _sample_cosines(onnx_session(path), batches, expected)
        tried.append({"method": method, "rounding": rounding, "float_layers": [_layer_of(graph, n) for n in keep],
                      "cosine": round(float(samples.mean()), 6), "path": path, "samples": samples, "keep": keep})
        return tried[-1]

    try:
        with tempfile.TemporaryDirectory(prefix="compressor-qdq-") as tmp:
            folder = Path(tmp)
            sources.update(rounded_sources(src, batches, folder, roundings=tuple(roundings),
                                           bias_correction=bias_correction))
            best = max((attempt(m, roundings[0], (), folder) for m in methods), key=lambda c: c["cosine"])
            for rounding in roundings[1:]:  # a later rounding must do clearly better: the first is simpler
                c = attempt(best["method"], rounding, (), folder)
                if _replaces(c, best, QDQ_TIE):
                    best = c
            ends = [n.name for n in weighted[:1]] + [n.name for n in weighted[-1:] if n is not weighted[0]]
            keeps = [(e,) for e in ends] + ([tuple(ends)] if len(ends) == 2 else [])
            sizes = _weight_sizes(graph, weighted)
            for keep in keeps:  # a float layer costs its weights' int8 bytes, so it must gain in proportion
                c = attempt(best["method"], best["rounding"], keep, folder)
                added = sum(sizes[n] for n in keep if n not in best["keep"]) / max(1, sum(sizes.values()))
                if _replaces(c, best, max(QDQ_TIE, QDQ_FLOAT_GAIN * added)):
                    best = c
            model, best = _keep_activations_float(onnx.load(str(best["path"])), graph, batches, expected, best,
                                                  tried, 0 if big else float_activations)
            choice = _choice_record(best, tried, sources[best["rounding"]][1], batches)
            onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                                QDQ_METADATA: json.dumps(choice)})
            with atomic_files(dst) as out:
                save_onnx(model, out / dst.name, onnx)
    except CompressorError:
        raise
    except Exception as err:
        raise CompressorError(f"static int8 quantization of '{src}' failed ({type(err).__name__}: "
                              f"{first_line(err)})", "export without --qdq, or report the model") from err
    return dst


def _keep_activations_float(model: Any, source: Any, batches: list[dict[str, np.ndarray]],
                            expected: list[list[np.ndarray]], best: dict[str, Any], tried: list[dict[str, Any]],
                            limit: int) -> tuple[Any, dict[str, Any]]:
    """The QDQ ``model`` with the activation tensors :func:`choose_float_activations` picks kept float, and the
    record of the candidate ``best`` it was made as, updated; what was tried is appended to ``tried``."""

    def score(candidate: Any, screen: bool) -> np.ndarray:
        n = 1 if screen else len(batches)
        return _sample_cosines(session(candidate.SerializeToString()), batches[:n], expected[:n])

    def better(samples: np.ndarray, than: np.ndarray) -> bool:
        return clearly_better(samples, than, QDQ_FLOAT_GAIN)

    kept, samples, tried_float = choose_float_activations(model, source, score, best["samples"], better, limit)
    made_as = {k: best[k] for k in ("method", "rounding", "float_layers")}  # not best's own comparison
    tried += [{**made_as, **t} for t in tried_float]
    return bypass_quantizers(model, kept), {**best, "float_activations": kept,
                                            "cosine": round(float(samples.mean()), 6)}


def _choice_record(best: dict[str, Any], tried: list[dict[str, Any]], counts: dict[str, int],
                   batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """What export_qdq records in the file's metadata: the candidate kept, all those tried, and how."""
    keys = ("method", "rounding", "float_layers", "float_activations", "cosine")
    evidence = ("gain", "noise")  # of a candidate compared with a simpler one (_replaces)
    return {"chosen": {k: best.get(k, []) for k in keys},
            "tried": [{**{k: c.get(k, []) for k in keys}, **{k: c[k] for k in evidence if k in c}} for c in tried],
            "calibration_batches": len(batches), "bias_corrected_layers": counts["bias_corrected_layers"],
            "gptq_layers": counts["gptq_layers"], "percentile": QDQ_PERCENTILE,
            "gptq": {"damp": GPTQ_DAMP, "act_order": GPTQ_ACT_ORDER,
                     "hessian": "X Xᵀ of each layer's fp32 inputs (im2col for convs, per group) on the calibration "
                                "inputs"},
            "calibration_samples": int(sum(next(iter(b.values())).shape[0] for b in batches)),
            "criterion": "mean per-sample cosine of the outputs to the fp32 file on the calibration inputs; a later "
                         f"rounding must gain more than {QDQ_TIE:g}, a float activation more than {QDQ_FLOAT_GAIN:g}, "
                         f"a float layer more than {QDQ_FLOAT_GAIN:g} times its share of the weights (at least "
                         f"{QDQ_TIE:g}), and each more than {QDQ_Z:g} standard errors of the paired per-sample "
                         "differences",
            "weights": "int8, per output channel", "activations": "uint8"}


def qdq_choice(path: str | Path) -> dict[str, Any] | None:
    """What :func:`export_qdq` tried and chose for the file ``path`` (None for other files)."""
    for prop in load_graph(path).metadata_props:
        if prop.key == QDQ_METADATA:
            return json.loads(prop.value)
    return None


class _Batches:
    """onnxruntime's CalibrationDataReader over a list of feeds: ``get_next`` until None, then ``rewind``."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.batches, self.i = batches, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.i += 1
        return self.batches[self.i - 1] if self.i <= len(self.batches) else None

    def rewind(self) -> None:
        self.i = 0


def _calibrate_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[name]


def paired_gain(samples: np.ndarray, than: np.ndarray) -> tuple[float, float]:
    """How much the per-sample scores ``samples`` beat ``than`` (the same samples' scores for another candidate)
    on average, and the gain chance alone could give: :data:`QDQ_Z` standard errors of the paired differences."""
    diff = np.asarray(samples, np.float64) - np.asarray(than, np.float64)
    noise = QDQ_Z * float(np.std(diff, ddof=1)) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return float(diff.mean()), noise


def clearly_better(samples: np.ndarray, than: np.ndarray, margin: float) -> bool:
    """Whether ``samples`` beat ``than`` (:func:`paired_gain`) by more than ``margin`` and more than chance."""
    return _wins(*paired_gain(samples, than), margin)


def _wins(gain: float, noise: float, margin: float) -> bool:
    """The rule of :func:`clearly_better`, on a gain and the gain chance could give."""
    return gain > max(margin, noise)


def _replaces(candidate: dict[str, Any], best: dict[str, Any], margin: float) -> bool:
    """Whether the more complex ``candidate`` is :func:`clearly_better` than ``best`` (each with its per-sample
    cosines, ``samples``); the evidence, ``gain`` and ``noise``, is recorded on ``candidate``."""
    gain, noise = paired_gain(candidate["samples"], best["samples"])
    candidate.update(gain=round(gain, 6), noise=round(noise, 6))
    return _wins(gain, noise, margin)


def _sample_cosines(session: Any, batches: list[dict[str, np.ndarray]],
                    expected: list[list[np.ndarray]]) -> np.ndarray:
    """Per sample of ``batches`` (in order), the cosine of ``session``'s outputs to ``expected``, averaged over
    the outputs."""
    per_batch = []
    for feed, wants in zip(batches, expected, strict=True):
        per_output = [_cosines(g, w) for g, w in zip(session.run(None, feed), wants, strict=True)]
        if len({len(c) for c in per_output}) > 1:  # outputs whose first axis is not the batch: one value per batch
            per_output = [np.array([np.mean([c.mean() for c in per_output])])]
        per_batch.append(np.mean(per_output, axis=0))
    return np.concatenate(per_batch)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample (dimension 0), the cosine similarity of the flattened outputs."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.where((na == 0) & (nb == 0), 1.0, np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-300))


def _weight_sizes(graph: Any, nodes: Sequence[Any]) -> dict[str, int]:
    """Per node, how many weights its constant weight (input 1) holds: what keeping it float costs in int8 bytes.
    The share decides how much a float layer must gain: MobileNetV2's stem conv (864 weights, and its output can
    stay float only if it does) passes on a small gain; its classifier (37% of the weights) needs 0.0018."""
    dims = {t.name: t.dims for t in graph.initializer}
    return {n.name: int(np.prod(dims[n.input[1]])) for n in nodes}


def _layer_of(graph, node_name: str) -> str:
    """The torch module whose weight a node multiplies by (``features.0.0``), else the node's own name."""
    node = next(n for n in graph.node if n.name == node_name)
    # The weight's own name first: a conv with a BatchNorm folded in is scoped under the BatchNorm.
    weight = node.input[1]
    module = weight.removesuffix(".weight") if weight.endswith(".weight") else module_name(weight, node)
    return module.removeprefix("model.") if module else node_name
