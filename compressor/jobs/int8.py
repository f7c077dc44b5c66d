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


def checked_on(opts: Any) -> str:
    """What a calibrated variant is validated on, in words (``opts``: the job's options)."""
    return "the first calibration batch" if opts.calibration is not None else "the example inputs"


def int8_choice(results: dict[str, Any], folder: Path, inputs: Any, real: Any, opts: Any) -> dict[str, Any]:
    """``folder``'s dynamic and static int8 files (``results``: their validations under "int8" and "qdq") timed
    side by side with its model.onnx on ``inputs``, their fidelity to model.onnx measured on the same ``real``
    inputs (the first calibration batch, when there is one), and the one to ship
    (:func:`compressor.export.latency.recommend_int8`)."""
    from compressor.export.latency import recommend_int8
    from compressor.export.onnx import VARIANTS, validate_onnx
    from compressor.search.evaluate import THREADS

    files = {}
    for k in ("int8", "qdq"):
        v = validate_onnx(results[k].path, folder / "model.onnx", real, atol=None, min_cosine=VARIANTS[k].min_cosine,
                          variant=k, batch_variant=False)
        files[f"model.{k}.onnx"] = (results[k].path, v.cosine, results[k].passed and v.passed)
    choice = recommend_int8(folder / "model.onnx", files, inputs, threads=opts.threads or THREADS)
    return {**choice, "fidelity_on": checked_on(opts)}
