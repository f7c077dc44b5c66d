"""Decoders with a key/value cache (compressor.export.kv_cache): the ONNX file's inputs and outputs follow
Optimum's / onnxruntime-genai's layout, it generates the torch model's greedy tokens (a tiny Llama, and a tiny
Gemma 3 whose sliding window of 4 tokens is shorter than prompt + generation), a different model fails the
check, and `compress --kv-cache` writes model_kv.onnx (factored layers as two MatMuls) and its int4 variant."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch

import compressor
from compressor.core.errors import CompressorError
from compressor.export.kv_cache import (
    AXES,
    GENERATION_PROMPTS,
    check_generation,
    check_kv_layout,
    export_kv_onnx,
    kv_layout,
    prompt_token_ids,
)
from compressor.export.onnx import check_factored_graph
from compressor.formats.load import EXAMPLE_TEXT
from tests.test_decoders import EOS, PAD, tiny

transformers = pytest.importorskip("transformers")
VOCAB = 300
# Longer than Gemma's 4-token window; the first prompt is one token (the prompt step with a past of length 0
# and one position).
PROMPTS = [[EOS], [EOS, 5, 9, 33, 120, 7], [EOS, *range(10, 19)]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{kind: (model, model_kv.onnx)} exported by the default exporter."""
    folder = tmp_path_factory.mktemp("kv")
    return {kind: (model, export_kv_onnx(model, folder / f"{kind}.onnx"))
            for kind in ("llama", "gemma3") for model in [tiny(kind, VOCAB)]}


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_inputs_and_outputs_follow_the_optimum_layout(kind, exported):
    model, path = exported[kind]
    layout = kv_layout(model)
    heads, head_dim = (1, 16) if kind == "gemma3" else (2, 8)  # the tiny configs' key/value heads and head size
    assert (layout.layers, layout.kv_heads, layout.head_dim, layout.position_ids) == (2, heads, head_dim, True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                                             "past_key_values.0.value", "past_key_values.1.key",
                                             "past_key_values.1.value"]
    assert [o.name for o in graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                              "present.1.value"]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    shapes = {v.name: dims(v) for v in (*graph.input, *graph.output)}
    assert shapes["input_ids"] == shapes["position_ids"] == ["batch_size", "sequence_length"]
    assert shapes["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert shapes["past_key_values.1.value"] == ["batch_size", heads, "past_sequence_length", head_dim]
    assert shapes["present.0.key"] == ["batch_size", heads, "total_sequence_length", head_dim]
    assert shapes["logits"] == ["batch_size", "sequence_length", VOCAB]
    assert check_kv_layout(path, layout) == []
    wrong = copy.deepcopy(layout)
    wrong.head_dim += 1
    assert any("expected" in p for p in check_kv_layout(path, wrong)) and set(AXES.values()) == {
        "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"}


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_the_cached_onnx_generates_the_torch_models_greedy_tokens(kind, exported):
    model, path = exported[kind]
    check = check_generation(path, model, PROMPTS, new_tokens=32)
    assert check.passed, check.problems
    assert check.identical == 3 and check.first_divergence == [None] * 3 and check.token_agreement == 1.0
    assert check.max_abs_diff < 1e-4 and check.cosine > 0.99999
    # A model that is not the exported one fails the same check: the comparison can fail.
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    worse = check_generation(path, other, PROMPTS, new_tokens=32)
    assert not worse.passed and worse.identical < 3 and "prompts generated other tokens" in worse.problems[0]


def test_the_legacy_exporter_writes_the_same_layout_and_tokens(tmp_path):
    model = tiny("gemma3", VOCAB)
    path = export_kv_onnx(model, tmp_path / "m.onnx", exporter="legacy")
    assert check_kv_layout(path, kv_layout(model)) == []
    assert check_generation(path, model, PROMPTS[1:], new_tokens=16).passed


def test_a_model_without_a_cache_is_refused(tmp_path):
    from tests.models import mlp

    with pytest.raises(CompressorError, match="not a causal language model"):
        export_kv_onnx(mlp(), tmp_path / "m.onnx")
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama Hugging Face folder with a byte-level BPE tokenizer trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([*EXAMPLE_TEXT, *GENERATION_PROMPTS], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert tok.token_to_id("<pad>") == PAD and tok.get_vocab_size() <= VOCAB
    path = tmp_path_factory.mktemp("llama") / "llama"
    tiny("llama", VOCAB).save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(path)
    return path


@pytest.mark.slow
def test_compress_kv_cache_writes_a_validated_cached_decoder_and_its_int4_file(folder, tmp_path):
    out, text = tmp_path / "out", tmp_path / "text.txt"
    text.write_text("\n".join(EXAMPLE_TEXT * 20) + "\n")
    # Calibrated: both int4 files, model.int4.onnx and model_kv.int4.onnx, take GPTQ's weights.
    report = compressor.compress(folder, out, rank_ratio=0.5, include=["model.layers.*"], variants=["int4"],
                                 kv_cache=True, calibration=text, progress=False)
    assert report.passed, report.kv_cache
    assert report.validations["int4"].settings["rounding"] == "gptq"
    files = report.kv_cache["files"]
    assert list(files) == ["model_kv.onnx", "model_kv.int4.onnx"]
    fp32, int4 = files["model_kv.onnx"], files["model_kv.int4.onnx"]
    assert fp32["identical"] == fp32["prompts"] == 10 and fp32["prompt_source"] == "first 10 lines of text.txt"
    assert int4["min_cosine"] == 0.8 and not int4["same_tokens"] and int4["passed"]
    plan = compressor.Plan.from_json(out / "plan.json")
    assert len(plan.factored) >= 8 and check_factored_graph(out / "model_kv.onnx", plan) == []  # two MatMuls each
    ops = {n.op_type for n in onnx.load(str(out / "model_kv.int4.onnx")).graph.node}
    assert "MatMulNBits" in ops
    assert json.loads((out / "report.json").read_text())["kv_cache"]["files"]["model_kv.onnx"]["passed"]
    md = (out / "report.md").read_text()
    assert "## Key/value cache export" in md and "Inputs input_ids, attention_mask, position_ids, `past_key" in md


def test_prompts_come_from_the_users_text_and_a_non_decoder_is_refused(folder, tmp_path):
    from compressor.formats.load import load_model

    tok = load_model(folder).tokenizer
    ids = prompt_token_ids(tok, ["", "first line", "  ", *["more text"] * 20], max_tokens=2)
    assert len(ids) == 10 and all(len(i) <= 2 for i in ids) and ids[0] == tok("first line")["input_ids"][:2]
    with pytest.raises(CompressorError, match="no prompt"):
        prompt_token_ids(tok, ["", " "])
    model = tmp_path / "mlp.pt"
    from tests.models import mlp

    torch.save(mlp(), model)
    with pytest.raises(CompressorError, match="causal language models"):
        compressor.compress(model, tmp_path / "o", mode="export", input_shapes=["2x32"], kv_cache=True,
                            trust_pickle=True, progress=False)
    assert not (tmp_path / "o").exists()


def test_kv_cache_of_a_model_that_is_not_a_causal_lm_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    from compressor.cli.main import main
    from tests.models import mlp

    torch.save(mlp(), tmp_path / "mlp.pt")
    res = CliRunner().invoke(main, ["export", str(tmp_path / "mlp.pt"), "--input-shape", "2x32", "--kv-cache",
                                    "--trust-pickle", "--out", str(tmp_path / "o")])
    lines = [ln for ln in res.output.strip().splitlines() if ln]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "causal language models" in lines[0] and "leave out --kv-cache" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt"]
