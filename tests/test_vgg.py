"""Dense 3x3 convs: the spatial decomposition ("conv2d-spatial") of ONNX Conv nodes, written as a ``kh x 1``
and a ``1 x kw`` Conv and checked against the dense graph holding the best rank-r kernel in that layout
(Eckart-Young on the reshaped weight); and on a real pretrained VGG16 (compressor.zoo.vgg16_tumor_onnx),
where analyze picks it per layer; and that ddddocr's text detector (zoo.ddddocr_detector_onnx) finds text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor import zoo
from compressor.analysis.onnx_model import OnnxModel, analyze_onnx
from compressor.core.handlers import handler_of_kind
from compressor.core.plan import Plan
from compressor.core.rewrite import rewrite
from compressor.export.onnx_factor import onnx_fidelity, write_factored
from compressor.formats.onnx_graph import read_onnx
from compressor.jobs.compress import compress

SPATIAL = handler_of_kind("conv2d-spatial")


def _separable_kernel(out: int, cin: int, kh: int, kw: int, rank: int, seed: int = 0) -> np.ndarray:
    """A kernel of spatial rank ``rank`` (plus a little noise): the spatial decomposition wins on it."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(out * kw, rank, generator=g) @ torch.randn(rank, cin * kh, generator=g)
    w = SPATIAL.kernel(a, (out, cin, kh, kw)) + 0.01 * torch.randn(out, cin, kh, kw, generator=g)
    return w.numpy().astype(np.float32)


def _conv_graph(path: Path, w: np.ndarray, xshape: list, **attrs) -> Path:
    bias = np.linspace(-1, 1, w.shape[0], dtype=np.float32)
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "c", "h", "w"])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("attrs", [{"pads": [1, 2, 2, 0], "strides": [2, 1], "dilations": [1, 2]},
                                   {"auto_pad": "SAME_UPPER", "strides": [2, 2]}])
def test_onnx_conv_takes_the_spatial_decomposition_as_two_conv_nodes(tmp_path, attrs):
    w = _separable_kernel(16, 6, 3, 3, rank=3)
    src = _conv_graph(tmp_path / "m.onnx", w, ["b", 6, 11, 9], **attrs)
    report = compress(src, tmp_path / "out", target=0.4)
    plan = Plan.from_json(tmp_path / "out" / "plan.json")
    lp = plan.layers[0]
    assert lp.kind == "conv2d-spatial" and lp.rank is not None and lp.matrix_shape == [16 * 3, 6 * 3]
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    kernels = [helper.get_attribute_value(a) for n in model.graph.node for a in n.attribute if a.name == "kernel_shape"]
    assert [n.op_type for n in model.graph.node] == ["Conv", "Conv"] and kernels == [[3, 1], [1, 3]]
    # Oracle: the dense Conv holding the best rank-r kernel in the spatial layout (numpy SVD, float64).
    # A[(o, j), (c, i)] = W[o, c, i, j]: rows pair an output with a kernel column, columns an input with a row.
    u, s, vh = np.linalg.svd(w.transpose(0, 3, 1, 2).reshape(16 * 3, 6 * 3).astype(np.float64))
    best = ((u[:, :lp.rank] * s[:lp.rank]) @ vh[:lp.rank]).reshape(16, 3, 6, 3).transpose(0, 2, 3, 1)
    oracle = _conv_graph(tmp_path / "oracle.onnx", np.ascontiguousarray(best, dtype=np.float32), ["b", 6, 11, 9],
                         **attrs)
    x = np.random.default_rng(0).standard_normal((2, 6, 11, 9)).astype(np.float32)
    got, want = _run(tmp_path / "out" / "model.onnx", x), _run(oracle, x)
    assert got.shape == want.shape == _run(src, x).shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert report.validations["onnx"].passed and report.fidelity["cosine_mean"] > 0.999


def test_spatial_onnx_factors_at_full_rank_compute_the_original_conv(tmp_path):
    w = np.random.default_rng(1).standard_normal((8, 5, 3, 3)).astype(np.float32)
    src = _conv_graph(tmp_path / "m.onnx", w, ["b", 5, 10, 7], pads=[2, 1, 0, 1], strides=[1, 2])
    graph = read_onnx(src)
    model = OnnxModel(graph)
    name = graph.layers[0].name
    conv = model.get_submodule(name)
    full = SPATIAL.factor(conv, min(SPATIAL.weight_matrix(conv).shape))
    path = write_factored(graph, {name: (full.up.weight, full.down.weight)}, tmp_path / "full.onnx")
    x = np.random.default_rng(2).standard_normal((3, 5, 10, 7)).astype(np.float32)
    np.testing.assert_allclose(_run(path, x), _run(src, x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ real VGG16


@pytest.fixture(scope="module")
def vgg():
    graph = read_onnx(zoo.vgg16_tumor_onnx())
    photos = zoo.sample_images(240, n=2, normalization="unit").permute(0, 2, 3, 1).contiguous()
    return graph, photos


@pytest.mark.slow
def test_vgg16_runs_as_its_torch_layers_and_takes_spatial_factors(vgg, tmp_path):
    graph, photos = vgg
    model = OnnxModel(graph)
    assert sum(lay.op == "Conv" and lay.skip is None for lay in graph.layers) == 13
    with torch.no_grad():
        probs = next(iter(model(photos).values()))
    want = _run_named(graph.path, photos.numpy())
    assert probs.shape == (2, len(zoo.VGG16_TUMOR_CLASSES))
    torch.testing.assert_close(probs, torch.from_numpy(want), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    # Weights only (no calibration): block 5's 3x3 convs, 40% removed; spatial wins on real layers.
    plan = analyze_onnx(model, target=0.4, include=["*block5_conv*"], threads=1)
    spatial = [lp.name for lp in plan.factored if lp.kind == "conv2d-spatial"]
    assert spatial, [(lp.name, lp.kind) for lp in plan.layers]
    rewrite(model, plan)
    factors = {lp.name: (model.get_submodule(lp.name).up.weight, model.get_submodule(lp.name).down.weight)
               for lp in plan.factored}
    path = write_factored(graph, factors, tmp_path / "vgg.onnx")
    convs = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "Conv"]
    assert len(convs) == 13 + len(plan.factored)
    with torch.no_grad():  # the written graph computes what the factored torch layers compute
        torch.testing.assert_close(torch.from_numpy(_run_named(path, photos.numpy())),
                                   next(iter(model(photos).values())), atol=1e-4, rtol=1e-3)
    assert onnx_fidelity(graph.path, path, [{"input": photos}])["cosine_mean"] > 0.9


def _run_named(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_text_detector_finds_the_characters_of_the_scanned_page_not_grass():
    # ddddocr's YOLOX-style detector (zoo): a wrong channel order or scale would not separate these.
    sess = ort.InferenceSession(str(zoo.ddddocr_detector_onnx()), providers=["CPUExecutionProvider"])
    photos = list(zoo.PHOTOS)
    x = (zoo.sample_images(416, normalization="unit").flip(1) * 255)[[photos.index("page.png"),
                                                                     photos.index("grass.png")]]
    found = []
    for img in x:
        out = sess.run(None, {"images": img[None].numpy()})[0][0]
        found.append(int((out[:, 4] * out[:, 5] > 0.1).sum()))  # anchors whose objectness x class > 0.1
    assert found[0] > 100 and found[1] == 0, found
