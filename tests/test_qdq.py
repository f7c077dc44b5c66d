"""Static int8 (QDQ) export: calibrated on real inputs, per-channel weights, validated like the other
variants, and the int8 file to ship (dynamic or static) chosen by measured latency and fidelity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import compressor
from compressor.core.errors import CompressorError
from compressor.export.int8 import QDQ_TIE, QDQ_Z, clearly_better
from compressor.export.latency import INT8_COSINE_TOLERANCE, Comparison, recommend_int8
from compressor.export.onnx import INT8_MIN_COSINE, VARIANTS, export_onnx, export_qdq, onnx_session, qdq_choice

from .conftest import needs_exact_int8


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits CNN trained briefly, pickled, with calibration images (train split) and held-out ones."""
    from compressor.examples import digits_splits, train_digits_cnn

    folder = tmp_path_factory.mktemp("digits")
    model, _ = train_digits_cnn(seed=0, epochs=3)
    splits = digits_splits(0)
    torch.save(model, folder / "cnn.pt")
    torch.save(splits["train"][0][:256], folder / "cal.pt")
    return model, folder, splits["test"][0]


def test_qdq_is_one_registry_entry_that_needs_calibration():
    v = VARIANTS["qdq"]
    assert v.calibrated and v.min_cosine == INT8_MIN_COSINE and v.bytes_per_param == 1.0
    assert not v.searched  # tried by a search only when asked for


@needs_exact_int8
def test_digits_cnn_static_int8_is_qdq_per_channel_validated_and_chosen(digits, tmp_path):
    _, folder, held_out = digits
    out = tmp_path / "out"
    report = compressor.compress(folder / "cnn.pt", out, trust_pickle=True, energy=0.95, variants=("int8", "qdq"),
                                 # random example inputs: the static file is validated on real ones instead
                                 calibration=folder / "cal.pt", input_shapes=("2x1x8x8",), progress=False)
    path = out / "model.qdq.onnx"
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # Per-channel weights: every Conv's weight comes through a DequantizeLinear with one scale per output
    # channel (the float layers the choice kept, if any, excepted).
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    settings = report.validations["qdq"].settings
    per_channel = 0
    for node in graph.node:
        dq = producer.get(node.input[1]) if node.op_type == "Conv" else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            weight, scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]])
            assert weight.data_type == onnx.TensorProto.INT8
            assert scale.shape == (weight.dims[0],) and len(np.unique(scale)) > 1
            per_channel += 1
    convs = sum(op == "Conv" for op in ops)
    assert per_channel >= convs - len(settings["chosen"]["float_layers"]) and per_channel >= 1
    # Smaller than fp32, though not 4x in a model this small: int32 biases with per-channel scales and the
    # Q/DQ nodes weigh about as much as its few thousand int8 weights.
    assert report.files["model.qdq.onnx"] < report.files["model.onnx"]

    # Validated against torch within the int8 tolerance, like the other variants.
    qdq = report.validations["qdq"].validation
    assert qdq.passed and qdq.cosine >= INT8_MIN_COSINE and report.passed
    # It classifies held-out digits as the fp32 file (the compressed torch model, to 1e-5) does.
    def top1(file):
        sess = onnx_session(out / file)
        return sess.run(None, {sess.get_inputs()[0].name: held_out.numpy()})[0].argmax(-1)

    assert (top1("model.qdq.onnx") == top1("model.onnx")).mean() >= 0.95

    # How it was chosen is recorded, in the file and in the report.
    assert qdq_choice(path) == {k: v for k, v in settings.items() if k not in ("calibrated_on", "validated_on")}
    assert "cal.pt" in settings["calibrated_on"] and settings["calibration_samples"] == 256
    assert settings["validated_on"] == "the first calibration batch"
    assert {c["method"] for c in settings["tried"]} == {"minmax", "percentile"}
    assert {c["rounding"] for c in settings["tried"]} == {"nearest", "gptq"}
    assert f"{settings['chosen']['rounding']} rounding" in (out / "report.md").read_text()
    # A float layer is kept only when it gained clearly (QDQ_TIE at least, and beyond chance) over the same
    # candidate without it.
    chosen = settings["chosen"]
    assert chosen in settings["tried"]
    same = [c for c in settings["tried"] if (c["method"], c["rounding"]) == (chosen["method"], chosen["rounding"])
            and not c["float_activations"]]
    if chosen["float_layers"]:
        with_them = next(c for c in same if c["float_layers"] == chosen["float_layers"])
        assert with_them["cosine"] > next(c for c in same if not c["float_layers"])["cosine"] + QDQ_TIE
        assert with_them["gain"] > max(QDQ_TIE, with_them["noise"])
    # Each candidate compared with a simpler one records the evidence: its paired gain, and chance's.
    compared = [c for c in settings["tried"] if "gain" in c]
    assert len(compared) == 4 and all(c["noise"] >= 0 for c in compared)  # gptq, and 3 float-layer candidates
    assert {c["rounding"] for c in compared} >= {"gptq"}

    # The int8 file to ship follows the rule from the measurements written beside it.
    choice = json.loads((out / "report.json").read_text())["int8_choice"]
    rows = choice["files"]
    assert set(rows) == {"model.int8.onnx", "model.qdq.onnx"}
    best = max(r["cosine"] for r in rows.values() if r["passed"])
    close = [n for n, r in rows.items() if r["passed"] and r["cosine"] >= best - INT8_COSINE_TOLERANCE]
    assert choice["recommended"] == min(close, key=lambda n: rows[n]["latency_ratio"])
    assert choice["fidelity_on"] == "the first calibration batch"
    md = (out / "report.md").read_text()
    assert f"Which int8 file to ship: `{choice['recommended']}`" in md and "static int8 (QDQ" in md


def test_a_more_complex_qdq_candidate_must_win_by_more_than_chance():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.9, 1.0, 64)
    steady = base + 2 * QDQ_TIE  # every sample a little better: not chance
    assert clearly_better(steady, base, QDQ_TIE)
    assert not clearly_better(steady, base, 3 * QDQ_TIE)  # but not by the margin asked for
    # The same mean gain, from samples that go up and down by much more: within chance.
    noisy = base + 2 * QDQ_TIE + rng.choice([-1.0, 1.0], 64) * 20 * QDQ_TIE
    diff = noisy - base
    assert diff.mean() > QDQ_TIE and diff.mean() < QDQ_Z * diff.std(ddof=1) / np.sqrt(64)
    assert not clearly_better(noisy, base, QDQ_TIE)
    assert not clearly_better(base, steady, QDQ_TIE)  # worse is never better


def test_recommend_int8_rule():
    times = {"a.onnx": 2.0, "b.onnx": 1.0, "c.onnx": 0.5}

    def timer(dense, path, inputs, threads):
        return Comparison(4.0, times[path.name], times[path.name] / 4.0, 1)

    x = torch.zeros(1, 3)
    within = {"a.onnx": ("a.onnx", 0.999, True), "b.onnx": ("b.onnx", 0.995, True)}
    assert recommend_int8("f.onnx", within, x, threads=1, timer=timer)["recommended"] == "b.onnx"
    apart = {"a.onnx": ("a.onnx", 0.999, True), "b.onnx": ("b.onnx", 0.95, True)}
    assert recommend_int8("f.onnx", apart, x, threads=1, timer=timer)["recommended"] == "a.onnx"
    failed = {**within, "c.onnx": ("c.onnx", 0.999, False)}  # fastest and faithful, but failed validation
    assert recommend_int8("f.onnx", failed, x, threads=1, timer=timer)["recommended"] == "b.onnx"
    none = {"c.onnx": ("c.onnx", 0.5, False)}
    assert recommend_int8("f.onnx", none, x, threads=1, timer=timer)["recommended"] is None


def test_qdq_without_calibration_is_refused_and_writes_nothing(digits, tmp_path):
    model, _, held_out = digits
    src = export_onnx(model, held_out[:2], tmp_path / "m.onnx")
    for nothing in (None, []):
        with pytest.raises(CompressorError, match="calibration"):
            export_qdq(src, tmp_path / "q.onnx", calibration=nothing)
    with pytest.raises(CompressorError, match="calibration method"):
        export_qdq(src, tmp_path / "q.onnx", calibration=[held_out[:4]], methods=("entropy",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_cli_qdq_without_calibration_says_what_it_calibrated_on(tmp_path):
    from click.testing import CliRunner

    from compressor.cli.main import main
    from compressor.examples import digits_cnn

    torch.manual_seed(0)
    torch.save(digits_cnn(), tmp_path / "cnn.pt")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["export", str(tmp_path / "cnn.pt"), "--trust-pickle", "--input-shape", "4x1x8x8",
                                    "--int8", "--qdq", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "model.qdq.onnx" in res.output and "calibrated" in res.output and "int8 to ship" in res.output
    report = json.loads((out / "report.json").read_text())
    assert report["qdq"]["passed"] and "random ones (--input-shape)" in report["qdq"]["settings"]["calibrated_on"]
    assert report["int8_choice"]["recommended"] in ("model.int8.onnx", "model.qdq.onnx")


def test_search_tries_qdq_only_when_asked():
    from compressor.search.recipes import DEFAULT_PRECISIONS, REFERENCES, Recipe, default_recipes

    assert "qdq" not in DEFAULT_PRECISIONS and Recipe("qdq") not in REFERENCES
    assert not any(r.precision == "qdq" for r in default_recipes())
    asked = default_recipes((0.3,), precisions=("fp32", "qdq"))
    assert Recipe("qdq") in asked and Recipe("qdq", 0.3) in asked


def test_qdq_bias_correction_removes_the_mean_shift_of_int8_weights(tmp_path):
    # Rows with one large weight: int8 rounds the small ones coarsely, and on positive inputs (as after a
    # ReLU) the errors add up to a constant shift per output channel, which bias correction takes out.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 8, 1)
    with torch.no_grad():
        conv.weight.uniform_(-0.3, 0.3)
        conv.weight[:, 0] = 40.0
    x = torch.rand(64, 6, 4, 4) * 4 + 2
    src = export_onnx(conv.eval(), x[:1], tmp_path / "c.onnx")
    before = src.read_bytes()
    want = onnx_session(src).run(None, {"input": x.numpy()})[0]

    def mean_shift(bias_correction: bool) -> float:
        path = export_qdq(src, tmp_path / f"q{bias_correction}.onnx", calibration=list(x.split(16)),
                          methods=("minmax",), bias_correction=bias_correction)
        assert qdq_choice(path)["bias_corrected_layers"] == (1 if bias_correction else 0)
        got = onnx_session(path).run(None, {"input": x.numpy()})[0]
        return float(np.abs((got - want).mean(axis=(0, 2, 3))).mean())

    plain, corrected = mean_shift(False), mean_shift(True)
    assert corrected < 0.3 * plain and plain > 0.05
    assert src.read_bytes() == before  # the input file is left as it was


def test_qdq_of_a_model_with_external_weights_corrects_its_biases(tmp_path):
    # The bias correction runs the fp32 model once more with extra outputs: a model whose weights live in
    # a separate file must work too, and that file stays as it was.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.rand(32, 3, 8, 8)
    graph = onnx.load(str(export_onnx(model, x[:1], tmp_path / "m.onnx")))
    src = tmp_path / "ext" / "ext.onnx"
    src.parent.mkdir()
    onnx.save(graph, str(src), save_as_external_data=True, location="weights.bin", size_threshold=0)
    weights = (src.parent / "weights.bin").read_bytes()
    path = export_qdq(src, tmp_path / "q.onnx", calibration=list(x.split(16)), methods=("minmax",))
    assert qdq_choice(path)["bias_corrected_layers"] == 2
    assert sorted(p.name for p in src.parent.iterdir()) == ["ext.onnx", "weights.bin"]
    assert (src.parent / "weights.bin").read_bytes() == weights


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory):
    """A CNN with the layer kinds GPTQ treats apart (a conv, a depthwise conv, a pointwise conv, a linear),
    its fp32 file and calibration inputs (positive, as images are)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, stride=2, groups=16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 8, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10)).eval()
    x = torch.rand(64, 3, 8, 8)
    src = export_onnx(model, x[:1], tmp_path_factory.mktemp("tiny") / "m.onnx")
    return model, src, x


def test_gptq_weights_sit_on_the_int8_grid_and_cost_less_output_error_than_rounding_to_nearest(tiny_cnn, tmp_path):
    from compressor.core.handlers import fake_int8_weight
    from compressor.export.int8_rounding import rounded_sources

    model, src, x = tiny_cnn
    name = onnx_session(src).get_inputs()[0].name
    sources = rounded_sources(src, [{name: b.numpy()} for b in x.split(16)], tmp_path, roundings=("gptq",),
                              bias_correction=False)
    path, counts = sources["gptq"]
    assert counts == {"gptq_layers": 4, "bias_corrected_layers": 0}
    rounded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    inputs = {}
    layers = {i: m for i, m in enumerate(model) if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)}
    hooks = [m.register_forward_hook(lambda m, a, _, i=i: inputs.__setitem__(i, a[0])) for i, m in layers.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    errors = []
    for i, layer in layers.items():
        w = layer.weight.detach()
        g = torch.from_numpy(rounded[f"model.{i}.weight"].copy())
        # On onnxruntime's grid: each output channel an integer multiple (within -127..127) of the scale
        # max|w| / 127 of the original weights, which its largest weight keeps, so the scale is the same.
        scale = w.reshape(len(w), -1).abs().amax(1) / 127
        q = g.reshape(len(g), -1) / scale[:, None]
        assert (q - q.round()).abs().max() < 1e-4 and q.abs().max() <= 127 + 1e-4
        assert torch.equal(g.reshape(len(g), -1).abs().amax(1), (scale * 127).float())
        assert not torch.equal(g, fake_int8_weight(w))  # not round to nearest

        def out(weight, layer=layer, i=i):
            if isinstance(layer, torch.nn.Linear):
                return torch.nn.functional.linear(inputs[i], weight)
            return torch.nn.functional.conv2d(inputs[i], weight, stride=layer.stride, padding=layer.padding,
                                              groups=layer.groups)

        exact = out(w)
        gptq, nearest = (float((out(v) - exact).pow(2).sum()) for v in (g, fake_int8_weight(w)))
        assert gptq <= nearest, (i, gptq, nearest)
        errors.append((gptq, nearest))
    # Not by a hair: over the four layers well under half of round-to-nearest's squared error.
    assert sum(e for e, _ in errors) < 0.5 * sum(e for _, e in errors)


def test_qdq_with_gptq_rounding_stores_gptq_weights_losslessly_and_records_the_choice(tiny_cnn, tmp_path):
    from compressor.export.int8_rounding import rounded_sources
    from compressor.export.onnx import validate_onnx

    model, src, x = tiny_cnn
    calibration = list(x.split(16))
    path = export_qdq(src, tmp_path / "q.onnx", calibration=calibration, methods=("minmax",), roundings=("gptq",))
    choice = qdq_choice(path)
    assert choice["chosen"]["rounding"] == "gptq" and {c["rounding"] for c in choice["tried"]} == {"gptq"}
    assert choice["gptq_layers"] == 4 and choice["bias_corrected_layers"] == 4
    check = validate_onnx(path, model, x[:16], atol=None, min_cosine=INT8_MIN_COSINE, variant="qdq")
    assert check.passed, check.problems
    # onnxruntime's own rounding of the GPTQ weights gives them back: its int8 values are GPTQ's.
    name = onnx_session(src).get_inputs()[0].name
    gptq_file = rounded_sources(src, [{name: b.numpy()} for b in calibration], tmp_path, roundings=("gptq",),
                                bias_correction=False)["gptq"][0]
    wanted = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(gptq_file)).graph.initializer if len(t.dims) > 1}
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    stored = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0].removesuffix("_DequantizeLinear_Output") in wanted:
            weight = wanted[node.output[0].removesuffix("_DequantizeLinear_Output")]
            q, scale = inits[node.input[0]], inits[node.input[1]]
            assert q.dtype == np.int8 and scale.shape == (len(weight),)
            mine = weight.reshape(len(weight), -1) / (np.abs(weight).reshape(len(weight), -1).max(1) / 127)[:, None]
            assert np.array_equal(q.reshape(len(q), -1), np.round(mine).astype(np.int8))
            stored += 1
    float_layers = len(choice["chosen"]["float_layers"])
    assert stored == 4 - float_layers and stored >= 2
    # A layer left float has its fp32 weight and bias, neither GPTQ's nor corrected for it.
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    kept = [n for n, v in inits.items() if n in original and v.dtype == np.float32]
    assert len(kept) == 2 * float_layers and all(np.array_equal(inits[n], original[n]) for n in kept)


def test_gptq_of_a_matmul_weight_is_stored_losslessly_per_output_column(tmp_path):
    # A MatMul weight is (inputs, outputs): onnxruntime's channel axis is 1, so GPTQ must round its columns.
    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = torch.nn.Parameter(torch.randn(24, 32)), torch.nn.Parameter(torch.randn(32, 6))

        def forward(self, x):
            return torch.relu(x @ self.w1) @ self.w2

    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.rand(64, 24)
    src = export_onnx(model, x[:1], tmp_path / "m.onnx")
    assert [n.op_type for n in onnx.load(str(src)).graph.node].count("MatMul") == 2
    path = export_qdq(src, tmp_path / "q.onnx", calibration=list(x.split(16)), methods=("minmax",),
                      roundings=("gptq",), bias_correction=False)
    assert qdq_choice(path)["gptq_layers"] == 2
    from compressor.export.int8_rounding import rounded_sources

    name = onnx_session(src).get_inputs()[0].name
    gptq_file = rounded_sources(src, [{name: b.numpy()} for b in x.split(16)], tmp_path, roundings=("gptq",),
                                bias_correction=False)["gptq"][0]
    wanted = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(gptq_file)).graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    checked = 0
    for node in graph.node:
        weight = node.output[0].removesuffix("_DequantizeLinear_Output")
        if node.op_type == "DequantizeLinear" and weight in wanted:
            q, scale, w = inits[node.input[0]], inits[node.input[1]], original[weight]
            assert scale.shape == (w.shape[1],)  # one scale per output column
            assert np.allclose(scale, np.abs(w).max(0) / 127, rtol=1e-6)  # the original weights' grid
            assert np.array_equal(q, np.round(wanted[weight] / (np.abs(w).max(0) / 127)).astype(np.int8))
            assert not np.array_equal(q, np.round(w / scale).astype(np.int8))  # GPTQ's, not nearest rounding
            checked += 1
    assert checked == 2 - len(qdq_choice(path)["chosen"]["float_layers"]) and checked >= 1


def test_qdq_keeps_float_the_activation_whose_channels_one_scale_cannot_hold(tmp_path):
    # The second layer's outputs span ~1000 in channel 0 and ~1 in the others: one uint8 scale for the
    # tensor rounds the small channels to a few steps, and the third layer reads them as much as channel 0.
    from compressor.export.int8_activations import activation_quantizers, bypass_quantizers

    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1),
             torch.nn.Conv2d(8, 4, 1)]
    with torch.no_grad():
        convs[1].weight[0] *= 1000
        convs[1].bias[0] *= 1000
        convs[2].weight[:, 0] /= 1000
    # The second conv has no activation after it (a linear bottleneck, as in MobileNetV2).
    model = torch.nn.Sequential(convs[0], torch.nn.ReLU(), convs[1], convs[2], torch.nn.ReLU(), convs[3]).eval()
    x = torch.randn(64, 3, 8, 8)
    src = export_onnx(model, x[:2], tmp_path / "m.onnx")
    settings = {"calibration": list(x.split(16)), "methods": ("minmax",), "roundings": ("nearest",)}
    kept = export_qdq(src, tmp_path / "kept.onnx", **settings)
    plain = export_qdq(src, tmp_path / "plain.onnx", **settings, float_activations=0)
    chosen = qdq_choice(kept)["chosen"]
    assert qdq_choice(plain)["chosen"]["float_activations"] == []
    # The second conv's output is the tensor kept float, and it is recorded with what was tried.
    graph = onnx.load(str(plain)).graph
    producer = {o: n for n in graph.node for o in n.output}
    first = chosen["float_activations"][0]
    convs_in_order = [n.name for n in graph.node if n.op_type == "Conv"]
    assert producer[first].op_type == "Conv" and convs_in_order.index(producer[first].name) == 1
    assert any(t["float_activations"] == [first] for t in qdq_choice(kept)["tried"])
    held_out = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        want = model(held_out).numpy().reshape(32, -1)

    def cosine(path):
        session = onnx_session(path)
        got = session.run(None, {session.get_inputs()[0].name: held_out.numpy()})[0].reshape(32, -1)
        return float(np.mean(np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)))

    assert cosine(kept) > cosine(plain) + 0.002
    # Bypassing a pair removes exactly its two nodes and leaves a valid graph; graph outputs are never candidates.
    plain_model, source = onnx.load(str(plain)), onnx.load(str(src)).graph
    tensors = activation_quantizers(plain_model, source)
    assert first in tensors and not {o.name for o in graph.output} & set(tensors)
    # The outputs of the Relus onnxruntime folded into their Convs (the uint8 range clips) are never candidates:
    # bypassing their pairs would drop the Relu.
    relus = {n.output[0] for n in source.node if n.op_type == "Relu"}
    assert relus and not relus & set(tensors)
    bypassed = bypass_quantizers(plain_model, [first])
    assert len(bypassed.graph.node) == len(plain_model.graph.node) - 2
    assert first not in activation_quantizers(bypassed, source)
    onnx.checker.check_model(bypassed)
