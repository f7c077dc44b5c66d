"""``compress checkpoints diff A B`` finds a planted low-rank change; ``compress checkpoints DIR --plot``
draws the monitored metric with the best step marked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.train.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _planted() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    a = {"0.weight": torch.randn(16, 12, generator=g), "0.bias": torch.randn(16, generator=g),
         "1.weight": torch.randn(10, 16, generator=g), "2.weight": torch.randn(4, 3, 3, 3, generator=g)}
    b = {k: v.clone() for k, v in a.items()}
    b["1.weight"] += 0.3 * torch.randn(10, 2, generator=g) @ torch.randn(2, 16, generator=g)  # rank 2
    b["2.weight"] += 1e-4 * torch.randn(4, 3, 3, 3, generator=g)  # a tiny full-rank drift elsewhere
    return a, b


def _write(kind: str, tensors: dict, folder: Path, name: str, metrics: dict) -> Path:
    if kind == "pt":
        torch.save(tensors, folder / f"{name}.pt")
        return folder / f"{name}.pt"
    if kind == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(folder / f"{name}.safetensors"))
        return folder / f"{name}.safetensors"
    manager = CheckpointManager(folder / "run", monitor="val_loss")
    step = {"a": 10, "b": 20}[name]
    return manager.save(step, {f"param.{k}": v for k, v in tensors.items()}, {}, metrics)


@pytest.mark.parametrize("kind", ["pt", "safetensors", "checkpoint"])
def test_diff_finds_the_planted_rank_2_change(tmp_path, kind):
    a, b = _planted()
    pa = _write(kind, a, tmp_path, "a", {"val_loss": 0.9})
    pb = _write(kind, b, tmp_path, "b", {"val_loss": 0.4})
    res = _cli("checkpoints", "diff", pa, pb, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    rows = {r["name"]: r for r in out["tensors"]}
    assert out["moved_most"][0] == "1.weight" and rows["1.weight"]["effective_rank"] == 2
    assert rows["2.weight"]["effective_rank"] > 2  # the drift is full rank, just small
    assert rows["0.weight"]["relative"] == 0 and rows["0.weight"]["effective_rank"] is None
    assert rows["1.weight"]["relative"] == pytest.approx(float((b["1.weight"] - a["1.weight"]).norm()
                                                               / a["1.weight"].norm()), rel=1e-6)
    if kind == "checkpoint":
        assert out["metrics"] == {"val_loss": [0.9, 0.4]} and out["steps"] == [10, 20]
        table = _cli("checkpoints", "diff", pa, pb, cwd=tmp_path).stdout
        assert "moved most: 1.weight" in table and "val_loss" in table


def test_plot_marks_the_best_step(tmp_path):
    manager = CheckpointManager(tmp_path / "run", monitor="val_accuracy", mode="max")
    for step, acc in ((0, 0.5), (5, 0.8), (10, 0.7)):
        manager.save(step, {"param.w": torch.zeros(2)}, {}, {"val_accuracy": acc, "train_loss": 1.0 / (step + 1)})
    res = _cli("checkpoints", tmp_path / "run", "--plot", "acc.png", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "step" in res.stdout  # the listing still prints
    from matplotlib.image import imread

    img = imread(tmp_path / "acc.png")
    red = (img[..., 0] > 0.8) & (img[..., 1] < 0.2) & (img[..., 2] < 0.2)
    assert red.sum() > 20  # the best-step star is drawn


@pytest.mark.parametrize("args, message", [
    (["checkpoints", "diff", "a.pt", "other.pt"], "'1.weight' is [10, 16] in"),
    (["checkpoints", "diff", "a.pt", "a.pt", "--energy", "2"], "energy must be in (0, 1]"),
    (["checkpoints", "run", "--plot", "x.txt"], "is not a .png file"),
    (["checkpoints", "run", "--plot", "x.png"], "no readable checkpoints.json"),
])
def test_bad_diff_and_plot_input_is_one_line_exit_2(tmp_path, args, message):
    a, _ = _planted()
    torch.save(a, tmp_path / "a.pt")
    torch.save({**a, "1.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    (tmp_path / "run").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert message in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
