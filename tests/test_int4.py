"""4-bit weights (onnxruntime MatMulNBits / GatherBlockQuantized) and their low-rank error correction."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from compressor.analysis.int4 import int4_correction, parse_correction, simulate_int4
from compressor.analysis.tracing import Calibrator
from compressor.analysis.whitened import whitening
from compressor.core.errors import CompressorError
from compressor.core.int4 import fake_int4_weight
from compressor.export.onnx import VARIANTS, export_int4, export_onnx, validate_onnx


class Tagger(nn.Module):
    """Token ids -> embedding -> two Linear layers on (batch, tokens, features): MatMul and Gather nodes."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(60, 48)
        self.inner = nn.Linear(48, 80)
        self.out = nn.Linear(80, 40)

    def forward(self, ids):
        return self.out(torch.tanh(self.inner(self.emb(ids))))


def _mlp() -> nn.Module:
    # Linear on (batch, features): exported as Gemm, which the int4 export rewrites into MatMul.
    return nn.Sequential(nn.Linear(72, 96), nn.ReLU(), nn.Linear(96, 24))


def _ids(n=6, t=7):
    return torch.randint(0, 60, (n, t), generator=torch.Generator().manual_seed(1))


def _run(path, x):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size", [16, 32])
def test_simulated_int4_is_what_onnxruntime_stores(symmetric, block_size):
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    g = torch.Generator().manual_seed(0)
    K, N = 72, 20  # K not a multiple of the block: a padded last block
    W = (torch.randn(K, N, generator=g) * torch.linspace(0.1, 3, N)).numpy()  # MatMul's B is (in, out)
    W[:, 3] = np.abs(W[:, 3])  # blocks of one sign: the zero point / scale edge cases
    E = torch.randn(30, 64, generator=g).numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), helper.make_node("Gather", ["E", "i"], ["e"],
                                                                                      name="ga")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K]),
              helper.make_tensor_value_info("i", TensorProto.INT64, ["b"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N]),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, ["b", 64])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(E, "E")])
    q = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                             block_size=block_size, is_symmetric=symmetric, op_types_to_quantize=("MatMul", "Gather"))
    q.process()
    import onnxruntime as ort

    s = ort.InferenceSession(q.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    deq_w, deq_e = s.run(None, {"x": np.eye(K, dtype=np.float32), "i": np.arange(30)})
    sim_w = fake_int4_weight(torch.from_numpy(W.T.copy()), block_size, symmetric).numpy().T
    sim_e = fake_int4_weight(torch.from_numpy(E), block_size, symmetric).numpy()
    assert np.abs(deq_w[:K] - sim_w).max() < 1e-5 < np.abs(sim_w - W).max()  # rounded, and as onnxruntime rounds
    assert np.abs(deq_e - sim_e).max() < 1e-5


def test_correction_removes_exactly_the_top_of_the_error_spectrum():
    model = Tagger()
    E = model.inner.weight.detach() - fake_int4_weight(model.inner.weight, 16)
    S = torch.linalg.svdvals(E).double()
    last = None
    for r in (1, 4, 12):
        c = int4_correction(model, rank=r, block_size=16)
        up, down = c.factors["inner"]
        left = float((E - up @ down).double().square().sum())
        assert left == pytest.approx(float(S[r:].square().sum()), rel=1e-4)  # the discarded part, exactly
        before, after = c.weight_error["inner"]
        assert after < before and (last is None or after < last)
        last = after
    assert c.ranks == {"inner": 12, "out": 12}


def test_data_aware_correction_minimises_the_whitened_error():
    model = Tagger()
    batches = [_ids(8, 9), _ids(8, 9) % 30]
    c = int4_correction(model, rank=5, block_size=16, calibration=batches)
    assert c.data_aware
    mom = Calibrator(model, {"out": model.out}, batches).moments()[0]["out"]
    Sw = whitening(mom.xx).S.float()
    E = model.out.weight.detach() - fake_int4_weight(model.out.weight, 16)
    up, down = c.factors["out"]
    spectrum = torch.linalg.svdvals(E @ Sw).double()
    assert float(((E - up @ down) @ Sw).double().square().sum()) == pytest.approx(
        float(spectrum[5:].square().sum()), rel=1e-3)
    plain_up, plain_down = int4_correction(model, rank=5, block_size=16).factors["out"]
    assert ((E - up @ down) @ Sw).norm() < ((E - plain_up @ plain_down) @ Sw).norm()


def test_budget_spends_at_most_its_share_where_the_error_is():
    model = Tagger()
    with torch.no_grad():
        model.out.weight.mul_(20)  # a much larger rounding error (relative to nothing else: weights scale it)
        model.out.weight[:, :40] = model.out.weight[:, :40].round()  # half of it exactly representable
    c = int4_correction(model, budget=0.1, block_size=16)
    weights = 48 * 80 + 80 * 40
    assert 0 < c.parameters() <= 0.1 * weights
    assert sum(c.ranks.values()) > 0


@pytest.mark.parametrize("factory,x", [(Tagger, _ids()), (_mlp, torch.randn(5, 72))])
def test_graph_holds_matmulnbits_and_two_matmuls_per_corrected_layer(factory, x, tmp_path):
    import onnx

    model = factory().eval()
    src = export_onnx(model, x, tmp_path / "m.onnx")
    c = int4_correction(model, rank=6, block_size=16)
    # accuracy_level 0 (float32 inputs): the simulation below rounds weights only, while the default level
    # also rounds each MatMulNBits input to int8.
    path = export_int4(src, tmp_path / "m.int4.onnx", block_size=16, corrections=c.factors, accuracy_level=0)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 2 and "Gemm" not in ops
    inits = {t.name: t for t in graph.initializer}
    casts = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
    for node in (n for n in graph.node if n.op_type == "MatMulNBits"):
        base = node.name.removesuffix("_Q4")
        mms = [n for n in graph.node if n.op_type == "MatMul" and n.name.startswith(f"{base}__correction")]
        assert len(mms) == 2
        for mm in mms:  # each multiplies by a constant factor stored as float16
            assert inits[casts[mm.input[1]]].data_type == onnx.TensorProto.FLOAT16
        assert [tuple(inits[casts[mm.input[1]]].dims) for mm in mms] in ([(48, 6), (6, 80)], [(80, 6), (6, 40)],
                                                                         [(72, 6), (6, 96)], [(96, 6), (6, 24)])
    if factory is Tagger:
        assert ops.count("GatherBlockQuantized") == 1
    # What onnxruntime computes is the simulation (fp16 factors aside), and it validates as the variant.
    sim = simulate_int4(model, 16, c)
    v = validate_onnx(path, sim, x, atol=1e-3)
    assert v.passed, v.problems
    v = validate_onnx(path, model, x, atol=None, min_cosine=VARIANTS["int4"].min_cosine, variant="int4")
    assert v.passed, v.problems
    # Over many inputs the corrected file's output error is below the uncorrected one's.
    dense = export_int4(src, tmp_path / "d.onnx", block_size=16, accuracy_level=0)
    big = _ids(64, 7) if factory is Tagger else torch.randn(512, 72, generator=torch.Generator().manual_seed(5))
    ref = model(big).detach().numpy()
    assert np.square(_run(path, big) - ref).mean() < np.square(_run(dense, big) - ref).mean()


def test_int4_refuses_bad_settings(tmp_path):
    model = _mlp()
    src = export_onnx(model, torch.randn(2, 72), tmp_path / "m.onnx")
    with pytest.raises(CompressorError, match="power of two"):
        export_int4(src, tmp_path / "x.onnx", block_size=48)
    with pytest.raises(CompressorError, match="no MatMul"):
        export_int4(src, tmp_path / "x.onnx", corrections={"nope": (torch.zeros(2, 1), torch.zeros(1, 2))})
    assert not (tmp_path / "x.onnx").exists()
    for text in ("rank", "depth=3", "rank=x", "energy=2", "budget=1.5"):
        with pytest.raises(CompressorError):
            parse_correction(text)
    assert parse_correction("budget=0.05") == {"budget": 0.05}
    before = copy.deepcopy(model.state_dict())
    int4_correction(model, energy=0.5, block_size=16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input never modified


def test_cli_writes_a_corrected_int4_file_and_refuses_stray_settings(tmp_path):
    import json

    from .test_cli import run

    src, cal = tmp_path / "mlp.pt", tmp_path / "cal.pt"
    torch.save(_mlp(), src)
    torch.save(torch.randn(64, 72, generator=torch.Generator().manual_seed(2)), cal)
    res = run(["export", src, "--input-shape", "4x72", "--int4", "--int4-block-size", "16", "--int4-correction",
               "rank=4", "--int4-factors", "int8", "--calibration", cal, "--out", tmp_path / "a"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    corr = report["int4"]["correction"]
    assert report["int4"]["passed"] and corr["data_aware"] and corr["ranks"] == {"0": 4, "2": 4}
    assert corr["factors"] == "int8" and "corrects 2 of 2 4-bit layers" in (tmp_path / "a" / "report.md").read_text()
    assert report["int4"]["settings"] == {"block_size": 16, "rounding": "gptq", "gptq_layers": 2,
                                          "calibrated_on": "the calibration inputs (cal.pt)"}
    assert "2 layers' weights rounded by GPTQ" in (tmp_path / "a" / "report.md").read_text()
    assert "model.int4.onnx" in res.output and "corrected       2 layers" in res.output
    for extra, problem in ((["--int4-correction", "rank=4"], "add --int4"),
                           (["--int4-rounding", "nearest"], "add --int4"),
                           (["--int4", "--int4-block-size", "24"], "power of two"),
                           (["--int4", "--int4-correction", "depth=2"], "RULE=VALUE")):
        res = run(["export", src, "--input-shape", "4x72", *extra, "--out", tmp_path / "c"])
        lines = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert res.exit_code == 2 and len(lines) == 1 and problem in lines[0], res.output
        assert not (tmp_path / "c").exists()


def test_search_recipes_with_int4_corrections():
    from compressor.search.recipes import Recipe, default_recipes

    r = Recipe("int4", calibrated=True, int4_correction="budget=0.03")
    assert r.name == "dense-int4+budget0.03-cal" and r.base() == Recipe("fp32")
    assert Recipe.from_dict(r.to_dict()) == r and r.key() != Recipe("int4", int4_correction="budget=0.03").key()
    assert "int4_correction" not in Recipe("int8").to_dict()  # older recipes keep their cache keys
    assert Recipe("int4", 0.2, True, int4_correction="rank=8").name == "lowrank0.2-cal-int4+rank8"
    for bad in (dict(precision="int8", int4_correction="rank=8"), dict(precision="int4", int4_correction="x=1"),
                dict(precision="int4", calibrated=True)):
        with pytest.raises(CompressorError):
            Recipe(**bad)
    names = [r.name for r in default_recipes([0.3], calibrated=True, int4_corrections=("rank=16",))]
    assert {"dense-int4", "lowrank0.3-cal-int4", "dense-int4+rank16-cal"} <= set(names)
    assert not any("+" in n for n in (r.name for r in default_recipes([0.3], precisions=("fp32", "int8"))))


def test_search_measures_corrected_int4_beside_dense_int4(tmp_path):
    from compressor.search.evaluate import output_fidelity
    from compressor.search.recipes import Constraints, Recipe
    from compressor.search.search import search

    model = _mlp().eval()
    g = torch.Generator().manual_seed(4)
    cal = [torch.randn(256, 72, generator=g)]
    corrected = Recipe("int4", calibrated=True, int4_correction="rank=8")
    result = search(model, constraints=Constraints(min_fidelity=0.0), recipes=[corrected],
                    example_inputs=torch.randn(4, 72), evaluation=output_fidelity(model, [torch.randn(64, 72)]),
                    calibration=cal, cache_dir=tmp_path / "cache", latency_runs=3)
    points = {p.recipe.name: p for p in result.points}
    dense, fixed = points["dense-int4"], points["dense-int4+rank8-cal"]
    assert dense.passed and fixed.passed
    assert fixed.size_bytes > dense.size_bytes and fixed.metrics["cosine"] > dense.metrics["cosine"]


def _gram(x: torch.Tensor) -> torch.Tensor:
    return (x.T @ x).double()


@pytest.mark.parametrize("block_size", [16, 32])
def test_gptq_int4_weight_keeps_the_grid_and_moves_the_output_less_than_rounding_to_nearest(block_size):
    from compressor.analysis.int4 import gptq_int4_weight
    from compressor.core.int4 import int4_grid

    g = torch.Generator().manual_seed(3)
    W = torch.randn(40, 72, generator=g) * torch.linspace(0.1, 2, 72)  # 72: a padded last block
    W[:, :16] = W[:, :16].abs()  # blocks of one sign: their range starts at 0
    mix = torch.randn(72, 72, generator=g)
    fit, other = (torch.randn(2000, 72, generator=g) @ mix for _ in range(2))  # correlated inputs
    prepared = gptq_int4_weight(W, _gram(fit), block_size)
    pad = -72 % block_size
    blocks = [torch.nn.functional.pad(w, (0, pad)).reshape(40, -1, block_size) for w in (W, prepared)]
    # onnxruntime sets each block's scale and zero point from the matrix it is given: the same for both
    assert all(torch.equal(a, b) for a, b in zip(int4_grid(blocks[0]), int4_grid(blocks[1]), strict=True))
    rounded, nearest = fake_int4_weight(prepared, block_size), fake_int4_weight(W, block_size)
    # Every weight but the blocks' extremes (kept to keep the grid) is given at its 4-bit value already.
    lo, hi = (f(blocks[1], -1, keepdim=True).expand_as(blocks[1]).reshape(40, -1)[:, :72] for f in (torch.amin,
                                                                                                   torch.amax))
    inner = (prepared != lo) & (prepared != hi)
    assert inner.float().mean() > 0.8 and (rounded - prepared)[inner].abs().max() < 1e-6
    assert not torch.equal(rounded, nearest)

    def error(w, x):
        return float(((W - w) @ x.T).norm() / (W @ x.T).norm())

    # Less output error than nearest rounding on the inputs it was fitted to, and on other inputs alike.
    assert error(rounded, fit) < 0.8 * error(nearest, fit) and error(rounded, other) < 0.8 * error(nearest, other)


def test_gptq_int4_weights_are_what_onnxruntime_stores(tmp_path):
    from compressor.analysis.int4 import gptq_int4

    model = _mlp().eval()
    g = torch.Generator().manual_seed(6)
    weights = gptq_int4(model, [torch.randn(256, 72, generator=g)], block_size=16)
    assert set(weights) == {"0", "2"}
    src = export_onnx(model, torch.randn(2, 72), tmp_path / "m.onnx")
    path = export_int4(src, tmp_path / "g.onnx", block_size=16, weights=weights, accuracy_level=0)
    x = torch.randn(64, 72, generator=g)
    sim = simulate_int4(model, 16, weights=weights)(x).detach().numpy()
    assert np.abs(_run(path, x) - sim).max() < 1e-4  # onnxruntime's 4-bit values are GPTQ's
    assert np.abs(simulate_int4(model, 16)(x).detach().numpy() - sim).max() > 1e-3  # not nearest rounding's
    with pytest.raises(CompressorError, match="no MatMul"):
        export_int4(src, tmp_path / "x.onnx", weights={"nope": torch.zeros(2, 2)})
    assert not (tmp_path / "x.onnx").exists()
