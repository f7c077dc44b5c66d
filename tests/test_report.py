"""Report.validations: every validated ONNX file by variant key, typed, and report.json as it always was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

import compressor
from compressor.cli.summary import summary
from compressor.export.onnx import VARIANTS, Validation, Variant
from compressor.report.report import FileValidation, Report


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copyfile(src, dst))


def test_a_new_export_variant_is_one_registry_entry(tmp_path, monkeypatch):
    # A variant no module names: its file is the fp32 export copied, so it validates at cosine 1.
    monkeypatch.setitem(VARIANTS, "copy", Variant("copy", _copy, 0.999, 4.0, "the fp32 file copied"))
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8)), tmp_path / "m.pt")
    report = compressor.compress(tmp_path / "m.pt", tmp_path / "out", rank=4, trust_pickle=True,
                                 input_shapes=["2x32"], variants=("fp16", "copy"))
    assert list(report.validations) == ["onnx", "fp16", "copy"]
    copy = report.validations["copy"]
    assert copy.passed and copy.validation.variant == "copy" and copy.validation.path == "model.copy.onnx"
    assert copy.validation.cosine > 0.9999 and copy.validation.min_cosine == 0.999 and report.passed

    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["copy"]["path"] == "model.copy.onnx" and data["copy"]["passed"]
    assert data == report.to_dict() and Report.from_dict(data).to_dict() == data
    assert Report.from_dict(data).validations["copy"].validation == copy.validation
    md = (tmp_path / "out" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| `model.copy.onnx` |"))
    assert row.endswith("| cosine >= 0.999 | PASS |")
    assert "| `model.copy.onnx` size" in md
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- model.copy.onnx: validated against the torch model, passed" in card
    line = next(x for x in summary(report).splitlines() if x.strip().startswith("model.copy.onnx"))
    assert "(cosine >= 0.999): PASS" in line


def _validation(path: str, **changes) -> Validation:
    fields = dict(path=path, size_bytes=10, max_abs_diff=0.5, cosine=0.99, atol=None, min_cosine=0.9, passed=True,
                  providers=["CPUExecutionProvider"], batch_sizes=[2, 3], variant="int8")
    return Validation(**{**fields, **changes})


def test_validations_read_back_from_their_top_level_keys():
    # A failed fp32 export with a NaN difference, a skipped one, and a variant's extra keys all round-trip.
    checked = FileValidation(_validation("model.onnx", max_abs_diff=float("nan"), passed=False, variant="fp32"),
                             graph_problems=["layer 0 not factored"])
    int8 = FileValidation(_validation("model.int8.onnx"), kept_fp16=["2"])
    base = {"mode": "compress", "source": {}, "output": "o", "params_before": 1, "params_after": 1,
            "params_ratio": 1.0, "files": {}, "passed": False, "timings_s": {}, "command": None, "options": {},
            "versions": {}, "date": "d"}
    data = Report(**base, validations={"onnx": checked, "int8": int8}).to_dict()
    assert data["onnx"]["max_abs_diff"] is None and data["onnx"]["graph_problems"] == ["layer 0 not factored"]
    assert list(data["int8"])[-1] == "kept_fp16" and "validations" not in data
    again = Report.from_dict(json.loads(json.dumps(data)))
    assert again.validations["int8"] == int8 and again.validations["onnx"].passed is False
    assert again.to_dict() == data
    skipped = Report.from_dict({**data, "onnx": {"skipped": "weights only"}}).validations["onnx"]
    assert skipped.validation is None and skipped.skipped == "weights only" and skipped.passed is None
