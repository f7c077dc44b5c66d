"""Issue 18: thread choice per operation (and --threads), latency-aware ranks that never make a model slower."""

from __future__ import annotations

import torch

import compressor
from compressor.core.threads import LINALG_THREADS, linalg_threads, thread_budget, torch_threads
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
