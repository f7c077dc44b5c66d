"""ddddocr's CTC text-line recogniser (zoo.ddddocr_recognizer_onnx) reads rendered lines, and compressed through
the ONNX path at 30% it still decodes them as the original does (issue 28; benchmarks/ocr.py measures more)."""

from __future__ import annotations

import random
import string

import pytest

import compressor
from compressor import zoo
from compressor.core.errors import CompressorError
from compressor.data.sequence import ctc_greedy, decoded_agreement, step_labels

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def recognizer():
    try:
        return zoo.ddddocr_recognizer_onnx(), zoo.ddddocr_recognizer_charset()
    except CompressorError as err:
        pytest.skip(str(err))


def outputs(path, inputs):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3  # it declares its output (1, seqlen): no warnings
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [sess.run(None, {"input1": x.numpy()})[0] for x in inputs]


def test_the_recognizer_reads_rendered_digits(recognizer):
    model, charset = recognizer
    assert len(charset) == 8210 and charset[0] == ""  # the CTC blank
    lines = ["0123456789", "2718281828", "31415926", "4096"]
    got = outputs(model, [zoo.ddddocr_recognizer_input(zoo.rendered_text_line(t, i)) for i, t in enumerate(lines)])
    assert ["".join(charset[i] for i in ctc_greedy(step_labels(o)[0])) for o in got] == lines


def test_compressed_at_30_percent_it_decodes_lines_as_the_original(recognizer, tmp_path):
    model, _ = recognizer
    rng = random.Random(0)
    lines = ["".join(rng.choice(string.digits + string.ascii_letters) for _ in range(rng.randint(4, 10)))
             for _ in range(40)]
    inputs = [zoo.ddddocr_recognizer_input(zoo.rendered_text_line(t, f"test{i}")) for i, t in enumerate(lines)]
    report = compressor.compress(model, tmp_path / "out", target=0.3, threads=1)
    assert report.passed and report.params_after < 0.85 * report.params_before
    got = decoded_agreement(outputs(model, inputs), outputs(tmp_path / "out" / "model.onnx", inputs))
    assert got["string_agreement"] >= 0.9, got
    assert got["step_agreement"] < 1.0  # the factored classifier does change some scores
