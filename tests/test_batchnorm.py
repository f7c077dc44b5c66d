"""BatchNorm folding (compressor.core.fold, compressor.analysis.batchnorm): exact in eval mode, found by
running the model, refused where another layer reads the raw conv output, recorded in the plan and
repeated by rewrite and by the load skeleton."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import compressor
from compressor.analysis.batchnorm import conv_bn_pairs
from compressor.core.errors import PlanError
from compressor.core.fold import apply_folds, fold_into
from compressor.core.plan import Plan
from compressor.core.rewrite import build_factored


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


class Net(nn.Module):
    """Conv/BN pairs as attributes (not a Sequential), one conv with a bias, and a conv whose raw output
    also feeds a skip connection (its BN must not be folded)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)))
        raw = self.c3(h)
        h = self.b3(raw) + raw  # the raw conv output is read twice
        return self.fc(h.mean((2, 3)))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return _randomize_bn(Net(), seed)


@pytest.mark.parametrize("affine", [True, False])
def test_folding_is_exact_in_eval_mode(affine):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 8, 3, padding=1), _randomize_bn(nn.BatchNorm2d(8, affine=affine))
    x = torch.randn(2, 4, 9, 9)
    ref = bn(conv(x))
    fold_into(conv, bn)
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)


def test_pairs_are_found_by_running_the_model_and_a_shared_raw_output_is_refused():
    model = _net()
    pairs = conv_bn_pairs(model, torch.randn(2, 3, 8, 8))
    assert pairs == [["c1", "b1"], ["c2", "b2"]]  # not c3/b3: the skip connection reads c3's raw output
    assert isinstance(model.b1, nn.BatchNorm2d)  # the model itself is not changed
    assert conv_bn_pairs(model, torch.randn(2, 3, 8, 8), convs={"c2"}) == [["c2", "b2"]]


def test_analyze_folds_records_the_pairs_and_rewrite_repeats_them():
    model, x = _net(), torch.randn(4, 3, 8, 8)
    ref = model(x)
    plan = compressor.analyze(model, rank_ratio=1.0, calibration=[x], sensitivity=False, sequential=False)
    assert plan.folded == [["c1", "b1"], ["c2", "b2"]]
    assert isinstance(model.b1, nn.BatchNorm2d)  # analyze changes nothing
    again = Plan.from_dict(plan.to_dict())
    assert again.folded == plan.folded
    compressor.rewrite(model, plan)
    assert isinstance(model.b1, nn.Identity) and isinstance(model.b2, nn.Identity)
    assert isinstance(model.b3, nn.BatchNorm2d)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)  # full rank (kept dense): still exact
    with pytest.raises(PlanError, match="cannot be folded"):
        compressor.rewrite(model, plan)  # already folded: refused, not folded twice


def test_folded_factors_load_into_the_skeleton_and_keep_batchnorm_leaves_them():
    model, x = _net(), torch.randn(4, 3, 8, 8)
    plan = compressor.analyze(model, target=0.3, example_inputs=x)
    assert plan.folded and plan.factored
    factored = compressor.rewrite(copy.deepcopy(model), plan)
    skeleton = build_factored(_net(seed=1), Plan.from_dict(plan.to_dict()))
    skeleton.load_state_dict(factored.state_dict(), strict=True)
    torch.testing.assert_close(skeleton.eval()(x), factored(x))
    kept = compressor.analyze(model, target=0.3, example_inputs=x, fold_batchnorm=False)
    assert kept.folded == []
    assert compressor.analyze(model, target=0.3).folded == []  # no inputs to trace: nothing folded


def test_a_plan_folding_a_missing_layer_changes_nothing():
    model = _net()
    plan = compressor.analyze(model, target=0.3, example_inputs=torch.randn(2, 3, 8, 8))
    plan.folded.append(["c3", "nope"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match="nope"):
        compressor.rewrite(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert apply_folds(model, []) is model


@pytest.mark.filterwarnings("ignore::compressor.jobs.fidelity.LowFidelityWarning")  # random weights, plain SVD
def test_the_compress_job_folds_with_example_inputs_and_keep_batchnorm_keeps_them(tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                        nn.Flatten(), nn.Linear(16 * 8 * 8, 10)))
    path = tmp_path / "cnn.pt"
    torch.save(model, path)
    out = tmp_path / "out"
    report = compressor.compress(path, out, target=0.3, input_shapes=["2x3x8x8"])
    assert report.validations["onnx"].passed
    assert Plan.from_json(out / "plan.json").folded == [["0", "1"], ["3", "4"]]
    assert isinstance(compressor.load(out)[1], nn.Identity)  # the folded structure is what loads back
    compressor.compress(path, tmp_path / "kept", mode="analyze", target=0.3, input_shapes=["2x3x8x8"],
                        keep_batchnorm=True)
    assert Plan.from_json(tmp_path / "kept" / "plan.json").folded == []
