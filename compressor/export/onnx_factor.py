"""Factor the layers of an existing ONNX graph in place, and compare the result with the original graph.

    write_factored(graph, {"encoder.layer.0.attention.self.query": (up, down), ...}, "out/model.onnx")
    v = validate_onnx("out/model.onnx", "model.onnx", inputs, atol=None)   # onnxruntime vs the ORIGINAL file

Each factored node becomes two nodes of its own kind: ``MatMul(x, W)`` -> ``MatMul(MatMul(x, D), U)``
(``W @ x`` -> ``U @ (D @ x)``), ``Gemm(a, B, C)`` -> ``Gemm(Gemm(a, D), U, C)`` (same ``transA``/``transB``
layout, ``alpha`` folded into the factors, ``beta`` kept), ``Conv(x, W, B)`` -> the original kernel,
strides, pads and dilations to ``rank`` channels, then a 1x1 Conv with the bias (as
:class:`compressor.core.layers.LowRankConv`), or, for a 2-D Conv the plan gives the spatial decomposition
(kind "conv2d-spatial"), a ``kh x 1`` Conv to ``rank`` channels, then a ``1 x kw`` Conv with the bias (as
:class:`compressor.core.layers.LowRankSpatialConv`). Everything else is kept as it was: node and tensor names,
opset, metadata, and the bytes of every other weight. Weights that were external data are copied one
tensor at a time into ``<model>.data`` beside the output (never all in memory); factors of an external
weight are written there too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write_bytes
from compressor.data.inputs import attention_mask, batches_fidelity
from compressor.export.onnx_files import onnx_outputs, onnx_session
from compressor.formats.onnx_graph import OnnxGraph, OnnxLayer, external_file

ALIGN = 4096  # external tensors start at multiples of this (memory-mappable, as onnx aligns large tensors)
CHUNK = 64 << 20  # bytes copied at a time from the input's external data


def _factor_tensors(lay: OnnxLayer, up: torch.Tensor, down: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The (first, second) node's weights, laid out as ``lay``'s node stores its weight."""
    up, down = up.detach().cpu().numpy(), down.detach().cpu().numpy()
    if lay.op == "Conv":
        return down, up  # (r, C, *k) and (m, r, 1, ...): LowRankConv's own layout
    m, r = up.shape[0], down.shape[0]
    up, down = up.reshape(m, r), down.reshape(r, -1)
    if lay.op == "MatMul":
        return (down.T, up.T) if lay.side == "right" else (down, up)
    return (down, up) if lay.trans_b else (down.T, up.T)


def is_spatial(lay: OnnxLayer, down: torch.Tensor) -> bool:
    """Whether ``down`` is the first factor of the spatial decomposition of the 2-D Conv ``lay`` (a ``kh x 1``
    kernel where the Conv's is ``kh x kw``, ``kw > 1``; the channel decomposition keeps the whole kernel)."""
    return lay.op == "Conv" and len(lay.shape) == 4 and lay.shape[3] > 1 and tuple(down.shape[2:]) == (lay.shape[2], 1)


def spatial_conv_attrs(lay: OnnxLayer, attrs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The attributes of the ``kh x 1`` and the ``1 x kw`` Conv replacing ``lay`` (as
    :class:`compressor.core.layers.LowRankSpatialConv`): the first keeps the vertical stride, dilation and
    padding, the second the horizontal ones. An ``auto_pad`` is kept on both: along the axis a node does not
    convolve (kernel 1, stride 1) it pads nothing, along the other it pads as the original did."""
    kh, kw = lay.shape[2:]
    (sh, sw), (dh, dw) = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
    first = {"kernel_shape": [kh, 1], "strides": [sh, 1], "dilations": [dh, 1]}
    second = {"kernel_shape": [1, kw], "strides": [1, sw], "dilations": [1, dw]}
    if "auto_pad" in attrs:
        first["auto_pad"] = second["auto_pad"] = attrs["auto_pad"]
    if "pads" in attrs:  # [top, left, bottom, right]
        top, left, bottom, right = attrs["pads"]
        first["pads"], second["pads"] = [top, 0, bottom, 0], [0, left, 0, right]
    return first, second


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


def factored_model(graph: OnnxGraph, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, set[str]]:
    """A copy of ``graph.model`` with each layer named in ``factors`` (``{layer: (up (m, r), down (r, n))}``,
    as :meth:`compressor.core.svd.Decomposition.factors` and the factored torch layers hold them) split into
    two nodes; and the names of new initializers that belong in external data (their weight was there)."""
    import onnx
    from onnx import helper, numpy_helper

    by_name = {lay.name: lay for lay in graph.layers}
    unknown = sorted(set(factors) - set(by_name))
    if unknown:
        raise CompressorError(f"the plan factors {', '.join(unknown[:3])}, which '{graph.path}' does not have",
                              "apply the plan to the ONNX model it was made for")
    by_index = {by_name[n].index: (by_name[n], *factors[n]) for n in factors}
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    g = model.graph
    taken = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
    taken |= {name for node in g.node for name in (*node.input, *node.output, node.name)}
    removed, external, new_inits, nodes = set(), set(), [], []
    for index, node in enumerate(g.node):
        if index not in by_index:
            nodes.append(node)
            continue
        lay, up, down = by_index[index]
        first_w, second_w = _factor_tensors(lay, up, down)
        dtype = helper.tensor_dtype_to_np_dtype(graph.inits[lay.weight].data_type)
        names = [_unique(f"{lay.weight}__{part}", taken) for part in ("down", "up")]
        for name, arr in zip(names, (first_w, second_w), strict=True):
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(arr.astype(dtype, copy=False)), name))
            if graph.inits[lay.weight].data_location == onnx.TensorProto.EXTERNAL:
                external.add(name)
        hidden = _unique(f"{node.output[0]}__low_rank", taken)
        x, attrs = lay.input, {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rest = list(node.input[2:])  # Gemm C / Conv B, on the second node
        if lay.op == "MatMul":
            pairs = ([x, names[0]], [hidden, names[1]]) if lay.side == "right" else ([names[0], x], [names[1], hidden])
            first = helper.make_node("MatMul", pairs[0], [hidden])
            second = helper.make_node("MatMul", pairs[1], list(node.output))
        elif lay.op == "Gemm":
            first = helper.make_node("Gemm", [x, names[0]], [hidden], transA=int(lay.trans_a), transB=int(lay.trans_b))
            second_attrs = {"transB": int(lay.trans_b)}
            if rest and "beta" in attrs:
                second_attrs["beta"] = attrs["beta"]
            second = helper.make_node("Gemm", [hidden, names[1], *rest], list(node.output), **second_attrs)
        elif is_spatial(lay, down):
            first_attrs, second_attrs = spatial_conv_attrs(lay, attrs)
            first = helper.make_node("Conv", [x, names[0]], [hidden], **first_attrs)
            second = helper.make_node("Conv", [hidden, names[1], *rest], list(node.output), **second_attrs)
        else:
            first_attrs = {k: v for k, v in attrs.items() if k != "group"}
            first = helper.make_node("Conv", [x, names[0]], [hidden], **first_attrs)
            ones = [1] * (len(lay.shape) - 2)
            second = helper.make_node("Conv", [hidden, names[1], *rest], list(node.output), kernel_shape=ones)
        for new, part in ((first, "down"), (second, "up")):
            new.name = _unique(f"{node.name or lay.name}__{part}", taken)
            new.domain = node.domain
            new.doc_string = node.doc_string
            new.metadata_props.extend(node.metadata_props)  # keeps the module name the exporter recorded
        nodes += [first, second]
        removed.add(lay.weight)
    g.ClearField("node")
    g.node.extend(nodes)
    kept = [t for t in g.initializer if t.name not in removed] + new_inits
    g.ClearField("initializer")
    g.initializer.extend(kept)
    inputs = [i for i in g.input if i.name not in removed]  # initializers old exporters list as inputs
    g.ClearField("input")
    g.input.extend(inputs)
    return model, external


def _tensors(graph) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers, Constant values, and those of subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _tensors(sub)


def save_onnx(model, path: Path, source_dir: Path, to_external: set[str] = frozenset()) -> Path:
    """Write ``model`` to ``path``: external tensors are copied from the files under ``source_dir`` into
    ``<path>.data``, chunk by chunk; in-memory tensors named in ``to_external`` are moved there too. The
    ``.data`` file only exists when some tensor is external."""
    import onnx

    path = Path(path)
    data_name = f"{path.name}.data"
    moved = [t for t in _tensors(model.graph)
             if t.data_location == onnx.TensorProto.EXTERNAL or t.name in to_external]
    if moved:
        with open(path.parent / data_name, "wb") as out:
            for t in moved:
                pad = (-out.tell()) % ALIGN
                out.write(b"\0" * pad)
                offset = out.tell()
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    info = {e.key: e.value for e in t.external_data}
                    length = _copy(external_file(source_dir, info.get("location", "")), out,
                                   int(info.get("offset", 0)), int(info["length"]) if "length" in info else None)
                else:
                    out.write(t.raw_data)
                    length = len(t.raw_data)
                    t.ClearField("raw_data")
                    t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    t.external_data.add(key=key, value=value)
    atomic_write_bytes(path, model.SerializeToString())
    return path


def _copy(src: Path, out, offset: int, length: int | None) -> int:
    with open(src, "rb") as f:
        f.seek(offset)
        left, done = length, 0
        while left is None or left > 0:
            chunk = f.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            out.write(chunk)
            done += len(chunk)
            left = None if left is None else left - len(chunk)
    if length is not None and done != length:
        raise CompressorError(f"external data file '{src}' ends before the {length} bytes a tensor needs",
                              "the model's .data file is truncated: copy it again")
    return done


def write_factored(graph: OnnxGraph, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path) -> Path:
    """``graph`` with ``factors`` applied (see :func:`factored_model`), written to ``path`` (+ ``.data``)."""
    model, external = factored_model(graph, factors)
    return save_onnx(model, Path(path), graph.base_dir, external)


def onnx_fidelity(reference: str | Path, compressed: str | Path, batches: Sequence[Any],
                  outputs: Sequence[str] = ()) -> dict[str, float]:
    """Cosine (mean, worst sample) and relative error of ``compressed``'s outputs (those named in
    ``outputs``, or every float one) to ``reference``'s, both run in onnxruntime on each of ``batches``
    (every sample counts once)."""
    ref_sess, new_sess = onnx_session(reference), onnx_session(compressed)

    def run(sess, batch: Any) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.asarray(v)) for k, v in onnx_outputs(sess, batch)}

    return batches_fidelity(((run(ref_sess, b), run(new_sess, b), attention_mask(b)) for b in batches),
                            list(outputs) or None)
