"""The spatial decomposition of 2-D convs (kind "conv2d-spatial") beyond the handler table: analyze picks it
per layer only where it loses less, data-aware or not, and the choice survives JSON, re-analysis, the
load skeleton and LoRA healing of the factors."""

from __future__ import annotations

import copy

import torch
from torch import nn

import compressor
from compressor.core.handlers import handler_of_kind
from compressor.core.layers import LowRankConv, LowRankSpatialConv
from compressor.core.plan import Plan
from compressor.core.rewrite import build_factored


class TwoConvs(nn.Module):
    """``sep``: a kernel nearly rank 3 in the spatial layout; ``chan``: nearly rank 3 in the channel layout."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.sep = nn.Conv2d(8, 24, 3, padding=1)
        self.chan = nn.Conv2d(24, 24, 3, padding=1)
        self.head = nn.Linear(24, 4)
        with torch.no_grad():
            A = torch.randn(24 * 3, 3, generator=g) @ torch.randn(3, 8 * 3, generator=g)
            self.sep.weight.copy_(handler_of_kind("conv2d-spatial").kernel(A, self.sep.weight.shape))
            B = torch.randn(24, 3, generator=g) @ torch.randn(3, 24 * 9, generator=g)
            self.chan.weight.copy_(B.reshape(self.chan.weight.shape) / 10)
            for w in (self.sep.weight, self.chan.weight):
                w.add_(0.01 * torch.randn(w.shape, generator=g))

    def forward(self, x):
        return self.head(torch.relu(self.chan(torch.relu(self.sep(x)))).mean((2, 3)))


def _x(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 8, 10, 10, generator=torch.Generator().manual_seed(seed))


def test_each_layer_takes_the_decomposition_that_loses_less():
    model = TwoConvs()
    for kw in ({}, {"calibration": [_x()], "sensitivity": False}):
        plan = compressor.analyze(model, target=0.8, **kw)
        kinds = {lp.name: lp.kind for lp in plan.layers}
        assert kinds["sep"] == "conv2d-spatial" and kinds["chan"] == "conv2d", kw
        assert plan.layer("sep").matrix_shape == [24 * 3, 8 * 3]
        off = compressor.analyze(model, target=0.8, spatial=False, **kw)
        assert off.layer("sep").kind == "conv2d"


def test_data_aware_spatial_factors_rewrite_and_beat_the_channel_ones():
    x, held_out = _x(), _x(seed=2)
    results = {}
    for spatial in (True, False):
        model = TwoConvs()
        with torch.no_grad():
            ref = model(held_out)
        plan = compressor.analyze(model, target=0.8, calibration=[x], spatial=spatial)
        if spatial:
            assert plan.calibration["spatial_layers"] == ["sep"]
        compressor.rewrite(model, plan)
        assert isinstance(model.sep, LowRankSpatialConv if spatial else LowRankConv)
        with torch.no_grad():
            results[spatial] = float((model(held_out) - ref).norm() / ref.norm())
    assert results[True] < 0.5 * results[False]


def test_the_choice_survives_json_reanalysis_and_the_load_skeleton():
    model, x = TwoConvs(), _x()
    plan = Plan.from_dict(compressor.analyze(model, target=0.5).to_dict())
    again = compressor.analyze(model, plan=plan)  # re-derive: each layer keeps its kind
    assert again.layer("sep").kind == "conv2d-spatial"
    factored = compressor.rewrite(copy.deepcopy(model), again)
    skeleton = build_factored(TwoConvs(seed=5), plan)
    assert isinstance(skeleton.sep, LowRankSpatialConv)
    skeleton.load_state_dict(factored.state_dict(), strict=True)
    torch.testing.assert_close(skeleton(x), factored(x))


def test_spatial_factors_keep_stride_dilation_and_same_padding():
    for conv in (nn.Conv2d(3, 6, (3, 5), stride=(2, 1), dilation=(1, 2), padding=(1, 4)),
                 nn.Conv2d(3, 6, (3, 5), padding="same")):
        h = handler_of_kind("conv2d-spatial")
        new = h.factor(conv, min(h.weight_matrix(conv).shape))
        x = torch.randn(2, 3, 11, 12)
        torch.testing.assert_close(new(x), conv(x), atol=1e-5, rtol=1e-4)
