"""Mixed-precision int8 export: ``export_int8(..., keep_fp16=[...])`` leaves the named layers out of
quantization and stores their weights as fp16, on small MLPs (both exporters, dense and factored) and on
the real all-MiniLM-L6-v2."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

import compressor
from compressor.core.errors import CompressorError
from compressor.export.measure import file_size
from compressor.export.onnx import export_int8, export_onnx, validate_onnx

HIDDEN = 256  # the kept layer is HIDDEN x HIDDEN: big enough that its bytes dwarf the graph's overhead


def outlier_mlp() -> nn.Sequential:
    """An MLP whose middle layer int8 rounds badly: one weight per output row is 100x the others, so
    each row's per-channel scale is set by it and the other weights of the row round to a few levels.
    Those outliers read a hidden unit that is always 0, so the outputs stay of normal size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                          nn.Linear(HIDDEN, 10)).eval()
    with torch.no_grad():
        model[0].weight[0], model[0].bias[0] = 0.0, -1.0  # hidden unit 0 is dead after the ReLU
        model[2].weight[:, 0] = 100 * model[2].weight.abs().max()
    return model


def inputs() -> torch.Tensor:
    # (batch, sequence, features): Linear on a 3-D input exports as MatMul on a pre-transposed weight
    # that both exporters rename (dynamo "val_N", legacy "onnx::MatMul_N"), so names come from the nodes.
    return torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["dynamo", "legacy"])
def exported(request, tmp_path_factory):
    """(model, src, plain int8, int8 keeping layer "2" fp16), once per exporter."""
    folder = tmp_path_factory.mktemp(f"mixed_{request.param}")
    model = outlier_mlp()
    src = export_onnx(model, inputs(), folder / "mlp.onnx", exporter=request.param)
    plain = export_int8(src, folder / "mlp.int8.onnx")
    mixed = export_int8(src, folder / "mlp.mixed.onnx", keep_fp16=["2"])
    return model, src, plain, mixed


def weights(path) -> dict[int, list[tuple[int, ...]]]:
    """{data_type: [shape, ...]} of the initializers of 2 or more dimensions."""
    out: dict[int, list] = {}
    for t in onnx.load(str(path)).graph.initializer:
        if len(t.dims) >= 2:
            out.setdefault(t.data_type, []).append(tuple(sorted(t.dims)))
    return out


def max_error(path, model) -> float:
    x = inputs()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        return float(np.abs(got - model(x).numpy()).max())


def test_kept_layer_is_fp16_and_the_others_int8(exported):
    _, src, plain, mixed = exported
    assert weights(plain) == {TensorProto.INT8: [(32, HIDDEN), (HIDDEN, HIDDEN), (10, HIDDEN)]}
    # Layer 2's weight is fp16 and has no quantized copy; layers 0 and 4 are int8 as before.
    assert weights(mixed) == {TensorProto.FLOAT16: [(HIDDEN, HIDDEN)],
                              TensorProto.INT8: [(32, HIDDEN), (10, HIDDEN)]}
    half = next(t for t in onnx.load(str(mixed)).graph.initializer if t.data_type == TensorProto.FLOAT16)
    assert np.abs(numpy_helper.to_array(half)).max() > 1  # the outlier column: layer 2's weight
    assert file_size(src) > file_size(mixed)  # the source is untouched (fp32) and still there


def test_kept_layer_costs_one_byte_per_parameter(exported):
    _, _, plain, mixed = exported
    params = HIDDEN * HIDDEN  # fp16 (2 bytes) instead of int8 (1 byte) plus a scale per row
    extra = file_size(mixed) - file_size(plain)
    assert 0.95 * params < extra < 1.05 * params, extra


def test_keeping_the_outlier_layer_reduces_the_error(exported):
    model, _, plain, mixed = exported
    e_plain, e_mixed = max_error(plain, model), max_error(mixed, model)
    print(f"max abs error: int8 {e_plain:.4g}, int8 keeping layer 2 fp16 {e_mixed:.4g}")
    assert e_mixed < 0.5 * e_plain, (e_mixed, e_plain)


def test_keep_nothing_is_plain_int8(exported, tmp_path):
    _, src, plain, _ = exported
    again = export_int8(src, tmp_path / "again.onnx", keep_fp16=())
    assert again.read_bytes() == plain.read_bytes()


@pytest.mark.parametrize("name", ["nope", "1", "2.weight"])  # no module; a ReLU (no weight); a tensor
def test_unknown_layer_is_refused_and_nothing_written(name, exported, tmp_path):
    _, src, _, _ = exported
    before = src.read_bytes()
    with pytest.raises(CompressorError, match=f"keep_fp16 names '{name}'.*e.g. 0, 2, 4"):
        export_int8(src, tmp_path / "out.onnx", keep_fp16=["2", name])
    assert list(tmp_path.iterdir()) == [] and src.read_bytes() == before


@pytest.mark.parametrize(("keep", "fp16"), [("2", {"down", "up"}), ("2.up", {"up"}), ("2.down", {"down"})])
def test_factored_layer_keeps_its_factors(keep, fp16, tmp_path):
    model = outlier_mlp()
    plan = compressor.analyze(model, rank=16)
    compressor.rewrite(model, plan)
    src = export_onnx(model, inputs(), tmp_path / "factored.onnx")
    out = export_int8(src, tmp_path / "mixed.onnx", keep_fp16=[keep])
    plain = weights(export_int8(src, tmp_path / "plain.onnx"))[TensorProto.INT8]
    kept = [(16, HIDDEN)] * len(fp16)  # each factor of layer 2 is (rank, 256) once sorted
    got = weights(out)
    assert got[TensorProto.FLOAT16] == kept
    halves = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
              if t.data_type == TensorProto.FLOAT16]
    factors = {f: getattr(model[2], f).weight.detach().numpy() for f in fp16}  # the very factors named
    assert all(any(h.shape == w.T.shape and np.allclose(h, w.T, rtol=1e-3, atol=1e-4) for h in halves)
               for w in factors.values())  # stored (in, out) for MatMul
    assert Counter(got[TensorProto.INT8]) == Counter(plain) - Counter(kept)  # the rest stays int8
    v = validate_onnx(out, model, inputs(), atol=None, min_cosine=0.99)
    assert v.passed, v.problems


@pytest.mark.slow
@pytest.mark.minilm
def test_minilm_keeping_its_worst_layer(minilm, tmp_path):
    model, tok = minilm
    enc = tok(["Return the number of items in a container.", "Open the file and return a stream."],
              padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    src = export_onnx(model, batch, tmp_path / "minilm.onnx",
                      dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}})
    plain = export_int8(src, tmp_path / "minilm.int8.onnx")
    mixed = export_int8(src, tmp_path / "minilm.mixed.onnx", keep_fp16=["encoder.layer.0.output.dense"])
    params = model.encoder.layer[0].output.dense.weight.numel()  # 1536 x 384 = 0.59 M
    assert abs(file_size(mixed) - file_size(plain) - params) < 0.01 * params
    v_plain = validate_onnx(plain, model, batch, atol=None)
    v_mixed = validate_onnx(mixed, model, batch, atol=None)
    # Cosine over the real tokens: since validation leaves padding out, the one largest element moved less
    # in plain int8 (0.246 against 0.270 here), while the outputs as a whole are closer with the layer in fp16.
    assert v_mixed.cosine > v_plain.cosine
