"""Which activations a static int8 (QDQ) file keeps float: chosen by measurement, a few at most.

A QDQ file quantizes each activation tensor to uint8 with one scale for the whole tensor. Where a tensor's
channels span very different ranges, that one scale leaves the small channels a handful of steps, and every
layer after it inherits the error. MobileNetV2's stem output is the known case (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction", Fig. 2): on the edge benchmark's 64
calibration crops, keeping that one tensor float raised the mean logit cosine of the static int8 file to fp32
from 0.954 to 0.986, and its held-out logit cosine from 0.9872 to 0.9935, while the next most helpful tensors
added 0.0005 to 0.0046 each (``benchmarks/results/edge_mobilenetv2.md``; the run at commit 0587cd2).

Keeping a tensor float means bypassing its QuantizeLinear -> DequantizeLinear pair: its consumers read the
float tensor. onnxruntime then runs its producer and consumers in float (their weights are still stored
int8, dequantized), so each tensor kept float costs some speed; hence a small cap,
:data:`QDQ_FLOAT_ACTIVATIONS`, and the file's measured latency in the edge benchmark.

How :func:`choose_float_activations` picks them: every bypassable pair is screened alone on one calibration
batch (one session each, a pass over the graph's quantized tensors); then, most helpful first, a tensor is
kept when it is clearly better on all calibration batches: its mean per-sample cosine higher by more than
:data:`QDQ_FLOAT_GAIN` and by more than chance (the rule ``export_qdq`` applies to every more complex candidate,
``compressor.export.int8.clearly_better``, passed in as ``better``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# At most this many activation tensors stay float in a static int8 file (each runs its neighbours in float).
QDQ_FLOAT_ACTIVATIONS = 3
# A tensor stays float only when that raises the mean cosine to fp32 on the calibration inputs by more than
# this, and by more than chance (a weight layer, by this times its share of the weights: export_qdq). On
# MobileNetV2 the stem output gained 0.032, the next two 0.0019 and 0.0006, and with all three float the file
# ran at 0.74x the dense fp32 latency, against 0.57x with the stem output alone (the edge benchmark at commit
# 0587cd2, then at this rule).
QDQ_FLOAT_GAIN = 0.005
# Screened candidates tried on all calibration batches, most helpful first; the rest are not tried.
_TRIED = 6


def activation_quantizers(model: Any, source: Any) -> list[str]:
    """The tensors of the QDQ ``model`` (an onnx ModelProto) that pass through a QuantizeLinear ->
    DequantizeLinear pair and can be kept float, in graph order. ``source`` is the fp32 graph it was
    quantized from.

    Not constants (weights, biases), not tensors whose dequantized value is a graph output, and not
    tensors whose producer is not the source's: onnxruntime drops a Relu or Clip after a Conv when the
    tensor's uint8 range does the clipping (the Conv then writes the tensor), and bypassing that pair
    would drop the activation itself."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    dequantized = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    made_by_source = {o: n.op_type for n in source.node for o in n.output}
    seen: list[str] = []
    for n in graph.node:
        tensor = n.input[0]
        if (n.op_type == "QuantizeLinear" and tensor not in constants and n.output[0] in dequantized
                and dequantized[n.output[0]] not in outputs and tensor not in seen
                and made_by.get(tensor) == made_by_source.get(tensor)):
            seen.append(tensor)
    return seen


def bypass_quantizers(model: Any, tensors: Sequence[str]) -> Any:
    """A copy of the QDQ ``model`` in which each of ``tensors`` stays float: the readers of its
    DequantizeLinear read the tensor itself, and its QuantizeLinear/DequantizeLinear nodes are removed."""
    out = type(model)()
    out.CopyFrom(model)
    graph, keep = out.graph, set(tensors)
    quantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in keep}
    float_of = {n.output[0]: quantized[n.input[0]] for n in graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in quantized}
    nodes = [n for n in graph.node if not (n.op_type == "QuantizeLinear" and n.output[0] in quantized)
             and not (n.op_type == "DequantizeLinear" and n.output[0] in float_of)]
    for n in nodes:
        for i, name in enumerate(n.input):
            n.input[i] = float_of.get(name, name)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def choose_float_activations(model: Any, source: Any, score: Callable[[Any, bool], np.ndarray], base: np.ndarray,
                             better: Callable[[np.ndarray, np.ndarray], bool], limit: int = QDQ_FLOAT_ACTIVATIONS
                             ) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    """The activation tensors of the QDQ ``model`` (quantized from the fp32 graph ``source``) to keep float,
    the per-sample cosines with them kept float, and what was tried.

    ``score(model, screen)`` is the per-sample cosine of a candidate model's outputs to the fp32 file's, on one
    calibration batch when ``screen`` is true, on all of them otherwise; ``base`` is ``model``'s on all.
    A tensor is kept when ``better(its scores, the best scores so far)``, at most ``limit`` of them."""
    if limit <= 0:
        return [], base, []
    alone = {t: float(score(bypass_quantizers(model, [t]), True).mean())
             for t in activation_quantizers(model, source)}
    chosen: list[str] = []
    best, tried = base, []
    for tensor in sorted(alone, key=alone.get, reverse=True)[:_TRIED]:
        if len(chosen) == limit:
            break
        samples = score(bypass_quantizers(model, [*chosen, tensor]), False)
        tried.append({"float_activations": [*chosen, tensor], "cosine": round(float(samples.mean()), 6)})
        if better(samples, best):
            chosen, best = [*chosen, tensor], samples
    return chosen, best, tried
