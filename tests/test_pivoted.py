"""The pivoted form of a low-rank linear layer: r of the outputs computed, the others combined from them, in
r (m + n - r) weights (compressor.core.svd.pivoted_factors, compressor.core.layers.PivotedLowRankLinear)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compressor
from compressor.core.layers import LowRankLinear, PivotedLowRankLinear
from compressor.core.rewrite import factor_module
from compressor.core.svd import factored_params, max_saving_rank, pivoted_factors
from compressor.jobs.options import OptionError, Options


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# (out, in, rank, bias): tall, wide and square matrices, rank 1 to full.
SHAPES = [(48, 24, 1, True), (48, 24, 24, True), (24, 48, 10, False), (32, 32, 31, True), (64, 16, 8, False)]


@pytest.mark.parametrize("m,n,r,bias", SHAPES)
def test_the_pivoted_layer_computes_the_two_factor_layer_in_fewer_weights(m, n, r, bias):
    lin = nn.Linear(n, m, bias=bias)
    x = torch.randn(7, n, generator=_gen())
    two, pivoted = factor_module(lin, r), factor_module(lin, r, kind="linear-pivoted")
    assert isinstance(two, LowRankLinear) and isinstance(pivoted, PivotedLowRankLinear)
    torch.testing.assert_close(pivoted(x), two(x), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pivoted.weight, two.weight, atol=2e-5, rtol=1e-4)
    weights = sum(p.numel() for k, p in pivoted.named_parameters() if k.endswith("weight"))
    assert weights == factored_params(m, n, r, pivoted=True) == r * (m + n - r) < factored_params(m, n, r)
    assert sum(p.numel() for p in pivoted.parameters()) == weights + (m if bias else 0)  # biases: m in all


def test_a_rank_deficient_product_still_pivots_exactly():
    up = torch.randn(20, 2, generator=_gen()) @ torch.randn(2, 6, generator=_gen(1))  # rank 2, asked for 6
    down = torch.randn(6, 12, generator=_gen(2))
    rows, coeffs, positions = pivoted_factors(up, down)
    torch.testing.assert_close(torch.cat([rows, coeffs @ rows]), (up @ down)[positions], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(coeffs).all()


def test_every_rank_below_full_saves_in_the_pivoted_form():
    for m, n in [(640, 640), (2048, 640), (256, 640)]:
        assert max_saving_rank(m, n, pivoted=True) == min(m, n) - 1
        top = max_saving_rank(m, n, pivoted=True)
        assert factored_params(m, n, top, pivoted=True) < m * n <= factored_params(m, n, max_saving_rank(m, n) + 1)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 64)).eval()


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_target_removes_its_parameters_and_keeps_more_rank_and_less_error(calibrated):
    """At the same target the pivoted plan holds the same number of weights and loses less: the
    two-factor form's ranks are capped at m n / (m + n)."""
    x = torch.randn(512, 64, generator=_gen())
    cal = {"calibration": [x[i:i + 64] for i in range(0, 512, 64)]} if calibrated else {}
    results = {}
    for pivoted in (False, True):
        model = _mlp()
        reference = model(x).detach()
        plan = compressor.analyze(model, target=0.4, pivoted=pivoted, **cal)
        compressor.rewrite(model, plan)
        before = sum(m.weight.numel() for m in _mlp().modules() if isinstance(m, nn.Linear))
        after = sum(p.numel() for k, p in model.named_parameters() if k.endswith("weight"))
        assert 1 - after / before == pytest.approx(plan.totals()["removed_fraction"], abs=1e-9)
        assert plan.totals()["removed_fraction"] == pytest.approx(0.4, abs=0.01)
        assert {lp.kind for lp in plan.factored} == {"linear-pivoted" if pivoted else "linear"}
        err = float((model(x) - reference).detach().norm() / reference.norm())
        results[pivoted] = (sum(lp.rank for lp in plan.factored), err)
    assert results[True][0] > results[False][0] and results[True][1] < results[False][1]


def test_a_pivoted_plan_round_trips_and_rewrites_a_fresh_model():
    model = _mlp()
    plan = compressor.analyze(model, target=0.3, pivoted=True)
    again = compressor.Plan.from_dict(plan.to_dict())
    fresh = compressor.rewrite(copy.deepcopy(_mlp()), again)
    assert all(isinstance(fresh[i], PivotedLowRankLinear) for i in (0, 2) if again.ranks()[str(i)])
    x = torch.randn(4, 64, generator=_gen())
    torch.testing.assert_close(fresh(x), compressor.rewrite(model, plan)(x))


def test_pivoted_with_stream_is_refused_in_one_line():
    with pytest.raises(OptionError, match="pivoted cannot be used with stream"):
        Options(target=0.2, pivoted=True, stream=True)


def test_pivoted_with_latency_aware_is_refused_in_one_line():
    with pytest.raises(OptionError, match="measures each layer's two-factor form"):
        Options(target=0.2, pivoted=True, latency_aware=True)


def test_lora_on_a_pivoted_layer_trains_and_merges_back():
    """Healing with --train lora wraps the factors of each factored layer; the pivoted layer still runs."""
    from compressor.train.lora import apply_lora, lora_parameters, merge_lora

    model = _mlp()
    compressor.rewrite(model, compressor.analyze(model, target=0.3, pivoted=True))
    x = torch.randn(8, 64, generator=_gen())
    before = model(x).detach()
    assert apply_lora(model, rank=2)
    torch.testing.assert_close(model(x), before)  # B starts at zero
    opt = torch.optim.SGD(list(lora_parameters(model).values()), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        (model(x) - before - 1).square().mean().backward()
        opt.step()
    trained = model(x).detach()
    assert not torch.allclose(trained, before)
    merge_lora(model)
    torch.testing.assert_close(model(x), trained, atol=1e-5, rtol=1e-4)


def test_pivoted_with_an_onnx_input_is_refused_in_one_line(tmp_path):
    from compressor.export.onnx import export_onnx

    path = export_onnx(_mlp(), torch.randn(2, 64), tmp_path / "m.onnx")
    with pytest.raises(OptionError, match="the pivoted form is a torch layer"):
        compressor.compress(path, tmp_path / "out", target=0.3, pivoted=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_healing_a_pivoted_model_returns_pivoted_layers_that_fit_better():
    torch.manual_seed(0)
    teacher = _mlp()
    student = copy.deepcopy(teacher)
    compressor.rewrite(student, compressor.analyze(student, target=0.5, pivoted=True))
    x, val = torch.randn(256, 64, generator=_gen()), torch.randn(64, 64, generator=_gen(1))
    result = compressor.heal(student, data=x, teacher=teacher, val_data=val, steps=30, lr=1e-3, batch_size=32)
    pivoted = [i for i in (0, 2, 4) if isinstance(student[i], PivotedLowRankLinear)]
    assert pivoted and all(type(result.model[i]) is PivotedLowRankLinear for i in pivoted)
    assert result.best_step > 0 and result.after[result.config.monitor] < result.before[result.config.monitor]
