"""Edge builds (issue 29): every ONNX file also as an .ort that loads and computes what its .onnx computes,
the operators a reduced onnxruntime build needs, and a manifest whose checksums and sizes are the files'."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.core.errors import CompressorError
from compressor.examples import digits_cnn
from compressor.export.edge import CONFIG_NAME, MANIFEST_NAME, config_operators, min_onnxruntime, ort_operators
from compressor.jobs.compress import compress

from .test_cli import run


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_edge_folder(out: Path, feeds: dict[str, np.ndarray], onnx_names: set[str]) -> dict:
    """Every .ort loads and matches its .onnx on ``feeds``; the config covers every operator of every
    .ort; the manifest's sha256 and sizes are the files'. Returns the manifest."""
    edge = out / "edge"
    manifest = json.loads((edge / MANIFEST_NAME).read_text())
    assert {f["onnx"]["file"] for f in manifest["variants"]} == onnx_names
    assert {p.name for p in edge.iterdir()} == {*(f["file"] for f in manifest["variants"]), CONFIG_NAME,
                                                 MANIFEST_NAME}
    listed = config_operators(edge / CONFIG_NAME)
    for f in manifest["variants"]:
        ort_path, onnx_path = edge / f["file"], out / f["onnx"]["file"]
        ours, theirs = _session(ort_path), _session(onnx_path)
        feed = {i.name: feeds[i.name] for i in ours.get_inputs()}
        for a, b in zip(ours.run(None, feed), theirs.run(None, feed), strict=True):
            a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.9999, f["file"]
        ops = ort_operators(ort_path)
        assert ops and ops <= listed, (f["file"], sorted(ops - listed))
        for entry, path in ((f, ort_path), (f["onnx"], onnx_path)):
            assert entry["size_bytes"] == path.stat().st_size
            assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert f["validation"]["passed"] and f["latency_ms"] > 0 and f["min_onnxruntime"]["release"]
        assert [i["name"] for i in f["inputs"]] == [i.name for i in theirs.get_inputs()]
    assert manifest["passed"] and manifest["latency_setup"]["batch"] == 1
    return manifest


def test_cli_writes_an_edge_folder_for_the_digits_cnn(tmp_path):
    torch.manual_seed(0)
    torch.save(digits_cnn(), tmp_path / "cnn.pt")
    out = tmp_path / "out"
    res = run([tmp_path / "cnn.pt", "--energy", "0.9", "--input-shape", "2x1x8x8", "--fp16", "--int8", "--int4",
               "--edge", "--out", out])
    assert res.exit_code == 0, res.output
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    manifest = _check_edge_folder(out, {"input": x}, {"model.onnx", "model.fp16.onnx", "model.int8.onnx",
                                                        "model.int4.onnx"})
    assert manifest["origin"]["plan"] == "plan.json"
    int4 = next(f for f in manifest["variants"] if f["variant"] == "int4")
    assert int4["recipe"]["accuracy_level"] == 4
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["edge"]["passed"]
    assert "edge/model.int4.ort" in res.output and "## Edge builds" in (out / "report.md").read_text()


def test_tiny_transformer_edge_folder_int4_embeddings_load_as_ort(tmp_path):
    transformers = pytest.importorskip("transformers")
    import onnx

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(tmp_path / "bert")
    ids = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    ids["attention_mask"][1, 6:] = 0
    torch.save(ids, tmp_path / "ids.pt")
    out = tmp_path / "out"
    report = compress(tmp_path / "bert", out, rank=16, example_inputs=tmp_path / "ids.pt",
                      variants=("int8", "int4"), int4_block_size=16, edge=True)
    assert report.passed
    feeds = {k: v.numpy() for k, v in ids.items()}
    _check_edge_folder(out, feeds, {"model.onnx", "model.int8.onnx", "model.int4.onnx"})
    # The embedding tables are 4-bit values packed in uint8 (the ORT format holds no 4-bit tensor type).
    graph = onnx.load(str(out / "model.int4.onnx")).graph
    inits = {t.name: t for t in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert gathers and all(inits[n.input[0]].data_type == onnx.TensorProto.UINT8 for n in gathers)
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}


def test_edge_is_refused_or_absent_when_it_cannot_be_built(tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.save(digits_cnn(), tmp_path / "cnn.pt")
    with pytest.raises(CompressorError, match="edge must be True or False"):
        compress(tmp_path / "cnn.pt", tmp_path / "a", energy=0.9, input_shapes=["2x1x8x8"], edge="yes")
    with pytest.raises(CompressorError, match="analyze writes none"):
        compress(tmp_path / "cnn.pt", tmp_path / "a", mode="analyze", energy=0.9, edge=True)
    res = run([tmp_path / "cnn.pt", "--stream", "--rank", "4", "--edge", "--out", tmp_path / "a"])
    assert res.exit_code == 2 and "--edge cannot be used with --stream" in res.output, res.output

    import compressor.export.edge as edge

    def broken(src, dst):
        raise CompressorError(f"'{src.name}' does not convert", "report the model")

    monkeypatch.setattr(edge, "convert_to_ort", broken)
    res = run([tmp_path / "cnn.pt", "--energy", "0.9", "--input-shape", "2x1x8x8", "--edge", "--out", tmp_path / "b"])
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1 and "does not convert" in lines[0], res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.pt"]  # nothing published, nothing left
    # A file that converts but does not validate fails the run as the other files do: exit 3, folder kept.
    monkeypatch.undo()
    monkeypatch.setattr(edge, "ORT_MIN_COSINE", 1.5)
    res = run([tmp_path / "cnn.pt", "--energy", "0.9", "--input-shape", "2x1x8x8", "--edge", "--out", tmp_path / "c"])
    assert res.exit_code == 3 and "validation FAILED" in res.output, res.output
    manifest = json.loads((tmp_path / "c" / "edge" / MANIFEST_NAME).read_text())
    assert not manifest["passed"] and "cosine" in manifest["variants"][0]["validation"]["problems"][0]


def test_oldest_onnxruntime_follows_the_compatibility_table():
    assert min_onnxruntime(8, 17)["release"] == "1.12"
    assert min_onnxruntime(10, 18)["release"] == "1.18"  # IR 10 needs 1.18 even at opset 18
    assert min_onnxruntime(9, 19)["release"] == "1.16"
    beyond = min_onnxruntime(11, 18)
    assert beyond["release"] is None and "beyond the table" in beyond["notes"][0]
    assert any("com.microsoft" in n for n in min_onnxruntime(10, 21, {"com.microsoft"})["notes"])


def test_onnx_input_gets_an_edge_folder_checked_against_its_model_onnx(tmp_path):
    from compressor.export.onnx import export_onnx

    torch.manual_seed(0)
    src = export_onnx(digits_cnn().eval(), torch.randn(2, 1, 8, 8), tmp_path / "cnn.onnx")
    out = tmp_path / "out"
    report = compress(src, out, energy=0.9, variants=("int8",), edge=True)
    assert report.passed and report.edge["origin"]["plan"] == "plan.json"
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    manifest = _check_edge_folder(out, {"input": x}, {"model.onnx", "model.int8.onnx"})
    assert all(f["fidelity"]["against"] == "the original model" for f in manifest["variants"])
