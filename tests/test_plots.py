"""Plots are written atomically as real PNGs and hold what they claim; the benchmark's helpers on tiny inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import compressor
from compressor.core.errors import CompressorError

from .models import CNN, mlp

pytest.importorskip("matplotlib")
from compressor.report import plots

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _common
import run_all

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figures(monkeypatch):
    """Every figure saved by compressor.report.plots, keyed by file name (the PNG is still written)."""
    saved = {}
    real = plots._save

    def spy(fig, path):
        saved[Path(path).name] = fig
        real(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return saved


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic: no temp leftovers


class Bert(nn.Module):
    """BERT-like names, to check the grouping by role."""

    def __init__(self):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(50, 16)
        self.layer = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.attention = nn.Module()
            blk.attention.self = nn.Module()
            for n in ("query", "key", "value"):
                setattr(blk.attention.self, n, nn.Linear(16, 16))
            blk.attention.output = nn.Module()
            blk.attention.output.dense = nn.Linear(16, 16)
            blk.intermediate = nn.Module()
            blk.intermediate.dense = nn.Linear(16, 64)
            blk.output = nn.Module()
            blk.output.dense = nn.Linear(64, 16)
            self.layer.append(blk)


GROUP_CASES = [
    ("encoder.layer.0.attention.self.query", "linear", "query"),
    ("model.layers.3.self_attn.k_proj", "linear", "key"),
    ("encoder.layer.5.attention.self.value", "linear", "value"),
    ("encoder.layer.0.attention.output.dense", "linear", "attention output"),
    ("encoder.layer.0.intermediate.dense", "linear", "intermediate"),
    ("encoder.layer.0.output.dense", "linear", "output"),
    ("model.layers.0.mlp.down_proj", "linear", "output"),
    ("embeddings.word_embeddings", "embedding", "embeddings"),
    ("pooler.dense", "linear", "pooler"),
    ("features.0", "conv2d", "conv2d"),
    ("head", "linear", "linear"),
]


@pytest.mark.parametrize(("name", "kind", "group"), GROUP_CASES)
def test_layer_group(name, kind, group):
    assert plots.layer_group(name, kind) == group


@pytest.mark.parametrize("call", ["plan", "model+json-plan"])
def test_plot_spectra_writes_one_panel_per_group_and_one_line_per_layer(tmp_path, figures, call):
    model = Bert()
    plan = compressor.analyze(model, energy=0.9)
    args = {"model": (model,), "plan": (plan,), "model+plan": (model, plan),
            "model+json-plan": (model, compressor.Plan.from_dict(plan.to_dict()))}[call]
    paths = plots.plot_spectra(*args, tmp_path, prefix="bert_")
    assert [p.name for p in paths] == ["bert_spectra.png", "bert_energy.png"]
    for p in paths:
        assert_png(p)
        fig = figures[p.name]
        titles = [ax.get_title().split(" (")[0] for ax in fig.axes]
        assert titles == ["embeddings", "query", "key", "value", "attention output", "intermediate", "output"]
        for ax in fig.axes:
            layers = 1 if ax.get_title().startswith("embeddings") else 2
            dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
            assert len(ax.get_lines()) - len(dashed) == layers
            assert len(dashed) == 1  # one break-even rank per group here (one shape each)
    # break-even of the 64x16 intermediate layer: 64*16/80 / 16 = 0.8 of its full rank
    inter = next(ax for ax in figures["bert_spectra.png"].axes if ax.get_title().startswith("intermediate"))
    assert [ln.get_xdata()[0] for ln in inter.get_lines() if ln.get_linestyle() == "--"] == [0.8]


def test_spectra_values_are_the_singular_values(figures, tmp_path):
    model = mlp()
    spectra = plots.layer_spectra(model)
    for name, sp in spectra.items():
        S = torch.linalg.svdvals(model.get_submodule(name).weight.detach()).double()
        assert torch.allclose(sp["S"], S, rtol=1e-5)
    plan = compressor.analyze(model, rank=4)
    from_plan = plots.layer_spectra(plan=plan)
    assert from_plan.keys() == spectra.keys()
    assert all(torch.allclose(from_plan[k]["S"], spectra[k]["S"], rtol=1e-5) for k in spectra)
    plots.plot_spectra(CNN(), tmp_path)  # convs, a depthwise conv (skipped) and a ConvTranspose (unsupported)
    assert [ax.get_title().split(" (")[0] for ax in figures["spectra.png"].axes] == ["conv2d", "conv1d", "linear"]


def test_plot_spectra_bad_input(tmp_path):
    with pytest.raises(CompressorError, match="read from JSON"):
        plots.plot_spectra(compressor.Plan.from_dict(compressor.analyze(mlp(), rank=4).to_dict()), tmp_path)
    with pytest.raises(CompressorError, match="no factorizable"):
        plots.plot_spectra(nn.Sequential(nn.ReLU()), tmp_path)
    with pytest.raises(CompressorError, match="cannot plot"):
        plots.plot_spectra("model.pt", tmp_path / "x", tmp_path)


def test_plot_fidelity_and_latency(tmp_path, figures):
    rows = [{"model": "a", "policy": "energy", "size_ratio": s, "fidelity": f, "metric": "cos"}
            for s, f in [(0.9, 0.9), (0.7, 0.6), (0.5, 0.4)]]
    rows += [{"model": "a", "policy": "int8", "size_ratio": 0.26, "fidelity": 0.99, "metric": "cos"},
             {"model": "b", "policy": "target", "size_ratio": 0.6, "fidelity": 0.95, "metric": "accuracy"}]
    assert_png(plots.plot_fidelity(rows, tmp_path / "fid.png"))
    a, b = figures["fid.png"].axes
    assert [ln.get_label() for ln in a.get_lines()] == ["energy", "int8"]
    assert len(a.get_lines()[0].get_xdata()) == 3
    assert (a.get_ylabel(), b.get_ylabel()) == ("cos", "accuracy")

    lat = [{"series": "ort, batch 1", "params_ratio": 0.7, "macs_ratio": 0.6, "latency_ratio": 0.8, "label": "t0.4"},
           {"series": "torch, batch 1", "params_ratio": 0.7, "macs_ratio": 1.2, "latency_ratio": 1.05}]
    assert_png(plots.plot_latency(lat, tmp_path / "lat.png"))
    left, right = figures["lat.png"].axes
    for ax, key in ((left, "params_ratio"), (right, "macs_ratio")):
        pts = {ln.get_label(): (ln.get_xdata()[0], ln.get_ydata()[0]) for ln in ax.get_lines()[:2]}
        assert pts == {r["series"]: (r[key], r["latency_ratio"]) for r in lat}
    with pytest.raises(CompressorError):
        plots.plot_latency([], tmp_path / "none.png")


# ------------------------------------------------------------------------------- benchmark helpers


def test_int8_and_fp16_baselines_round_weights_and_count_bytes():
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    q = _common.quantize_int8_(model)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    assert q == sum(w.numel() + 4 * w.shape[0] for w in weights) + sum(4 * m.bias.numel() for m in model
                                                                       if isinstance(m, nn.Linear))
    for w, w0 in zip(weights, before[::2], strict=True):
        scale = w0.abs().amax(1, keepdim=True) / 127
        assert torch.allclose(w / scale, (w / scale).round(), atol=1e-3)  # on the int8 grid
        assert (w - w0).abs().max() <= scale.max() / 2 + 1e-6  # round-to-nearest
    model = mlp()
    assert _common.round_fp16_(model) == sum(2 * p.numel() for p in model.parameters())
    assert all(torch.equal(p, p.half().float()) for p in model.parameters())


def test_embedding_fidelity_metrics():
    ref = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    same = _common.embedding_fidelity(ref, ref.clone())
    assert same["cos_mean"] == pytest.approx(1.0) and same["top10_agreement"] == 1.0
    other = _common.embedding_fidelity(ref, torch.randn(50, 8))
    assert other["cos_mean"] < 0.5 and other["top10_agreement"] < 0.5


def test_fidelity_rows_and_report_on_a_tiny_model():
    x = torch.randn(64, 32)
    model = mlp().eval()
    ref = model(x).detach()
    bench = run_all.Bench("tiny", model, "cos_mean",
                          lambda m: _common.embedding_fidelity(ref, m(x).detach(), k=5),
                          inputs=lambda b: x[:b], batches=(1, 4), timed=(),
                          policies=run_all.policies({"energies": (0.5, 1.0), "targets": (0.5,)}, embeddings=False))
    rows, models = run_all.fidelity_rows(bench)
    assert set(models) == {"energy 0.5", "energy 1.0", "target 0.5"}
    for r in rows:
        r.pop("_plan", None)
    by = {r["setting"]: r for r in rows}
    assert by["dense fp32"]["fidelity"] == pytest.approx(1.0)
    assert by["energy 1.0"]["params_ratio"] == 1.0  # nothing saved: every rank is above break-even
    assert by["target 0.5"]["removed_fraction"] == pytest.approx(0.5, abs=0.05)
    assert by["target 0.5"]["size_ratio"] < 0.6 and by["dense int8 (weights)"]["size_ratio"] < 0.3
    assert by["target 0.5"]["macs_ratio"] == pytest.approx(by["target 0.5"]["params_ratio"], abs=0.02)
    text = run_all.pays_section({"fidelity": rows, "latency": []})
    assert "tiny, energy 1.0: saves 0.0% of the parameters" in text


def test_data_aware_and_healed_rows_on_a_tiny_model():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    model = mlp().eval()
    ref = model(x).detach()
    pol = run_all.policies({"energies": (), "targets": (0.5,), "data_aware": (0.5,)}, embeddings=False,
                           calibration=[x[:32], x[32:]])
    heal_kw = {"data": x, "val": x[:16], "loss": "mse", "lr": 1e-2, "steps": 30, "batch_size": 16}
    bench = run_all.Bench("tiny", model, "cos_mean", lambda m: _common.embedding_fidelity(ref, m(x).detach(), k=5),
                          inputs=lambda b: x[:b], batches=(1, 4), timed=(), policies=pol,
                          heals=[("target 0.5", heal_kw), ("missing", heal_kw)])
    rows, _ = run_all.fidelity_rows(bench)
    by = {r["setting"]: r for r in rows}
    assert set(by) >= {"data-aware 0.5", "target 0.5, healed"} and "missing, healed" not in by
    healed, plain, aware = by["target 0.5, healed"], by["target 0.5"], by["data-aware 0.5"]
    assert healed["params"] == plain["params"] and healed["healed_from"] == "target 0.5"
    assert healed["heal_steps"] == 30 and healed["fidelity"] > plain["fidelity"]
    assert aware["removed_fraction"] == pytest.approx(0.5, abs=0.05)
    res = {"fidelity": rows, "latency": [], "tool_speed": []}
    text = run_all.headlines(res)
    assert "Calibrated: data-aware 0.5" in text and "Healed: target 0.5" in text


@pytest.mark.slow
def test_run_all_quick_digits_writes_the_report(tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, str(root / "benchmarks" / "run_all.py"), "--quick", "--only", "digits",
                    "--out", str(tmp_path)], check=True, env=env, capture_output=True, timeout=900)
    report = (tmp_path / "report.md").read_text()
    for heading in ("## Fidelity vs size", "## Speed of the output", "## Where factoring does not pay",
                    "## Speed of the tool", "## Plots"):
        assert heading in report
    res = json.loads((tmp_path / "report.json").read_text())
    assert {r["setting"] for r in res["fidelity"]} >= {"dense fp32", "dense int8 (onnxruntime)", "target 0.4"}
    assert {(r["runtime"], r["batch"]) for r in res["latency"]} == {(rt, b) for rt in ("onnxruntime", "torch")
                                                                    for b in (1, 256)}
    assert res["tool_speed"][0]["svd_floor_s"] > 0 and res["env"]["command"].startswith("python benchmarks")
    for name in ("digits_spectra.png", "digits_energy.png", "fidelity.png", "latency.png"):
        assert_png(tmp_path / name)
