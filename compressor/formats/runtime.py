"""The one way into onnxruntime: every session compressor opens (validation, latency, fidelity, perplexity,
ONNX input, edge conversion, generation) is made by :func:`session`, so the provider, the log level and how
threads are set are decided once. The inputs a session is fed come from
:func:`compressor.formats.onnx_graph.feeds`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROVIDERS = ["CPUExecutionProvider"]  # device-agnostic code, CPU runtime: what the validations measure


def session(model: str | Path | bytes, *, threads: int | None = None, optimize: bool | str = True,
            arena: bool = True, config: dict[str, str] | None = None, save_as: str | Path | None = None) -> Any:
    """An onnxruntime CPU session of ``model`` (a file, or a serialized ModelProto).

    ``threads``: intra-op threads (None: onnxruntime's default, every core); ``optimize``: True (onnxruntime's
    default level), False (none: as a minimal build runs a pre-optimized file) or a level ("basic",
    "extended", "all"); ``arena``: False frees activation memory between runs (a graph run in segments holds
    many sessions); ``config``: session config entries; ``save_as``: also write the optimized model there.
    onnxruntime's own exceptions pass through: each caller says what failed in its own words."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimize is False:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif isinstance(optimize, str):
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{optimize.upper()}")
    opts.enable_cpu_mem_arena = arena
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    if save_as is not None:
        opts.optimized_model_filepath = str(save_as)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=PROVIDERS)
