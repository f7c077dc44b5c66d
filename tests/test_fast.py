"""Issue 18: thread choice per operation (and --threads), latency-aware ranks that never make a model slower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import compressor
from compressor.core.threads import LINALG_THREADS, linalg_threads, thread_budget, torch_threads
from compressor.export.latency import (
    Comparison,
    LatencyTable,
    break_even,
    cache_dir,
    compare_onnx,
    keep_slow_layers_dense,
    latency_decisions,
    layer_key,
    machine_id,
)
from compressor.export.onnx import export_onnx
from tests.models import mlp
from tests.test_cli import run

# ------------------------------------------------------------------------------------------ threads


def _record_svd_threads(monkeypatch) -> list[int]:
    """Record torch's thread count at every SVD the analysis takes."""
    seen: list[int] = []
    real = torch.linalg.svd

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    return seen


def test_analyze_runs_svds_on_one_thread_and_restores_the_callers_setting(monkeypatch):
    seen = _record_svd_threads(monkeypatch)
    with torch_threads(3):
        compressor.analyze(mlp(), energy=0.9)
        assert torch.get_num_threads() == 3
    assert seen and set(seen) == {LINALG_THREADS}


def test_threads_option_applies_to_the_svds_and_is_restored(monkeypatch):
    seen = _record_svd_threads(monkeypatch)
    before = torch.get_num_threads()
    other = 3 if before != 3 else 2
    compressor.analyze(mlp(), energy=0.9, threads=other)
    assert seen and set(seen) == {other}
    assert torch.get_num_threads() == before


def test_thread_settings_are_restored_when_the_block_raises():
    before = torch.get_num_threads()
    try:
        with thread_budget(before + 1), linalg_threads():
            assert torch.get_num_threads() == before + 1  # the user's choice wins over the per-op default
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == before


def test_cli_threads_is_checked_and_restored(tmp_path):
    model = tmp_path / "mlp.pt"
    torch.save(mlp(), model)
    before = torch.get_num_threads()
    bad = run(["analyze", model, "--energy", "0.9", "--threads", "0"])
    assert bad.exit_code == 2
    assert "threads must be a whole number >= 1" in bad.output and "--threads 1" in bad.output
    assert "Traceback" not in bad.output
    assert not (tmp_path / "mlp.compressed").exists()
    ok = run(["analyze", model, "--energy", "0.9", "--threads", "1", "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------------ latency-aware


def rank_timer(slow_from: int, calls: list | None = None, int8: float = 0.5, other: float = 0.5):
    """A fake onnxruntime timer. A factored layer graph of rank r (its file is rank<r>.onnx) runs at
    r / slow_from of the dense latency, so it is faster below ``slow_from``; a whole model file at ``int8``
    of dense if it holds integer operators (int8 or 4-bit), else at ``other``."""
    def timer(a, b, inputs, threads) -> Comparison:
        b = Path(b)
        if calls is not None:
            calls.append(b.name)
        if b.stem.startswith("rank"):
            ratio = int(b.stem[4:]) / slow_from
        else:
            import onnx

            ops = {node.op_type for node in onnx.load(str(b), load_external_data=False).graph.node}
            ratio = int8 if any(k in op for op in ops for k in ("Integer", "Quantize", "NBits")) else other
        return Comparison(1.0, ratio, ratio, 1)
    return timer


def test_break_even_is_cached_atomically_and_reused(tmp_path):
    layer, x = nn.Linear(64, 64), torch.randn(2, 64)
    calls: list[str] = []
    table = LatencyTable(tmp_path / "latency.json")
    entry = break_even(layer, x, threads=1, table=table, timer=rank_timer(10, calls))
    assert entry["break_even"] == 9 and entry["max_saving_rank"] == 31  # r/10 below the 0.95 margin <=> r <= 9
    assert calls and len(calls) <= 8 and table.writes == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.json"]  # no temporary file left
    stored = json.loads((tmp_path / "latency.json").read_text())
    assert stored["entries"][layer_key(layer, x, 1)]["break_even"] == 9
    # A new table on the same file (a later run) measures nothing; another shape or thread count does.
    calls.clear()
    again = LatencyTable(tmp_path / "latency.json")
    assert break_even(layer, x, threads=1, table=again, timer=rank_timer(10, calls)) == entry and not calls
    break_even(layer, torch.randn(8, 64), threads=1, table=again, timer=rank_timer(10, calls))
    assert calls
    # A corrupt file costs a measurement, never a crash, and is replaced by a valid one.
    (tmp_path / "latency.json").write_text("{not json")
    assert LatencyTable(tmp_path / "latency.json").entries == {}
    fresh = LatencyTable(tmp_path / "latency.json")
    break_even(layer, x, threads=1, table=fresh, timer=rank_timer(10))
    assert layer_key(layer, x, 1) in json.loads((tmp_path / "latency.json").read_text())["entries"]


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert LatencyTable().path.parent == tmp_path / "c" and machine_id() in LatencyTable().path.name


def test_latency_aware_plan_leaves_a_slower_layer_dense(tmp_path):
    model = mlp()  # 32->64, 64->64, 64->10
    plan = compressor.analyze(model, rank=12, overrides={"0": 5})
    assert {lp.name: lp.rank for lp in plan.factored} == {"0": 5, "2": 12}
    decisions = latency_decisions(model, plan, torch.randn(3, 32), threads=1,
                                  table=LatencyTable(tmp_path / "t.json"), timer=rank_timer(10))
    assert decisions["0"]["faster"] and not decisions["2"]["faster"]
    assert decisions["2"]["input_shape"] == [3, 64] and decisions["2"]["break_even"] == 9
    before = plan.totals()["macs_after"]
    assert keep_slow_layers_dense(plan, decisions) == ["2"]
    assert {lp.name: lp.rank for lp in plan.factored} == {"0": 5}
    lp = plan.layer("2")
    assert lp.params_after == lp.params_before and "slower than dense" in lp.reason and "break-even rank 9" in lp.reason
    assert plan.totals()["macs_after"] > before and any("latency-aware" in n for n in plan.notes)
    factored = compressor.rewrite(model, plan)
    assert isinstance(factored[2], nn.Linear) and not isinstance(factored[0], nn.Linear)


def _search(tmp_path, timer):
    from compressor.search.evaluate import output_fidelity
    from compressor.search.recipes import Constraints, Recipe
    from compressor.search.search import search

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 8)).eval()
    recipes = [Recipe("fp16", 0.5), Recipe("int8", 0.5)]
    return search(model, torch.randn(4, 32), evaluation=output_fidelity(model, [torch.randn(16, 32)]),
                  constraints=Constraints(min_fidelity=0.0), recipes=recipes, cache_dir=tmp_path / "cache",
                  latency_runs=3, timer=timer,
                  latency_table=LatencyTable(tmp_path / "t.json"))


@pytest.mark.slow
def test_search_never_returns_a_recipe_slower_than_dense(tmp_path):
    from compressor.search.front import front_markdown
    from compressor.search.recipes import Recipe

    # The smallest files (int4, low rank + int8) would win, but every integer file is measured slower than
    # dense: the search sets them aside and returns low rank fp16, whose layers are all faster factored here.
    result = _search(tmp_path / "aware", rank_timer(1000, int8=1.3))
    assert min(result.points, key=lambda p: p.size_bytes).recipe.precision in ("int4", "int8")
    assert result.chosen.recipe == Recipe("fp16", 0.5)
    assert result.chosen.latency_vs_dense is not None and result.chosen.latency_vs_dense < 1
    aside = {p.recipe for p in result.points if p.slower_than_dense}
    assert {Recipe("int8", 0.5), Recipe("int4")} <= aside
    md = front_markdown(result.to_dict())
    assert "lowrank0.5-int8: 1.300x the dense fp32 latency (slower: set aside)" in md
    assert "lowrank0.5-fp16: 0.500x the dense fp32 latency" in md
    assert "| latency vs fp32 | MAC ratio |" in md
    # Everything slower than dense: dense fp32 itself comes back.
    # (the same cache: every point is read back, only the side-by-side checks run again)
    assert _search(tmp_path / "aware", rank_timer(1000, int8=1.3, other=1.1)).chosen.recipe == Recipe("fp32")
    # Factored layers slower than dense: the low-rank recipe keeps every layer dense (no smaller than dense).
    dense_again = _search(tmp_path / "layers", rank_timer(1, int8=1.3))
    point = next(p for p in dense_again.points if p.recipe == Recipe("fp16", 0.5))
    assert point.plan_totals["layers_factored"] == 0


@pytest.mark.slow
def test_cli_latency_aware_run_uses_the_cached_break_even_and_reports_latency_next_to_macs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    model = tmp_path / "mlp.pt"
    torch.save(net, model)
    # This machine's table, as an earlier run left it: layer 0 is faster factored up to rank 40, layer 2 never.
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path / "cache"))
    table = LatencyTable()
    for layer, x, be in ((net[0], torch.zeros(16, 64), 40), (net[2], torch.zeros(16, 256), 0)):
        table.put(layer_key(layer, x, 1), {"break_even": be, "max_saving_rank": 51, "ratios": {}, "threads": 1,
                                            "input_shape": list(x.shape)})
    res = run([model, "--rank", "8", "--input-shape", "16x64", "--latency-aware", "--threads", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "mlp.compressed"
    plan = {lp["name"]: lp for lp in json.loads((out / "plan.json").read_text())["layers"]}
    assert plan["0"]["factored"] and plan["0"]["rank"] == 8
    assert not plan["2"]["factored"] and "slower than dense" in plan["2"]["reason"]
    lat = json.loads((out / "report.json").read_text())["latency"]
    assert set(lat["files"]) == {"model.onnx"} and lat["threads"] == 1 and lat["inputs"] == "input 16x64"
    assert 0 < lat["macs_ratio"] < 1 and lat["files"]["model.onnx"]["latency_ratio"] > 0
    assert "Latency vs multiply-adds" in (out / "report.md").read_text()
    # A factored model measured slower than dense as a whole is never handed back: one line, nothing written.
    import compressor.export.latency as latency

    monkeypatch.setattr(latency, "compare_onnx", lambda a, b, inputs, threads, rounds=7: Comparison(1.0, 1.2, 1.2, 1))
    slow = run([model, "--rank", "8", "--input-shape", "16x64", "--latency-aware", "--threads", "1", "--out",
                tmp_path / "slow"])
    assert slow.exit_code == 2 and "ran 1.200x the dense model's latency" in slow.output, slow.output
    assert "Traceback" not in slow.output and not (tmp_path / "slow").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("ratio", "low", "slower"), [
    (1.04, 0.97, False),  # slower in the median, faster in more than a round of four: noise
    (1.04, 1.01, True),   # slower in three rounds of four
    (0.98, 0.95, False),
    (1.04, None, True),   # no spread measured (an injected timer): the median decides
])
def test_slower_means_slower_in_most_rounds(ratio, low, slower):
    assert Comparison(1.0, ratio, ratio, 15, low).slower is slower


def test_compare_onnx_measures_the_spread_of_its_rounds(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU()).eval()
    path = export_onnx(model, torch.randn(2, 16), tmp_path / "m.onnx")
    c = compare_onnx(path, path, torch.randn(2, 16), 1, rounds=5)
    assert c.rounds == 5 and c.low is not None and c.low <= c.ratio
