"""The search and heal jobs return typed results, and what they write is exactly the result's to_dict()."""

from __future__ import annotations

import copy
import json

import torch
from click.testing import CliRunner
from torch import nn

import compressor
from compressor.jobs.heal import heal_folder
from compressor.jobs.results import HealFolderResult, SearchJobResult
from compressor.jobs.search import run_search
from compressor.search.front import Point
from compressor.search.recipes import Constraints
from compressor.train.heal import HealConfig


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))


def test_heal_folder_returns_a_typed_result_whose_dict_is_heal_json(tmp_path):
    teacher = _mlp()
    torch.save(teacher, tmp_path / "teacher.pt")
    plan = compressor.analyze(teacher, rank=3)
    compressor.save(compressor.rewrite(copy.deepcopy(teacher), plan), tmp_path / "small", plan,
                    source=compressor.load_model(tmp_path / "teacher.pt"))
    x = torch.randn(80, 12)
    y = teacher(x).argmax(-1).detach()
    torch.save({"inputs": x[:60], "targets": y[:60]}, tmp_path / "train.pt")
    torch.save({"inputs": x[60:], "targets": y[60:]}, tmp_path / "val.pt")
    result = heal_folder(tmp_path / "small", tmp_path / "healed", data=tmp_path / "train.pt", val=tmp_path / "val.pt",
                         config=HealConfig(steps=4, every=2), progress=False)
    assert isinstance(result, HealFolderResult) and result.supervised and result.teacher is None
    assert result.steps == 4 and set(result.after) == set(result.before) != set()
    assert result.output == str(tmp_path / "healed")
    written = (tmp_path / "healed/heal.json").read_text()
    assert written == json.dumps(result.to_dict(), indent=2, default=str) + "\n"
    assert result.plot == "metrics.png" and "adapter" not in result.to_dict()


def test_run_search_returns_a_typed_result_whose_dict_is_report_json(tmp_path):
    torch.save(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), tmp_path / "mlp.pt")
    options = compressor.Options(input_shapes=["4x64"], latency_aware=False)
    result = run_search(tmp_path / "mlp.pt", tmp_path / "out", constraints=Constraints(min_fidelity=0.8),
                        targets=(0.5,), precisions=("fp32", "int8"), cache_dir=tmp_path / "cache", options=options)
    assert isinstance(result, SearchJobResult) and isinstance(result.chosen, Point) and result.passed
    assert result.chosen is result.front.chosen and (tmp_path / "out" / result.file).is_file()
    assert result.chosen.fidelity >= 0.8 and result.front.points
    report = result.to_dict()
    assert (tmp_path / "out/report.json").read_text() == json.dumps(report, indent=2) + "\n"
    assert report["chosen"]["file"] == result.file and report["chosen"]["name"] == result.chosen.recipe.name
    # The command line prints the same dict with --json, and reads the result's fields for its lines.
    from compressor.cli.main import main

    args = ["search", str(tmp_path / "mlp.pt"), "--input-shape", "4x64", "--targets", "0.5", "--precisions",
            "fp32,int8", "--cache", str(tmp_path / "cache"), "--no-latency-aware", "--min-fidelity", "0.8"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cli")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert f"/{result.file}: {result.chosen.recipe.name}, " in res.output and "report.md" in res.output
