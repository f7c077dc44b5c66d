"""ONNX export, validation against torch, fp16 / int8 / static int8 (QDQ) / int4 variants, and measurements
(size, latency, MACs).

    from compressor.export import export_onnx, validate_onnx, export_int8, export_qdq, export_int4
"""

from compressor.export.onnx import (
    check_factored_graph,
    export_fp16,
    export_int4,
    export_int8,
    export_onnx,
    export_qdq,
    format_validation,
    qdq_choice,
    validate_onnx,
)

__all__ = ["check_factored_graph", "export_fp16", "export_int4", "export_int8", "export_onnx", "export_qdq",
           "format_validation", "qdq_choice", "validate_onnx"]
