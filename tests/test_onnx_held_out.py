"""An ONNX input judged on held-out inputs (--eval-inputs) and on the outputs named by --output, as a torch
model is: a graph exported with its batch fixed at 1 is fed the held-out samples one at a time."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from compressor.analysis.onnx_model import analyze_onnx
from compressor.cli.main import main
from compressor.core.plan import Plan
from compressor.export.onnx import export_onnx
from compressor.jobs import compress_onnx
from compressor.jobs.compress import compress

from .test_recipes import mlp

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fixed_batch(tmp_path):
    """The MLP exported with its batch fixed at 1, calibration inputs and 12 held-out samples."""
    src = export_onnx(mlp(), torch.randn(1, 64), tmp_path / "mlp.onnx", dynamic_batch=False, exporter="legacy")
    g = torch.Generator().manual_seed(2)
    np.savez(tmp_path / "cal.npz", input=torch.randn(16, 64, generator=g).numpy())
    np.savez(tmp_path / "held.npz", input=torch.randn(12, 64, generator=g).numpy())
    return src


def _cosines(a: str, b: str, x: np.ndarray) -> np.ndarray:
    sa, sb = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (a, b))
    out = []
    for row in x:  # one sample at a time: the batch axis is fixed at 1
        ya, yb = sa.run(None, {"input": row[None]})[0].ravel(), sb.run(None, {"input": row[None]})[0].ravel()
        out.append(ya @ yb / np.linalg.norm(ya) / np.linalg.norm(yb))
    return np.array(out)


def test_fidelity_of_an_onnx_input_is_measured_on_every_held_out_sample(tmp_path, fixed_batch, monkeypatch):
    seen = []

    def spy(model, **kw):  # the calibrated analysis compares the named outputs, as on the torch path
        seen.append(kw.get("outputs"))
        return analyze_onnx(model, **kw)

    monkeypatch.setattr(compress_onnx, "analyze_onnx", spy)
    report = compress(fixed_batch, tmp_path / "out", rank_ratio=0.25, calibration=tmp_path / "cal.npz",
                      eval_inputs=tmp_path / "held.npz", outputs=["output"])
    assert seen == [["output"]] and Plan.from_json(tmp_path / "out" / "plan.json").method == "whitened-svd+sequential"
    f = report.fidelity
    assert f["inputs"] == "12 held-out samples from held.npz" and f["compared"] == "output"
    want = _cosines(fixed_batch, tmp_path / "out" / "model.onnx", np.load(tmp_path / "held.npz")["input"])
    assert f["cosine_mean"] == pytest.approx(want.mean(), abs=1e-5)
    assert f["cosine_min"] == pytest.approx(want.min(), abs=1e-5)
    assert want.min() < want.max()  # the samples differ: a mean over one sample would not match
    assert "12 held-out samples from held.npz" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("bad", ["output", "held-out shape"])
def test_a_wrong_output_name_or_held_out_shape_is_one_line_exit_2(tmp_path, fixed_batch, bad):
    args = [str(fixed_batch), "--rank", "4", "--calibration", str(tmp_path / "cal.npz"), "--out", str(tmp_path / "o")]
    if bad == "output":
        args += ["--output", "logits", "--eval-inputs", str(tmp_path / "held.npz")]
    else:
        np.savez(tmp_path / "wide.npz", input=np.ones((3, 65), np.float32))
        args += ["--eval-inputs", str(tmp_path / "wide.npz")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert {"output": "no output named 'logits' (it computes output)",
            "held-out shape": "held-out inputs in"}[bad] in lines[0]
    assert not (tmp_path / "o").exists()
