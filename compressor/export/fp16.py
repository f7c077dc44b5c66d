"""The fp16 variant: weights stored as float16 and cast back to float32 where they are used. The int8 (layers
kept fp16) and int4 (correction factors) writers store some weights this way too (:func:`store_fp16`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.export.onnx_files import load_full, save_atomic


def export_fp16(src_onnx: str | Path, dst: str | Path) -> Path:
    """A copy of ``src_onnx`` with every float32 weight stored as float16 and cast back to float32 where
    it is used; inputs, outputs and arithmetic stay float32. Written atomically; returns ``dst``."""
    # Why fp16 storage only, measured on all-MiniLM-L6-v2 with onnxruntime 1.32 CPU: a full-fp16 graph
    # is no smaller (45.57 vs 45.59 MB), is less accurate (max diff 0.0099 vs 0.0051) and is not fp16
    # compute: the CPU provider lacks fp16 kernels for most of its nodes and inserts 76 Cast nodes to
    # run them in fp32. With fp16 storage, onnxruntime constant-folds each weight's Cast at load (no Cast
    # is left in its optimized graph), so the model runs like the fp32 one, with fp16-rounded weights,
    # from a file half the size, and float inputs/outputs stay float32 for the caller.
    # Weights beyond fp16's range (|w| > 65504) stay fp32.
    import onnx

    model = load_full(Path(src_onnx))
    store_fp16(model.graph)
    return save_atomic(model, Path(dst), onnx)


def store_fp16(graph, only: set[str] | None = None) -> None:
    """Store the float32 initializers of ``graph`` (those named in ``only``, or all) as float16, each with
    a Cast back to float32 under its old name, so every consumer is unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    keep, casts = [], []
    for init in graph.initializer:
        wanted = init.data_type == TensorProto.FLOAT and (only is None or init.name in only)
        arr = numpy_helper.to_array(init) if wanted else None
        if arr is None or arr.size < 2 or not np.all(np.abs(arr) <= np.finfo(np.float16).max):
            keep.append(init)
            continue
        half = numpy_helper.from_array(arr.astype(np.float16), f"{init.name}__fp16")
        keep.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=f"{init.name}__cast_fp32"))
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    nodes = [*casts, *graph.node]  # casts first: the graph stays topologically sorted
    graph.ClearField("node")
    graph.node.extend(nodes)
