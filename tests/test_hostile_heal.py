"""Hostile inputs to ``compress heal`` and ``compress checkpoints``, run as a user runs them (a subprocess):
each exits 2 with one stderr line naming the problem and the fix, no traceback, in bounded time, with
its inputs unchanged and nothing left behind (no output folder, no temporary folder, no checkpoints).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import compressor
from compressor.train.checkpoint import MARKER, STATE, list_checkpoints
from compressor.train.heal import HealConfig

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 90  # each command: import, load, one refused check; far below this unless it hangs


def _mlp(out: int = 5) -> nn.Module:
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, out))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A compressed MLP folder, its original, data files (good and bad) and a finished checkpointed run."""
    from compressor.jobs.heal import heal_folder

    d = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    teacher = _mlp()
    torch.save(teacher, d / "teacher.pt")
    torch.save(_mlp(8), d / "other_teacher.pt")  # another architecture: 8 outputs, not 5
    loaded = compressor.load_model(d / "teacher.pt")
    plan = compressor.analyze(teacher, rank=3)
    compressor.save(compressor.rewrite(copy.deepcopy(teacher), plan), d / "small", plan, source=loaded)
    x = torch.randn(150, 12)
    y = teacher(x).argmax(-1).detach()
    torch.save({"inputs": x[:120], "targets": y[:120]}, d / "train.pt")
    torch.save({"inputs": x[120:], "targets": y[120:]}, d / "val.pt")
    torch.save(x[:120], d / "unlabelled.pt")
    torch.save({"inputs": torch.randn(40, 7), "targets": y[:40]}, d / "wrong_shape.pt")
    torch.save({"inputs": torch.randn(30, 7), "targets": y[:30]}, d / "val_wrong_shape.pt")
    torch.save({"inputs": x[:40], "targets": torch.full((40,), 57)}, d / "labels_57.pt")
    torch.save({"inputs": x[:40], "targets": torch.cat([y[:39], torch.tensor([-1])])}, d / "labels_neg.pt")
    torch.save({"inputs": x[120:], "targets": torch.full((30,), 57)}, d / "val_labels_57.pt")
    torch.save({"inputs": x[:40], "targets": torch.randn(40, 5)}, d / "float_targets.pt")
    torch.save({"inputs": x[:40], "targets": torch.randn(40, 3)}, d / "float_targets_3.pt")
    nan = x[:40].clone()
    nan[3, 2] = float("nan")
    torch.save({"inputs": nan, "targets": y[:40]}, d / "nan_inputs.pt")
    torch.save(torch.empty(0, 12), d / "empty.pt")
    (d / "zero_bytes.pt").write_bytes(b"")
    (d / "a_file").write_text("not a folder\n")
    heal_folder(d / "small", d / "done", data=d / "train.pt", val=d / "val.pt",
                config=HealConfig(steps=6, every=3), checkpoint_dir=d / "ck", progress=False)
    shutil.rmtree(d / "done")
    return d


def _tree(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (hidden ones too) with the sha256 of each file's bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "symlink -> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], capture_output=True, text=True,
                         env=env, cwd=cwd, timeout=SECONDS)
    res.seconds = time.monotonic() - start
    return res


def _refused(res: subprocess.CompletedProcess, *words: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "; " in lines[0], lines[0]  # the problem; the fix
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def work(base, tmp_path) -> Path:
    """A private copy of the base folder (symlinks kept as symlinks)."""
    shutil.copytree(base, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def _refused_untouched(work: Path, args: list[object], *words: str) -> None:
    before = _tree(work)
    res = _cli(*args, cwd=work)
    _refused(res, *words)
    assert _tree(work) == before  # inputs unchanged, no output, no temporary folder, no checkpoints


SUP = ["heal", "small", "--data", "train.pt", "--val", "val.pt", "--quiet"]


@pytest.mark.parametrize("args, words", [
    (["heal", "small", "--data", "wrong_shape.pt"], ["model cannot run on the training inputs", "shaped"]),
    (["heal", "small", "--data", "labels_57.pt"], ["labels go from 57 to 57", "5 classes", "0..4"]),
    (["heal", "small", "--data", "labels_neg.pt"], ["from -1", "0..4"]),
    (["heal", "small", "--data", "train.pt", "--checkpoint-dir", "a_file"], ["is a file", "--checkpoint-dir"]),
    (["heal", "small", "--data", "train.pt", "--loss", "kl"], ["loss kl", "class labels", "--loss"]),
    (["heal", "small", "--data", "float_targets.pt", "--loss", "ce"], ["loss ce needs class labels", "float"]),
    (["heal", "small", "--data", "float_targets_3.pt"], ["targets are shaped [32, 3]", "[32, 5]"]),
    (["heal", "small", "--data", "unlabelled.pt", "--teacher", "other_teacher.pt"],
     ["teacher's outputs are [32, 8]", "[32, 5]", "--teacher"]),
    (["heal", "small", "--data", "train.pt", "--resume"], ["--checkpoint-dir"]),
    (["heal", "small", "--data", "train.pt", "--steps", "0"], ["steps must be >= 1", "--steps"]),
    (["heal", "small", "--data", "train.pt", "--lr", "nan"], ["lr must be a finite number", "--lr"]),
    (["heal", "small", "--data", "train.pt", "--lr", "-1"], ["lr must be > 0"]),
    (["heal", "small", "--data", "train.pt", "--lora-dropout", "1"], ["lora_dropout must be >= 0 and < 1"]),
    (["heal", "small", "--data", "train.pt", "--samples", "0"], ["samples", "--samples"]),
    (["heal", "small", "--data", "train.pt", "--monitor", "val_accuracy"], ["monitor='val_accuracy'",
                                                                             "train_loss"]),
    (["heal", "small", "--data", "empty.pt", "--teacher", "teacher.pt"], ["empty"]),
    (["heal", "small", "--data", "zero_bytes.pt"], ["zero_bytes.pt"]),
    (["heal", "small", "--data", "nan_inputs.pt"], ["NaN", "training inputs"]),
    ([*SUP[:4], "--val", "val_wrong_shape.pt"], ["validation inputs"]),
    ([*SUP[:4], "--val", "val_labels_57.pt"], ["validation labels go from 57"]),
    ([*SUP[:4], "--val", "unlabelled.pt"], ["validation data has no targets", "--val"]),
    ([*SUP[:4], "--lr", "1e30", "--grad-clip", "0", "--optimizer", "sgd"], ["the loss became", "--lr"]),
    ([*SUP[:4], "--checkpoint-dir", "small"], ["compressed model's folder", "of its own"]),
    ([*SUP[:4], "--checkpoint-dir", "small/ck"], ["compressed model's folder", "of its own"]),
    ([*SUP[:4], "--out", "o", "--checkpoint-dir", "o/ck"], ["output folder", "of its own"]),
])
def test_heal_refuses(work, args, words):
    _refused_untouched(work, args, *words)


def _resign(step_dir: Path, edit) -> None:
    """Edit a checkpoint's state.json and re-sign it, so that only a content check can catch the edit."""
    state = json.loads((step_dir / STATE).read_text())
    edit(state)
    data = json.dumps(state).encode()
    (step_dir / STATE).write_bytes(data)
    marker = json.loads((step_dir / MARKER).read_text())
    marker["files"][STATE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / MARKER).write_text(json.dumps(marker))


def _newest(work: Path) -> Path:
    return Path(list_checkpoints(work / "ck")[-1].path)


def _drop(key):
    return lambda s: s.pop(key)


def _set(key, value):
    return lambda s: s.update({key: value})


RESUME = [*SUP, "--steps", "6", "--every", "3", "--checkpoint-dir", "ck", "--resume"]


def test_resume_of_the_untouched_run_works(work):
    """The baseline the cases below break: the same command resumes (here: finds the run finished)."""
    res = _cli(*RESUME, "--json", cwd=work)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["resumed_from"] == 6


@pytest.mark.parametrize("edit, words", [
    (_drop("config"), ["no training config"]),
    (_drop("optimizer"), ["no optimizer state"]),
    (_drop("data_position"), ["data position"]),
    (_set("data_position", [0, -3]), ["data position"]),
    (_drop("rng"), ["no RNG states"]),
    (_set("step", -1000), ["step is -1000"]),
    (_set("step", 2), ["folder name says 6"]),
    (_set("metrics", [1.0, 2.0]), ["metrics are a list"]),
    (_set("history", {"step": 1}), ["history is a dict"]),
    (_set("format", 99), ["format 99"]),
])
def test_resume_refuses_a_malformed_checkpoint(work, edit, words):
    _resign(_newest(work), edit)
    _refused_untouched(work, RESUME, "malformed", "delete", *words)


def test_resume_refuses_a_subfolder_or_a_symlink_loop(work):
    newest = _newest(work)
    (newest / "sub").mkdir()
    _refused_untouched(work, RESUME, "malformed", "subfolder")
    (newest / "sub").rmdir()
    (newest / "loop").symlink_to("loop")
    _refused_untouched(work, RESUME, "malformed", "symlink")


@pytest.mark.parametrize("edit, words", [
    (_set("metrics", [1.0, 2.0]), ["metrics are a list"]),
    (_set("metrics", {"val_loss": "low"}), ["non-numbers (val_loss)"]),
    (_set("step", -1000), ["step is -1000"]),
    (lambda s: s.update({"history": [7]}), ["history holds 7"]),
])
def test_checkpoints_listing_refuses_a_malformed_field(work, edit, words):
    _resign(_newest(work), edit)
    before = _tree(work)
    res = _cli("checkpoints", "ck", cwd=work)
    _refused(res, *words)
    assert "refused" in res.stdout  # the table is still printed, the bad row marked
    assert _tree(work) == before


def test_checkpoints_listing_survives_a_malformed_summary_file(work):
    (work / "ck" / "checkpoints.json").write_text("[1, 2]")
    res = _cli("checkpoints", "ck", cwd=work)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr


def test_resume_past_a_damaged_checkpoint_warns_in_one_line(work):
    """Crash damage (here a truncated file) is skipped, as after a crash: one warning line, then success."""
    newest = _newest(work)
    data = (newest / STATE).read_bytes()
    (newest / STATE).write_bytes(data[:-10])
    res = _cli(*RESUME, "--json", cwd=work)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines() == [f"warning: skipping checkpoint ck/{newest.name}: "
                                               f"{STATE} is truncated or resized ({len(data) - 10} bytes, "
                                               f"expected {len(data)})"]
    assert json.loads(res.stdout)["resumed_from"] == 3
