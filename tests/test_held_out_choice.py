"""Data-aware analysis chooses its ranks and each layer's factors on held-out calibration batches, among the
data-aware allocation, a whitened energy threshold, the whitened global allocation and the plain SVD; the
choice is recorded per layer in the plan."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import compressor
from compressor.analysis import calibration, held_out
from compressor.core.errors import PlanError
from compressor.core.plan import FACTORS, Plan
from compressor.core.policies import LayerSpectrum, energy_threshold_budget

FIT_ROWS = 24  # 8 batches of 4 images, the first 2 held out: the classifier is fit on 24 rows for 64 inputs


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def _batches() -> list[torch.Tensor]:
    return [_images(4, seed) for seed in range(8)]


def _tiny_cnn(hidden_decay: float | None = None) -> nn.Sequential:
    """A conv, pooled to 64 features, (a hidden linear,) and a classifier whose strongest input directions are
    the ones the fit batches (all but the first two) never show it: fit there, its whitened factors drop them,
    while its decaying spectrum (as trained weights have) lets a plain SVD keep them. Zero-mean features (no
    ReLU, no bias): a mean direction would dominate every output and hide the rest."""
    torch.manual_seed(0)
    head = [nn.Linear(64, 64)] if hidden_decay is not None else []
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(2), nn.Flatten(), *head,
                        nn.Linear(64, 64)).eval()
    with torch.no_grad():
        if head:
            a, _, b = torch.linalg.svd(torch.randn(64, 64))
            net[3].weight.copy_(a * torch.logspace(0, -hidden_decay, 64) @ b)
        feats = net[:-1](torch.cat(_batches()[2:]))
        _, _, vh = torch.linalg.svd(feats, full_matrices=True)  # rows FIT_ROWS.. span what the fit rows never show
        u, _, _ = torch.linalg.svd(torch.randn(64, 64))
        net[-1].weight.copy_(u * torch.logspace(0, -1.5, 64) @ torch.cat([vh[FIT_ROWS:], vh[:FIT_ROWS]]))
        net[-1].bias.zero_()
    return net


def _error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - reference(x)).square().sum() / reference(x).square().sum())


def _compressed(net: nn.Module, batches=None) -> tuple[nn.Module, Plan]:
    model = copy.deepcopy(net)
    plan = compressor.analyze(model, target=0.4, calibration=batches) if batches is not None else \
        compressor.analyze(model, target=0.4)
    return compressor.rewrite(model, plan), plan


def test_data_aware_is_never_worse_than_plain_where_plain_is_better_by_construction(monkeypatch):
    # The held-out ridge search alone would move the classifier's factors most of the way to the plain SVD; with
    # the 1% ridge only, whitened factors lose twice what plain ones do on fresh images (measured 0.095 vs 0.050).
    net, batches, fresh = _tiny_cnn(), _batches(), _images(400, 100)
    monkeypatch.setattr(calibration, "RIDGES", (calibration.DAMPING[0],))
    plain, _ = _compressed(net)
    chosen, plan = _compressed(net, batches)
    monkeypatch.setattr(held_out, "CANDIDATES", (("data-aware", "whitened"),))
    only_whitened, _ = _compressed(net, batches)
    assert _error(only_whitened, net, fresh) > 1.5 * _error(plain, net, fresh)  # plain is better here
    assert _error(chosen, net, fresh) <= 1.01 * _error(plain, net, fresh)
    sel = plan.calibration["selection"]
    assert sel["held_out_batches"] == 2 and sel["fit_batches"] == 6
    assert sel["candidates"][sel["chosen"]] == min(sel["candidates"].values())
    assert sel["candidates"][sel["chosen"]] <= sel["candidates"]["plain ranks, plain factors"]
    classifier = plan.layer("3").selection
    assert classifier["factors"] == "plain", classifier
    assert classifier["held_out_error"]["plain"] < classifier["held_out_error"]["whitened"]


def test_a_data_starved_layer_is_never_cut_below_what_held_out_data_supports(monkeypatch):
    # Two data-starved linears share the cut. In sample (no layer counted as starved, no held-out choice) the
    # classifier's whitened factors reproduce the calibration outputs at almost any rank and it is cut deeper;
    # measured on the held-out batches it keeps more rank, and the model moves less on fresh images.
    net, batches, fresh = _tiny_cnn(hidden_decay=3.0), _batches(), _images(400, 100)
    chosen, plan = _compressed(net, batches)
    monkeypatch.setattr(calibration, "STARVED_ROWS_PER_FEATURE", 0)
    monkeypatch.setattr(held_out, "CANDIDATES", (("data-aware", "whitened"),))
    in_sample_model, in_sample = _compressed(net, batches)
    assert in_sample.layer("4").rank < plan.layer("4").rank, (in_sample.ranks(), plan.ranks())
    assert _error(chosen, net, fresh) < 0.95 * _error(in_sample_model, net, fresh)  # measured 0.0124 vs 0.0144


def test_the_choice_is_recorded_per_layer_and_round_trips(tmp_path):
    net, batches = _tiny_cnn(hidden_decay=3.0), _batches()
    model, plan = _compressed(net, batches)
    assert plan.factored and all(lp.selection["factors"] in FACTORS and lp.selection["why"] and
                                 set(lp.selection["held_out_error"]) == set(FACTORS) for lp in plan.factored)
    assert plan.calibration["selection"]["chosen"] in plan.calibration["selection"]["candidates"]
    plan.to_json(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert all("selection" in d for d in data["layers"] if d["rank"] is not None)
    again = Plan.from_json(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict()
    # Re-derived with the same data, the plan keeps its ranks and its recorded factors, and rewrites the same.
    fresh = copy.deepcopy(net)
    redo = compressor.analyze(fresh, plan=again, calibration=batches)
    assert redo.ranks() == plan.ranks()
    assert {lp.name: lp.selection["factors"] for lp in redo.factored} == \
        {lp.name: lp.selection["factors"] for lp in plan.factored}
    x = _images(16, 50)
    with torch.no_grad():
        assert torch.allclose(compressor.rewrite(fresh, redo)(x), model(x), atol=1e-5)
    # A plan written before the field loads; a malformed one is refused.
    for d in data["layers"]:
        d.pop("selection", None)
    assert all(lp.selection is None for lp in Plan.from_dict(data).layers)
    data["layers"][-1]["selection"] = {"factors": "magic"}
    with pytest.raises(PlanError, match="selection"):
        Plan.from_dict(data)


def test_one_energy_threshold_spreads_the_cut_over_every_layer():
    spectra = [LayerSpectrum.from_singular_values(f"l{i}", 32, 32, torch.logspace(0, -i - 1, 32)) for i in range(3)]
    ranks = energy_threshold_budget(spectra, 0.4, 1, {})
    saved = sum(32 * 32 - r * 64 for r in ranks.values() if r is not None)
    assert saved >= 0.4 * 3 * 32 * 32 and all(r is not None for r in ranks.values())
    assert energy_threshold_budget(spectra, 0.99, 1, {}) is None  # rank 1 everywhere cannot remove 99%


def test_joint_errors_replay_the_prefix_and_equal_full_passes():
    # A candidate's passes replay what finishes before its first replaced layer: the same numbers as running the
    # whole compressed model.
    from compressor.analysis.tracing import Calibrator
    from compressor.core.rewrite import factor_module

    net, batches = _tiny_cnn(hidden_decay=3.0), _batches()
    modules = {n: net.get_submodule(n) for n in ("0", "3", "4")}
    cal = Calibrator(net, modules, batches)
    candidates = {"late": {"4": factor_module(modules["4"], 5)},
                  "both": {"0": factor_module(modules["0"], 3), "4": factor_module(modules["4"], 9)}}
    got = cal.joint_errors(candidates, 2)
    for key, replaced in candidates.items():
        model = copy.deepcopy(net)
        for name, new in replaced.items():
            setattr(model, name, new)
        x = torch.cat(batches[:2])
        assert got[key] == pytest.approx(_error(model, net, x), rel=1e-5)
