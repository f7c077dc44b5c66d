"""What an exported graph's structure says: the weights that feed MatMul/Gemm/Conv/Gather nodes (through
Transpose, Cast, DequantizeLinear, ...) and their shapes, and whether every factored layer of a plan stayed two
factors (:func:`check_factored_graph`: no exporter may multiply them back into one matrix)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from compressor.core.handlers import handler_of_kind
from compressor.core.plan import Plan
from compressor.export.onnx_files import load_graph

# Nodes that multiply by (or look up in) a weight, and nodes a weight may pass through on its way there
# (pre-transposed, cast from fp16, dequantized from int8).
_WEIGHT_OPS = {"MatMul", "Gemm", "Conv", "Gather", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
               "QLinearMatMul", "QLinearConv", "FusedMatMul", "MatMulNBits",
               "GatherBlockQuantized"}
_PASS_OPS = {"Transpose", "Cast", "DequantizeLinear", "Reshape", "Identity", "Squeeze", "Unsqueeze"}


def weight_shapes(onnx_path_or_model: Any) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every constant (initializer or Constant node) of 2 or more dimensions that
    feeds, directly or through Transpose/Cast/DequantizeLinear/..., a MatMul/Gemm/Conv/Gather node."""
    model = load_graph(onnx_path_or_model)
    graph = model.graph
    consts = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = tuple(attr.t.dims)
    used = {name for name, _, _ in weight_uses(graph, consts)}
    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.input[1] in consts:
            # Stored packed as (N, blocks, bytes per block): the weight it multiplies by is (K, N).
            attrs = {a.name: a.i for a in node.attribute}
            consts[node.input[1]] = (attrs["K"], attrs["N"])
        bits = next((a.i for a in node.attribute if a.name == "bits"), None)
        if node.op_type == "GatherBlockQuantized" and bits and node.input[0] in consts:
            # A uint8 table packs 8 // bits values a byte along its last axis (export.int4._pack_gather_nibbles).
            *rows, packed = consts[node.input[0]]
            consts[node.input[0]] = (*rows, packed * (8 // bits))
    return {n: s for n, s in consts.items() if len(s) >= 2 and n in used}


def weight_uses(graph, names) -> Iterator[tuple[str, Any, tuple]]:
    """``(name, weight node, nodes passed through)`` for each of the tensors ``names`` that feeds a
    MatMul/Gemm/Conv/Gather/... node, directly or through Transpose/Cast/DequantizeLinear/..."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def walk(name: str, path: tuple, depth: int = 0):
        for node in consumers.get(name, []):
            if node.op_type in _WEIGHT_OPS:
                yield node, path
            elif node.op_type in _PASS_OPS and depth < 4:
                yield from walk(node.output[0], (*path, node), depth + 1)

    for name in names:
        for node, path in walk(name, ()):
            yield name, node, path


def _key(shape) -> tuple[int, ...]:
    # A 2-D weight may be stored transposed (MatMul wants (in, out), Gemm keeps (out, in)).
    shape = tuple(int(d) for d in shape)
    return tuple(sorted(shape)) if len(shape) == 2 else shape


def _factor_shapes(lp) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the (down, up) factor weights of a factored layer, from its kind's handler."""
    return handler_of_kind(lp.kind).factor_shapes(lp.shape, lp.rank)


def check_factored_graph(onnx_path_or_model: Any, plan: Plan) -> list[str]:
    """Problems (empty when fine) with the factored layers of ``plan`` in an exported graph: each must
    appear as its two factor weights feeding MatMul/Gemm/Conv/Gather nodes, and no dense ``m x n``
    weight may be left for it (by name, or one more dense-shaped weight than the plan's dense layers
    of that shape explain)."""
    shapes = weight_shapes(onnx_path_or_model)
    have = Counter(_key(s) for s in shapes.values())
    factored = plan.factored
    need = Counter(_key(s) for lp in factored for s in _factor_shapes(lp))
    dense_ok = Counter(_key(lp.shape) for lp in plan.layers if lp.rank is None)
    problems = []
    left = have.copy()
    for lp in factored:
        for what, shape in zip(("down", "up"), _factor_shapes(lp), strict=True):
            if left[_key(shape)] > 0:
                left[_key(shape)] -= 1
            else:
                problems.append(f"layer '{lp.name}': no {'x'.join(map(str, shape))} {what} factor weight "
                                "feeds a MatMul/Gemm/Conv/Gather node")
        named = [n for n in shapes if n == f"{lp.name}.weight" or n.endswith(f".{lp.name}.weight")]
        if named:
            problems.append(f"layer '{lp.name}': its dense weight '{named[0]}' is in the graph")
    for key in sorted({_key(lp.shape) for lp in factored}):
        extra = have[key] - dense_ok[key] - need[key]
        if extra > 0:
            names = [lp.name for lp in factored if _key(lp.shape) == key]
            problems.append(f"{extra} dense {'x'.join(map(str, key))} weight(s) more than the plan's dense "
                            f"layers explain: the factors of {', '.join(names[:3])}"
                            f"{' ...' if len(names) > 3 else ''} were multiplied back together")
    return problems
