"""ONNX export, validation against torch, fp16 / int8 / static int8 (QDQ) / int4 variants, and measurements
(size, latency, MACs).

    from compressor.export import export_onnx, validate_onnx, export_int8, export_qdq, export_int4
"""

from compressor.export.fp16 import export_fp16
from compressor.export.graph import check_factored_graph
from compressor.export.int4 import export_int4
from compressor.export.int8 import export_int8, export_qdq, qdq_choice
from compressor.export.onnx import export_onnx, format_validation, validate_onnx

__all__ = ["check_factored_graph", "export_fp16", "export_int4", "export_int8", "export_onnx", "export_qdq",
           "format_validation", "qdq_choice", "validate_onnx"]
