"""Data-aware factoring of CNNs: sensitivity is measured on batches the probe factors were not fit on, and
sequential refits leave convs and data-starved layers alone."""

from __future__ import annotations

import torch
from torch import nn

import compressor


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(),
                         nn.Linear(64, 48)).eval()


def _batches(n: int, size: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 8, 8, generator=g) for _ in range(n)]


def test_a_layer_with_fewer_rows_than_inputs_is_not_free_to_truncate():
    # The last layer sees 4 rows per batch (one per image) for 64 inputs: in sample, its whitened factors
    # reproduce the calibration outputs almost at any rank, so it looked no more sensitive than the first
    # conv (below, with 2 batches nothing can be held out); measured on held-out batches it is far more.
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
