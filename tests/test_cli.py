"""The command-line tool, end to end: every output it promises, and every bad input it refuses (issue 3)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from compressor.cli.main import main
from compressor.examples import digits_cnn, minilm_path

REPO = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(args: list[str], cwd: Path | None = None):
    """Invoke the CLI in-process; ``cwd`` matters for --trust-pickle imports and relative paths."""
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


@pytest.fixture
def cnn_file(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "cnn.pt"
    torch.save(digits_cnn(), path)
    return path


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial outputs a failed command must not leave behind."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".compressed")]


def test_pickled_cnn_goes_through(cnn_file):
    res = run([cnn_file, "--energy", "0.9", "--input-shape", "2x1x8x8", "--fp16", "--int8"])
    assert res.exit_code == 0, res.output
    out = cnn_file.parent / "cnn.compressed"
    assert {"model.safetensors", "plan.json", "model.onnx", "model.fp16.onnx", "model.int8.onnx",
            "report.json", "report.md"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert {"name", "rank", "full_rank", "energy_kept", "factored", "reason"} <= set(report["layers"][0])
    assert report["onnx"]["passed"] and report["onnx"]["max_abs_diff"] <= 1e-4
    assert report["onnx"]["path"] == "model.onnx" and report["onnx"]["size_bytes"] > 0
    assert report["fp16"]["passed"] and report["int8"]["passed"]
    assert "PASS" in res.output and "report.md" in res.output
    md = (out / "report.md").read_text()
    assert "## ONNX validation" in md and "## Layers" in md

    import compressor

    model = compressor.load(out)  # a folder written by compressor loads without any flag
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]


def test_json_output_is_the_report(cnn_file, tmp_path):
    res = run([cnn_file, "--rank", "8", "--input-shape", "1x1x8x8", "--json", "--out", tmp_path / "o"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report == json.loads((tmp_path / "o" / "report.json").read_text())


def test_analyze_writes_only_the_plan_and_apply_reapplies_an_edit(cnn_file, tmp_path):
    res = run(["analyze", cnn_file, "--target", "0.5", "--out", tmp_path / "a"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"plan.json", "report.json", "report.md"}
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    for layer in plan["layers"]:
        if layer["supported"]:
            layer["rank"] = 3 if layer["name"] == "6" else None
    (tmp_path / "edited.json").write_text(json.dumps(plan))
    res = run(["apply", cnn_file, tmp_path / "edited.json", "--input-shape", "1x1x8x8", "--out", tmp_path / "b"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert [(lp["name"], lp["rank"]) for lp in report["layers"] if lp["factored"]] == [("6", 3)]
    assert report["onnx"]["passed"]


def test_export_only(cnn_file, tmp_path):
    res = run(["export", cnn_file, "--input-shape", "1x1x8x8", "--out", tmp_path / "e"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["onnx"]["passed"] and report["params_after"] == report["params_before"]


def test_state_dict_with_and_without_arch(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "weights.pt"
    torch.save(digits_cnn().state_dict(), weights)
    res = run([weights, "--energy", "0.9", "--out", tmp_path / "w"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert "skipped" in report["onnx"] and report["params_after"] < report["params_before"]
    assert "model.safetensors" in report["files"]

    res = run([weights, "--energy", "0.9", "--arch", "compressor.examples:digits_cnn",
               "--input-shape", "1x1x8x8", "--out", tmp_path / "a"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a" / "report.json").read_text())["onnx"]["passed"]


class _Marker:
    """Unpickling this creates a file: the test's stand-in for code hidden in a model file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bad_inputs(tmp: Path, cnn: Path) -> dict[str, tuple[list, str]]:
    (tmp / "notes.txt").write_text("this is not a model\n")
    (tmp / "random.bin").write_bytes(os.urandom(4096))
    data = cnn.read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 64] = b"\0" * 64
    (tmp / "corrupt.pt").write_bytes(bytes(corrupt))
    torch.save(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), tmp / "nothing.pt")
    nan_model = digits_cnn()
    with torch.no_grad():
        nan_model[6].weight[0, 0] = float("nan")
    torch.save(nan_model, tmp / "nan.pt")
    torch.save(_Marker(str(tmp / "PWNED")), tmp / "evil.pt")
    with open(tmp / "evil.pkl", "wb") as f:
        pickle.dump(_Marker(str(tmp / "PWNED")), f)
    (tmp / "existing.compressed").mkdir()
    shape = ["--input-shape", "1x1x8x8"]
    return {
        "missing": ([tmp / "absent.pt", "--energy", "0.9"], "does not exist"),
        "not a model": ([tmp / "notes.txt", "--energy", "0.9"], ""),
        "random bytes": ([tmp / "random.bin", "--energy", "0.9"], ""),
        "truncated": ([tmp / "truncated.pt", "--energy", "0.9"], ""),
        "corrupt": ([tmp / "corrupt.pt", "--energy", "0.9"], ""),
        "energy above 1": ([cnn, "--energy", "1.5", *shape], "energy"),
        "energy zero": ([cnn, "--energy", "0", *shape], "energy"),
        "two policies": ([cnn, "--energy", "0.9", "--rank", "4", *shape], "exactly one"),
        "no policy": ([cnn, *shape], "exactly one"),
        "nothing to factor": ([tmp / "nothing.pt", "--energy", "0.9", *shape], "factor"),
        "NaN weights": ([tmp / "nan.pt", "--energy", "0.9", *shape], "NaN"),
        "existing output": ([cnn, "--energy", "0.9", *shape, "--out", tmp / "existing.compressed"], "--force"),
        "unwritable output": ([cnn, "--energy", "0.9", *shape, "--out", tmp / "notes.txt" / "o"], "--out"),
        "no example inputs": ([cnn, "--energy", "0.9"], "--input-shape"),
        "bad input shape": ([cnn, "--energy", "0.9", "--input-shape", "1xfoo"], "shape"),
        "untrusted pickle": ([tmp / "evil.pt", "--energy", "0.9"], "--trust-pickle"),
        "plain pickle": ([tmp / "evil.pkl", "--energy", "0.9"], "--trust-pickle"),
        "bad plan": (["apply", cnn, tmp / "notes.txt", *shape], "plan"),
    }


BAD_CASES = ["missing", "not a model", "random bytes", "truncated", "corrupt", "energy above 1", "energy zero",
             "two policies", "no policy", "nothing to factor", "NaN weights", "existing output",
             "unwritable output", "no example inputs", "bad input shape", "untrusted pickle", "plain pickle",
             "bad plan"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_loses_nothing(tmp_path, cnn_file, case):
    cases = _bad_inputs(tmp_path, cnn_file)
    args, fragment = cases[case]
    inputs = {p: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run(args)
    assert res.exit_code == 2, res.output
    err = res.stderr if hasattr(res, "stderr") else res.output
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in res.output
    assert {p: digest(p) for p in inputs} == inputs  # inputs byte-for-byte unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial output, no temp folder
    assert not (tmp_path / "PWNED").exists()


def test_trusted_pickle_of_a_user_class_loads_with_the_flag_only(tmp_path):
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a = nn.Linear(16, 64)\n"
        "        self.b = nn.Linear(64, 8)\n"
        "    def forward(self, x):\n"
        "        return self.b(self.a(x).relu())\n")
    code = ("import sys, torch; sys.path.insert(0, '.'); import mynets; "
            "torch.save(mynets.Net(), 'net.pt')")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    res = run(["net.pt", "--rank", "4", "--input-shape", "3x16"], cwd=tmp_path)
    assert res.exit_code == 2 and "mynets.Net" in res.output and "--trust-pickle" in res.output
    assert not (tmp_path / "net.compressed").exists()
    res = run(["net.pt", "--rank", "4", "--input-shape", "3x16", "--trust-pickle"], cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "net.compressed" / "report.json").read_text())["onnx"]["passed"]


def test_subprocess_exit_codes_and_messages(tmp_path, cnn_file):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "compressor", str(cnn_file), "--energy", "0.9",
                         "--input-shape", "1x1x8x8", "--quiet"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout == "", ok.stderr
    bad = subprocess.run([sys.executable, "-m", "compressor", str(tmp_path / "nope.pt"), "--energy", "2"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    debug = subprocess.run([sys.executable, "-m", "compressor", str(tmp_path / "nope.pt"), "--energy", "0.9",
                            "--debug"], capture_output=True, text=True, env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.minilm
@pytest.mark.slow
def test_real_minilm_folder_goes_through(tmp_path):
    if minilm_path() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed")
    res = run([minilm_path(), "--target", "0.3", "--include", "encoder.*", "--int8", "--out", tmp_path / "m"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["source"]["format"] == "hf-folder"
    assert report["onnx"]["passed"] and report["int8"]["passed"]
    assert report["files"]["model.onnx"] < report["source"]["size_bytes"]


def test_heal_and_checkpoints_commands(tmp_path):
    from compressor.examples import digits_splits, train_digits_cnn

    model, _ = train_digits_cnn(seed=0, epochs=4)
    torch.save(model, tmp_path / "cnn.pt")
    splits = digits_splits(0)
    torch.save({"inputs": splits["train"][0], "targets": splits["train"][1]}, tmp_path / "train.pt")
    torch.save({"inputs": splits["val"][0], "targets": splits["val"][1]}, tmp_path / "val.pt")
    torch.save(splits["train"][0][:256], tmp_path / "unlabelled.pt")
    res = run([tmp_path / "cnn.pt", "--rank-ratio", "0.2", "--include", "0", "--include", "2", "--include", "6",
               "--input-shape", "1x1x8x8", "--out", tmp_path / "small", "--quiet"])
    assert res.exit_code == 0, res.output

    res = run(["heal", tmp_path / "small", "--data", tmp_path / "train.pt", "--val", tmp_path / "val.pt",
               "--epochs", "2", "--checkpoint-dir", tmp_path / "ckpt", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["supervised"] and summary["after"]["val_accuracy"] > summary["before"]["val_accuracy"]
    healed = json.loads((tmp_path / "small.healed" / "heal.json").read_text())
    assert healed["best_step"] == summary["best_step"]
    # Labels: the general defaults, all but --epochs filled by them (heal.json says which).
    from compressor.train.heal import KIND_DEFAULTS

    assert healed["recipe"] == {"kind": "default", "filled": KIND_DEFAULTS["default"]}
    plot = tmp_path / "small.healed" / healed["plot"]  # the monitored metric over steps, linked from heal.json
    assert plot.suffix == ".png" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import compressor

    small, again = compressor.load(tmp_path / "small"), compressor.load(tmp_path / "small.healed")
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in small.parameters())

    listing = run(["checkpoints", tmp_path / "ckpt"])
    assert listing.exit_code == 0 and "best" in listing.output

    # Distillation: no targets in --data, the teacher is the original recorded in the folder.
    res = run(["heal", tmp_path / "small", "--data", tmp_path / "unlabelled.pt", "--steps", "5",
               "--out", tmp_path / "distilled", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["teacher"].endswith("cnn.pt")
    # Distilling a CNN: its row of the defaults.
    assert json.loads(res.output)["recipe"]["kind"] == "cnn"
    assert json.loads(res.output)["config"]["loss"] == KIND_DEFAULTS["cnn"]["loss"]


def test_outputs_get_the_usual_file_modes(cnn_file, tmp_path):
    old = os.umask(0o022)
    try:
        res = run([cnn_file, "--rank", "4", "--input-shape", "1x1x8x8", "--out", tmp_path / "o", "--quiet"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir()} == {
        p.name: 0o644 for p in (tmp_path / "o").iterdir()}


def test_int8_keep_fp16_keeps_the_layer_int8_hurts_most(tmp_path):
    from .test_mixed_int8 import outlier_mlp

    src, cal = tmp_path / "mlp.pt", tmp_path / "cal.pt"
    torch.save(outlier_mlp(), src)
    torch.save(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)), cal)
    args = [src, "--rank", "8", "--include", "0", "--input-shape", "4x32", "--int8"]
    res = run([*args, "--keep-fp16", "1", "--calibration", cal, "--out", tmp_path / "a"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["int8"]["kept_fp16"] == ["2"] and report["int8"]["passed"]  # the outlier layer
    assert "kept in fp16    2" in res.output
    assert "keeps these layers in fp16" in (tmp_path / "a" / "report.md").read_text()
    # Without the kept layer the outlier layer's int8 rounding costs the file its validation (exit 3, the
    # folder kept for inspection); the kept layer costs one byte more per weight.
    plain = run([*args, "--out", tmp_path / "b"])
    assert plain.exit_code in (0, 3), plain.output
    files = [json.loads((tmp_path / d / "report.json").read_text())["int8"] for d in ("a", "b")]
    assert files[0]["cosine"] > files[1]["cosine"]
    assert 0.9 * 256 * 256 < files[0]["size_bytes"] - files[1]["size_bytes"] < 1.1 * 256 * 256
    for extra, problem in ((["--keep-fp16", "1"], "--calibration"), (["--keep-fp16", "-1"], "whole number")):
        res = run([*args, *extra, "--out", tmp_path / "c"])
        lines = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert res.exit_code == 2 and len(lines) == 1 and problem in lines[0], res.output
    res = run([src, "--rank", "8", "--input-shape", "4x32", "--keep-fp16", "1", "--calibration", cal,
               "--out", tmp_path / "c"])
    assert res.exit_code == 2 and "add --int8" in res.output and not (tmp_path / "c").exists()
