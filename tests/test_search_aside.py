"""A recipe whose file onnxruntime cannot load is set aside with its reason, and the search goes on."""

from __future__ import annotations

import json

import onnx
import torch
from onnx import helper

from compressor.search import search as search_module

from .test_recipes import cli, mlp


def test_a_recipe_whose_file_does_not_load_is_set_aside_and_the_search_goes_on(tmp_path, monkeypatch):
    write_variant = search_module.write_variant

    def broken(kind, src, dst, **kw):  # every fp16 file gets an operator no runtime implements
        made = write_variant(kind, src, dst, **kw)
        if kind == "fp16":
            model = onnx.load(str(made))
            model.graph.node[0].op_type, model.graph.node[0].domain = "NoSuchOp", "com.example"
            model.opset_import.append(helper.make_opsetid("com.example", 1))
            onnx.save(model, str(made))
        return made

    monkeypatch.setattr(search_module, "write_variant", broken)
    src, held = tmp_path / "mlp.pt", tmp_path / "held.pt"
    torch.save(mlp(), src)
    torch.save(torch.randn(32, 64), held)
    res = cli(["search", src, "--input-shape", "4x64", "--targets", "0.5", "--precisions", "fp32,fp16",
               "--eval-inputs", held, "--min-fidelity", "0.5", "--out", tmp_path / "o", "--json",
               "--no-latency-aware"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    front = report["front"]
    aside = {s["name"]: s["reason"] for s in front["skipped"] if s.get("built")}
    assert set(aside) == {"dense-fp16", "lowrank0.5-fp16"}
    assert all("onnxruntime cannot load the model" in why and "NoSuchOp" in why for why in aside.values())
    measured = {p["name"] for p in front["points"]}
    assert {"dense-fp32", "lowrank0.5-fp32", "dense-int8"} <= measured and not measured & set(aside)
    assert report["chosen"]["name"] in measured
    text = (tmp_path / "o" / "report.md").read_text()
    assert "> set aside: lowrank0.5-fp16: validation failed" in text
