"""An ONNX graph seen as a torch model, so that its weights go through the same analysis as a torch
model's: the same handlers, SVDs, rank policies, calibration statistics and plan.

    graph = read_onnx("model.onnx")
    model = OnnxModel(graph)                    # one nn.Linear / nn.ConvNd per factorizable node
    plan = analyze_onnx(model, energy=0.9)      # or target=0.4, calibration=batches

Each MatMul / Gemm / Conv with a weight initializer becomes the torch layer computing the same ``y = W x``
(a MatMul ``x @ B`` is ``Linear`` with weight ``B^T``; ``A @ x`` is ``Linear`` with weight ``A`` applied to
the columns of ``x``; a Gemm's ``alpha`` is folded into its matrix; a Conv keeps its kernel, strides and
dilations, its padding is applied to the input first). Their names are the plan's layer names, so a plan
made on the torch model applies to its export. Calling the model runs the ORIGINAL graph in onnxruntime
with every layer's input also returned, then calls each layer on its own input: calibration hooks see
exactly the rows the graph multiplies. Weights stay memory-mapped where the file keeps external data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from compressor.analysis.analyze import analyze
from compressor.core.errors import CompressorError
from compressor.core.plan import Plan
from compressor.formats.onnx_graph import OnnxGraph, OnnxLayer, feeds, session

# What calibration on an ONNX graph does not do, told in the plan.
ONNX_CALIBRATION_NOTE = ("ONNX input: whitened factors and whitened-spectrum ranks; no sequential refits or "
                         "measured output sensitivity (each would rerun the graph once per layer)")


class Dense(nn.Module):
    """A weight the analysis lists but never factors (shared, behind a Cast, grouped conv, ...): its
    ``(m, n)`` matrix shape only, on the meta device."""

    def __init__(self, m: int, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(m, n, device="meta"), requires_grad=False)


class OnnxModel(nn.Module):
    """The factorizable layers of an ONNX graph as torch modules named like the plan's layers."""

    def __init__(self, graph: OnnxGraph):
        super().__init__()
        self.graph = graph
        self.onnx_layers: dict[str, OnnxLayer] = {}
        self._session = None
        if not any(lay.skip is None for lay in graph.layers):
            if graph.layers:
                why = "; ".join(sorted({lay.skip for lay in graph.layers}))[:300]
                raise CompressorError(f"'{graph.path}' has no factorizable weight: {why}",
                                      "pass a graph whose MatMul/Gemm/Conv weights are float initializers")
            dynamic = [n.name for n in graph.model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
            raise CompressorError(f"'{graph.path}' has no MatMul, Gemm or Conv with a constant weight" +
                                  (f" ({len(dynamic)} such node(s) multiply tensors computed or fed at run time: "
                                   "dynamic weights)" if dynamic else ""),
                                  "pass a graph whose weights are stored in it as initializers")
        for lay in graph.layers:
            self._place(lay.name, _layer_module(graph, lay))
            self.onnx_layers[lay.name] = lay

    def _place(self, dotted: str, module: nn.Module) -> None:
        node: nn.Module = self
        *parents, leaf = dotted.split(".")
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(leaf, module)

    def forward(self, *args: Any, **kwargs: Any) -> None:
        batch = kwargs if kwargs else args[0] if len(args) == 1 else tuple(args)
        todo = [lay for lay in self.onnx_layers.values() if lay.skip is None]
        graph_inputs = {i.name for i in self.graph.inputs()}
        exposed = sorted({lay.input for lay in todo} - graph_inputs)
        if self._session is None:
            self._session = session(self.graph, exposed)
        feed = feeds(self._session, batch)
        values: dict[str, Any] = dict(feed)
        values.update(zip(exposed, self._session.run(exposed, feed), strict=True))
        tensors = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in values.items()}
        for lay in todo:
            module = self.get_submodule(lay.name)
            module(layer_input(lay, tensors[lay.input].to(module.weight.dtype)))


def _tensor(arr: np.ndarray) -> torch.Tensor:
    # A copy-on-write memory map is writable: it stays a map; decoded protobuf data may be read-only.
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _layer_module(graph: OnnxGraph, lay: OnnxLayer) -> nn.Module:
    m, n = lay.matrix_shape
    if lay.skip is not None:
        return Dense(m, n)
    w = _tensor(graph.array(lay.weight))
    bias = None
    if lay.bias is not None and math.prod(graph.inits[lay.bias].dims) == m:
        bias = _tensor(graph.array(lay.bias)).reshape(m)
    if lay.op == "Conv":
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[w.dim() - 3]
        dims = w.dim() - 2
        module: nn.Module = cls(w.shape[1], m, tuple(w.shape[2:]), stride=tuple(lay.conv.get("strides", [1] * dims)),
                                dilation=tuple(lay.conv.get("dilations", [1] * dims)), padding=0,
                                bias=bias is not None, device="meta")
    else:
        if lay.op == "MatMul":
            w = w.T if lay.side == "right" else w
        else:  # Gemm: y = alpha * A' B'; the matrix (m, n) is alpha * B'^T
            w = w if lay.trans_b else w.T
            if lay.alpha != 1.0:
                w = w * lay.alpha
        module = nn.Linear(n, m, bias=bias is not None, device="meta")
    module.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias, requires_grad=False)
    return module.eval()


def layer_input(lay: OnnxLayer, x: torch.Tensor) -> torch.Tensor:
    """What the torch layer standing for ``lay`` takes, given the tensor the node multiplies."""
    if lay.op == "MatMul":
        return x if lay.side == "right" else x.transpose(-1, -2)
    if lay.op == "Gemm":
        return x.T if lay.trans_a else x
    dims = x.dim() - 2
    begin, end = conv_pads(lay, list(x.shape[2:]))
    return F.pad(x, [p for i in reversed(range(dims)) for p in (begin[i], end[i])])


def conv_pads(lay: OnnxLayer, spatial: list[int]) -> tuple[list[int], list[int]]:
    """The (begin, end) zero padding of each spatial axis of a Conv, from ``pads`` or ``auto_pad``."""
    k = list(lay.shape[2:])
    dims = len(k)
    s = list(lay.conv.get("strides", [1] * dims))
    d = list(lay.conv.get("dilations", [1] * dims))
    auto = lay.conv.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [max(0, (math.ceil(i / st) - 1) * st + (kk - 1) * dd + 1 - i)
                 for i, st, kk, dd in zip(spatial, s, k, d, strict=True)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        return (small, big) if auto == "SAME_UPPER" else (big, small)
    if auto == "VALID":
        return [0] * dims, [0] * dims
    pads = list(lay.conv.get("pads", [0] * 2 * dims))
    return pads[:dims], pads[dims:]


def analyze_onnx(model: OnnxModel, *, calibration: Any = None, **options: Any) -> Plan:
    """:func:`compressor.analysis.analyze.analyze` over an ONNX graph's layers (same options, same plan).

    With ``calibration`` the factors are whitened by each layer's input statistics, collected by running
    the original graph in onnxruntime; ranks follow the whitened spectra (no sequential refits and no
    measured sensitivity: see :data:`ONNX_CALIBRATION_NOTE`)."""
    extra = dict(calibration=calibration, sequential=False, sensitivity=False) if calibration is not None else {}
    plan = analyze(model, **options, **extra)
    for lp in plan.layers:
        lay = model.onnx_layers.get(lp.name)
        if lay is not None and lay.skip is not None:
            lp.kind, lp.reason = lay.op, lay.skip
    plan.params_total_before = model.graph.float_params()
    if calibration is not None:
        plan.notes.append(ONNX_CALIBRATION_NOTE)
    return plan
