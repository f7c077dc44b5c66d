"""Block-wise healing (compressor.train.blockwise), and healing that never returns a worse model."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import compressor
from compressor.core.errors import CompressorError
from compressor.train.blockwise import block_error, capture, find_blocks
from compressor.train.heal import HealConfig, heal

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # training steps: one thread (tests/conftest.py)


class Block(nn.Module):
    """A residual MLP block called with a keyword argument, as transformer layers are."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> tuple[torch.Tensor]:
        return (x + scale * self.fc2(torch.tanh(self.fc1(x))),)  # a tuple, as Hugging Face layers return


class Stack(nn.Module):
    def __init__(self, width: int = 12, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, scale=0.5)[0]
        return self.head(h)


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    teacher = Stack()
    student = compressor.rewrite(copy.deepcopy(teacher), compressor.analyze(teacher, rank=2, include=["layers.*"]))
    return teacher, student, torch.randn(192, 6), torch.randn(64, 6)


def test_find_blocks_picks_repeated_layers_or_the_first_split():
    _, student, *_ = _problem()
    trainable = [n for n, _ in student.named_parameters() if n.endswith((".down.weight", ".up.weight"))]
    assert find_blocks(student, trainable) == ["layers.0", "layers.1", "layers.2"]
    assert find_blocks(student, trainable, ["layers.1", "layers.1.fc1"]) == ["layers.1"]  # outermost only
    with pytest.raises(CompressorError, match="no module matching head"):
        find_blocks(student, trainable, ["head"])
    seq = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    assert find_blocks(seq, ["0.0.weight", "0.2.weight"]) == ["0.0", "0.2"]  # the wrapper is descended


def test_blockwise_lowers_each_blocks_output_error_on_its_inputs():
    teacher, student, x, val = _problem()
    r = heal(student, teacher=teacher, data=x, val_data=val, method="blockwise", block_steps=30, lr=1e-2,
             batch_size=32, progress=False)
    assert [b["block"] for b in r.blocks] == ["layers.0", "layers.1", "layers.2"]
    for b in r.blocks:
        assert b["after"] < 0.7 * b["before"], b  # every block, measured on held-out inputs
    # Measured again from outside: each healed block against the original block on the inputs the healed
    # model gives it, lower than the compressed block on the inputs the compressed model gives it.
    for name in ("layers.0", "layers.1", "layers.2"):
        healed = block_error(r.model.get_submodule(name), capture(r.model, teacher, name, [val]))
        before = block_error(student.get_submodule(name), capture(student, teacher, name, [val]))
        assert healed < before, name
    assert r.after["val_loss"] < r.before["val_loss"] and r.note is None
    assert r.steps == 0 and len(r.history) == 1  # blockwise alone trains no end-to-end step


def test_both_is_blockwise_then_end_to_end():
    teacher, student, x, val = _problem()
    cfg = HealConfig(block_steps=20, steps=12, lr=5e-3, batch_size=32)
    both = heal(student, cfg.replace(method="both"), teacher=teacher, data=x, val_data=val, progress=False)
    blocks = heal(student, cfg.replace(method="blockwise"), teacher=teacher, data=x, val_data=val, progress=False)
    then = heal(blocks.model, cfg, teacher=teacher, data=x, val_data=val, progress=False)
    for (k, a), b in zip(both.model.state_dict().items(), then.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert both.before == blocks.before  # the bar is the input, not the blockwise result
    assert both.after["val_loss"] <= blocks.after["val_loss"]


@pytest.mark.parametrize("settings", [
    dict(method="end-to-end"), dict(method="blockwise"), dict(method="both"),
    dict(method="end-to-end", train="lora", lora_init="pissa"),  # a merged PiSSA split is not bit-exact
])
def test_a_heal_that_cannot_help_returns_the_input_byte_for_byte(settings):
    _, student, x, val = _problem()
    # The teacher is the student itself: nothing can beat a validation loss of zero.
    r = heal(student, teacher=copy.deepcopy(student), data=x, val_data=val, lr=1e-2, steps=4, block_steps=4,
             batch_size=64, progress=False, **settings)
    assert r.note is not None and "unchanged" in r.note and r.note.count("\n") == 0
    assert r.model is not student and r.best_step == 0 and r.after == r.before
    state, original = r.model.state_dict(), student.state_dict()
    assert state.keys() == original.keys()
    for k, v in original.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


def test_a_heal_that_harms_returns_the_input():
    teacher, student, x, val = _problem()
    r = heal(student, teacher=teacher, data=x, val_data=val, lr=3.0, steps=6, grad_clip=0, progress=False)
    assert r.note is not None and max(h["metrics"]["val_loss"] for h in r.history[1:]) > r.before["val_loss"]
    for k, v in student.state_dict().items():
        assert torch.equal(r.model.state_dict()[k], v), k


def test_blockwise_needs_a_teacher():
    _, student, x, _ = _problem()
    with pytest.raises(CompressorError, match="distils each block"):
        heal(student, data=x, targets=torch.zeros(len(x), dtype=torch.long), method="blockwise")


CHILD = r"""
import os, signal, sys, torch
sys.path.insert(0, os.environ["TEST_DIR"])
torch.set_num_threads(1)
from safetensors.torch import save_file
import compressor.train.checkpoint as ckpt
from compressor.train.heal import heal
from test_heal_blockwise import _problem

what, folder, method = sys.argv[1], sys.argv[2], sys.argv[3]
if what == "kill":
    # Die by SIGKILL while writing the checkpoint after block 2 (tensors written, state not).
    write = ckpt._write_synced
    def dying_write(path, data):
        if ".step-00000002.tmp" in str(path) and path.name == ckpt.STATE:
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, data)
    ckpt._write_synced = dying_write
teacher, student, x, val = _problem()
r = heal(student, teacher=teacher, data=x, val_data=val, method=method, block_steps=15, steps=8, every=4,
         lr=5e-3, batch_size=32, progress=False, checkpoint_dir=None if what == "full" else f"{folder}/ck-{method}",
         resume=what == "resume")
save_file({k: v.contiguous() for k, v in r.model.state_dict().items()}, f"{folder}/{what}-{method}.safetensors")
"""


def _children(tmp_path: Path, *runs: tuple[str, str]) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TEST_DIR": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), what, str(tmp_path), method], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for what, method in runs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_blockwise_resume_after_sigkill_is_byte_identical(tmp_path):
    methods = ("blockwise", "both")
    done = _children(tmp_path, *[("full", m) for m in methods], *[("kill", m) for m in methods])
    for p in done[:2]:
        assert p.returncode == 0, p.stderr
    for p in done[2:]:
        assert p.returncode == -9, p.stderr  # really killed, not finished
    for m in methods:
        assert [d.name for d in sorted((tmp_path / f"ck-{m}" / "blocks").glob("step-*"))] == ["step-00000001"]
    for p in _children(tmp_path, *[("resume", m) for m in methods]):
        assert p.returncode == 0, p.stderr
    for m in methods:
        a, b = load_file(tmp_path / f"full-{m}.safetensors"), load_file(tmp_path / f"resume-{m}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (m, k)


@pytest.mark.slow
def test_cli_heals_blockwise_and_refuses_it_without_a_teacher(tmp_path):
    import json

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    torch.save(teacher, tmp_path / "teacher.pt")
    plan = compressor.analyze(teacher, rank=2)
    compressor.save(compressor.rewrite(copy.deepcopy(teacher), plan), tmp_path / "small", plan,
                    source=compressor.load_model(tmp_path / "teacher.pt"))
    x = torch.randn(96, 6)
    torch.save(x[:64], tmp_path / "x.pt")
    torch.save(x[64:], tmp_path / "val.pt")
    torch.save({"inputs": x[:64], "targets": torch.zeros(64, dtype=torch.long)}, tmp_path / "labelled.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "compressor", "heal", "small", *args], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=120)

    ok = cli("--data", "x.pt", "--val", "val.pt", "--method", "blockwise", "--block-steps", "10", "--lr", "1e-2",
             "--json")
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert [b["block"] for b in summary["blocks"]] == ["0", "2", "4"] and summary["config"]["method"] == "blockwise"
    assert (tmp_path / "small.healed" / "heal.json").is_file()
    bad = cli("--data", "labelled.pt", "--method", "blockwise", "--out", "bad")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no teacher" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()
