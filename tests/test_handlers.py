"""Every built-in layer handler through every stage, as one table of cases (peft-style), and a layer kind
defined here, registered from outside the package, through analyze -> rewrite -> export -> heal."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import compressor
from compressor.core.handlers import (
    LayerHandler,
    conv_patches,
    handler_for,
    handler_for_kind,
    handler_of_kind,
    handlers,
    kinds,
    registered,
)
from compressor.core.layers import LowRankLinear
from compressor.export.onnx import check_factored_graph, export_int8, export_onnx, validate_onnx
from compressor.search.sensitivity import fake_int8, int8_sensitivity
from compressor.train.lora import apply_lora, lora_parameters, merge_lora


def _hf_conv1d(nf: int, nx: int) -> nn.Module:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


class Wrap(nn.Module):
    """One layer under test (``layer``) between a little context, so stages see it inside a model."""

    def __init__(self, layer: nn.Module, head_in: int, flatten: bool = False):
        super().__init__()
        self.layer, self.flatten = layer, flatten
        self.head = nn.Linear(head_in, 3)

    def forward(self, x):
        y = torch.tanh(self.layer(x))
        return self.head(y.flatten(1) if self.flatten else y)


def _ids(shape, vocab=40):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(3))


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


def _separable_conv() -> Wrap:
    """A 3x3 conv whose kernel is nearly rank 2 in the spatial layout: analyze picks "conv2d-spatial"."""
    conv = nn.Conv2d(4, 16, 3, padding=1)
    with torch.no_grad():
        A = torch.randn(16 * 3, 2) @ torch.randn(2, 4 * 3) + 0.01 * torch.randn(16 * 3, 4 * 3)
        conv.weight.copy_(handler_of_kind("conv2d-spatial").kernel(A, conv.weight.shape))
    return Wrap(conv, 16 * 6 * 6, flatten=True)


# kind, model factory, example input: one row per built-in handler.
CASES = [
    ("linear", lambda: Wrap(nn.Linear(24, 32), 32), lambda: _x(5, 24)),
    ("conv1d", lambda: Wrap(nn.Conv1d(6, 16, 3, padding=1), 16 * 10, flatten=True), lambda: _x(2, 6, 10)),
    ("conv2d", lambda: Wrap(nn.Conv2d(4, 16, 3, stride=2, padding=1), 16 * 4 * 4, flatten=True),
     lambda: _x(2, 4, 8, 8)),
    ("conv3d", lambda: Wrap(nn.Conv3d(3, 12, (3, 3, 1), padding="same"), 12 * 4 * 4 * 4, flatten=True),
     lambda: _x(2, 3, 4, 4, 4)),
    ("embedding", lambda: Wrap(nn.Embedding(40, 24), 24), lambda: _ids((4, 6))),
    ("hf-conv1d", lambda: Wrap(_hf_conv1d(32, 24), 32), lambda: _x(5, 24)),
    ("conv2d-spatial", _separable_conv, lambda: _x(2, 4, 6, 6)),
    ("linear-pivoted", lambda: Wrap(nn.Linear(24, 32), 32), lambda: _x(5, 24)),
]
# How analyze is asked for a kind that is not the dispatched one.
ASK = {"conv2d-spatial": {"target": 0.5}, "linear-pivoted": {"rank_ratio": 0.25, "pivoted": True}}
IDS = [c[0] for c in CASES]


def test_every_built_in_kind_has_a_case():
    assert sorted(kinds()) == sorted(IDS)


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    kind, make, example = request.param
    torch.manual_seed(0)
    model = make().eval()
    return kind, model, example()


def test_handler_is_found_and_the_matrix_computes_the_layer(case):
    kind, model, x = case
    h = handler_for_kind(model.layer, kind)
    assert h is not None and h.kind == kind and handler_of_kind(kind) is h
    W = h.weight_matrix(model.layer)
    dispatched = handler_for(model.layer)
    if kind in dispatched.variants:  # another stored form of the same factors: the same matrix
        assert not h.matches(model.layer)
        torch.testing.assert_close(W, dispatched.weight_matrix(model.layer), atol=0, rtol=0)
    elif h is not dispatched:  # an alternative layout of the dispatched kind's weights
        assert kind in dispatched.alternatives and not h.matches(model.layer)
        torch.testing.assert_close(h.kernel(W, model.layer.weight.shape), model.layer.weight, atol=0, rtol=0)
    elif h.statistics == "rows":  # y_i = W x_i for every row the handler says the layer multiplies
        captured = {}
        model.layer.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
        model(x)
        rows = h.input_rows(model.layer, captured["x"], None)
        y = model.layer(captured["x"])
        bias = getattr(model.layer, "bias", None)
        y = (y if bias is None else y - bias.reshape(-1, *[1] * (y.dim() - 2))) if y.dim() > 2 else y - bias
        y_rows = y.movedim(1, -1).reshape(-1, W.shape[0]) if y.dim() > 2 else y
        torch.testing.assert_close(rows @ W.T, y_rows, atol=1e-5, rtol=1e-4)


def test_full_rank_outputs_equal_the_original(case):
    kind, model, x = case
    h = handler_for_kind(model.layer, kind)
    m, n = h.weight_matrix(model.layer).shape
    new = copy.deepcopy(model)
    new.layer = h.factor(model.layer, min(m, n))
    torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-4)


def test_truncation_error_is_the_discarded_singular_values(case):
    kind, model, _x = case
    h = handler_for_kind(model.layer, kind)
    W = h.weight_matrix(model.layer).detach()
    S = torch.linalg.svdvals(W)
    r = max(1, min(W.shape) // 3)
    factored = h.factor(model.layer, r)
    if kind == "conv2d-spatial":  # Eckart-Young on the regrouped kernel
        approx = h.weight_matrix(SimpleNamespace(weight=factored.dense_weight().detach()))
    else:
        approx = factored.dense_weight().detach().reshape(W.shape[0], -1)
    if approx.shape != W.shape:  # an embedding's dense table is stored as its matrix already
        approx = approx.T
    err = torch.linalg.matrix_norm(W - approx)
    assert math.isclose(float(err), float(S[r:].square().sum().sqrt()), rel_tol=1e-3, abs_tol=1e-5)


def test_onnx_keeps_two_factors_per_layer_and_validates(case, tmp_path):
    kind, model, x = case
    # Alternative factorizations are chosen under a parameter target only (a rank means different sizes).
    plan = compressor.analyze(model, **ASK.get(kind, {"rank_ratio": 0.25}), include=["layer"])
    assert [(lp.name, lp.kind) for lp in plan.factored] == [("layer", kind)]
    compressor.rewrite(model, plan)
    path = export_onnx(model, x, tmp_path / "m.onnx")
    assert check_factored_graph(path, plan) == []
    v = validate_onnx(path, model, x)
    assert v.passed, v.problems


def test_a_lora_heal_step_changes_only_the_adapter_and_merges_back(case):
    _, model, x = case
    target = model(x).detach() + 0.1
    wrapped = apply_lora(model, rank=2, filter_fn=lambda name, _m: name == "layer")
    assert list(wrapped) == ["layer"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    params = list(lora_parameters(model).values())
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(2):  # B starts at zero, so the first step only moves B: the second moves the output
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
    before_merge = model(x).detach()
    assert not torch.allclose(before_merge, target - 0.1)  # the adapter changed the output
    for n, p in model.named_parameters():
        if n in frozen:
            torch.testing.assert_close(p, frozen[n])
    merge_lora(model)
    torch.testing.assert_close(model(x), before_merge, atol=1e-5, rtol=1e-4)


def test_simulated_int8_is_what_onnxruntime_int8_computes(case, tmp_path):
    import numpy as np
    import onnxruntime as ort

    _, model, x = case
    path = export_int8(export_onnx(model, x, tmp_path / "m.onnx"), tmp_path / "m.int8.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i in session.get_inputs()}
    got = session.run(None, feed)[0]
    with torch.no_grad():
        simulated = fake_int8(copy.deepcopy(model))(x).numpy()
        dense = model(x).numpy()
    # The rounding reproduced, not absent: within 1% of what it moves the outputs (an input rounded the other way
    # at a tie in onnxruntime's DynamicQuantizeLinear moves one output by a step: 0.5% on the conv2d case).
    moved = np.abs(dense - got).max()
    assert np.abs(simulated - got).max() < 0.01 * moved and moved > 1e-4


def test_int8_sensitivity_ranks_the_layer(case):
    _, model, x = case
    sens = int8_sensitivity(model, [x])
    assert "layer" in sens and sens["layer"] > 0


def test_conv_patches_match_unfold_with_strides_dilation_and_padding():
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 0))
    x = _x(2, 3, 9, 7)
    ref = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    torch.testing.assert_close(conv_patches(conv, x), ref.transpose(1, 2).reshape(-1, ref.shape[1]))


# --------------------------------------------------------------------------- a user's own layer kind


class InOutDense(nn.Module):
    """A layer of "someone else's" library: ``y = x @ kernel + bias`` with ``kernel`` stored (in, out),
    under a name compressor has never seen."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.kernel + self.bias


class InOutDenseHandler(LayerHandler):
    kind = "in-out-dense"

    def matches(self, module):
        return isinstance(module, InOutDense)

    def weight(self, module):
        return module.kernel

    def weight_matrix(self, module):
        return module.kernel.T

    def factor_shapes(self, shape, rank):
        return (rank, shape[0]), (shape[1], rank)

    def empty_factored(self, module, rank):
        n, m = module.kernel.shape
        return LowRankLinear(n, m, rank, device=module.kernel.device, dtype=module.kernel.dtype)


def custom_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(InOutDense(16, 48), nn.GELU(), InOutDense(48, 48), nn.GELU(), nn.Linear(48, 4))


def test_a_registered_user_kind_goes_through_analyze_rewrite_export_and_heal(tmp_path):
    x = _x(64, 16)
    model = custom_model().eval()
    plan = compressor.analyze(model, rank=8)
    assert plan.layer("0").reason.startswith("InOutDense is not a supported layer type")  # unknown kind

    with registered(InOutDenseHandler()):
        assert handlers()[-1].kind == "in-out-dense"
        original = copy.deepcopy(model)
        plan = compressor.analyze(model, rank=8, calibration=[x[:32]])
        assert {lp.name: lp.kind for lp in plan.factored} == {"0": "in-out-dense", "2": "in-out-dense"}
        compressor.rewrite(model, plan)
        assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)
        assert plan.method.startswith("whitened-svd")  # calibration statistics came through the handler
        cos = F.cosine_similarity(model(x), original(x), dim=1).mean()
        assert cos > 0.8
        path = export_onnx(model, x[:2], tmp_path / "m.onnx")
        assert check_factored_graph(path, plan) == []
        assert validate_onnx(path, model, x[:2]).passed
        before = F.mse_loss(model(x[32:]), original(x[32:])).item()
        healed = compressor.heal(model, teacher=original, data=x[:32], val=x[32:], steps=30, lr=1e-2)
        after = F.mse_loss(healed.model(x[32:]), original(x[32:])).item()
        assert after < before
    assert "in-out-dense" not in kinds()  # registered inside the block only


def test_register_before_makes_a_handler_win_for_a_subclass():
    class MyLinear(nn.Linear):
        pass

    class MyLinearHandler(type(handler_of_kind("linear"))):
        kind = "my-linear"

        def matches(self, module):
            return isinstance(module, MyLinear)

    with registered(MyLinearHandler(), before="linear"):
        assert handler_for(MyLinear(3, 4)).kind == "my-linear"
        assert handler_for(nn.Linear(3, 4)).kind == "linear"
    assert handler_for(MyLinear(3, 4)).kind == "linear"
