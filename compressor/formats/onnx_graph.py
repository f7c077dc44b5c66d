"""ONNX files as compressor reads them: the graph (weights left on disk), its factorizable layers, weights
read one tensor at a time, onnxruntime sessions of (parts of) the graph and the inputs they are fed.

    graph = read_onnx("model.onnx")           # checked; external data is not loaded
    for layer in graph.layers: ...            # every MatMul / Gemm / Conv whose weight is an initializer
    w = graph.array(layer.weight)             # that weight, memory-mapped when it is external data

A layer is a MatMul with a constant initializer on either side, a Gemm whose second operand is one
(``transB`` or not, ``alpha`` folded into the matrix) or a Conv (1 to 3 spatial dims). A weight shared by
several nodes, one reaching its node through Cast / DequantizeLinear / Transpose, a grouped Conv or a
weight of a dtype other than float16/32/64 is listed with the reason it stays dense.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import file_in_folder, regular_file
from compressor.data.inputs import flatten
from compressor.formats.runtime import session as runtime_session

LAYER_OPS = ("MatMul", "Gemm", "Conv")
# Nodes a weight may pass through on its way to a layer; such a weight is reported, not factored.
PASS_OPS = ("Cast", "DequantizeLinear", "Transpose", "Reshape", "Identity")
FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # TensorProto.FLOAT, FLOAT16, DOUBLE
ONNX_FIX = "pass a valid .onnx file (onnx.checker.check_model must accept it)"
# Tags of the ModelProto fields that can follow ir_version (2-8: producer, domain, version, doc, graph,
# opset_import; 14: metadata_props; 20: functions).
ONNX_THIRD_BYTES = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2}


@dataclass
class OnnxLayer:
    """One MatMul / Gemm / Conv node with a weight initializer: ``y = W x`` with ``W`` of shape
    ``matrix_shape`` ``(m, n)``, as compressor's handlers see it (a conv as ``(out, in * prod(kernel))``)."""

    name: str  # the layer's name in the plan (the torch module it came from, when the exporter recorded it)
    node: str  # the node's name (may be empty: ONNX does not require one)
    op: str  # "MatMul", "Gemm" or "Conv"
    weight: str  # the initializer's name
    shape: tuple[int, ...]  # the initializer's shape
    input: str  # the activation the layer multiplies
    side: str = "right"  # MatMul: "right" (x @ W) or "left" (W @ x)
    trans_a: bool = False  # Gemm
    trans_b: bool = False  # Gemm
    alpha: float = 1.0  # Gemm
    beta: float = 1.0  # Gemm
    bias: str | None = None  # Gemm C / Conv B initializer
    conv: dict[str, Any] = field(default_factory=dict)  # Conv attributes: strides, pads, dilations, auto_pad
    skip: str | None = None  # why it stays dense
    index: int = -1  # the node's position in the graph
    output: str = ""  # the node's output

    @property
    def matrix_shape(self) -> tuple[int, int]:
        if self.op == "Conv":
            return self.shape[0], int(np.prod(self.shape[1:]))
        if self.op == "MatMul":
            return (self.shape[1], self.shape[0]) if self.side == "right" else (self.shape[0], self.shape[1])
        return (self.shape[0], self.shape[1]) if self.trans_b else (self.shape[1], self.shape[0])


@dataclass
class OnnxGraph:
    """An ONNX model read with its weights left where they are (``array`` reads one)."""

    path: Path
    model: Any  # onnx.ModelProto, external data not loaded
    layers: list[OnnxLayer]
    inits: dict[str, Any] = field(repr=False)  # name -> TensorProto of the main graph

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def array(self, name: str) -> np.ndarray:
        """The initializer ``name`` as an array: a copy-on-write memory map for external data (nothing is
        read until used, and the OS may drop its pages again), else decoded from the protobuf."""
        return tensor_array(self.inits[name], self.base_dir)

    def inputs(self) -> list[Any]:
        """The graph inputs a caller feeds (initializers listed as inputs by old exporters excluded)."""
        return [i for i in self.model.graph.input if i.name not in self.inits]

    def float_params(self) -> int:
        """Elements of every floating-point initializer (the model's parameters)."""
        return sum(int(np.prod(t.dims)) for t in self.inits.values() if t.data_type in FLOAT_TYPES)


def is_onnx(path: str | Path) -> bool:
    """Whether ``path`` is a file whose content parses as an ONNX model (a graph with a node or an input)."""
    path = Path(path)
    if not onnx_head(path):
        return False
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # any parse failure means "not ONNX"; read_onnx reports the details
        return False
    return model.ir_version > 0 and (len(model.graph.node) > 0 or len(model.graph.input) > 0)


def onnx_head(path: str | Path) -> bool:
    """Whether the file ``path`` starts as ONNX files do (a truncated one too): field 1 (ir_version, a small
    varint), then the tag of a later ModelProto field. Read before parsing, which reads the whole file."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 3 or head[0] != 0x08 or not 1 <= head[1] < 0x80 or head[2] not in ONNX_THIRD_BYTES:
        return False
    return head[8:9] != b"{"  # else a safetensors header (a large one can start with 0x08 too)


def read_onnx(path: str | Path) -> OnnxGraph:
    """Read and check ``path``; find its layers. External data stays on disk."""
    import onnx

    path = regular_file(path, "ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise CompressorError(f"'{path}' does not load as ONNX ({type(err).__name__}: {_line(err)})",
                              ONNX_FIX) from None
    try:
        onnx.checker.check_model(str(path))  # by path: external data and files past 2 GB are checked too
    except Exception as err:
        raise CompressorError(f"'{path}' fails onnx.checker ({_line(err)})", ONNX_FIX) from None
    newest = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and not 1 <= o.version <= newest:
            # The checker lets it through; onnxruntime refuses to load it later.
            raise CompressorError(f"'{path}' is stamped with opset {o.version}, which onnx and onnxruntime do not "
                                  f"know (1 to {newest})", "export the model again with a released opset")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    result = OnnxGraph(path, model, [], inits)
    # From IR 4 on, an initializer listed as a graph input is a default a caller may override: not a constant.
    overridable = {i.name for i in graph.input} if model.ir_version >= 4 else set()
    result.layers = _layers(graph, inits, overridable)
    return result


def _line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else ""


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _layers(graph, inits: dict[str, Any], overridable: set[str]) -> list[OnnxLayer]:
    uses: dict[str, int] = {}
    producer: dict[str, Any] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
        for name in node.output:
            producer[name] = node
    for out in graph.output:
        uses[out.name] = uses.get(out.name, 0) + 1
    for node in graph.node:  # subgraphs (If / Loop bodies) reading a main-graph weight are uses too
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                for inner in _all_nodes(sub):
                    for name in inner.input:
                        uses[name] = uses.get(name, 0) + 1

    def through(name: str) -> tuple[str | None, list[str]]:
        """The initializer behind ``name`` via pass-through nodes, and those nodes' ops."""
        ops: list[str] = []
        while name not in inits and name in producer and producer[name].op_type in PASS_OPS and len(ops) < 4:
            ops.append(producer[name].op_type)
            name = producer[name].input[0]
        return (name if name in inits else None), ops

    found: list[OnnxLayer] = []
    for index, node in enumerate(graph.node):
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        layer = _layer(node, inits, _attrs(node))
        if layer is None:  # no initializer operand: maybe one behind a Cast / DequantizeLinear
            for i in (1, 0) if node.op_type == "MatMul" else (1,):
                init, ops = through(node.input[i])
                if init is not None and ops:
                    chain = " -> ".join(reversed(ops))
                    layer = OnnxLayer("", node.name, node.op_type, init, tuple(inits[init].dims), node.input[1 - i],
                                      skip=f"its weight reaches the {node.op_type} through {chain}; only a weight "
                                           "stored as the node's own initializer is factored")
                    break
            if layer is None:
                continue
        w = inits[layer.weight]
        if layer.skip is None:
            if layer.weight in overridable:
                layer.skip = (f"initializer '{layer.weight}' is also a graph input (a caller may feed another "
                              "value); factoring it would drop that input")
            elif uses.get(layer.weight, 0) > 1:
                layer.skip = (f"initializer '{layer.weight}' is used {uses[layer.weight]} times in the graph "
                              "(shared); factoring one use would store it twice")
            elif w.data_type not in FLOAT_TYPES:
                layer.skip = f"weight type {_type_name(w.data_type)} is not floating point"
        layer.name = module_name(layer.weight, node) or layer.weight
        layer.index, layer.output = index, node.output[0]
        found.append(layer)
    _unique_names(found)
    return found


def _layer(node, inits: dict[str, Any], attrs: dict[str, Any]) -> OnnxLayer | None:
    a, b = node.input[0], node.input[1]
    if node.op_type == "MatMul":
        if b in inits and a not in inits and len(inits[b].dims) == 2:
            return OnnxLayer("", node.name, "MatMul", b, tuple(inits[b].dims), a, side="right")
        if a in inits and b not in inits and len(inits[a].dims) == 2:
            return OnnxLayer("", node.name, "MatMul", a, tuple(inits[a].dims), b, side="left")
        if (a in inits) == (b in inits):
            return None  # two activations (attention scores), or two constants
        const = b if b in inits else a
        return OnnxLayer("", node.name, "MatMul", const, tuple(inits[const].dims), b if const == a else a,
                         skip=f"a {len(inits[const].dims)}-D weight is not one matrix")
    if node.op_type == "Gemm":
        if b not in inits or a in inits:
            if a in inits and b not in inits:
                return OnnxLayer("", node.name, "Gemm", a, tuple(inits[a].dims), b,
                                 skip="the Gemm's constant is its first operand (A); only B is factored")
            return None
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        layer = OnnxLayer("", node.name, "Gemm", b, tuple(inits[b].dims), a, trans_a=bool(attrs.get("transA", 0)),
                          trans_b=bool(attrs.get("transB", 0)), alpha=float(attrs.get("alpha", 1.0)),
                          beta=float(attrs.get("beta", 1.0)), bias=c)
        if c is not None and c not in inits:
            layer.skip = "the Gemm's C is computed at run time, not an initializer"
        return layer
    if b not in inits or a in inits:
        return None
    dims = len(inits[b].dims)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    layer = OnnxLayer("", node.name, "Conv", b, tuple(inits[b].dims), a, bias=bias,
                      conv={k: attrs[k] for k in ("strides", "pads", "dilations", "auto_pad") if k in attrs})
    if bias is not None and bias not in inits:
        layer.skip = "the Conv's bias is computed at run time, not an initializer"
    elif attrs.get("group", 1) != 1:
        layer.skip = f"grouped/depthwise conv (group={attrs['group']}) has no single weight matrix to factor"
    elif not 3 <= dims <= 5:
        layer.skip = f"a {dims}-D conv weight is not supported (1 to 3 spatial dimensions are)"
    elif isinstance(layer.conv.get("auto_pad"), bytes | str) and _text(layer.conv["auto_pad"]) not in (
            "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        layer.skip = f"unknown auto_pad {_text(layer.conv['auto_pad'])!r}"
    return layer


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _type_name(data_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(data_type)


def _all_nodes(graph) -> Iterator[Any]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_nodes(sub)


def module_name(weight: str, node) -> str | None:
    """The torch module a weight node computes, as the exporters record it: the dynamo exporter in the
    node's ``name_scopes`` metadata (its weights may be renamed ``val_N`` once a Transpose is folded
    into them), the legacy exporter in the node's name (``/model/encoder/layer.0/.../MatMul``; weights
    ``onnx::MatMul_N``); else the weight's own name (``<module>.weight``)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)  # a list of strings; the last is the op's own name
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                break  # not what the exporter writes: ignored
            if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str) and scopes[-2]:
                return scopes[-2]
    if node.name.startswith("/") and node.name.count("/") >= 2:
        # Each scope is a module's name from its last non-numeric atom on ("encoder", "layer.0"), so a
        # child of a Sequential that ran as a module repeats the Sequential's name: "/model/model.0/".
        atoms: list[str] = []
        for scope in node.name.split("/")[1:-1]:
            head, *rest = scope.split(".")
            atoms += rest if atoms and atoms[-1] == head and rest else [head, *rest]
        return ".".join(atoms)
    return weight.removesuffix(".weight") if weight.endswith(".weight") else None


def _unique_names(layers: list[OnnxLayer]) -> None:
    """compressor's own exports wrap the model as ``model``: drop that prefix when every layer has it (so
    names match the torch model's); a name used twice gets its node's name appended."""
    if layers and all(lay.name.startswith("model.") for lay in layers):
        for lay in layers:
            lay.name = lay.name.removeprefix("model.")
    counts: dict[str, int] = {}
    for lay in layers:
        counts[lay.name] = counts.get(lay.name, 0) + 1
    for lay in layers:
        if counts[lay.name] > 1:
            lay.name = f"{lay.name}:{lay.node or lay.index}"


# ------------------------------------------------------------------------------------ tensors


def tensor_array(tensor, base_dir: Path) -> np.ndarray:
    """The data of a TensorProto; external data is memory-mapped copy-on-write (never modified on disk)."""
    from onnx import numpy_helper

    if tensor.data_location != 1:  # DEFAULT: in the protobuf
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = FLOAT_TYPES.get(tensor.data_type)
    if dtype is None:
        raise CompressorError(f"external tensor '{tensor.name}' has type {_type_name(tensor.data_type)}, which "
                              "compressor does not read", ONNX_FIX)
    file = external_file(base_dir, info.get("location", ""))
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape))
    offset = int(info.get("offset", 0))
    if count == 0:
        return np.zeros(shape, dtype)
    need = offset + count * np.dtype(dtype).itemsize
    if offset < 0 or file.stat().st_size < need:
        raise CompressorError(f"external data of tensor '{tensor.name}' needs bytes up to {need} of '{file}', "
                              f"which holds {file.stat().st_size}", "the .data file is truncated: copy it again")
    return np.memmap(file, dtype=np.dtype(dtype).newbyteorder("<"), mode="c", offset=offset, shape=shape)


def external_file(base_dir: Path, location: str) -> Path:
    """The file an external-data ``location`` names, refused when it leaves the model's folder."""
    if not location or os.path.isabs(location):
        raise CompressorError(f"external data location '{location}' is outside the model's folder", ONNX_FIX)
    return file_in_folder(base_dir, base_dir / location, "external data file")  # the shared rule: no link out


# ----------------------------------------------------------------------------------- running


def session(graph: OnnxGraph, model=None):
    """An onnxruntime CPU session of ``model`` (a ModelProto; default ``graph.model``) whose external
    data is read from ``graph``'s folder."""
    proto = model if model is not None else graph.model
    # No arena: a graph run in segments holds one session per segment, and each arena would keep the
    # peak activation memory of its segment (measured: 8.7 GB resident for MiniLM on 256 sentences).
    config = {"session.model_external_initializers_file_folder_path": str(graph.base_dir.resolve())}
    try:
        return runtime_session(proto.SerializeToString(), arena=False, config=config)
    except Exception as err:
        raise CompressorError(f"onnxruntime cannot run '{graph.path}' ({_line(err)})",
                              "check the model in onnxruntime first") from None


_NP_OF_ORT = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
              "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def feeds(sess, batch: Any) -> dict[str, np.ndarray]:
    """``batch`` (a tensor, a tuple: by name when its names (:func:`flatten`) are the graph's inputs, as in a
    graph compressor exported, else positional in graph-input order; or a mapping: by name) as the inputs
    of ``sess`` (an onnxruntime session, or an :class:`OnnxGraph`), each cast to the type the graph
    declares. Mapping keys the graph lacks are dropped."""
    if isinstance(sess, OnnxGraph):
        import onnx

        wanted = [(i.name, onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
                  for i in sess.inputs()]
    else:
        wanted = [(i.name, _NP_OF_ORT.get(i.type)) for i in sess.get_inputs()]
    if isinstance(batch, Mapping):
        given = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    else:
        names, tensors = flatten(batch)
        if {n for n, _ in wanted} <= set(names):  # exported from these inputs (an unused one may be pruned)
            given = dict(zip(names, tensors, strict=True))
        elif len(tensors) != len(wanted):
            raise CompressorError(f"the graph takes {len(wanted)} input(s) ({', '.join(n for n, _ in wanted)}), "
                                  f"the data gives {len(tensors)}", "give one tensor per graph input, or a dict "
                                  "keyed by the graph's input names")
        else:
            given = dict(zip([n for n, _ in wanted], tensors, strict=True))
    missing = [n for n, _ in wanted if n not in given]
    if missing:
        raise CompressorError(f"the data has no tensor for graph input(s) {', '.join(missing)} (it has "
                              f"{', '.join(given) or 'none'})", "save the inputs as a dict keyed by the graph's "
                              "input names (e.g. numpy.savez(path, input_ids=..., attention_mask=...))")
    out = {}
    for name, dtype in wanted:
        arr = given[name].detach().cpu().numpy()
        out[name] = arr.astype(dtype or arr.dtype, copy=False)
    return out
