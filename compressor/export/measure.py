"""Measurements for reports and benchmarks: file sizes, latency (onnxruntime and torch eager), and the
multiply-adds a forward pass really performs.

Latencies are the median (and 10th/90th percentiles) of many timed runs after a warm-up, with the
thread count fixed and stated, so numbers from one run compare with each other. They are not
asserted anywhere: machines differ.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.core.handlers import handler_for
from compressor.core.hooks import captured_outputs
from compressor.data.inputs import call, eval_mode, flatten, model_device, to_device
from compressor.formats.onnx_graph import feeds
from compressor.formats.runtime import session


def file_size(path: str | Path) -> int:
    """Bytes on disk of ``path``; for an ONNX model, its external-data files are counted too."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        locations = {entry.value for t in model.graph.initializer for entry in t.external_data
                     if entry.key == "location"}
        size += sum((path.parent / loc).stat().st_size for loc in locations)
    return size


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def _timings(step: Callable[[], Any], warmup: int, runs: int) -> dict[str, float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    return {"median_ms": float(median), "p10_ms": float(p10), "p90_ms": float(p90), "runs": runs}


def _batch_of(tensors: list[torch.Tensor]) -> int:
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else 1


def onnx_latency(path: str | Path, inputs: Any, *, threads: int = 2, warmup: int = 10, runs: int = 50,
                 optimize: bool = True) -> dict[str, Any]:
    """Latency of one onnxruntime CPU session on ``inputs`` (tensor, tuple or dict of tensors, as given to
    :func:`compressor.export.export_onnx`): ``{median_ms, p10_ms, p90_ms, runs, threads, batch}``.
    ``optimize=False``: no graph optimizations at load, as an onnxruntime minimal build runs an .ort file."""
    _, tensors = flatten(inputs)
    sess = session(path, threads=threads, optimize=bool(optimize))
    feed = feeds(sess, inputs)
    stats = _timings(lambda: sess.run(None, feed), warmup, runs)
    return {**stats, "threads": threads, "batch": _batch_of(tensors)}


def torch_latency(model: nn.Module, inputs: Any, *, threads: int = 2, warmup: int = 10, runs: int = 50
                  ) -> dict[str, Any]:
    """Latency of ``model`` in torch eager (eval mode, inference mode), same keys as :func:`onnx_latency`."""
    inputs = to_device(inputs, model_device(model))
    _, tensors = flatten(inputs)
    previous_threads, was_training = torch.get_num_threads(), model.training
    torch.set_num_threads(threads)
    model.eval()
    try:
        with torch.inference_mode():
            stats = _timings(lambda: call(model, inputs), warmup, runs)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    return {**stats, "threads": threads, "batch": _batch_of(tensors)}


def count_macs(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """Multiply-adds one forward pass on ``example_inputs`` really performs in the layers a handler knows
    (factored layers count through their two factors), measured with forward hooks.

    Returns ``{"total", "per_sample", "batch", "by_layer": {name: macs}}``. Embedding lookups cost 0;
    the ``up`` projection of a factored embedding is a Linear and is counted. Bias adds are not counted.
    """
    inputs = to_device(example_inputs, model_device(model))
    _, tensors = flatten(inputs)
    by_layer: dict[str, int] = {}

    layers = {n: (m, h) for n, m in model.named_modules() if (h := handler_for(m)) is not None}

    def record(name: str, _args, out) -> None:
        mod, handler = layers[name]
        by_layer[name] = by_layer.get(name, 0) + int(handler.call_macs(mod, out))

    with captured_outputs({n: m for n, (m, _) in layers.items()}, record), eval_mode(model), torch.no_grad():
        call(model, inputs)
    total, batch = sum(by_layer.values()), _batch_of(tensors)
    return {"total": total, "per_sample": total / batch, "batch": batch, "by_layer": by_layer}
