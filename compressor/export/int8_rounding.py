"""How the static int8 export rounds weights before onnxruntime quantizes them: to the nearest int8 step, or
by GPTQ (each rounding error compensated on the weights not yet rounded, fitted to the calibration inputs);
and the bias correction that follows either.

Why GPTQ: on MobileNetV2 rounding the weights to per-channel int8 is most of what static int8 costs: with
every weight rounded to the nearest step and activations left float, 0.867 of held-out views keep the
original's top-1 class, against 0.967 with 16-bit activations and bias correction
(benchmarks/results/edge_mobilenetv2.md). Round-to-nearest rounds each weight on its own, so the errors of
one output channel's weights add up in its output however its inputs are correlated. GPTQ
(:mod:`compressor.core.gptq`) rounds a channel's weights one input column at a time and moves each column's
rounding error onto the columns not yet rounded, fitted to the calibration inputs. For a convolution
``X`` is its im2col (every input patch, a column per input channel and kernel tap); in a grouped or depthwise
one each output channel reads only its group's input channels, so each group has its own ``H`` (9 x 9 over
the kernel taps for a 3x3 depthwise channel). ``H`` comes from the fp32 model's layer inputs, not from the
already rounded layers before it: one pass over the calibration batches for all layers. On MobileNetV2 GPTQ's
int8 weights alone (activations float, no bias correction) keep the original's top-1 class on 0.956 of the
held-out views, against 0.867 rounded to nearest (the same benchmark, 64 calibration crops).

The grid: onnxruntime's ``quantize_static`` (``per_channel=True``, int8 weights) quantizes each output
channel symmetrically with scale ``max|w| / 127`` (``compute_scale_zp``: the range made symmetric, int8
restricted to -127..127) and rounds to nearest. GPTQ's weights are written as ``q * scale`` in float32, on
that grid, with each channel's largest weight pinned to ±127 so that its max-abs, hence its scale, stays
what onnxruntime computes: onnxruntime's own rounding then gives back exactly ``q``, and the file's int8
weights are GPTQ's. The scale is :func:`compressor.core.handlers.fake_int8_weight`'s, the same number.

Bias correction (Nagel et al. 2019, "Data-free quantization") then subtracts from each Conv/Gemm bias the
mean output shift the chosen rounding's weight errors cause on the calibration inputs: rounding errors do not
average out over inputs that are not centred (after ReLU6 they never are). It is computed on the errors of the
rounding actually used, GPTQ's or round-to-nearest's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compressor.core.gptq import GPTQ_ACT_ORDER, GPTQ_DAMP, gptq
from compressor.core.handlers import fake_int8_weight
from compressor.export.onnx_files import onnx_session, save_onnx

ROUNDINGS = ("nearest", "gptq")  # how export_qdq may round weights; each is measured
_SAMPLES_PER_CHUNK = 4  # calibration samples unfolded at a time: im2col of a 112x112 layer is large


def int8_scale(rows: torch.Tensor) -> torch.Tensor:
    """The per-row int8 scale onnxruntime gives ``rows`` (float32 ``max|w| / 127``; for a zero row 0 here,
    1 in onnxruntime, where either leaves it 0)."""
    return rows.float().abs().amax(-1) / 127


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, *, damp: float = GPTQ_DAMP,
               act_order: bool = GPTQ_ACT_ORDER) -> torch.Tensor:
    """``weight`` (groups, rows, columns) rounded by GPTQ to the symmetric per-row int8 grid, with
    ``hessian`` (groups, columns, columns) the ``X Xᵀ`` of each group's inputs; returned dequantized in
    float32, each value ``q * int8_scale(row)`` with ``q`` an integer in -127..127 and each row's largest
    weight at ±127 (so its scale is unchanged)."""
    scale = int8_scale(weight)  # float32, as onnxruntime stores it
    step = torch.where(scale > 0, scale, 1).to(torch.float64)  # a zero row: any step, its weights stay 0
    w = weight.to(torch.float64)
    top = w.abs().argmax(-1)  # each row's largest weight: pinned to ±127, keeping the row's scale
    pin = torch.where(w.gather(-1, top[..., None])[..., 0] < 0, -127.0, 127.0).to(torch.float64) * (scale > 0)

    def round_column(column: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        q = torch.where(top == column[:, None], pin, (values / step).round().clamp(-127, 127))
        return q * step

    q = (gptq(weight, hessian, round_column, damp=damp, act_order=act_order) / step[..., None]).round()
    return (q.float() * scale[..., None]).float()


# ----------------------------------------------------------------------------- layers of an ONNX graph

def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def gptq_layout(node, weight: np.ndarray) -> tuple[int, bool] | None:
    """How GPTQ reads the constant weight of ``node``: ``(groups, transposed)``, transposed meaning the
    weight is (inputs, outputs) as MatMul and an untransposed Gemm store it, onnxruntime's channel axis 1;
    None for layers it leaves to round-to-nearest (ConvTranspose, non-2D convs, transposed Gemm inputs)."""
    attrs = _attrs(node)
    if node.op_type == "Conv":
        ok = weight.ndim == 4 and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        return (int(attrs.get("group", 1)), False) if ok else None
    if node.op_type == "Gemm" and weight.ndim == 2 and not attrs.get("transA", 0):
        return 1, not attrs.get("transB", 0)
    if node.op_type == "MatMul" and weight.ndim == 2:
        return 1, True
    return None


def _as_groups(weight: np.ndarray, groups: int, transposed: bool) -> torch.Tensor:
    """(groups, output channels per group, inputs per output channel): one row per output channel."""
    w = torch.from_numpy(np.array(weight.T if transposed else weight))  # a writable copy
    return w.reshape(groups, w.shape[0] // groups, -1)


def _from_groups(rows: torch.Tensor, weight: np.ndarray, transposed: bool) -> np.ndarray:
    out = rows.reshape(weight.shape[::-1] if transposed else weight.shape).numpy()
    return np.ascontiguousarray(out.T if transposed else out).astype(weight.dtype)


def _hessian(x: np.ndarray, node, weight_shape: tuple[int, ...], groups: int) -> torch.Tensor:
    """``X Xᵀ`` of the inputs ``x`` to ``node``, (groups, inputs per output channel, same), float64: for a
    conv over every patch it reads (im2col), with zero padding as the conv pads."""
    x = torch.from_numpy(np.asarray(x, np.float32))
    if node.op_type != "Conv":
        cols = x.reshape(-1, x.shape[-1])
        return (cols.T @ cols).to(torch.float64)[None]
    attrs = _attrs(node)
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    h = 0
    for chunk in x.split(_SAMPLES_PER_CHUNK):
        cols = F.unfold(F.pad(chunk, (left, right, top, bottom)), tuple(weight_shape[2:]),
                        dilation=tuple(attrs.get("dilations", (1, 1))), stride=tuple(attrs.get("strides", (1, 1))))
        n, width, length = cols.shape  # width: input channels x kernel taps, channel-major as the weight
        cols = cols.reshape(n, groups, width // groups, length)
        h = h + torch.einsum("ngil,ngjl->gij", cols, cols).to(torch.float64)
    return h


def _input_statistics(model, batches: list[dict[str, np.ndarray]], folder: Path, mean_of: list,
                      hessian_of: dict[str, tuple]) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """One pass of the fp32 ``model`` over ``batches`` with the inputs of the layers as extra outputs: the mean
    per channel (dimension 1) of the inputs of the nodes ``mean_of``, and the Hessian of the inputs of the nodes
    named in ``hessian_of`` (name -> (node, weight shape, groups))."""
    import onnx

    # A temporary copy with its weights: onnxruntime refuses external data outside the model's folder.
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    wanted = [n.input[0] for n in mean_of] + [node.input[0] for node, _, _ in hessian_of.values()]
    for x in dict.fromkeys(wanted):
        if x not in outputs:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
    probe_path = folder / "probe.onnx"
    save_onnx(probe, probe_path, onnx)
    del probe
    session = onnx_session(probe_path)
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    hessians: dict[str, torch.Tensor] = {}
    count = 0
    for batch in batches:
        values = dict(zip(names, session.run(None, batch), strict=True))
        size = next(iter(batch.values())).shape[0]
        for x in {node.input[0] for node in mean_of}:
            v = np.asarray(values[x], np.float64)
            sums[x] = sums.get(x, 0) + v.mean(axis=(0, *range(2, v.ndim))) * size  # all axes but channels
        for name, (node, shape, groups) in hessian_of.items():
            hessians[name] = hessians.get(name, 0) + _hessian(values[node.input[0]], node, shape, groups)
        count += size
        del values
    del session
    for f in folder.glob("probe.onnx*"):
        f.unlink()
    return {x: s / count for x, s in sums.items()}, hessians


def _bias_shift(node, error: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The mean output shift of a Conv/Gemm whose weight is off by ``error``, on inputs whose channel means
    are ``mean`` (for a conv, ignoring the zero padding at the borders)."""
    if node.op_type == "Gemm":
        return error @ mean
    # [out, in/groups, k...]: output channel o reads the input channels of its group
    groups = int(_attrs(node).get("group", 1))
    per_group = error.shape[1]
    group_of = np.arange(len(error)) // (len(error) // groups)
    reads = mean[group_of[:, None] * per_group + np.arange(per_group)]
    return np.einsum("oi,oi->o", error.reshape(*error.shape[:2], -1).sum(-1), reads)


def _gemm_like_linear(node) -> bool:
    """Whether a Gemm computes ``x @ W.T + b`` (torch's Linear) on an untransposed x; Convs always qualify."""
    if node.op_type != "Gemm":
        return True
    attrs = _attrs(node)
    return attrs.get("transB", 0) == 1 and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0


def rounded_sources(src: Path, batches: list[dict[str, np.ndarray]], folder: Path, *,
                    roundings: tuple[str, ...] = ROUNDINGS,
                    bias_correction: bool = True) -> dict[str, tuple[Path, dict[str, int]]]:
    """Per rounding among ``roundings``, the file for onnxruntime to quantize: ``src`` itself (round to nearest
    and no bias correction: onnxruntime rounds), or a copy in ``folder`` with GPTQ's weights on the int8 grid
    and/or each Conv/Gemm bias corrected for the mean output shift of that rounding on ``batches`` (feeds of
    ``src``). With it how many layers were rounded by GPTQ and how many biases corrected."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    weights = {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
               if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits
               and uses[n.input[1]] == 1 and n.name}
    nodes = {n.name: n for n in model.graph.node if n.name in weights}
    layouts = {name: gptq_layout(nodes[name], w) for name, w in weights.items()} if "gptq" in roundings else {}
    hessian_of = {name: (nodes[name], weights[name].shape, lay[0]) for name, lay in layouts.items() if lay}
    biased = [n for n in nodes.values() if bias_correction and n.op_type in ("Conv", "Gemm") and len(n.input) > 2
              and n.input[2] in inits and len(inits[n.input[2]].dims) == 1 and _gemm_like_linear(n)]
    if not (biased or hessian_of):
        return {r: (src, {"gptq_layers": 0, "bias_corrected_layers": 0}) for r in roundings}
    means, hessians = _input_statistics(model, batches, folder, biased, hessian_of)
    out = {}
    for rounding in roundings:
        rounded = {}
        if rounding == "gptq":
            for name, (_, _, groups) in hessian_of.items():
                transposed = layouts[name][1]
                q = gptq_round(_as_groups(weights[name], groups, transposed), hessians[name])
                rounded[name] = _from_groups(q, weights[name], transposed)
        if not (rounded or biased):
            out[rounding] = (src, {"gptq_layers": 0, "bias_corrected_layers": 0})
            continue
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        tensors = {t.name: t for t in copy.graph.initializer}
        for name, q in rounded.items():
            tensors[nodes[name].input[1]].CopyFrom(numpy_helper.from_array(q, nodes[name].input[1]))
        for node in biased:
            w = weights[node.name].astype(np.float64)
            if node.name in rounded:
                error = rounded[node.name].astype(np.float64) - w
            else:  # the rounding quantize_static does: symmetric, per output channel
                error = (fake_int8_weight(torch.from_numpy(w)) - torch.from_numpy(w)).numpy()
            bias = numpy_helper.to_array(inits[node.input[2]])
            shifted = (bias - _bias_shift(node, error, means[node.input[0]])).astype(bias.dtype)
            tensors[node.input[2]].CopyFrom(numpy_helper.from_array(shifted, node.input[2]))
        path = folder / f"{rounding}.onnx"
        save_onnx(copy, path, onnx)
        out[rounding] = (path, {"gptq_layers": len(rounded), "bias_corrected_layers": len(biased)})
    return out


def restore_layers(path: Path, src: Path, node_names: tuple[str, ...], dst: Path) -> Path:
    """``path`` with the weights and biases of the nodes ``node_names`` as in ``src`` again, written to
    ``dst`` (``path`` itself when it is ``src`` or there is nothing to restore): a layer left float keeps
    its fp32 weight and bias, neither rounded nor corrected for a rounding it does not undergo."""
    import onnx
    from onnx import numpy_helper

    if not node_names or Path(path) == Path(src):
        return path
    original = onnx.load(str(src))
    model = onnx.load(str(path))
    names = {i for n in original.graph.node if n.name in node_names for i in n.input[1:]}
    kept = {t.name: t for t in original.graph.initializer if t.name in names}
    for t in model.graph.initializer:
        if t.name in kept:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(kept[t.name]), t.name))
    save_onnx(model, dst, onnx)
    return dst
