"""``compress lora extract`` / ``merge``: extract + merge reproduces the tuned weights within the
Eckart-Young bound, through the handlers' weight matrices (Linear, Conv2d, transformers' Conv1D)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from compressor.core.handlers import handler_for
from compressor.train.adapter import extract_adapter
from compressor.train.lora import merge_lora

REPO = Path(__file__).resolve().parents[1]


def _tuned(base: nn.Module, change_rank: int, seed: int) -> nn.Module:
    """``base`` with a rank-``change_rank`` change (plus a small full-rank one) in every layer's matrix."""
    g = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for mod in tuned.modules():
            h = handler_for(mod)
            if h is None:
                continue
            w = h.weight_matrix(mod)
            m, n = w.shape
            k = min(change_rank, m, n)
            low = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g)
            w.add_(low + 0.01 * torch.randn(m, n, generator=g))  # weight_matrix is a view of the weight for these kinds
    return tuned


def _bound(base: nn.Module, tuned: nn.Module, name: str, rank: int) -> float:
    h = handler_for(base.get_submodule(name))
    delta = h.weight_matrix(tuned.get_submodule(name)).double() - h.weight_matrix(base.get_submodule(name)).double()
    s = torch.linalg.svdvals(delta.detach())
    return float(s[rank:].pow(2).sum().sqrt())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 9), n=st.integers(1, 9), c=st.integers(1, 4), k=st.sampled_from([1, 3]),
       change_rank=st.integers(1, 5), rank=st.integers(1, 6), energy=st.sampled_from([None, 0.5, 0.9, 1.0]),
       seed=st.integers(0, 2**16))
def test_extract_then_merge_is_within_eckart_young(m, n, c, k, change_rank, rank, energy, seed):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(n, m), nn.Conv2d(c, m, k))
    tuned = _tuned(base, change_rank, seed)
    adapter, rows, others = extract_adapter(base, tuned, energy=energy, rank=None if energy else rank)
    assert others == {}  # only the matrices changed
    merged = copy.deepcopy(base)
    adapter.apply(merged)
    merge_lora(merged)
    with torch.no_grad():
        for row in rows:
            h = handler_for(base.get_submodule(row.layer))
            err = float((h.weight_matrix(merged.get_submodule(row.layer)) -
                         h.weight_matrix(tuned.get_submodule(row.layer))).double().norm())
            bound = _bound(base, tuned, row.layer, row.rank)
            scale = float(h.weight_matrix(tuned.get_submodule(row.layer)).norm())
            assert abs(err - bound) <= 1e-5 * (1 + scale), (row, err, bound)  # equal: the truncated SVD is optimal
            assert abs(row.abs_error - bound) <= 1e-9 * (1 + scale)
            if energy is not None:
                assert row.energy_kept >= energy - 1e-9  # the fewest singular values reaching it
                if row.rank > 1:
                    s = torch.linalg.svdvals(h.weight_matrix(tuned.get_submodule(row.layer)).double()
                                             - h.weight_matrix(base.get_submodule(row.layer)).double())
                    assert float(s[:row.rank - 1].pow(2).sum() / s.pow(2).sum()) < energy
            else:
                assert row.rank == min(rank, *row.shape)


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_extract_and_merge_commands_on_hugging_face_folders(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    torch.manual_seed(0)
    base = transformers.GPT2Model(cfg).eval()
    tuned = _tuned(base, 2, seed=1)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")

    res = _cli("lora", "extract", "base", "tuned", "--rank", "2", "--out", "ad", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "ad" / "extract.json").read_text())
    kinds = {r["layer"]: r["kind"] for r in report["layers"]}
    assert kinds["h.0.attn.c_attn"] == "hf-conv1d" and kinds["wte"] == "embedding"
    assert "| h.0.mlp.c_fc | hf-conv1d | 64x16 | 2 |" in (tmp_path / "ad" / "extract.md").read_text()
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"] is True

    res = _cli("lora", "merge", "base", "ad", "--out", "merged", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "merged" / "config.json").exists()  # a Hugging Face folder
    merged = transformers.GPT2Model.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 32, (2, 6))
    for r in report["layers"]:
        h = handler_for(base.get_submodule(r["layer"]))
        err = float((h.weight_matrix(merged.get_submodule(r["layer"])) -
                     h.weight_matrix(tuned.get_submodule(r["layer"]))).detach().double().norm())
        assert abs(err - _bound(base, tuned, r["layer"], 2)) < 1e-4  # the small full-rank part: discarded
    peft = pytest.importorskip("peft")
    with torch.no_grad():  # peft applies the extracted adapter as compress lora merge did
        via_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
        torch.testing.assert_close(via_peft(ids).last_hidden_state, merged(ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


def test_merge_of_a_plain_torch_model_is_a_compressor_folder(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    tuned = _tuned(base, 1, seed=2)
    with torch.no_grad():
        tuned[2].bias.add_(1.0)  # a bias change: no adapter carries it, and the command says so
    torch.save(base, tmp_path / "base.pt")
    torch.save(tuned, tmp_path / "tuned.pt")
    res = _cli("lora", "extract", "base.pt", "tuned.pt", "--energy", "0.999", "--out", "ad", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "warning: 1 other tensors changed" in res.stderr
    assert json.loads((tmp_path / "ad" / "extract.json").read_text())["not_in_adapter"].keys() == {"2.bias"}
    assert _cli("lora", "merge", "base.pt", "ad", "--out", "merged", cwd=tmp_path).returncode == 0
    import compressor

    merged = compressor.load(tmp_path / "merged")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert (merged[0].weight - tuned[0].weight).norm() < 0.05 * (tuned[0].weight - base[0].weight).norm()
        assert (merged(x) - base(x) - (tuned(x) - base(x))).abs().max() > 0.5  # the bias change is not merged


@pytest.mark.parametrize("args, message", [
    (["lora", "extract", "base.pt", "tuned.pt", "--out", "ad"], "exactly one of energy and rank"),
    (["lora", "extract", "base.pt", "tuned.pt", "--rank", "2", "--energy", "0.9", "--out", "ad"], "exactly one"),
    (["lora", "extract", "base.pt", "tuned.pt", "--energy", "1.5", "--out", "ad"], "energy must be in (0, 1]"),
    (["lora", "extract", "base.pt", "other.pt", "--rank", "2", "--out", "ad"], "is [4, 8] in the base but"),
    (["lora", "extract", "base.pt", "base.pt", "--rank", "2", "--out", "ad"], "the same weights"),
    (["lora", "merge", "base.pt", "nothing", "--out", "ad"], "is not a folder"),
    (["lora", "merge", "other.pt", "adapter", "--out", "ad"], "does not fit"),
    (["lora", "extract", "base.pt", "tuned.pt", "--rank", "2", "--out", "."], "contains the base model"),
])
def test_bad_lora_commands_are_one_line_exit_2_and_leave_nothing(tmp_path, args, message):
    base = nn.Sequential(nn.Linear(8, 4))
    torch.save(base, tmp_path / "base.pt")
    torch.save(_tuned(base, 1, 0), tmp_path / "tuned.pt")
    torch.save(nn.Sequential(nn.Linear(9, 4)), tmp_path / "other.pt")
    from compressor.train.adapter import save_adapter
    from compressor.train.lora import apply_lora

    adapted = copy.deepcopy(base)
    apply_lora(adapted, rank=2)
    save_adapter(adapted, tmp_path / "adapter")
    before = sorted(p.name for p in tmp_path.iterdir())
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert message in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
