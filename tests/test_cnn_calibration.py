"""Data-aware factoring of CNNs: sensitivity and error curves are measured on batches the probe factors were not
fit on, data-starved layers choose their ridge there, and sequential refits leave convs and data-starved layers
alone."""

from __future__ import annotations

import copy

import torch
from torch import nn

import compressor
from compressor.analysis import calibration, held_out
from compressor.analysis.held_out import held_out_ridge
from compressor.analysis.whitened import DAMPING, Moments, held_out_errors, whitened_decomposition


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(),
                         nn.Linear(64, 48)).eval()


def _batches(n: int, size: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 8, 8, generator=g) for _ in range(n)]


def test_a_layer_with_fewer_rows_than_inputs_is_not_free_to_truncate(monkeypatch):
    # The last layer sees 4 rows per batch (one per image) for 64 inputs: in sample, its whitened factors
    # reproduce the calibration outputs almost at any rank, so it looked no more sensitive than the first
    # conv (below, with 2 batches nothing can be held out); measured on held-out batches it is far more.
    monkeypatch.setattr(calibration, "PROBE_MARGIN", 0.0)  # probe every layer, the first conv included
    plan = compressor.analyze(_net(), target=0.4, calibration=_batches(4), sequential=False)
    assert plan.calibration["sensitivity_held_out_batches"] == 2
    sens = plan.calibration["sensitivity"]
    assert sens["8"] > 3 * sens["0"], sens
    one = compressor.analyze(_net(), target=0.4, calibration=_batches(2), sequential=False)
    assert one.calibration["sensitivity_held_out_batches"] == 0  # too few batches to hold any out
    in_sample = one.calibration["sensitivity"]
    assert in_sample["8"] < 3 * in_sample["0"], in_sample


def test_sequential_refits_skip_convs_and_layers_with_few_rows():
    plan = compressor.analyze(_net(), target=0.4, calibration=_batches(4, size=64), sensitivity=False)
    # The linears see 256 rows for 32 and 64 inputs (at least 4 per feature: refit); convs are never refit.
    refit = plan.calibration["layers_refit_sequentially"]
    factored_linears = [lp.name for lp in plan.factored if lp.kind == "linear"]
    assert refit <= len(factored_linears)
    starved = compressor.analyze(_net(), target=0.4, calibration=_batches(2, size=2), sensitivity=False)
    assert starved.calibration["layers_refit_sequentially"] == 0  # 4 rows for 32-64 inputs: nothing refit


def _rows(n: int, dim: int, seed: int) -> torch.Tensor:
    """A few strong directions plus isotropic noise: what a handful of rows cannot pin down."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, dim, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, 4, generator=g) @ basis + 0.7 * torch.randn(n, dim, generator=g)


def test_held_out_errors_are_the_output_errors_of_the_truncated_factors():
    torch.manual_seed(0)
    w = torch.randn(12, 20)
    fit, out = _rows(30, 20, 1), _rows(15, 20, 2)
    m = Moments()
    m.add(fit)
    dec, _ = whitened_decomposition(w, m)
    curve = held_out_errors(dec, out.double().T @ out.double())
    assert len(curve) == 13
    for r in range(13):
        up, down = dec.factors(r)
        direct = float(((w - up @ down) @ out.T).double().square().sum())
        assert abs(float(curve[r]) - direct) <= 1e-4 * float(curve[0]), (r, float(curve[r]), direct)
    assert float(curve[12]) == 0.0 and float(curve[0]) > 0


def test_a_data_starved_layer_chooses_its_ridge_on_held_out_batches(monkeypatch):
    # 64 inputs, 4 rows per batch: the factors fit on 16 rows know 16 directions of the input; held out, the
    # isotropic part shows that a larger ridge (closer to the plain SVD) loses less. The convs of _net() see
    # 64 rows per image and keep the default ridge.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    with torch.no_grad():  # a decaying spectrum, as trained weights have: a plain SVD would keep it well
        u, _, v = torch.linalg.svd(torch.randn(64, 64))
        net[0].weight.copy_(u * torch.logspace(0, -2, 64) @ v)
    batches = [_rows(4, 64, seed) for seed in range(6)]
    fresh = _rows(400, 64, 100)

    def error(plan_model):
        with torch.no_grad():
            return float((plan_model(fresh) - net(fresh)).norm() / net(fresh).norm())

    small = copy.deepcopy(net)
    plan = compressor.analyze(small, target=0.4, calibration=batches)
    assert plan.calibration["ridges"] and min(plan.calibration["ridges"].values()) > DAMPING[0]
    chosen = error(compressor.rewrite(small, plan))
    monkeypatch.setattr(calibration, "RIDGES", (DAMPING[0],))  # the fixed 1% ridge of before
    fixed = copy.deepcopy(net)
    plan_fixed = compressor.analyze(fixed, target=0.4, calibration=batches)
    assert plan_fixed.calibration["ridges"] == {}
    assert chosen < 0.95 * error(compressor.rewrite(fixed, plan_fixed))  # measured: 0.148 vs 0.161

    rich = compressor.analyze(_net(), target=0.4, calibration=_batches(4), sequential=False)
    assert not {"0", "2"} & set(rich.calibration["ridges"])  # 256 rows per batch for 27 and 16 inputs


def _deep() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 32, 1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 128), nn.ReLU(),
                         nn.Linear(128, 100)).eval()


def test_only_layers_the_allocation_may_cut_are_probed_and_every_factored_layer_was(monkeypatch):
    # Of the data-aware allocation (other candidates are measured whole on the held-out batches: test_held_out_choice).
    monkeypatch.setattr(held_out, "CANDIDATES", (("data-aware", "whitened"),))
    batches = _batches(5)
    plan = compressor.analyze(_deep(), target=0.4, calibration=batches)
    probed = set(plan.calibration["sensitivity"])
    assert {lp.name for lp in plan.factored} <= probed  # nothing is cut without being measured
    assert len(probed) < len([lp for lp in plan.layers if lp.supported])  # the convs the cut never reaches
    again = compressor.analyze(_deep(), target=0.4, calibration=batches)
    assert again.ranks() == plan.ranks() and again.calibration["sensitivity"] == plan.calibration["sensitivity"]
    monkeypatch.setattr(calibration, "PROBE_MARGIN", 0.0)  # unprobed layers look free: every one is probed
    everything = compressor.analyze(_deep(), target=0.4, calibration=batches)
    assert set(everything.calibration["sensitivity"]) == {lp.name for lp in everything.layers if lp.supported}
    # Measured sensitivities do not depend on which other layers were probed.
    for name, s in plan.calibration["sensitivity"].items():
        assert abs(everything.calibration["sensitivity"][name] - s) <= 1e-6 * max(1.0, abs(s))


def test_held_out_ridge_in_output_space_agrees_with_whitened_factors():
    # Wide layers (m <= n) choose in output space (an m x m eigendecomposition per ridge), tall ones by whitened
    # factors: both must pick the first ridge after which the held-out error at the rank rises.
    fit, out = _rows(24, 40, 3), _rows(40, 40, 4)
    C_fit, C_out = fit.double().T @ fit.double(), out.double().T @ out.double()
    ridges = (1e-2, 1e-1, 1.0, 10.0, 100.0)
    chosen = set()
    for shape, seed in (((16, 40), 0), ((16, 40), 1), ((60, 40), 0), ((60, 40), 2)):
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        u, _, v = torch.linalg.svd(w, full_matrices=False)
        w = u * torch.logspace(0, -2, min(shape)) @ v
        rank = 6
        errors = []
        for ridge in ridges:
            dec, _ = whitened_decomposition(w, Moments(C_fit, rows=24), (ridge,))
            errors.append(float(held_out_errors(dec, C_out)[rank]))
        expected = next((r for r, a, b in zip(ridges[:-1], errors[:-1], errors[1:], strict=True) if b >= a), ridges[-1])
        got = held_out_ridge(w, C_fit, C_out, rank, ridges)
        assert got == expected, (shape, seed, errors)
        chosen.add(got)
    assert chosen != {1e-2}  # the data are starved: some layer prefers a larger ridge
