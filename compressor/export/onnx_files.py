"""Reading, writing and running ONNX files, for the exporter and every variant writer: an onnxruntime session
with a one-line error, a file's outputs, a graph's structure without its weights, an atomic save that moves
weights to external data past protobuf's 2 GB limit, and exporter chatter silenced."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_files
from compressor.formats.onnx_graph import feeds
from compressor.formats.runtime import session

# Above this many bytes of weights an ONNX protobuf (2 GB limit) cannot hold them: write external data.
EXTERNAL_DATA_BYTES = 1_800_000_000


def onnx_session(path: str | Path):
    """An onnxruntime CPU session of the ONNX file ``path``."""
    try:
        return session(path)
    except Exception as err:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
        raise CompressorError(f"onnxruntime cannot load '{path}' ({first_line(err)})",
                              "check the model in onnxruntime first") from None


def onnx_outputs(model: Any, inputs: Any) -> list[tuple[str, np.ndarray]]:
    """The outputs of ``model`` (an ONNX file's path, or a session of one) in onnxruntime on ``inputs``,
    named; inputs are matched to the graph's inputs by name (a mapping) or position."""
    sess = onnx_session(model) if isinstance(model, str | Path) else model
    names = [o.name for o in sess.get_outputs()]
    return list(zip(names, sess.run(names, feeds(sess, inputs)), strict=True))


@contextmanager
def quiet() -> Iterator[None]:
    """Silence exporter chatter (progress lines, deprecation and tracer warnings, optimizer logs)."""
    # The root logger too: onnxruntime.quantization logs its advice there.
    names = ("", "torch.onnx", "onnxscript", "torch.export", "torch._dynamo")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def first_line(err: BaseException) -> str:
    """The first line of an error's message, at most 300 characters (for a one-line error)."""
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def load_graph(onnx_path_or_model: Any):
    """An ONNX model (given, or read from its path without its external weights: the graph only)."""
    import onnx

    if isinstance(onnx_path_or_model, onnx.ModelProto):
        return onnx_path_or_model
    path = Path(onnx_path_or_model)
    if not path.is_file():
        raise CompressorError(f"ONNX file '{path}' does not exist", "export the model first")
    return onnx.load(str(path), load_external_data=False)  # shapes only: no weights read



def load_full(path: Path):
    """The ONNX file ``path`` with its weights (external data too)."""
    import onnx

    if not path.is_file():
        raise CompressorError(f"ONNX file '{path}' does not exist", "export the model first")
    return onnx.load(str(path))  # with external data, if any


def save_atomic(model, dst: Path, onnx) -> Path:
    """``model`` saved as ``dst`` atomically (with its external data, if any); returns ``dst``."""
    with atomic_files(dst) as tmpdir:
        save_onnx(model, tmpdir / dst.name, onnx)
    return dst


def save_onnx(model, path: Path, onnx) -> None:
    """``onnx.save``, with the weights in ``<name>.data`` beside it when they are too big for one file."""
    big = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=big, location=f"{path.name}.data")
