"""The core engine: layer discovery, rank policies, plans, and rewriting (issue 2)."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import compressor
from compressor import CompressorError, Plan, PlanError
from compressor.core.layers import LOW_RANK_TYPES
from compressor.core.svd import max_saving_rank, svd

from .models import MODELS, example_input

POLICIES = [
    {"energy": 0.9},
    {"energy": 1.0},
    {"rank": 4},
    {"rank_ratio": 0.25},
    {"target": 0.3},
    {"energy": 0.8, "rank_multiple": 4},
    {"target": 0.3, "rank_multiple": 4},
]

# Layers that must stay dense in each model, and a word their reason must contain.
EXPECTED_SKIPS = {
    "mlp": {},
    "cnn": {"depthwise": "depthwise", "up": "ConvTranspose2d"},
    "embed_mha": {"attn": "MultiheadAttention", "attn.out_proj": "MultiheadAttention"},
    "tied": {"emb": "tied", "lm_head": "tied"},
}


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("name", MODELS)
def test_policy_plans_apply_and_save_parameters(name, policy):
    model = MODELS[name]()
    x = example_input(name)
    before = model(x)
    plan = compressor.analyze(model, **policy)

    skipped = {lp.name: lp.reason for lp in plan.layers if not lp.supported}
    for layer, word in EXPECTED_SKIPS[name].items():
        assert word in skipped[layer]
    for lp in plan.layers:
        if lp.factored:
            # Never a factorization that does not save parameters.
            assert lp.rank * (lp.m + lp.n) < lp.m * lp.n
            assert lp.rank % policy.get("rank_multiple", 1) == 0
        elif lp.supported and lp.policy_rank is not None:
            assert lp.policy_rank * (lp.m + lp.n) >= lp.m * lp.n and "saves no parameters" in lp.reason

    # The plan survives JSON unchanged in what rewrite reads.
    reread = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert reread.ranks() == plan.ranks()

    compressed = compressor.rewrite(copy.deepcopy(model), reread)
    assert param_count(compressed) == plan.totals()["params_after"]
    assert param_count(model) == plan.totals()["params_before"]
    factored = {n for n, m in compressed.named_modules() if isinstance(m, LOW_RANK_TYPES)}
    assert factored == {lp.name for lp in plan.factored}
    after = compressed(x)
    assert after.shape == before.shape and torch.isfinite(after).all()


def test_energy_policy_picks_the_smallest_rank_reaching_the_energy():
    model = MODELS["mlp"]()
    for energy in (0.5, 0.9, 0.99):
        plan = compressor.analyze(model, energy=energy)
        for lp in plan.layers:
            S = svd(model.get_submodule(lp.name).weight).S.double()
            cum = (S.square().cumsum(0) / S.square().sum()).tolist()
            r = lp.policy_rank
            assert cum[r - 1] >= energy - 1e-9
            assert r == 1 or cum[r - 2] < energy
            assert lp.energy_kept == pytest.approx(cum[r - 1])
            assert lp.rel_error == pytest.approx(math.sqrt(max(0.0, 1 - cum[r - 1])), abs=1e-6)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"rank": 3}, {"0": 3, "2": 3, "4": 3}),
    ({"rank": 100}, {"0": 32, "2": 64, "4": 10}),   # capped at full rank (then kept dense)
    ({"rank_ratio": 0.1}, {"0": 4, "2": 7, "4": 1}),  # ceil(0.1 * full rank)
    ({"rank": 3, "rank_multiple": 8}, {"0": 8, "2": 8, "4": 8}),
])
def test_fixed_rank_policies(kwargs, expected):
    plan = compressor.analyze(MODELS["mlp"](), **kwargs)
    assert {lp.name: lp.policy_rank for lp in plan.layers} == expected


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.7])
def test_target_is_reached_within_one_percent(target):
    model = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 96))
    plan = compressor.analyze(model, target=target)
    assert abs(plan.totals()["removed_fraction"] - target) <= 0.01
    assert not plan.notes


def test_target_spends_cuts_where_they_lose_least():
    # One layer is nearly low-rank, the other is full-rank noise: the budget must go to the first.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(128, 4) @ torch.randn(4, 128) + 0.01 * torch.randn(128, 128))
    plan = compressor.analyze(model, target=0.3)
    low, noisy = plan.layer("0"), plan.layer("1")
    assert low.rank is not None and noisy.rank is None
    assert abs(plan.totals()["removed_fraction"] - 0.3) <= 0.01


def test_unreachable_target_says_how_far_it_can_go():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(CompressorError, match=r"cannot be reached: at most 0\.\d+"):
        compressor.analyze(model, target=0.9, rank_multiple=4)


@pytest.mark.parametrize("kwargs", [
    {}, {"energy": 0.9, "rank": 3}, {"energy": 0.0}, {"energy": 1.5}, {"rank": 0}, {"rank": 2.5},
    {"rank_ratio": 0}, {"target": 1.0}, {"target": -0.1}, {"energy": 0.9, "rank_multiple": 0},
])
def test_bad_policy_options_are_one_clear_error(kwargs):
    with pytest.raises(CompressorError) as err:
        compressor.analyze(MODELS["mlp"](), **kwargs)
    assert "\n" not in str(err.value) and ";" in str(err.value)


@pytest.mark.parametrize("policy, keywords", [
    (compressor.TargetPolicy(0.3), {"target": 0.3}), (compressor.EnergyPolicy(0.9), {"energy": 0.9}),
    (compressor.RankPolicy(3), {"rank": 3}), (compressor.RankRatioPolicy(0.25), {"rank_ratio": 0.25}),
])
def test_a_policy_object_plans_as_its_keyword(policy, keywords):
    model = MODELS["mlp"]()
    a, b = compressor.analyze(model, policy), compressor.analyze(model, **keywords)
    assert a.ranks() == b.ranks() and a.policy == b.policy and any(r is not None for r in a.ranks().values())


@pytest.mark.parametrize("make, needle", [
    (lambda: compressor.TargetPolicy(1.0), "target must be in (0, 1)"),
    (lambda: compressor.EnergyPolicy(float("nan")), "energy must be in (0, 1]"),
    (lambda: compressor.RankPolicy(0), "rank must be a whole number"),
    (lambda: compressor.analyze(MODELS["mlp"](), compressor.TargetPolicy(0.3), target=0.3), "both given"),
    (lambda: compressor.analyze(MODELS["mlp"](), 0.3), "is not a rank policy"),
])
def test_a_bad_policy_object_is_the_clis_one_line_error(make, needle):
    """The same line as ``compress --target 1`` prints (tests/test_hostile_cli.py), from the Python API."""
    with pytest.raises(CompressorError) as err:
        make()
    assert needle in str(err.value) and "\n" not in str(err.value)


@dataclasses.dataclass(frozen=True)
class HalfRankPolicy:
    """A policy a user registers: half of each layer's full rank, at most ``at_most``."""

    spectral: ClassVar[bool] = False
    at_most: int


def _half_rank(policy, layers, rank_multiple, fixed):
    return {lp.name: min(policy.at_most, lp.top_rank // 2) for lp in layers if lp.name not in fixed}


@pytest.fixture
def registries():
    """The policy registries as they were before the test (a registration ends with it)."""
    from compressor.core import policies

    saved = dict(policies.POLICIES), dict(policies.ALLOCATORS)
    yield policies
    for registry, before in zip((policies.POLICIES, policies.ALLOCATORS), saved, strict=True):
        registry.clear()
        registry.update(before)


def test_a_registered_policy_plans_and_round_trips_through_the_plan_json(tmp_path, registries):
    model = MODELS["mlp"]()
    with pytest.raises(CompressorError, match="is not a rank policy"):
        compressor.analyze(model, HalfRankPolicy(3))
    compressor.register_policy(HalfRankPolicy)(_half_rank)
    plan = compressor.analyze(model, HalfRankPolicy(3))
    assert plan.ranks() == {"0": 3, "2": 3, "4": 3} and plan.policy["policy"] == "HalfRankPolicy"
    plan.to_json(tmp_path / "plan.json")
    again = compressor.analyze(model, plan=Plan.from_json(tmp_path / "plan.json"))
    assert again.ranks() == plan.ranks() and again.policy == plan.policy
    with pytest.raises(CompressorError, match="registered already"):
        compressor.register_policy(compressor.TargetPolicy, "HalfRankPolicy")
    del registries.POLICIES["HalfRankPolicy"]  # a later session that has not registered it
    with pytest.raises(CompressorError, match="'HalfRankPolicy' is not registered"):
        compressor.analyze(model, plan=Plan.from_json(tmp_path / "plan.json"))


def test_overrides_win_over_the_policy():
    model = MODELS["mlp"]()
    plan = compressor.analyze(model, energy=0.9, overrides={"0": 5, "2": None, "4": 9})
    assert plan.layer("0").rank == 5 and "override" in plan.layer("0").reason
    assert plan.layer("2").rank is None and "kept dense by override" in plan.layer("2").reason
    assert plan.layer("4").rank is None and "saves no parameters" in plan.layer("4").reason
    with pytest.raises(CompressorError, match="does not have"):
        compressor.analyze(model, energy=0.9, overrides={"nope": 3})


def test_overrides_count_towards_a_target():
    model = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 96))
    plan = compressor.analyze(model, target=0.4, overrides={"2": 8})
    assert plan.layer("2").rank == 8
    assert abs(plan.totals()["removed_fraction"] - 0.4) <= 0.01


def test_include_and_exclude_patterns():
    model = MODELS["embed_mha"]()
    plan = compressor.analyze(model, rank=2, include=["ff", "head", "emb"], exclude=["he*"])
    reasons = {lp.name: lp.reason for lp in plan.layers}
    assert plan.layer("ff").factored and plan.layer("emb").factored
    assert reasons["head"] == "excluded by pattern 'he*'"
    plan = compressor.analyze(model, rank=2, include=["ff"])
    assert plan.layer("emb").reason == "not matched by include patterns"


def test_edited_plan_is_reapplied(tmp_path):
    model = MODELS["mlp"]()
    x = example_input("mlp")
    plan = compressor.analyze(model, energy=0.9)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["totals"]["params_before"] == param_count(model)
    for layer in data["layers"]:
        layer["rank"] = {"0": 3, "2": None, "4": 2}[layer["name"]]
    path.write_text(json.dumps(data))

    edited = Plan.from_json(path)
    refreshed = compressor.analyze(model, plan=edited)
    assert refreshed.ranks() == {"0": 3, "2": None, "4": 2}
    assert refreshed.layer("0").energy_kept < plan.layer("0").energy_kept
    compressed = compressor.rewrite(copy.deepcopy(model), edited)
    assert isinstance(compressed[0], compressor.LowRankLinear) and compressed[0].rank == 3
    assert isinstance(compressed[2], nn.Linear)
    assert param_count(compressed) == refreshed.totals()["params_after"]
    assert compressed(x).shape == (4, 10)


@pytest.mark.parametrize(("edit", "message"), [
    ({"rank": 40}, "saves no parameters"),
    ({"rank": 0}, "saves no parameters"),
    ({"rank": "8"}, "not an integer"),
    ({"name": "missing"}, "does not have"),
    ({"shape": [64, 31]}, "in the plan"),
])
def test_bad_plan_edits_are_refused_and_change_nothing(tmp_path, edit, message):
    model = MODELS["mlp"]()
    plan = compressor.analyze(model, rank=4)
    data = plan.to_dict()
    data["layers"][1].update(edit)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanError, match=message):
        compressor.rewrite(model, Plan.from_dict(data))
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.GELU))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_plan_for_an_unsupported_layer_is_refused():
    model = MODELS["cnn"]()
    data = compressor.analyze(model, rank=2).to_dict()
    next(lp for lp in data["layers"] if lp["name"] == "depthwise")["rank"] = 2
    with pytest.raises(PlanError, match="depthwise"):
        compressor.rewrite(model, Plan.from_dict(data))


@pytest.mark.parametrize("text", ["{}", '{"format": "compressor-plan", "version": 99}', "not json"])
def test_bad_plan_files(tmp_path, text):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(PlanError):
        Plan.from_json(path)


FULL_RANK_CASES = {
    "linear": (lambda: nn.Linear(12, 7), lambda: torch.randn(3, 12)),
    "linear_nobias": (lambda: nn.Linear(7, 12, bias=False), lambda: torch.randn(2, 5, 7)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), lambda: torch.randn(2, 4, 9, 9)),
    "conv2d_dilated": (lambda: nn.Conv2d(3, 5, (3, 2), padding=(2, 1), dilation=2, padding_mode="reflect"),
                       lambda: torch.randn(1, 3, 10, 10)),
    "conv1d": (lambda: nn.Conv1d(5, 8, 5, padding=2), lambda: torch.randn(2, 5, 11)),
    "embedding": (lambda: nn.Embedding(30, 6, padding_idx=2), lambda: torch.randint(0, 30, (4, 5))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", FULL_RANK_CASES)
def test_full_rank_factorization_reproduces_outputs(case, dtype):
    make, inputs = FULL_RANK_CASES[case]
    layer = make().to(dtype)
    x = inputs()
    x = x.to(dtype) if x.is_floating_point() else x
    w = layer.weight
    full = min(w.shape[0], w[0].numel())
    factored = compressor.factor_module(layer, full)
    assert all(p.dtype == dtype and p.device == w.device for p in factored.parameters())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(factored(x), layer(x), atol=tol * 10, rtol=tol)
    torch.testing.assert_close(factored.dense_weight(), w.detach(), atol=tol * 10, rtol=tol)
    if getattr(layer, "bias", None) is not None:
        assert torch.equal(factored.up.bias, layer.bias)
    if isinstance(layer, nn.Embedding):
        assert factored.down.padding_idx == layer.padding_idx


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), rank_frac=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_truncation_error_is_the_discarded_spectrum(m, n, rank_frac, seed):
    """Eckart-Young: the Frobenius error squared is the sum of the discarded sigma^2, the spectral error
    the first discarded sigma."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, m).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, generator=g, dtype=torch.float64))
    rank = max(1, round(rank_frac * min(m, n)))
    S = torch.linalg.svdvals(layer.weight.detach())
    diff = compressor.factor_module(layer, rank).dense_weight().detach() - layer.weight.detach()
    assert torch.linalg.matrix_norm(diff) ** 2 == pytest.approx(float(S[rank:].square().sum()), abs=1e-9)
    spectral = float(S[rank]) if rank < len(S) else 0.0
    assert float(torch.linalg.matrix_norm(diff, ord=2)) == pytest.approx(spectral, abs=1e-9)


def test_rewrite_keeps_dtype_bias_training_mode_and_predictable_keys():
    model = nn.Sequential(nn.Linear(40, 50), nn.Linear(50, 30, bias=False)).double().eval()
    plan = compressor.analyze(model, rank=5)
    compressed = compressor.rewrite(copy.deepcopy(model), plan)
    assert set(compressed.state_dict()) == {"0.down.weight", "0.up.weight", "0.up.bias",
                                            "1.down.weight", "1.up.weight"}
    assert all(p.dtype == torch.float64 for p in compressed.parameters())
    assert torch.equal(compressed[0].up.bias, model[0].bias)
    assert not compressed.training and not compressed[0].down.training


def test_nan_weights_name_the_layer():
    model = MODELS["mlp"]()
    with torch.no_grad():
        model[2].weight[3, 4] = float("nan")
    with pytest.raises(CompressorError, match="layer '2' has NaN or Inf"):
        compressor.analyze(model, energy=0.9)
    plan = compressor.analyze(model, energy=0.9, exclude=["2"])  # the fix the message suggests
    assert plan.layer("2").reason == "excluded by pattern '2'"


def test_each_svd_is_computed_once_and_reused_by_rewrite(monkeypatch):
    # The package exports functions named like their modules, so fetch the modules themselves.
    analyze_mod = importlib.import_module("compressor.analysis.analyze")
    rewrite_mod = importlib.import_module("compressor.core.handlers")  # where factoring runs an SVD

    calls = []
    real = analyze_mod.svd
    monkeypatch.setattr(analyze_mod, "svd", lambda w: calls.append(w.shape) or real(w))
    monkeypatch.setattr(rewrite_mod, "svd", lambda w: calls.append(("rewrite", w.shape)) or real(w))
    model = MODELS["mlp"]()
    plan = compressor.analyze(model, rank=4)
    assert len(calls) == 3
    compressor.rewrite(model, plan)
    assert len(calls) == 3  # no new SVD: the cached decompositions were used

    model = MODELS["mlp"]()
    plan = compressor.analyze(model, rank=4)
    with torch.no_grad():
        model[0].weight.mul_(2)  # the weights changed after analyze: the cache must not be used
    compressor.rewrite(model, plan)
    assert ("rewrite", (64, 32)) in calls


def test_a_model_with_nothing_to_factor_says_so():
    plan = compressor.analyze(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), energy=0.9)
    assert plan.layers == [] and plan.notes == ["no layer of this model can be factored"]


def test_max_saving_rank_is_below_break_even():
    for m in range(1, 30):
        for n in range(1, 30):
            r = max_saving_rank(m, n)
            assert r * (m + n) < m * n or r == 0
            assert (r + 1) * (m + n) >= m * n


@pytest.mark.minilm
@pytest.mark.parametrize("energy", [0.9, 0.95, 0.99])
def test_minilm_per_layer_plans(minilm, energy, capsys):
    model, _tokenizer = minilm
    plan = compressor.analyze(model, energy=energy)
    totals = plan.totals()
    with capsys.disabled():
        print(f"\nall-MiniLM-L6-v2, energy {energy}\n{plan.table()}")
    assert totals["params_before"] == param_count(model)
    linears = [lp for lp in plan.layers if lp.kind == "linear"]
    assert len(linears) == 37  # 6 blocks x 6 + pooler
    for lp in plan.layers:
        assert lp.energy_kept >= energy - 1e-9
    if energy == 0.99:  # the linear layers are near full rank: 99% keeps them all dense
        assert all(not lp.factored for lp in linears)


@pytest.mark.minilm
def test_minilm_rewrite_matches_the_plan(minilm):
    model, tokenizer = minilm
    model = copy.deepcopy(model)
    plan = compressor.analyze(model, target=0.4, include=["encoder.*"])
    assert abs(plan.totals()["removed_fraction"] - 0.4) <= 0.01
    enc = tokenizer(["A sentence to embed.", "Another, longer sentence to embed here."], padding=True,
                    return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).last_hidden_state
        compressor.rewrite(model, plan)
        after = model(**enc).last_hidden_state
    assert param_count(model) == plan.totals()["params_after"]
    cos = torch.nn.functional.cosine_similarity(before.flatten(1), after.flatten(1))
    assert torch.isfinite(after).all() and (cos > 0).all()
