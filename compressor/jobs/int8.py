"""The int8 files of a run (compress and compress on an ONNX input): what the static int8 file was calibrated
on, in words, and which int8 file to ship when both dynamic and static were written."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def calibrated_on(opts: Any) -> str:
    """What a calibrated variant measured its activations on (``opts``: the job's options), for the report."""
    if opts.calibration is not None:
        return f"the calibration inputs ({Path(opts.calibration).name})"
    return ("the example inputs, as no calibration inputs were given: random ones (--input-shape) are not what "
            "the model will see; pass real inputs with --calibration" if opts.input_shapes else
            "the example inputs, as no calibration inputs were given; pass real inputs with --calibration")


def int8_choice(results: dict[str, Any], folder: Path, inputs: Any, opts: Any) -> dict[str, Any]:
    """``folder``'s dynamic and static int8 files (``results``: their validations under "int8" and "qdq") timed
    side by side with its model.onnx on ``inputs``, and the one to ship
    (:func:`compressor.export.latency.recommend_int8`)."""
    from compressor.export.latency import recommend_int8
    from compressor.search.evaluate import THREADS

    files = {f"model.{k}.onnx": (results[k].path, results[k].cosine, results[k].passed) for k in ("int8", "qdq")}
    return recommend_int8(folder / "model.onnx", files, inputs, threads=opts.threads or THREADS)
