"""distill="hidden": end-to-end distillation that also matches every block's output to the teacher's."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compressor
from compressor.core.errors import CompressorError
from compressor.train.blockwise import block_error, capture
from compressor.train.heal import HealConfig, heal
from compressor.train.losses import hidden_loss
from tests.test_heal_blockwise import _problem

pytestmark = pytest.mark.usefixtures("one_thread")  # training steps: one thread (tests/conftest.py)


def _block_errors(model, teacher, val) -> list[float]:
    """Each block's output against the teacher's block on the same inputs (those ``model`` gives it)."""
    names = ("layers.0", "layers.1", "layers.2")
    return [block_error(model.get_submodule(n), capture(model, teacher, n, [val])) for n in names]


def test_hidden_distillation_lowers_each_blocks_error_below_output_only():
    teacher, student, x, val = _problem()
    cfg = HealConfig(steps=60, lr=1e-2, batch_size=32, every=20)
    output = heal(student, cfg, teacher=teacher, data=x, val_data=val, progress=False)
    hidden = heal(student, cfg.replace(distill="hidden"), teacher=teacher, data=x, val_data=val, progress=False)
    assert output.note is None and hidden.note is None
    start = _block_errors(student, teacher, val)
    out_err, hid_err = _block_errors(output.model, teacher, val), _block_errors(hidden.model, teacher, val)
    # The head maps 12 features to 4: the output loss leaves the hidden states free, the hidden loss does not.
    for s, o, h in zip(start, out_err, hid_err, strict=True):
        assert h < o and h < s, (start, out_err, hid_err)
    assert sum(hid_err) < 0.7 * sum(out_err), (out_err, hid_err)
    # The monitored (output) loss still improves, and the teacher is left without hooks.
    assert hidden.after["val_loss"] < hidden.before["val_loss"]
    assert not any(m._forward_hooks for m in teacher.modules())
    assert not any(m._forward_hooks for m in hidden.model.modules())
    assert hidden.config.distill == "hidden" and output.config.distill == "output"


def test_hidden_loss_is_relative_and_masked():
    t = [torch.ones(2, 3, 4), 10 * torch.ones(2, 3, 4)]
    s = [1.1 * t[0], 1.1 * t[1]]  # the same relative error at two scales
    assert torch.isclose(hidden_loss(s, t), torch.tensor(0.01))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    s[0][:, 2] = 100.0  # padding: left out
    assert torch.isclose(hidden_loss(s, t, mask), torch.tensor(0.01))
    with pytest.raises(CompressorError, match="blocks ran 1 times but the teacher's 2"):
        hidden_loss(s[:1], t)


def test_hidden_distillation_needs_a_teacher():
    _, student, x, _ = _problem()
    with pytest.raises(CompressorError, match="distill=hidden"):
        heal(student, data=x, targets=torch.zeros(len(x), 4), distill="hidden", steps=2)


@pytest.mark.slow
def test_hidden_distillation_with_targets_matches_the_teachers_blocks():
    """Targets for the output loss, the teacher for the blocks: both losses act (this crashed before)."""
    teacher, student, x, val = _problem()
    with torch.no_grad():
        y = teacher(x)
    cfg = HealConfig(steps=40, lr=1e-2, batch_size=32, every=20)
    plain = heal(student, cfg, data=x, targets=y, progress=False)
    hidden = heal(student, cfg.replace(distill="hidden"), teacher=teacher, data=x, targets=y, progress=False)
    assert sum(_block_errors(hidden.model, teacher, val)) < sum(_block_errors(plain.model, teacher, val))
    assert not any(m._forward_hooks for m in teacher.modules())


def test_cli_distill_hidden_and_its_refusal_without_a_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                  torch.nn.Linear(16, 4))
    torch.save(teacher, tmp_path / "teacher.pt")
    plan = compressor.analyze(teacher, rank=2)
    compressor.save(compressor.rewrite(copy.deepcopy(teacher), plan), tmp_path / "small", plan,
                    source=compressor.load_model(tmp_path / "teacher.pt"))
    x = torch.randn(96, 6)
    torch.save(x[:64], tmp_path / "x.pt")
    torch.save(x[64:], tmp_path / "val.pt")
    torch.save({"inputs": x[:64], "targets": torch.zeros(64, 4)}, tmp_path / "labelled.pt")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "compressor", "heal", "small", *args], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=120)

    ok = cli("--data", "x.pt", "--val", "val.pt", "--distill", "hidden", "--steps", "8", "--lr", "1e-2", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["config"]["distill"] == "hidden"
    bad = cli("--data", "labelled.pt", "--distill", "hidden", "--steps", "2", "--out", "bad")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "distill=hidden" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()
