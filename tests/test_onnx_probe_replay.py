"""Sensitivity probes on an ONNX graph start at the probed layer's level from values recorded in one reference
pass (OnnxModel.recording / replaying, the calibration's Replay protocol): the measured output changes and
the calibrated plan must equal those of full passes through the segmented graph."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor.analysis.onnx_model import OnnxModel, analyze_onnx
from compressor.analysis.tracing import Calibrator, Replay
from compressor.formats.onnx_graph import read_onnx

RNG = np.random.default_rng(0)


def _graph(path):
    """conv -> relu -> conv (+ residual) -> relu -> conv -> mean -> gemm: five layers in five levels, with
    onnxruntime segments (Relu, Add, ReduceMean, Flatten) between them."""
    def w(*shape):
        return (RNG.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = {"W1": w(8, 3, 3, 3), "B1": w(8), "W2": w(8, 8, 3, 3), "W3": w(12, 8, 1, 1), "W4": w(12, 12, 3, 3),
             "G": w(5, 12), "C": w(5)}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["s2"]),
             helper.make_node("Relu", ["s2"], ["r2"]),
             helper.make_node("Conv", ["r2", "W3"], ["c3"], name="conv3"),
             helper.make_node("Conv", ["c3", "W4"], ["c4"], name="conv4", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("ReduceMean", ["c4"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["m", "G", "C"], ["y"], name="head", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5])],
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return read_onnx(path)


@contextmanager
def _full(_self, _layer, _batch):
    yield


def _batches():
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(3, 3, 8, 8, generator=g)} for _ in range(4)]


def test_probes_from_recorded_levels_equal_full_passes(tmp_path, monkeypatch):
    model = OnnxModel(_graph(tmp_path / "g.onnx"))
    assert isinstance(model, Replay)
    layers = dict(model.onnx_layers)
    modules = {n: model.get_submodule(n) for n in layers}
    replacements = {}
    for name, mod in modules.items():
        new = copy.deepcopy(mod)
        with torch.no_grad():
            new.weight.mul_(0.8)
        replacements[name] = new
    calls = {n: 0 for n in modules}
    for n, m in modules.items():
        m.register_forward_pre_hook(lambda _m, _a, n=n: calls.__setitem__(n, calls[n] + 1))
    cal = Calibrator(model, modules, _batches())
    measure = cal.prober(2)
    calls.update(dict.fromkeys(calls, 0))
    fast = measure(replacements)
    # The first conv (layer W1) runs only in its own probe (2 batches), the head (G) in every probe.
    assert calls["W1"] == 2 and calls["G"] == 2 * len(modules)
    monkeypatch.setattr(OnnxModel, "replaying", _full)
    full = cal.output_errors(replacements, 2)
    assert fast.keys() == full.keys() == modules.keys()
    for name in full:
        assert full[name] > 0
        assert fast[name] == full[name]  # bit-identical: the same values reach the same computations
    assert model._resume is None


def test_calibrated_plan_is_the_same_with_and_without_replay(tmp_path, monkeypatch):
    graph = _graph(tmp_path / "g.onnx")
    fast = analyze_onnx(OnnxModel(graph), target=0.4, calibration=_batches()).to_dict()
    monkeypatch.setattr(OnnxModel, "replaying", _full)
    full = analyze_onnx(OnnxModel(graph), target=0.4, calibration=_batches()).to_dict()
    assert fast["calibration"]["sensitivity"]  # probes ran
    for plan in (fast, full):
        plan.pop("created", None)
    assert fast == full
