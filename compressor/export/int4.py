"""The int4 variant: onnxruntime's 4-bit weight-only quantization (MatMulNBits, GatherBlockQuantized), with an
optional low-rank correction of chosen layers computed beside their 4-bit MatMuls (the factors from
:mod:`compressor.analysis.int4`), and the checks of its settings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_files
from compressor.core.handlers import DYNAMIC_INT8_LEVELS
from compressor.core.int4 import INT4_BLOCK_SIZE, INT4_SYMMETRIC
from compressor.export.fp16 import store_fp16
from compressor.export.graph import weight_uses
from compressor.export.onnx_files import first_line, load_full, quiet, save_atomic, save_onnx
from compressor.formats.onnx_graph import module_name

FACTOR_STORAGE = ("fp16", "int8")  # how export_int4 stores correction factors; the first is the default
# MatMulNBits' accuracy_level: the precision its inputs are multiplied in. 0 (unset) dequantizes the 4-bit
# weights to float32 and multiplies in float32; 4 quantizes each input row to int8 per block and uses
# the CPU's int8 dot-product kernels. Measured on all-MiniLM-L6-v2 as .ort files, batch 1, 1 thread,
# onnxruntime 1.32 (benchmarks/results/edge_minilm.md): on a 29-token sentence level 4 ran at 0.71-0.86x
# level 0's latency (every block size, with and without a correction); padded to 64 tokens, 0.89-1.04x;
# held-out sentence cosine moved by at most 0.00062.
INT4_ACCURACY_LEVEL = 4
INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # unset, fp32, fp16, bf16, int8 (onnxruntime's MatMulNBits docs)


def check_factor_storage(factors: str) -> str:
    """``factors`` if it is one of :data:`FACTOR_STORAGE`, else :class:`CompressorError`."""
    if factors not in FACTOR_STORAGE:
        raise CompressorError(f"unknown int4 correction factor storage {factors!r}",
                              f"use one of {', '.join(FACTOR_STORAGE)}")
    return factors


def check_int4_block_size(block_size: int) -> int:
    """``block_size`` if onnxruntime's 4-bit kernels take it (a power of two, at least 16), else
    :class:`CompressorError`."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or \
            block_size & (block_size - 1):
        raise CompressorError(f"int4 block size {block_size!r} is not a power of two >= 16 (MatMulNBits and "
                              "GatherBlockQuantized need one)", "pass e.g. block_size=32 or 128",
                              cli_fix="pass e.g. --int4-block-size 32")
    return block_size


def check_int4_accuracy_level(level: int) -> int:
    """``level`` if it is a MatMulNBits accuracy_level (:data:`INT4_ACCURACY_LEVELS`), else
    :class:`CompressorError`."""
    if isinstance(level, bool) or level not in INT4_ACCURACY_LEVELS:
        raise CompressorError(f"int4 accuracy level {level!r} is not one of {INT4_ACCURACY_LEVELS}",
                              f"pass accuracy_level={INT4_ACCURACY_LEVEL} (int8 compute) or 0 (float32)")
    return level


def export_int4(src_onnx: str | Path, dst: str | Path, *, block_size: int = INT4_BLOCK_SIZE,
                corrections: Mapping[str, tuple[Any, Any]] | None = None, factors: str = "fp16",
                accuracy_level: int = INT4_ACCURACY_LEVEL, weights: Mapping[str, Any] | None = None) -> Path:
    """onnxruntime's 4-bit weight-only quantization of ``src_onnx`` (MatMulNBitsQuantizer, asymmetric,
    blocks of ``block_size`` weights along the input dimension): every MatMul/Gemm by a constant weight
    becomes a MatMulNBits node, every embedding lookup a GatherBlockQuantized node; convolutions and the
    rest stay float32. Written atomically; returns ``dst``.

    ``corrections`` maps torch module names (``"encoder.layer.0.output.dense"``) to ``(up, down)`` of
    shapes ``(out, r)`` and ``(r, in)``: beside that layer's MatMulNBits node the graph then computes
    ``x @ down^T @ up^T`` with two small MatMuls and adds it to its output, so the layer computes
    ``x (deq(Q(W)) + up down)^T``. ``factors``: how those MatMuls store their weights, "fp16" (cast back
    to float32 at load) or "int8" (onnxruntime dynamic int8: per-channel weights, inputs quantized at run
    time, half the bytes of fp16 and a little more error). ``accuracy_level``: the MatMulNBits attribute
    (:data:`INT4_ACCURACY_LEVEL`). ``weights`` maps module names to the (out, in) matrices their MatMuls
    are given before quantizing, instead of their own: GPTQ's (:func:`compressor.analysis.int4.gptq_int4`),
    which onnxruntime's rounding turns into GPTQ's 4-bit values. Embedding tables are stored as 4-bit
    values packed two to a uint8 (:func:`_pack_gather_nibbles`), the layout onnxruntime's ``.ort`` format can
    hold."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    check_int4_block_size(block_size)
    check_factor_storage(factors)
    check_int4_accuracy_level(accuracy_level)
    src, dst = Path(src_onnx), Path(dst)
    model = load_full(src)
    graph = model.graph
    _gemms_to_matmuls(graph)
    modules = _matmul_modules(graph)  # MatMul node name -> torch module name, before the quantizer drops it
    corrections = dict(corrections or {})
    unknown = sorted((set(corrections) | set(weights or {})) - set(modules.values()))
    if unknown:
        some = ", ".join(sorted(set(modules.values()))[:3])
        raise CompressorError(f"int4 corrections or weights name layers with no MatMul in '{src}': "
                              f"{', '.join(unknown[:3])}",
                              f"name torch Linear modules as in model.named_modules(), e.g. {some}")
    _place_weights(graph, modules, weights or {}, src)
    try:
        with quiet():
            q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=INT4_SYMMETRIC,
                                     accuracy_level=accuracy_level or None,
                                     op_types_to_quantize=("MatMul", "Gather"))
            q.process()
    except Exception as err:
        raise CompressorError(f"int4 quantization of '{src}' failed ({type(err).__name__}: {first_line(err)})",
                              "export without --int4, or report the model") from err
    model = q.model.model
    _pack_gather_nibbles(model.graph)
    by_module = {modules[n.name.removesuffix("_Q4")]: n for n in model.graph.node
                 if n.op_type == "MatMulNBits" and n.name.removesuffix("_Q4") in modules}
    missing = sorted(set(corrections) - set(by_module))
    if missing:
        raise CompressorError(f"onnxruntime left layer(s) {', '.join(missing[:3])} of '{src}' unquantized, so "
                              "there is no MatMulNBits node to correct", "leave those layers out of the correction")
    weights = _add_corrections(model.graph, {by_module[m].name: corrections[m] for m in sorted(corrections)})
    if factors == "fp16" or not weights:
        store_fp16(model.graph, weights)
        return save_atomic(model, dst, onnx)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    with atomic_files(dst) as tmpdir:
        save_onnx(model, tmpdir / "fp32_factors.onnx", onnx)
        with quiet():
            quantize_dynamic(tmpdir / "fp32_factors.onnx", tmpdir / dst.name, weight_type=QuantType.QInt8,
                             per_channel=True, reduce_range=DYNAMIC_INT8_LEVELS < 127, nodes_to_quantize=nodes)
        for f in tmpdir.glob("fp32_factors.onnx*"):
            f.unlink()
    return dst


def _pack_gather_nibbles(graph) -> None:
    """Store each GatherBlockQuantized node's 4-bit table and zero points as uint8, two values a byte
    (low nibble first, each row packed on its own), with ``bits=4``: the kernel's MatMulNBits-style layout.

    Why: the quantizer writes them as ONNX uint4 tensors, which onnxruntime's ``.ort`` format cannot
    hold ("Unsupported tensor data type" at load); the uint8 layout computes the same outputs (measured:
    identical on all-MiniLM-L6-v2) from the same bytes."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    four_bit = (TensorProto.UINT4, TensorProto.INT4)
    for node in list(graph.node):
        if node.op_type != "GatherBlockQuantized" or inits.get(node.input[0]) is None or \
                inits[node.input[0]].data_type not in four_bit:
            continue
        # Signed tables have no zero point: the uint8 layout's implicit one (8) shifts them.
        shift = 8 if inits[node.input[0]].data_type == TensorProto.INT4 else 0
        width = inits[node.input[0]].dims[-1]
        for i in (0, 3) if len(node.input) > 3 and node.input[3] else (0,):
            t = inits[node.input[i]]
            values = numpy_helper.to_array(t).astype(np.int16) + shift
            t.CopyFrom(numpy_helper.from_array(_nibbles(values.astype(np.uint8)), t.name))
        node.attribute.append(helper.make_attribute("bits", 4))
        if width % 2:
            _slice_padded_column(graph, node, width)


def _slice_padded_column(graph, node, width: int) -> None:
    """An odd-width table packs a padding nibble into each row's last byte, which the kernel returns as one
    more column (a factored embedding of odd rank then fed its MatMul a wrong width): slice it off."""
    from onnx import helper, numpy_helper

    out, padded = node.output[0], f"{node.output[0]}_padded"
    node.output[0] = padded
    consts = {f"{padded}_{k}": np.array([v], np.int64) for k, v in (("start", 0), ("end", width), ("axis", -1))}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    index = list(graph.node).index(node)
    graph.node.insert(index + 1, helper.make_node("Slice", [padded, *consts], [out], name=f"{node.name}_unpad"))


def _nibbles(values: np.ndarray) -> np.ndarray:
    """``values`` (each < 16) packed two to a byte along the last axis, low nibble first (odd: padded)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _gemms_to_matmuls(graph) -> None:
    """Rewrite each ``Gemm(x, W, b)`` with a constant ``W`` (alpha = beta = 1, x not transposed) into
    ``MatMul(x, W')`` (+ ``Add(b)``) under the Gemm's name: onnxruntime's 4-bit quantizer reads MatMul only."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if w is None or len(w.dims) != 2 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or \
                attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        arr = numpy_helper.to_array(w)
        wt = numpy_helper.from_array(np.ascontiguousarray(arr.T if attrs.get("transB", 0) else arr),
                                     f"{w.name}__matmul")
        graph.initializer.append(wt)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        mm_out = f"{node.output[0]}__matmul" if bias else node.output[0]
        mm = helper.make_node("MatMul", [node.input[0], wt.name], [mm_out], name=node.name)
        mm.metadata_props.extend(node.metadata_props)  # the torch module it computes
        nodes.append(mm)
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [node.output[0]], name=f"{node.name}__bias"))
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def _matmul_modules(graph) -> dict[str, str]:
    """``{MatMul node name: torch module name}`` for the MatMuls by a constant 2-D weight."""
    inits = [t.name for t in graph.initializer if len(t.dims) == 2]
    out = {}
    for weight, node, _ in weight_uses(graph, inits):
        module = module_name(weight, node) if node.op_type == "MatMul" else None
        if module and node.name:
            out[node.name] = module.removeprefix("model.")
    return out


def _place_weights(graph, modules: dict[str, str], weights: Mapping[str, Any], src: Path) -> None:
    """Give the MatMul of each module in ``weights`` that (out, in) matrix as its (in, out) weight initializer
    instead of its own; the initializer must be that MatMul's alone (not tied to a lookup table)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    uses = Counter(i for n in graph.node for i in n.input)
    nodes = {n.name: n for n in graph.node}
    by_module = {m: nodes[n] for n, m in modules.items()}
    for module, w in weights.items():
        arr = np.asarray(w.detach().cpu().float() if isinstance(w, torch.Tensor) else w, np.float32).T
        init = inits.get(by_module[module].input[1])
        if init is None or uses[init.name] != 1 or tuple(init.dims) != arr.shape:
            raise CompressorError(f"the int4 weights given for '{module}' cannot replace its MatMul's weight in "
                                  f"'{src}' (shared, transposed in the graph, or not {arr.shape})",
                                  "leave that layer out of the weights (it is then rounded to nearest)",
                                  cli_fix="pass --int4-rounding nearest")
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), init.name))


def _add_corrections(graph, corrections: Mapping[str, tuple[Any, Any]]) -> set[str]:
    """Add ``x @ down^T @ up^T`` to the output of each MatMulNBits node named in ``corrections``; returns
    the names of the factor initializers."""
    from onnx import helper, numpy_helper

    names: set[str] = set()
    extra: dict[str, list] = {}  # the node after which each correction's nodes go
    nodes_by_name = {n.name: n for n in graph.node}
    for node_name, (up, down) in corrections.items():
        node = nodes_by_name[node_name]
        up, down = (np.asarray(f.detach().cpu().float() if isinstance(f, torch.Tensor) else f, np.float32)
                    for f in (up, down))
        attrs = {a.name: a.i for a in node.attribute}
        k, n = attrs["K"], attrs["N"]
        if down.shape[1] != k or up.shape[0] != n or up.shape[1] != down.shape[0]:
            raise CompressorError(f"int4 correction of node '{node.name}' has factors {up.shape} and "
                                  f"{down.shape}, not (out={n}, r) and (r, in={k})",
                                  "pass (up, down) as the module's weight is (out, in)")
        base = node.name.removesuffix("_Q4")
        a = numpy_helper.from_array(np.ascontiguousarray(down.T), f"{base}__correction_down")
        b = numpy_helper.from_array(np.ascontiguousarray(up.T), f"{base}__correction_up")
        graph.initializer.extend([a, b])
        names |= {a.name, b.name}
        out = node.output[0]
        node.output[0] = f"{out}__int4"
        extra[node.name] = [
            helper.make_node("MatMul", [node.input[0], a.name], [f"{base}__correction_h"],
                             name=f"{base}__correction_down"),
            helper.make_node("MatMul", [f"{base}__correction_h", b.name], [f"{base}__correction"],
                             name=f"{base}__correction_up"),
            helper.make_node("Add", [node.output[0], f"{base}__correction"], [out], name=f"{base}__corrected"),
        ]
    nodes = []
    for node in graph.node:
        nodes.append(node)
        nodes.extend(extra.get(node.name, []))
    graph.ClearField("node")
    graph.node.extend(nodes)
    return names
