"""Checkpoints: exact resume after SIGKILL, corrupt checkpoints skipped, rotation keeps the best,
pickle refused, listing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import compressor
from compressor.cli.train import checkpoints as checkpoints_command
from compressor.train.checkpoint import (
    MARKER,
    STATE_FILE,
    TENSORS,
    CheckpointManager,
    CheckpointWarning,
    UnsafeCheckpointError,
    check,
    format_checkpoints,
    list_checkpoints,
)
from compressor.train.heal import heal

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


# A tiny compressed MLP and data, identical in every process that builds it.
SETUP = """
import torch, compressor
from torch import nn
torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))
x = torch.randn(150, 12)
y = teacher(x).argmax(-1).detach()
import copy
student = compressor.rewrite(copy.deepcopy(teacher), compressor.analyze(teacher, rank=3))
"""


def _setup():
    scope: dict = {}
    exec(SETUP, scope)  # the same model and data as the child processes build
    return scope["teacher"], scope["student"], scope["x"], scope["y"]


CHILD = SETUP + textwrap.dedent("""
    import os, signal, sys
    from safetensors.torch import save_file
    import compressor.train.checkpoint as ckpt
    from compressor.train.heal import heal
    what, folder = sys.argv[1], sys.argv[2]
    trains = sys.argv[3:]
    if what == "kill":
        # Die by SIGKILL in the middle of writing the step-15 checkpoint (tensors written, state not):
        # the step-10 checkpoint (mid-epoch) is the newest whole one; the half-written folder is ignored.
        write = ckpt._write_synced
        def dying_write(path, data):
            if ".step-00000015.tmp" in str(path) and path.name == ckpt.STATE:
                os.kill(os.getpid(), signal.SIGKILL)
            write(path, data)
        ckpt._write_synced = dying_write
    for train in trains:
        r = heal(student, data=x[:120], targets=y[:120], val_data=(x[120:], y[120:]), train=train, lora_rank=2,
                 lora_dropout=0.2, batch_size=16, epochs=3, every=5, lr=3e-2, seed=7, progress=False,
                 checkpoint_dir=None if what == "full" else f"{folder}/ck-{train}", resume=what == "resume",
                 keep_last=2)
        state = {k: v.contiguous() for k, v in r.model.state_dict().items()}
        save_file(state, f"{folder}/{what}-{train}.safetensors")
        print(train, "resumed_from", r.resumed_from)
""")
TRAINS = ("factors", "lora")


def _children(tmp_path: Path, *runs: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Run child processes side by side (each pays torch's import time) and wait for them all."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), what, str(tmp_path), *trains], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for what, *trains in runs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    full, *killed = _children(tmp_path, ("full", *TRAINS), *[("kill", t) for t in TRAINS])
    assert full.returncode == 0, full.stderr
    for train, k in zip(TRAINS, killed, strict=True):
        assert k.returncode == -9, k.stderr  # really killed, not finished
        ckdir = tmp_path / f"ck-{train}"
        steps = [r.step for r in list_checkpoints(ckdir)]
        assert steps[-2:] == [5, 10] and len(steps) <= 3  # rotation kept 2 (+ the best); 15 never landed
        assert any(p.name.startswith(".step-00000015.tmp") for p in ckdir.iterdir())
    (resumed,) = _children(tmp_path, ("resume", *TRAINS))
    assert resumed.returncode == 0, resumed.stderr
    for train in TRAINS:
        assert f"{train} resumed_from 10" in resumed.stdout
        a = load_file(tmp_path / f"full-{train}.safetensors")
        b = load_file(tmp_path / f"resume-{train}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (train, key)
        assert not any(p.name.startswith(".step-") for p in (tmp_path / f"ck-{train}").iterdir())


def _run(folder: Path, lr: float = 3e-2, **kw):
    _, student, x, y = _setup()
    return heal(student, data=x[:120], targets=y[:120], val_data=(x[120:], y[120:]), batch_size=16, epochs=2,
                every=3, lr=lr, progress=False, checkpoint_dir=folder, keep_last=10, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished run with checkpoints: ``(folder, final state_dict)``; tests copy the folder."""
    folder = tmp_path_factory.mktemp("trained") / "ck"
    return folder, _run(folder).model.state_dict()


def _copy(trained, tmp_path: Path) -> Path:
    shutil.copytree(trained[0], tmp_path / "ck")
    return tmp_path / "ck"


def _corrupt_flip(d: Path):
    f = d / TENSORS
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _corrupt_truncate(d: Path):
    f = d / TENSORS
    f.write_bytes(f.read_bytes()[:-100])


def _corrupt_no_marker(d: Path):
    (d / MARKER).unlink()


@pytest.mark.parametrize("corrupt, reason", [(_corrupt_flip, "sha256"), (_corrupt_truncate, "truncated"),
                                             (_corrupt_no_marker, "no completeness marker")])
def test_corrupt_newest_is_skipped_with_a_warning(trained, tmp_path, corrupt, reason):
    folder = _copy(trained, tmp_path)
    rows = list_checkpoints(folder)
    newest = Path(rows[-1].path)
    corrupt(newest)
    assert reason in check(newest)
    rows = list_checkpoints(folder)
    assert not rows[-1].valid and reason in rows[-1].reason and all(r.valid for r in rows[:-1])
    assert "INVALID" in format_checkpoints(rows)
    with pytest.warns(CheckpointWarning, match=newest.name):
        again = _run(folder, resume=True)
    assert again.resumed_from == rows[-2].step  # the previous one was used
    # It redoes the lost steps and ends where the first run ended.
    for p, q in zip(trained[1].values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("mode, values, keep_last, kept, best", [
    ("min", [5, 1, 4, 3, 2, 6], 2, [2, 5, 6], 2),
    ("max", [5, 1, 4, 3, 2, 6], 2, [5, 6], 6),
    ("max", [9, 1, 4, 3, 2, 6], 3, [1, 4, 5, 6], 1),
    ("min", [3, 3, 3, 3], 1, [1, 4], 1),  # a tie is no improvement: the earliest stays best
])
def test_rotation_keeps_the_best(tmp_path, mode, values, keep_last, kept, best):
    m = CheckpointManager(tmp_path, keep_last=keep_last, monitor="val_loss", mode=mode)
    for step, v in enumerate(values, start=1):
        m.save(step, {"w": torch.full((3,), float(step))}, {"note": "x"}, {"val_loss": float(v)})
    assert [r.step for r in list_checkpoints(tmp_path)] == kept
    summary = json.loads((tmp_path / STATE_FILE).read_text())
    assert summary["best_step"] == best and summary["best_path"].endswith(f"step-{best:08d}")
    assert [h["step"] for h in summary["history"]] == list(range(1, len(values) + 1))
    assert [r.step for r in list_checkpoints(tmp_path) if r.best] == [best]
    assert torch.equal(m.load_tensors(m.best_path())["w"], torch.full((3,), float(best)))


def _pickle_in_place(d: Path):
    """Replace the tensors by a torch.save pickle and re-sign it, so only the payload check can catch it."""
    import hashlib
    f = d / TENSORS
    torch.save({"w": torch.zeros(3)}, f)
    marker = json.loads((d / MARKER).read_text())
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    marker["files"][TENSORS] = {"bytes": f.stat().st_size, "sha256": digest}
    (d / MARKER).write_text(json.dumps(marker))


def _pickle_beside(d: Path):
    import pickle
    (d / "extra.bin").write_bytes(pickle.dumps({"a": 1}))


@pytest.mark.parametrize("inject", [_pickle_in_place, _pickle_beside])
def test_pickle_payload_is_refused(tmp_path, inject):
    m = CheckpointManager(tmp_path)
    path = m.save(1, {"w": torch.zeros(3)}, {}, {"val_loss": 1.0})
    inject(path)
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        m.newest_valid()
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        m.load(path)
    assert list_checkpoints(tmp_path)[0].reason == "refused: contains a pickle payload"


def test_checkpoints_command_lists_them(trained):
    result = CliRunner().invoke(checkpoints_command, [str(trained[0])])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["step", "train_loss"] and "val_accuracy" in lines[0]
    assert sum(line.startswith("*") for line in lines) == 1 and "valid" in result.output
    as_json = CliRunner().invoke(checkpoints_command, [str(trained[0]), "--json"])
    rows = json.loads(as_json.output)
    assert [r["step"] for r in rows] == [0, 3, 6, 9, 12, 15, 16] and sum(r["best"] for r in rows) == 1


def test_fresh_run_refuses_a_used_folder(trained, tmp_path):
    folder = _copy(trained, tmp_path)
    with pytest.raises(compressor.CompressorError, match="resume"):
        _run(folder)
    with pytest.raises(compressor.CompressorError, match="other options: lr"):
        _run(folder, resume=True, lr=1e-3)


def test_a_safetensors_header_that_looks_like_a_pickle_is_not_refused(tmp_path):
    """A header of 640 bytes starts with b"\\x80\\x02", a pickle's first two bytes: still safetensors."""
    from safetensors.torch import save

    meta = {"format": "1"}
    name = next("k" * n for n in range(1, 700)
                if save({"k" * n: torch.zeros(1)}, metadata=meta)[:2] == b"\x80\x02")
    path = CheckpointManager(tmp_path).save(1, {name: torch.zeros(1)}, {}, {"val_loss": 1.0})
    assert (path / TENSORS).read_bytes()[:2] == b"\x80\x02"
    assert check(path) is None
    assert list(CheckpointManager(tmp_path).load(path)[0]) == [name]
