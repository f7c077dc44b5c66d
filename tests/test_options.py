"""A bad option is refused by Python and by the command line alike (issue 26): ``compressor.compress(path,
energy=1.5)`` raises the one line that ``compress path --energy 1.5`` prints (exit 2, no traceback, nothing
written), its options spelled for each (``eval_text=FILE`` / ``--eval-text FILE``). The checks live in
:class:`compressor.jobs.options.Options`; the command line only parses its flags into one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compressor
from compressor.core.errors import CompressorError
from compressor.examples import digits_cnn
from compressor.jobs.options import DEFAULT_WORKERS, Options
from compressor.jobs.stream import stream_compress

from .test_cli import REPO, run

# (kwargs for Python, flags for the command line, what the line says); every run names a model that exists.
BAD = {
    "energy above 1": ({"energy": 1.5}, ["--energy", "1.5"], "energy must be in (0, 1]"),
    "two policies": ({"energy": 0.9, "rank": 4}, ["--energy", "0.9", "--rank", "4"], "exactly one rank policy"),
    "no policy": ({}, [], "exactly one rank policy is needed, got none"),
    "rank multiple 0": ({"energy": 0.9, "rank_multiple": 0}, ["--energy", "0.9", "--rank-multiple", "0"],
                        "whole number >= 1"),
    "eval window alone": ({"energy": 0.9, "eval_window": 512}, ["--energy", "0.9", "--eval-window", "512"],
                          "only with"),
    "no BOS alone": ({"energy": 0.9, "eval_bos": False}, ["--energy", "0.9", "--no-eval-bos"], "only with"),
    "workers in memory": ({"energy": 0.9, "workers": DEFAULT_WORKERS + 2},
                          ["--energy", "0.9", "--workers", str(DEFAULT_WORKERS + 2)], "only for streamed runs"),
    "ray in memory": ({"energy": 0.9, "ray": "local"}, ["--energy", "0.9", "--ray"], "only for streamed runs"),
    "max rank in memory": ({"energy": 0.9, "max_rank": 8}, ["--energy", "0.9", "--max-rank", "8"],
                           "only for streamed runs"),
    "randomized in memory": ({"energy": 0.9, "svd": "randomized"}, ["--energy", "0.9", "--svd", "randomized"],
                             "only for streamed runs"),
    "keep fp16 without int8": ({"energy": 0.9, "keep_fp16": 1}, ["--energy", "0.9", "--keep-fp16", "1"],
                               "chooses layers of the int8 file"),
    "keep fp16 without calibration": ({"energy": 0.9, "keep_fp16": 1, "variants": ["int8"]},
                                      ["--energy", "0.9", "--keep-fp16", "1", "--int8"], "calibration"),
    "keep fp16 negative": ({"energy": 0.9, "keep_fp16": -1, "variants": ["int8"]},
                           ["--energy", "0.9", "--keep-fp16", "-1", "--int8"], "whole number >= 0"),
    "int4 setting without int4": ({"energy": 0.9, "int4_block_size": 64},
                                  ["--energy", "0.9", "--int4-block-size", "64"], "int4 file is not asked for"),
    "int4 block size": ({"energy": 0.9, "variants": ["int4"], "int4_block_size": 24},
                        ["--energy", "0.9", "--int4", "--int4-block-size", "24"], "power of two"),
    "edge with kv cache": ({"energy": 0.9, "edge": True, "kv_cache": True}, ["--energy", "0.9", "--edge", "--kv-cache"],
                           "key/value cache"),
    "calibration samples alone": ({"energy": 0.9, "calibration_samples": 5},
                                  ["--energy", "0.9", "--calibration-samples", "5"], "calibration"),
    "negative atol": ({"energy": 0.9, "atol": -1.0}, ["--energy", "0.9", "--atol", "-1"], "atol must be"),
    "opset": ({"energy": 0.9, "opset": 3}, ["--energy", "0.9", "--opset", "3"], "opset 3"),
    "threads 0": ({"energy": 0.9, "threads": 0}, ["--energy", "0.9", "--threads", "0"], "threads must be"),
    "bad input shape": ({"energy": 0.9, "input_shapes": ["1xfoo"]}, ["--energy", "0.9", "--input-shape", "1xfoo"],
                        "input shape '1xfoo'"),
    "huge input shape": ({"energy": 0.9, "input_shapes": ["100000x100000"]},
                         ["--energy", "0.9", "--input-shape", "100000x100000"], "more than"),
}
# The same through the streamed job: stream_compress(path, **kwargs) and `compress path --stream ...`.
BAD_STREAMED = {
    "plots with stream": ({"rank": 4, "plots": True}, ["--rank", "4", "--plots"], "cannot be used with"),
    "int8 with stream": ({"rank": 4, "variants": ["int8"]}, ["--rank", "4", "--int8"], "cannot be used with"),
    "target, randomized, unbounded": ({"target": 0.3, "svd": "randomized"},
                                      ["--target", "0.3", "--svd", "randomized"], "rank bound"),
    "randomized with calibration": ({"rank": 4, "svd": "randomized", "calibration": "cal.pt"},
                                    ["--rank", "4", "--svd", "randomized", "--calibration", "cal.pt"],
                                    "cannot be used with it"),
    "no policy, streamed": ({}, [], "exactly one rank policy is needed, got none"),
}


@pytest.fixture
def work(tmp_path) -> Path:
    torch.manual_seed(0)
    torch.save(digits_cnn(), tmp_path / "cnn.pt")
    torch.save(torch.randn(8, 1, 8, 8), tmp_path / "cal.pt")
    return tmp_path


def _python_error(call, work: Path) -> CompressorError:
    with pytest.raises(CompressorError) as caught:
        call()
    err = caught.value
    assert "\n" not in str(err)
    assert "--" not in str(err), f"a Python caller is told command-line flags: {err}"
    return err


def _cli_line(args: list[str], work: Path) -> str:
    before = sorted(p.name for p in work.iterdir())
    res = run(args, cwd=work)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln]
    assert len(lines) == 1, res.stderr
    assert sorted(p.name for p in work.iterdir()) == before  # nothing written, not even a temporary folder
    return lines[0]


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_option_is_the_same_line_from_python_and_the_command_line(work, case):
    kwargs, flags, needle = BAD[case]
    err = _python_error(lambda: compressor.compress(work / "cnn.pt", **kwargs), work)
    assert needle in str(err)
    assert _cli_line(["cnn.pt", *flags], work) == f"error: {err.for_cli()}"


@pytest.mark.parametrize("case", list(BAD_STREAMED))
def test_a_bad_streamed_option_is_the_same_line_from_python_and_the_command_line(work, case):
    kwargs, flags, needle = BAD_STREAMED[case]
    kwargs = {k: work / v if k == "calibration" else v for k, v in kwargs.items()}
    err = _python_error(lambda: stream_compress(work / "cnn.pt", **kwargs), work)
    assert needle in str(err)
    assert _cli_line(["cnn.pt", "--stream", *flags], work) == f"error: {err.for_cli()}"


def test_an_options_object_checks_itself_when_made():
    with pytest.raises(CompressorError, match="only with eval_text; add eval_text=FILE"):
        Options(energy=0.9, eval_window=512)
    opts = Options(energy=0.9)
    opts.energy = 2.0  # set after it was made: the job checks again
    with pytest.raises(CompressorError, match="energy must be in"):
        opts.validate()


def test_options_and_keywords_together_are_refused_not_dropped(work):
    err = _python_error(lambda: compressor.compress(work / "cnn.pt", options=Options(energy=0.9), rank=4), work)
    assert "rank" in str(err) and "one way" in str(err)


def test_an_unknown_keyword_is_named_with_the_valid_ones(work):
    err = _python_error(lambda: compressor.compress(work / "cnn.pt", enrgy=0.9), work)
    assert str(err).startswith("unknown option(s) enrgy (did you mean energy?)")
    assert "rank_ratio" in str(err) and "eval_text" in str(err)
    with pytest.raises(CompressorError, match="unknown option"):
        stream_compress(work / "cnn.pt", rnk=4)


def test_a_streamed_run_is_not_silently_run_in_memory(work):
    err = _python_error(lambda: compressor.compress(work / "cnn.pt", energy=0.9, stream=True), work)
    assert "stream_compress" in str(err)


def test_the_installed_command_prints_the_same_line(work):
    """As a user runs it (a process of its own): one line on stderr, exit 2."""
    err = _python_error(lambda: compressor.compress(work / "cnn.pt", energy=0.9, eval_stride=64), work)
    done = subprocess.run([sys.executable, "-m", "compressor", "cnn.pt", "--energy", "0.9", "--eval-stride", "64"],
                          cwd=work, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stderr == f"error: {err.for_cli()}\n", done.stderr
    assert err.for_cli() == "--eval-stride: only with --eval-text; add --eval-text FILE"
