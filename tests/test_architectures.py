"""Model families compressor did not grow up with, built from small transformers configs (no pretrained
causal LM installs offline): GPT-2 (transformers' Conv1D layers), ViT (reads a conv's weight directly),
and a tokenizer's BatchEncoding fed to every stage."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compressor
from compressor.export.measure import count_macs

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
SENTENCES = REPO / "examples" / "calibration_sentences.txt"


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, minilm):
    """A 2-layer GPT2LMHeadModel saved as a Hugging Face folder, with MiniLM's (real) tokenizer."""
    _, tokenizer = minilm
    cfg = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=128, n_embd=64, n_layer=2,
                                  n_head=4, bos_token_id=tokenizer.cls_token_id,
                                  eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("gpt2") / "gpt2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def test_gpt2_conv1d_layers_are_factorizable_and_calibration_takes_a_batch_encoding(gpt2_folder):
    _, original, tokenizer = gpt2_folder
    model = copy.deepcopy(original)
    enc = tokenizer(["Low rank factors make a model small.", "A second, somewhat longer sentence of text."],
                    padding=True, return_tensors="pt")
    assert not isinstance(enc, dict)  # a BatchEncoding: a Mapping, not a dict
    plan = compressor.analyze(model, target=0.3, calibration=enc)
    kinds = {lp.name: lp.kind for lp in plan.layers if lp.supported}
    assert kinds["transformer.h.0.attn.c_attn"] == "hf-conv1d"
    assert sum(k == "hf-conv1d" for k in kinds.values()) == 8  # 4 per block
    assert plan.method.startswith("whitened-svd") and plan.calibration["tokens"] == int(enc["attention_mask"].sum())
    assert "transformer.wte" not in kinds or plan.layer("transformer.wte").reason.startswith("weight shared")
    ref = model(**enc).logits
    small = compressor.rewrite(model, plan)
    cos = torch.nn.functional.cosine_similarity(small(**enc).logits.flatten(1), ref.flatten(1)).min()
    assert cos > 0.9


def test_count_macs_reads_a_batch_encoding_by_name(gpt2_folder):
    _, model, tokenizer = gpt2_folder
    enc = tokenizer(["one short sentence", "and another one that is longer than it"], padding=True,
                    return_tensors="pt")
    macs = count_macs(model, enc)
    # Every Conv1D and the LM head run on every token position of every sentence.
    tokens = enc["input_ids"].numel()
    per_token = 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64) + 64 * tokenizer.vocab_size
    assert macs["total"] == tokens * per_token


@pytest.mark.slow
def test_gpt2_compresses_end_to_end_with_text_calibration(gpt2_folder, tmp_path):
    folder, _, _ = gpt2_folder
    res = _cli(folder, "--target", "0.3", "--calibration", SENTENCES, "--calibration-samples", "64", "--int8",
               "--out", tmp_path / "out", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["passed"] and report["onnx"]["passed"] and report["int8"]["passed"]
    assert any(layer["kind"] == "hf-conv1d" and layer["rank"] for layer in report["layers"])
    back = compressor.load(tmp_path / "out")
    assert type(back).__name__ == "GPT2LMHeadModel"
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    assert torch.isfinite(back(ids).logits).all()


def test_vit_runs_after_its_patch_embedding_is_factored(tmp_path):
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    torch.manual_seed(0)
    transformers.ViTModel(cfg).eval().save_pretrained(tmp_path / "vit")
    res = _cli(tmp_path / "vit", "--rank-ratio", "0.5", "--input-shape", "1x3x32x32", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "model.onnx" in res.stdout and "PASS" in res.stdout
    plan = compressor.core.plan.Plan.from_json(tmp_path / "out" / "plan.json")
    assert plan.layer("embeddings.patch_embeddings.projection").rank is not None


def test_the_compared_outputs_are_every_float_output_or_those_named(gpt2_folder):
    from compressor.core.errors import CompressorError
    from compressor.data.inputs import compared_outputs

    _, original, tokenizer = gpt2_folder
    enc = tokenizer(["a sentence", "another sentence here"], padding=True, return_tensors="pt")
    out = original(**enc)
    assert [n for n, _ in compared_outputs(out)] == ["logits"]  # the cache object is not a tensor output
    model = copy.deepcopy(original)
    plan = compressor.analyze(model, target=0.3, calibration=enc, outputs=["logits"])
    # GPT-2 is a causal LM: calibrated block by block, its layers weighted by the loss on its logits
    assert plan.calibration["passes"] == "block by block (decoder)"
    assert plan.calibration["allocation"].endswith("Fisher")
    with pytest.raises(CompressorError, match=r"no output named 'hidden'.*it returns logits"):
        compressor.analyze(copy.deepcopy(original), target=0.3, calibration=enc, outputs=["hidden"])
