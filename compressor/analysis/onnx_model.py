"""An ONNX graph seen as a torch model, so that its weights go through the same analysis as a torch
model's: the same handlers, SVDs, rank policies, calibration statistics and plan.

    graph = read_onnx("model.onnx")
    model = OnnxModel(graph)                    # one nn.Linear / nn.ConvNd per factorizable node
    plan = analyze_onnx(model, energy=0.9)      # or target=0.4, calibration=batches

Each MatMul / Gemm / Conv with a weight initializer becomes the torch layer computing the same ``y = W x``
(a MatMul ``x @ B`` is ``Linear`` with weight ``B^T``; ``A @ x`` is ``Linear`` with weight ``A`` applied to
the columns of ``x``; a Gemm's ``alpha`` is folded into its matrix; a Conv keeps its kernel, strides and
dilations, its padding is applied to the input first). Their names are the plan's layer names, so a plan
made on the torch model applies to its export. Calling the model computes the ORIGINAL graph:
onnxruntime runs the segments between factorizable nodes, and each of those nodes is its torch layer, so
calibration hooks see exactly the rows the graph multiplies, and a hook that swaps a layer's output
changes what follows (sequential refits and sensitivity work as on a torch model). Weights stay
memory-mapped where the file keeps external data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from compressor.analysis.analyze import analyze
from compressor.core.errors import CompressorError
from compressor.core.plan import Plan
from compressor.formats.onnx_graph import OnnxGraph, OnnxLayer, feeds, session


class Dense(nn.Module):
    """A weight the analysis lists but never factors (shared, behind a Cast, grouped conv, ...): its
    ``(m, n)`` matrix shape only (a zero-stride view: no memory)."""

    def __init__(self, m: int, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()).expand(m, n), requires_grad=False)


@dataclass
class _Level:
    """One step of a forward pass: run the graph segment that computes ``targets`` (the inputs of
    ``layers``) from what is known, then the torch ``layers``; then forget the tensors used for the last time."""

    layers: list[OnnxLayer]
    targets: list[str]
    nodes: list[int] = field(default_factory=list)  # node positions of the segment
    inputs: list[str] = field(default_factory=list)  # known tensors the segment reads
    outputs: list[str] = field(default_factory=list)  # tensors it computes that later steps need
    forget: list[str] = field(default_factory=list)
    session: Any = None


class OnnxModel(nn.Module):
    """The factorizable layers of an ONNX graph as torch modules named like the plan's layers.

    Calling it computes the graph: onnxruntime runs the segments between factorizable nodes, and each
    factorizable node is computed by its torch module, so hooks see every layer's input and a hook that
    replaces a layer's output changes what the graph computes after it (as in a torch model: the
    calibration's sequential refits and sensitivity run unchanged). Returns ``{output name: tensor}``."""

    def __init__(self, graph: OnnxGraph):
        super().__init__()
        self.graph = graph
        self.onnx_layers: dict[str, OnnxLayer] = {}
        self._levels: list[_Level] | None = None
        # Probe replay (see :meth:`recording`): per recorded forward, what is known at each level's layers.
        self._recorded: list[list[dict[str, Any]]] | None = None
        self._resume: tuple[int, dict[str, Any]] | None = None
        self._kept: list[list[dict[str, Any]]] = []
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

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        batch = kwargs if kwargs else args[0] if len(args) == 1 else tuple(args)
        if self._levels is None:
            self._levels = self._schedule()
        start, known = 0, None
        if self._resume is not None:
            start, snapshot = self._resume
            known = dict(snapshot)
        else:
            known = dict(feeds(self.graph, batch))
        snapshots = [] if self._recorded is not None else None
        for k, level in enumerate(self._levels[start:], start):
            if level.nodes and (k > start or self._resume is None):
                feed = {n: _array(known[n]) for n in level.inputs}
                if level.session is None:
                    level.session = self._segment(level, feed)
                got = level.session.run(level.outputs, feed)
                known.update(zip(level.outputs, got, strict=True))
            if snapshots is not None:  # a shallow copy: no step changes a tensor it did not make
                snapshots.append(dict(known))
            for lay in level.layers:
                module = self.get_submodule(lay.name)
                x = _torch(known[lay.input]).to(module.weight.dtype)
                known[lay.output] = layer_output(self.graph, lay, module(layer_input(lay, x)))
            for name in level.forget:
                known.pop(name, None)
        if snapshots is not None:
            self._recorded.append(snapshots)
        return {o.name: _torch(known[o.name]) for o in self.graph.model.graph.output}

    # ------------------------------------------------------------------------ probe replay
    @contextmanager
    def recording(self) -> Iterator[None]:
        """Each forward in this context keeps, per level, the tensors known when its layers start (the
        k-th forward: batch k for :meth:`replaying`). Ends any earlier recording."""
        self._recorded = []
        try:
            yield
        finally:
            self._kept, self._recorded = self._recorded, None

    @contextmanager
    def replaying(self, layer: nn.Module, batch: int) -> Iterator[None]:
        """The next forwards start at ``layer``'s level from what the ``batch``-th recorded forward knew
        there: the graph segments and layers before it do not run again (they would compute the same)."""
        if self._levels is None:
            self._levels = self._schedule()
        level = next((k for k, lv in enumerate(self._levels)
                      if any(self.get_submodule(lay.name) is layer for lay in lv.layers)), None)
        if level is None:  # not a layer of this graph's schedule: run in full
            yield
            return
        self._resume = (level, self._kept[batch][level])
        try:
            yield
        finally:
            self._resume = None

    # -------------------------------------------------------------------------------- scheduling
    def _schedule(self) -> list[_Level]:
        """Levels of factorizable layers (a layer's level: one more than the deepest it depends on), the
        graph segment each level needs, and when each tensor is needed for the last time."""
        g = self.graph.model.graph
        cut = {lay.index: lay for lay in self.onnx_layers.values() if lay.skip is None}
        producer = {name: i for i, node in enumerate(g.node) for name in node.output if name}
        depth: dict[str, int] = {}  # tensor -> how many factorizable layers deep it is (0: none before it)
        for i, node in enumerate(g.node):
            d = max((depth.get(name, 0) for name in _reads(node)), default=0)
            for name in node.output:
                depth[name] = d + 1 if i in cut else d
        by_level: dict[int, list[OnnxLayer]] = {}
        for lay in cut.values():
            by_level.setdefault(depth.get(lay.input, 0), []).append(lay)
        finals = [o.name for o in g.output]
        levels = [_Level(sorted(by_level[d], key=lambda lay: lay.index), []) for d in sorted(by_level)]
        levels.append(_Level([], finals))
        for level in levels:
            level.targets = list(dict.fromkeys([lay.input for lay in level.layers] + level.targets))
        known = {i.name for i in self.graph.inputs()} | set(self.graph.inits)
        computed: set[int] = set()
        for level in levels:
            need: set[int] = set()
            stack = [t for t in level.targets if t not in known]
            while stack:
                name = stack.pop()
                i = producer.get(name)
                if i is None or i in need or name in known:
                    continue
                if i in cut or i in computed:
                    raise CompressorError(f"cannot schedule the graph of '{self.graph.path}' around its layers",
                                          "report the model")
                need.add(i)
                stack += [n for n in _reads(g.node[i]) if n not in known]
            level.nodes = sorted(need)
            computed |= need
            made = {name for i in need for name in g.node[i].output if name}
            level.inputs = sorted({n for i in need for n in _reads(g.node[i])
                                   if n in known and n not in self.graph.inits} - made)
            level.outputs = sorted(made)  # trimmed below to what later steps read
            known |= made | {lay.output for lay in level.layers}
        # Keep only outputs read later (or graph outputs); forget each tensor after its last reader.
        last: dict[str, int] = {}
        for k, level in enumerate(levels):
            for name in level.inputs + [lay.input for lay in level.layers]:
                last[name] = k
        for k, level in enumerate(levels):
            level.outputs = [n for n in level.outputs if last.get(n, -1) > k or n in finals
                             or n in {lay.input for lay in level.layers}]
        for name, k in last.items():
            if name not in finals:
                levels[k].forget.append(name)
        return levels

    def _segment(self, level: _Level, feed: dict[str, np.ndarray]):
        """An onnxruntime session of one segment of the graph, its inputs typed from ``feed``."""
        import onnx

        g = self.graph.model.graph
        nodes = [g.node[i] for i in level.nodes]
        used = {n for node in nodes for n in _reads(node)}
        sub = onnx.ModelProto()
        sub.CopyFrom(self.graph.model)
        del sub.graph.node[:]
        sub.graph.node.extend(nodes)
        del sub.graph.initializer[:]
        sub.graph.initializer.extend(t for t in g.initializer if t.name in used)
        del sub.graph.input[:]
        sub.graph.input.extend(onnx.helper.make_tensor_value_info(
            n, onnx.helper.np_dtype_to_tensor_dtype(feed[n].dtype), None) for n in level.inputs)
        del sub.graph.output[:]
        sub.graph.output.extend(onnx.ValueInfoProto(name=n) for n in level.outputs)
        del sub.graph.value_info[:]
        return session(self.graph, model=sub)


def _reads(node) -> list[str]:
    """The tensors a node reads: its inputs, and names its subgraphs read from the enclosing graph."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            inner = {o for n in _nodes(sub) for o in n.output} | {t.name for t in sub.initializer} | \
                    {i.name for i in sub.input}
            names += [n for x in _nodes(sub) for n in x.input if n and n not in inner]
    return names


def _nodes(graph) -> list[Any]:
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                out += _nodes(sub)
    return out


def _torch(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def _array(value: Any) -> np.ndarray:
    return value.detach().cpu().contiguous().numpy() if isinstance(value, torch.Tensor) else value


def _tensor(arr: np.ndarray) -> torch.Tensor:
    # A copy-on-write memory map is writable: it stays a map; decoded protobuf data may be read-only.
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _layer_module(graph: OnnxGraph, lay: OnnxLayer) -> nn.Module:
    m, n = lay.matrix_shape
    if lay.skip is not None:
        return Dense(m, n)
    w = _tensor(graph.array(lay.weight))
    bias = None
    if folded_bias(graph, lay):  # Gemm's beta * C, or Conv's B: the torch layer's own bias
        bias = _tensor(graph.array(lay.bias)).reshape(m) * (lay.beta if lay.op == "Gemm" else 1.0)
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


def folded_bias(graph: OnnxGraph, lay: OnnxLayer) -> bool:
    """Whether the node's bias is a vector over its outputs (the torch layer then carries it)."""
    if lay.bias is None:
        return False
    dims = list(graph.inits[lay.bias].dims)
    return dims in ([lay.matrix_shape[0]], [1, lay.matrix_shape[0]]) and lay.op in ("Gemm", "Conv")


def layer_output(graph: OnnxGraph, lay: OnnxLayer, y: torch.Tensor) -> torch.Tensor:
    """The node's output, given what its torch layer returned."""
    if lay.op == "MatMul" and lay.side == "left":
        return y.transpose(-1, -2)
    if lay.op == "Gemm" and lay.bias is not None and not folded_bias(graph, lay):
        return y + lay.beta * _torch(graph.array(lay.bias)).to(y.dtype)
    return y


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

    With ``calibration`` (batches keyed by the graph's input names, or positional) the analysis is the
    torch path's data-aware one: whitened factors, sequential refits and measured output sensitivity,
    computed by running the graph (see :class:`OnnxModel`)."""
    plan = analyze(model, **options, **({"calibration": calibration} if calibration is not None else {}))
    for lp in plan.layers:
        lay = model.onnx_layers.get(lp.name)
        if lay is not None and lay.skip is not None:
            lp.kind, lp.reason = lay.op, lay.skip
    plan.params_total_before = model.graph.float_params()
    return plan
