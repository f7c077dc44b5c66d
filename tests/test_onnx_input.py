"""ONNX in, compressed ONNX out: small graphs built here (MatMul on either side, Gemm, Conv, shared and
cast weights, external data), bad inputs, plan round trips, and the digits CNN and MiniLM compressed from
their exports exactly as their torch models are compressed with the same plan."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from compressor.analysis.analyze import analyze
from compressor.analysis.onnx_model import OnnxModel, analyze_onnx
from compressor.cli.main import main
from compressor.core.plan import Plan
from compressor.core.rewrite import rewrite
from compressor.data.inputs import sequence_axes
from compressor.export.onnx import export_onnx
from compressor.formats.onnx_graph import read_onnx
from compressor.jobs.compress import compress

RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    # A decaying spectrum, so that truncation keeps most of the matrix.
    scale = np.arange(1, shape[0] + 1).reshape(-1, *[1] * (len(shape) - 1))
    return (RNG.standard_normal(shape) / scale).astype(np.float32)


def _save(nodes, inputs, outputs, inits, path: Path, **save) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="owner", value="test")
    onnx.checker.check_model(model)
    onnx.save(model, str(path), **save)
    return path


def _run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def _truncate(w: np.ndarray, rank: int, matrix) -> np.ndarray:
    """The best rank-``rank`` approximation of ``matrix(w)`` (the layer's (m, n) view)."""
    u, s, vh = np.linalg.svd(matrix(w).astype(np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _fvi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _out(name: str, rank: int):
    return _fvi(name, [f"{name}{i}" for i in range(rank)])


CASES = {
    # name: (nodes, weights, input shape, view of a weight as the (m, n) matrix, back to its layout)
    "matmul_right": ([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], {"W": (24, 20)}, ["b", 5, 24],
                     lambda w: w.T, lambda a: a.T),
    "matmul_left": ([helper.make_node("MatMul", ["W", "x"], ["y"], name="mm")], {"W": (20, 24)}, ["b", 24, 6],
                    lambda w: w, lambda a: a),
    "gemm_transB": ([helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)],
                    {"W": (20, 24), "C": (20,)}, ["b", 24], lambda w: w, lambda a: a),
    "gemm": ([helper.make_node("Gemm", ["x", "W"], ["y"], name="gemm")], {"W": (24, 20)}, ["b", 24],
             lambda w: w.T, lambda a: a.T),
    "conv": ([helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 0, 2, 1], strides=[2, 1])],
             {"W": (16, 6, 3, 3), "B": (16,)}, ["b", 6, 9, 7], lambda w: w.reshape(16, -1),
             lambda a: a.reshape(16, 6, 3, 3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_layer_kind_is_factored_in_the_graph_as_two_nodes_of_its_kind(tmp_path, case):
    nodes, shapes, xshape, matrix, back = CASES[case]
    inits = {n: _w(*s) for n, s in shapes.items()}
    src = _save(nodes, [_fvi("x", xshape)], [_out("y", len(xshape))], inits, tmp_path / "m.onnx")
    before = src.read_bytes()
    rank = 3
    report = compress(src, tmp_path / "out", rank=rank)
    assert src.read_bytes() == before  # the input is never modified
    out = tmp_path / "out" / "model.onnx"
    model = onnx.load(str(out))
    op = nodes[0].op_type
    assert [n.op_type for n in model.graph.node] == [op, op]
    assert model.graph.node[1].output[0] == "y" and model.metadata_props[0].value == "test"
    assert model.opset_import[0].version == 17
    # Oracle: the original graph with its weight replaced by the rank-3 SVD truncation (numpy, float64).
    approx = back(_truncate(inits["W"], rank, matrix)).astype(np.float32)
    oracle = _save(nodes, [_fvi("x", xshape)], [_out("y", len(xshape))], {**inits, "W": approx},
                   tmp_path / "oracle.onnx")
    x = RNG.standard_normal([3 if d == "b" else d for d in xshape]).astype(np.float32)
    got, want = _run(out, {"x": x})[0], _run(oracle, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    lp = Plan.from_json(tmp_path / "out" / "plan.json").layers[0]
    assert lp.rank == rank and lp.matrix_shape == list(matrix(inits["W"]).shape)
    assert report.validations["onnx"].passed and report.source["format"] == "onnx"
    assert 0.5 < report.fidelity["cosine_mean"] < 1.0  # measured against the original graph


def _two_layer(tmp_path: Path, shared: bool = False, cast: bool = False, **save) -> Path:
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"),
             helper.make_node("Relu", ["h"], ["r"]),  # unnamed: it must stay so
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="second")]
    inits = {"W1": _w(32, 32), "W2": _w(32, 16)}
    if shared:
        nodes.append(helper.make_node("MatMul", ["r", "W1"], ["z"], name="third"))
    if cast:
        inits["W2"] = inits["W2"].astype(np.float16)
        nodes.insert(0, helper.make_node("Cast", ["W2"], ["W2f"], to=TensorProto.FLOAT, name="cast"))
        nodes[-1].input[1] = "W2f"
    outputs = [_out("y", 2)] + ([_out("z", 2)] if shared else [])
    return _save(nodes, [_fvi("x", ["b", 32])], outputs, inits, tmp_path / "two.onnx", **save)


def test_shared_and_cast_weights_stay_dense_with_their_reason(tmp_path):
    src = _two_layer(tmp_path, shared=True)
    compress(src, tmp_path / "out", rank=4)
    plan = Plan.from_json(tmp_path / "out" / "plan.json")
    reasons = {lp.name: (lp.rank, lp.reason) for lp in plan.layers}
    assert reasons["W2"][0] == 4
    shared = [v for k, v in reasons.items() if k.startswith("W1")]
    assert len(shared) == 2 and all(r is None and "shared" in why for r, why in shared)
    out = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [n.name for n in out.graph.node] == ["first", "", "second__down", "second__up", "third"]
    w1 = {t.name: t for t in out.graph.initializer}["W1"]
    original = {t.name: t for t in onnx.load(str(src)).graph.initializer}["W1"]
    assert w1.SerializeToString() == original.SerializeToString()

    (tmp_path / "c").mkdir()
    src = _two_layer(tmp_path / "c", cast=True)
    plan = compress(src, tmp_path / "out2", rank=4, mode="analyze").layers
    cast = next(lp for lp in plan if lp["name"] == "W2")
    assert cast["rank"] is None and "through Cast" in cast["reason"] and cast["kind"] == "MatMul"


def test_external_data_is_streamed_and_copied_byte_for_byte(tmp_path):
    src = _two_layer(tmp_path, save_as_external_data=True, location="two.onnx.data", size_threshold=0)
    graph = read_onnx(src)
    assert isinstance(graph.array("W1"), np.memmap)  # read lazily, not loaded
    np.savez(tmp_path / "cal.npz", x=RNG.standard_normal((64, 32)).astype(np.float32))
    compress(src, tmp_path / "out", rank=4, exclude=["W1"], calibration=tmp_path / "cal.npz")  # graph run in parts
    out = tmp_path / "out"
    assert Plan.from_json(out / "plan.json").method == "whitened-svd+sequential"
    assert (out / "model.onnx.data").is_file()
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    assert all(t.data_location == TensorProto.EXTERNAL for t in inits.values())
    assert set(inits) == {"W1", "W2__down", "W2__up"}
    w1 = read_onnx(out / "model.onnx").array("W1")
    np.testing.assert_array_equal(np.asarray(w1), np.asarray(graph.array("W1")))
    x = RNG.standard_normal((2, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(out / "model.onnx", {"x": x})[0], _run(src, {"x": x})[0], rtol=0.5, atol=1.0)


def test_plan_edited_and_applied_to_the_onnx_file(tmp_path):
    src = _two_layer(tmp_path)
    r = CliRunner().invoke(main, ["analyze", str(src), "--energy", "0.9", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "a" / "plan.json").read_text())
    for lp in data["layers"]:
        lp["rank"] = {"W1": 2, "W2": None}[lp["name"]]
    (tmp_path / "edited.json").write_text(json.dumps(data))
    r = CliRunner().invoke(main, ["apply", str(src), str(tmp_path / "edited.json"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    ops = [(n.op_type, list(n.input)) for n in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.node]
    assert ops[0] == ("MatMul", ["x", "W1__down"]) and ops[-1] == ("MatMul", ["r", "W2"])


def test_layer_names_come_from_the_exporters_records(tmp_path):
    """The dynamo exporter's name scopes (its folded weights are val_N), the legacy exporter's node names,
    else the weight's name; compressor's own "model." wrapper prefix is dropped."""
    nodes = [helper.make_node("MatMul", ["x", "val_7"], ["h"], name="node_MatMul_3"),
             helper.make_node("MatMul", ["h", "onnx::MatMul_9"], ["g"], name="/model/encoder/layer.0/fc/MatMul"),
             helper.make_node("MatMul", ["g", "model.head.weight"], ["y"], name="n2")]
    nodes[0].metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'model.encoder.q', 'linear']")
    inits = {"val_7": _w(8, 8), "onnx::MatMul_9": _w(8, 8), "model.head.weight": _w(8, 4)}
    src = _save(nodes, [_fvi("x", ["b", 8])], [_out("y", 2)], inits, tmp_path / "n.onnx")
    assert [lay.name for lay in read_onnx(src).layers] == ["encoder.q", "encoder.layer.0.fc", "head"]


@pytest.mark.parametrize("what", ["garbage", "checker", "dynamic"])
def test_bad_onnx_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, what):
    path = tmp_path / "bad.onnx"
    if what == "garbage":
        path.write_bytes(b"\x08\x07not really onnx at all")
    elif what == "checker":  # a node reading a tensor nothing defines
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "nowhere"], ["y"])], "g",
                                  [_fvi("x", [1, 4])], [_out("y", 2)])
        onnx.save(helper.make_model(graph), str(path))
    else:  # the MatMul's "weight" is a graph input
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [_fvi("x", [1, 4]), _fvi("w", [4, 4])], [_out("y", 2)])
        onnx.save(helper.make_model(graph), str(path))
    r = CliRunner().invoke(main, [str(path), "--rank", "2", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert {"checker": "onnx.checker", "dynamic": "dynamic weights", "garbage": "not a model"}[what] in lines[0]
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_digits_cnn_from_its_onnx_export_matches_the_torch_compression(tmp_path):
    """Same plan and calibration, torch path vs ONNX path: the compressed models compute the same."""
    from compressor.examples import digits_splits, train_digits_cnn

    model, _ = train_digits_cnn(epochs=2)  # about 90% test accuracy: enough to be a real classifier
    x = digits_splits()["train"][0][:256]
    calib, held = x[:192], x[192:]
    # The legacy exporter (fast here); it keeps the parameters' names ("model.0.weight", ...).
    src = export_onnx(model, held[:4], tmp_path / "cnn.onnx", exporter="legacy")
    np.savez(tmp_path / "calib.npz", input=calib.numpy())
    np.savez(tmp_path / "held.npz", input=held.numpy())
    # A parameter target: ranks spent by measured output sensitivity, measured alike on both paths.
    onnx_plan = analyze_onnx(OnnxModel(read_onnx(src)), target=0.5, calibration=[calib])
    torch_plan = analyze(model, target=0.5, calibration=[calib])
    assert onnx_plan.ranks() == torch_plan.ranks()
    sensitivity = torch_plan.calibration["sensitivity"]
    # Probed: the layers the allocation may cut (calibration.PROBE_MARGIN), the same on both paths.
    assert set(onnx_plan.calibration["sensitivity"]) == set(sensitivity)
    assert {lp.name for lp in torch_plan.factored} <= set(sensitivity) and torch_plan.factored
    for name, s in sensitivity.items():
        assert onnx_plan.calibration["sensitivity"][name] == pytest.approx(s, rel=1e-3)
    # Every layer factored; the sequential refit rule (no conv refits, enough rows per feature) is the torch
    # path's, so both refit the same layers.
    report = compress(src, tmp_path / "out", rank_ratio=0.25, calibration=tmp_path / "calib.npz",
                      example_inputs=tmp_path / "held.npz")
    plan = Plan.from_json(tmp_path / "out" / "plan.json")
    assert plan.method == "whitened-svd+sequential" and len(plan.factored) == 4
    # The torch model, same plan (the ONNX layer names are the torch module names), same calibration.
    twin = analyze(model, plan=plan, calibration=[calib])
    assert twin.ranks() == plan.ranks()
    assert plan.calibration["layers_refit_sequentially"] == twin.calibration["layers_refit_sequentially"]
    with torch.no_grad():
        ref = model(held)
        want = rewrite(model, twin)(held).numpy()
    got = _run(tmp_path / "out" / "model.onnx", {"input": held.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(got), ref, dim=1).mean()
    assert abs(float(cos) - report.fidelity["cosine_mean"]) < 1e-4


@pytest.mark.slow
def test_minilm_from_its_onnx_export_matches_the_torch_compression(tmp_path, minilm):
    """A torch plan applied to MiniLM's export (the legacy exporter, fast here: weights renamed
    onnx::MatMul_N, layers named from the node names): the compressed graph computes what the compressed
    torch model computes."""
    model, tok = minilm
    model = copy.deepcopy(model)
    sentences = ["Low-rank factors replace each weight matrix by two thin ones.",
                 "An ONNX file is all some people have of their model.", "Short one."]
    held = dict(tok(sentences, padding=True, return_tensors="pt"))
    src = export_onnx(model, held, tmp_path / "minilm.onnx", dynamic_axes=sequence_axes(held), exporter="legacy")
    plan = analyze(model, rank_ratio=0.3, exclude=["embeddings.*"])  # embedding lookups are not factored in ONNX
    plan.to_json(tmp_path / "plan.json")
    np.savez(tmp_path / "held.npz", **{k: v.numpy() for k, v in held.items()})
    report = compress(src, tmp_path / "out", mode="apply", plan_path=tmp_path / "plan.json",
                      example_inputs=tmp_path / "held.npz")
    # 6 x (query, key, value, output, ffn in, ffn out) + pooler
    assert report.plan_totals["layers_factored"] == len(plan.factored) == 37
    with torch.no_grad():
        ref = model(**held).last_hidden_state
        want = rewrite(model, plan)(**held).last_hidden_state
    got = torch.from_numpy(_run(tmp_path / "out" / "model.onnx", {k: v.numpy() for k, v in held.items()})[0])
    assert float((got - want).abs().max()) < 1e-3 * float(want.abs().max())
    cos_torch = torch.nn.functional.cosine_similarity(want.flatten(1), ref.flatten(1)).mean()
    cos_onnx = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).mean()
    assert abs(float(cos_torch) - float(cos_onnx)) < 1e-5
