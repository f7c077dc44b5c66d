"""Hostile input, run as a user would (`python -m compressor ...` in a subprocess): nothing run, nothing lost,
nothing hangs. Each refusal exits 2 with one stderr line naming the problem and the fix in the CLI's own
spelling, no traceback, the inputs unchanged and nothing left behind, in bounded time."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# A refusal happens before any real work: interpreter and torch start-up only (generous: shared machines).
REFUSAL_SECONDS = 90
# Hints written for Python (exclude=['0'], rank_multiple=8) must not reach the command line.
PYTHON_SPELLING = re.compile(r"\b(include|exclude|rank|rank_ratio|rank_multiple|energy|target|calibration|"
                             r"calibration_samples|heal_steps|keep_fp16|min_fidelity|max_size|max_latency_ms|"
                             r"atol|opset|input_shapes|trust_pickle|arch)=")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A small CNN, calibration files (one of the wrong width), a folder `compress` wrote, a plain file."""
    import compressor
    from compressor.examples import digits_cnn

    d = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    torch.save(digits_cnn(), d / "cnn.pt")
    torch.save(torch.randn(16, 1, 8, 8), d / "calib.pt")
    torch.save(torch.randn(16, 1, 12, 12), d / "wide.pt")  # 12x12 reaches the Linear with 2304, not 1024
    nan = digits_cnn()
    with torch.no_grad():
        nan[0].weight[0, 0, 0, 0] = float("nan")
    torch.save(nan, d / "nan.pt")
    compressor.compress(d / "cnn.pt", d / "done", energy=0.9, input_shapes=["1x1x8x8"], progress=False)
    (d / "notes.txt").write_text("not a folder\n")
    return d


@pytest.fixture
def work(assets, tmp_path) -> Path:
    """A private copy of the assets: the folder every command runs in."""
    shutil.copytree(assets, tmp_path / "w")
    return tmp_path / "w"


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (hidden ones included) with the hash of its content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def cli(folder: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "compressor", *args], cwd=folder, capture_output=True, text=True,
                         env=env, timeout=timeout)
    return res, time.perf_counter() - start


def refused(folder: Path, args: list[str], *needles: str) -> str:
    """Run the CLI and check the refusal contract; returns the error line."""
    before = snapshot(folder)
    res, seconds = cli(folder, *args, timeout=REFUSAL_SECONDS)
    lines = res.stderr.splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert res.stdout == "", res.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not PYTHON_SPELLING.search(lines[0]), lines[0]
    assert snapshot(folder) == before, "inputs changed or something was left behind"
    assert seconds < REFUSAL_SECONDS
    return lines[0]


EXPORT = ["--input-shape", "1x1x8x8"]


# --------------------------------------------------------------------------------- the cases


def test_input_shape_too_large_is_refused_before_allocating(work):
    refused(work, ["cnn.pt", "--energy", "0.9", "--input-shape", "100000x100000x100000"],
            "100000x100000x100000", "--input-shape 1x3x224x224")


def test_calibration_of_the_wrong_width(work):
    refused(work, ["cnn.pt", "--energy", "0.9", *EXPORT, "--calibration", "wide.pt"],
            "wide.pt", "16x1x12x12", "do not fit the model")
    refused(work, ["search", "cnn.pt", "--max-size", "0.5", *EXPORT, "--calibration", "wide.pt"],
            "wide.pt", "do not fit the model")


def test_search_cache_that_is_a_file(work):
    refused(work, ["search", "cnn.pt", "--max-size", "0.5", *EXPORT, "--cache", "notes.txt"], "notes.txt", "--cache")
    refused(work, ["search", "cnn.pt", "--max-size", "0.5", *EXPORT, "--cache", "notes.txt/sub"], "is a file")


def test_apply_with_a_folder_as_the_plan(work):
    refused(work, ["apply", "cnn.pt", "done", *EXPORT], "is a folder", "done/plan.json")
    refused(work, ["apply", "cnn.pt", "missing.json", *EXPORT], "does not exist")


@pytest.mark.parametrize("damage", ["truncate", "header", "garbage", "empty"])
def test_compressed_folder_with_damaged_weights(work, damage):
    weights = work / "done" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[:1000], "header": b"\xff" * 7 + b"\x7f" + data[8:],
                         "garbage": bytes(range(256)) * 20, "empty": b""}[damage])
    for args in (["export", "done", *EXPORT], ["done", "--energy", "0.9", *EXPORT]):
        refused(work, args, "model.safetensors")


@pytest.mark.parametrize("opset", ["1", "13", "999"])
def test_opset_outside_what_the_exporters_honour(work, opset):
    refused(work, ["cnn.pt", "--energy", "0.9", *EXPORT, "--opset", opset], f"opset {opset}", "--opset between")
    refused(work, ["search", "cnn.pt", "--max-size", "0.5", *EXPORT, "--opset", opset], "--opset between")


@pytest.mark.parametrize("atol", ["nan", "-1", "inf"])
def test_atol_that_cannot_be_a_tolerance(work, atol):
    refused(work, ["cnn.pt", "--energy", "0.9", *EXPORT, "--atol", atol], "--atol 1e-3")


def test_unreachable_fidelity_is_refused_before_the_search(work):
    for value in ("2", "nan", "-3"):
        refused(work, ["search", "cnn.pt", *EXPORT, "--min-fidelity", value], "--min-fidelity 0.95")
    # The default command turns into the same search.
    refused(work, ["cnn.pt", *EXPORT, "--min-fidelity", "2"], "--min-fidelity 0.95")


def test_calibration_samples_without_calibration(work):
    refused(work, ["cnn.pt", "--energy", "0.9", *EXPORT, "--calibration-samples", "4"],
            "--calibration-samples", "--calibration FILE")
    refused(work, ["cnn.pt", "--energy", "0.9", *EXPORT, "--calibration", "calib.pt", "--calibration-samples", "0"],
            "--calibration-samples 256")


def test_globs_that_match_no_layer_name_the_closest(work):
    refused(work, ["cnn.pt", "--energy", "0.9", *EXPORT, "--include", "conv*"], "'conv*'", "--include '0'")
    refused(work, ["cnn.pt", "--energy", "0.9", *EXPORT, "--exclude", "7"], "'7'", "--exclude '0'")
    # Regular-expression syntax is not a glob: say so.
    refused(work, ["cnn.pt", "--energy", "0.9", *EXPORT, "--exclude", r"\d+"], "shell globs")


def test_hints_are_spelled_for_the_command_line(work):
    line = refused(work, ["nan.pt", "--energy", "0.9", *EXPORT], "NaN", "--exclude '0'")
    assert "exclude=[" not in line
    refused(work, ["cnn.pt", "--energy", "0.9", *EXPORT, "--rank-multiple", "0"], "--rank-multiple 8")
    refused(work, ["cnn.pt", "--rank", "0", *EXPORT], "--rank 64")
    refused(work, ["search", "cnn.pt", "--max-size", "0.5", *EXPORT, "--heal-steps", "-1"], "--heal-steps 200")


# ------------------------------------------------------------------------------------ other options


@pytest.mark.parametrize("args, needle", [
    (["--rank", "-3"], "rank must be"),
    (["--rank", "1000000000"], "no layer would be factored"),
    (["--energy", "0"], "energy must be in (0, 1]"),
    (["--energy", "1.5"], "energy must be in (0, 1]"),
    (["--energy", "nan"], "energy must be in (0, 1]"),
    (["--target", "1"], "target must be in (0, 1)"),
    (["--target", "0"], "target must be in (0, 1)"),
    (["--rank-ratio", "0"], "rank_ratio must be in (0, 1]"),
    (["--energy", "0.9", "--rank", "8"], "exactly one rank policy"),
    (["--energy", "0.9", "--threads", "0"], "threads must be a whole number >= 1"),
    (["--energy", "0.9", "--atol", "abc"], "'abc' is not a valid float"),
    (["--energy", "0.9", "--keep-fp16", "1", "--int8"], "--calibration"),
])
def test_bad_policy_and_export_options(work, args, needle):
    refused(work, ["cnn.pt", *args, *EXPORT], needle)


@pytest.mark.parametrize("args, needle", [
    (["--max-size", "0"], "cannot read the size '0'"),
    (["--max-size", "-5MB"], "cannot read the size"),
    (["--max-latency", "-1"], "cannot read the latency '-1'"),
    (["--max-latency", "0"], "cannot read the latency"),
    (["--max-size", "0.5", "--targets", "1.5"], "target 1.5 is outside (0, 1)"),
    (["--max-size", "0.5", "--precisions", "int3"], "'int3'"),
    (["--max-size", "0.5", "--heal-steps", "5"], "--calibration FILE"),
    (["--max-size", "0.5", "--keep-fp16", "2"], "--calibration FILE"),
    ([], "at least one constraint"),
])
def test_bad_search_options(work, args, needle):
    refused(work, ["search", "cnn.pt", *EXPORT, *args], needle)


def test_existing_output_is_refused_before_the_search(work):
    (work / "cnn.compressed").mkdir()
    refused(work, ["search", "cnn.pt", *EXPORT, "--max-size", "0.5"], "already exists", "--force")


# ------------------------------------------------------------------------- runs that must go through


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory) -> Path:
    """A two-layer BERT with MiniLM's tokenizer, saved as a Hugging Face folder (small, fast to export)."""
    from compressor.examples import minilm_path

    if minilm_path() is None:
        pytest.skip("all-MiniLM-L6-v2 (its tokenizer) not installed")
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path_factory.mktemp("text") / "tinybert"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_search_on_a_text_model_with_longer_held_out_sentences(tiny_text_model, tmp_path):
    """The held-out sentences tokenize longer than the example inputs: the exports need a dynamic sequence
    axis, or onnxruntime refuses them ("Got: 26 Expected: 16")."""
    (tmp_path / "long.txt").write_text("".join(
        f"The quick brown fox jumps over the lazy dog again and again while the farmer watches from the old "
        f"wooden fence number {i}.\n" for i in range(6)))
    before = snapshot(tiny_text_model)
    res, _ = cli(tmp_path, "search", str(tiny_text_model), "--max-size", "0.9", "--targets", "0.5",
                 "--precisions", "fp32", "--eval-inputs", "long.txt", "--out", "s", "--cache", "c", "--quiet",
                 "--no-latency-aware")  # sequence axes here; a tiny model's factored layers may run slower
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "s" / "report.json").is_file() and snapshot(tiny_text_model) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_poor_fidelity_is_warned_about(work):
    before = snapshot(work)
    res, _ = cli(work, "cnn.pt", "--rank", "2", *EXPORT, "--out", "small", "--quiet")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "Traceback" not in res.stderr, res.stderr
    assert "below 0.9" in lines[0] and "--calibration FILE" in lines[0] and "--exclude '" in lines[0]
    assert not PYTHON_SPELLING.search(lines[0]), lines[0]
    assert {k: v for k, v in snapshot(work).items() if not k.startswith("small")} == before
    import json

    warnings = json.loads((work / "small" / "report.json").read_text())["warnings"]
    assert [w["kind"] for w in warnings] == ["low_fidelity"] and warnings[0]["cosine"] < 0.9
    # A faithful run says nothing.
    res, _ = cli(work, "cnn.pt", "--energy", "0.9", *EXPORT, "--out", "faithful", "--quiet")
    assert res.returncode == 0 and res.stderr == "", res.stderr


@pytest.mark.minilm
@pytest.mark.slow
def test_minilm_plain_svd_of_the_embeddings_is_warned_about(tmp_path):
    from compressor.examples import minilm_path

    if minilm_path() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed")
    res, _ = cli(tmp_path, str(minilm_path()), "--energy", "0.95", "--out", "m", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: "), res.stderr
    assert "embeddings.word_embeddings" in lines[0] and "--calibration FILE" in lines[0]
