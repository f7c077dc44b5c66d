"""Drop-in outputs: what compressor writes loads with transformers' own from_pretrained (and pipeline,
and sentence-transformers) once compressor is imported, gives the compressed model's outputs, refuses to
load without compressor, and carries a model card naming its numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compressor
from compressor.core.layers import LowRankLinear
from compressor.data.inputs import pool
from compressor.formats.dropin import NEEDS_COMPRESSOR, pooling

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "a", "model", "small", "low", "rank", "factor", "layer", "keeps", "what", "it", "said", "sentence",
         "embedding", "is", "close", "to", "original"]
SENTENCES = ["the small model keeps what it said", "a low rank factor", "the sentence embedding is close"]


def _bert_st_folder(path: Path) -> Path:
    """A tiny BERT with a word-level tokenizer, saved as a sentence-transformers folder (mean pooling, then
    Normalize, as all-MiniLM-L6-v2's)."""
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(path / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """``(source, out, report)``: the tiny sentence-transformers BERT and its `compress` output."""
    root = tmp_path_factory.mktemp("dropin")
    source = _bert_st_folder(root / "bert")
    report = compressor.compress(source, root / "out", rank=12, include=["encoder.*"],
                                 command="compress bert --rank 12 --include 'encoder.*'")
    return source, root / "out", report


def _encode(folder: Path):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return tok(SENTENCES, padding=True, return_tensors="pt")


def test_transformers_loads_a_compressed_bert_with_compressors_outputs(bert, tmp_path):
    _, out, _ = bert
    enc = _encode(out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressor"
    assert config["transformers_weights"] == NEEDS_COMPRESSOR
    model = transformers.AutoModel.from_pretrained(out).eval()
    assert isinstance(model.encoder.layer[0].intermediate.dense, LowRankLinear)
    want = compressor.load(out)
    with torch.no_grad():
        got = model(**enc).last_hidden_state
        assert torch.equal(got, want(**enc).last_hidden_state)
        dense = transformers.AutoModel.from_pretrained(bert[0]).eval()(**enc).last_hidden_state
    assert not torch.allclose(got, dense)  # the factored model, not the original
    # pipeline builds its model through from_pretrained too
    features = transformers.pipeline("feature-extraction", model=str(out), framework="pt")(SENTENCES[0])
    with torch.no_grad():
        one = want(**transformers.AutoTokenizer.from_pretrained(out)(SENTENCES[0], return_tensors="pt"))
    assert torch.allclose(torch.tensor(features)[0], one.last_hidden_state[0], atol=1e-6)
    # save_pretrained of the loaded model round-trips (the config keeps the ranks)
    model.save_pretrained(tmp_path / "resaved")
    again = transformers.AutoModel.from_pretrained(tmp_path / "resaved").eval()
    with torch.no_grad():
        assert torch.equal(again(**enc).last_hidden_state, got)
        # compressor.load reads it too (as a Hugging Face folder, through the same quantizer)
        assert torch.equal(compressor.load(tmp_path / "resaved")(**enc).last_hidden_state, got)


def test_transformers_loads_a_compressed_gpt2(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    plan = compressor.analyze(model, rank=6, include=["transformer.h.*"])
    assert plan.factored
    compressor.rewrite(model, plan)
    out = compressor.save(model, tmp_path / "gpt2", plan)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        want = compressor.load(out)(ids).logits
        assert torch.equal(hf(ids).logits, want)
        assert torch.equal(model(ids).logits, want)


def _load_without_compressor(folder: Path) -> subprocess.CompletedProcess:
    code = ("import sys, transformers\n"
            "try:\n"
            f"    transformers.AutoModel.from_pretrained({str(folder)!r})\n"
            "except Exception as err:\n"
            "    print(type(err).__name__, err)\n"
            "    sys.exit(3)\n"
            "print('compressor' in sys.modules)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=folder.parent,
                          timeout=300)


def test_without_compressor_transformers_refuses_the_folder(bert, tmp_path):
    # A fresh interpreter that never imports compressor: transformers alone must raise, naming compressor,
    # rather than fill the factored layers with random weights.
    run = _load_without_compressor(bert[1])
    assert run.returncode == 3, run.stdout + run.stderr
    assert "import compressor" in run.stdout
    # The same folder re-saved by transformers (which drops the key that names compressor): still refused.
    transformers.AutoModel.from_pretrained(bert[1]).save_pretrained(tmp_path / "resaved")
    run = _load_without_compressor(tmp_path / "resaved")
    assert run.returncode == 3 and "mismatch" in run.stdout, run.stdout + run.stderr


def test_import_compressor_leaves_transformers_unimported_and_registers_when_it_loads():
    code = ("import sys\nimport compressor\nassert 'transformers' not in sys.modules\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
            "print('compressor' in AUTO_QUANTIZER_MAPPING)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"


def test_sentence_transformers_folder_keeps_its_modules_and_pools_as_compressor_does(bert):
    source, out, report = bert
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert pooling(out) == {"mode": "mean", "normalize": True}
    # fidelity compared the pooled, normalised sentence embedding, not the token outputs
    assert report.fidelity["compared"] == "sentence_embedding:mean:normalize"
    enc = _encode(out)
    with torch.no_grad():
        tokens = compressor.load(out)(**enc).last_hidden_state
    want = pool(tokens, enc["attention_mask"], "sentence_embedding:mean:normalize")
    assert torch.allclose(want.norm(dim=-1), torch.ones(len(SENTENCES)))
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(out), device="cpu", local_files_only=True)
    assert isinstance(model[0].auto_model.encoder.layer[1].output.dense, LowRankLinear)
    got = model.encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(got, want, atol=1e-6)


def test_model_card_names_the_runs_numbers(bert):
    _, out, report = bert
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: sentence-transformers" in front and "- compressor" in front and "- low-rank" in front
    assert f"{report.params_before:,} -> {report.params_after:,}" in card
    assert f"{report.fidelity['cosine_mean']:.5f}" in card
    assert f"{report.files['model.safetensors'] / 1e6:.2f} MB" in card
    assert "compress bert --rank 12" in card
    assert f"SentenceTransformer(\"{out}\")" in card


def test_folders_written_before_still_load_with_compressor_load(bert, tmp_path):
    # Folders from before this change have no quantization_config: compressor.load reads them as ever.
    old = tmp_path / "old"
    shutil.copytree(bert[1], old)
    config = json.loads((old / "config.json").read_text())
    del config["quantization_config"], config["transformers_weights"]
    (old / "config.json").write_text(json.dumps(config))
    enc = _encode(old)
    with torch.no_grad():
        assert torch.equal(compressor.load(old)(**enc).last_hidden_state,
                           compressor.load(bert[1])(**enc).last_hidden_state)


def test_search_scores_the_pooled_embedding(bert):
    from compressor.export.onnx import torch_outputs
    from compressor.search.evaluate import output_fidelity

    source, out, _ = bert
    dense, small = compressor.load(source), compressor.load(out)
    enc = dict(_encode(out))
    name = "sentence_embedding:mean:normalize"
    evaluation = output_fidelity(dense, [enc], [name])
    got = evaluation.score([[v for _, v in torch_outputs(small, enc)]])
    with torch.no_grad():
        a = pool(dense(**enc).last_hidden_state, enc["attention_mask"], name)
        b = pool(small(**enc).last_hidden_state, enc["attention_mask"], name)
    assert "top1_agreement" not in got  # an embedding is not class scores
    assert got["fidelity"] == pytest.approx(float(torch.nn.functional.cosine_similarity(a, b).mean()), abs=1e-6)


def test_a_copied_source_card_is_kept_beside_ours_and_a_heal_card_names_its_metrics(bert, tmp_path):
    from compressor.report.card import BASE_CARD, write_model_card

    folder = tmp_path / "healed"
    shutil.copytree(bert[1], folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# The original model\n")  # the source's card
    summary = {"source": str(bert[1]), "output": str(tmp_path / "healed"), "before": {"cosine": 0.91234},
               "after": {"cosine": 0.96789}, "command": "compress heal out --data s.txt --val v.txt",
               "versions": {"compressor": compressor.__version__}}
    write_model_card(folder, summary)
    assert (folder / BASE_CARD).read_text().startswith("---\nlicense: apache-2.0")
    card = (folder / "README.md").read_text()
    assert "- distillation" in card and "0.96789" in card and "0.91234" in card and BASE_CARD in card
    assert "compress heal out --data s.txt" in card
    write_model_card(folder, summary)  # writing again replaces our card, and keeps the source's
    assert (folder / BASE_CARD).read_text().startswith("---\nlicense: apache-2.0")


def test_a_module_path_out_of_the_folder_is_refused(bert, tmp_path):
    from compressor.core.errors import CompressorError

    folder = tmp_path / "st"
    shutil.copytree(bert[0], folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["path"] = "../elsewhere"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CompressorError, match="outside the folder"):
        pooling(folder)


@pytest.mark.slow  # a second compress job, ONNX export included
def test_fidelity_on_held_out_sentences(bert, tmp_path):
    from compressor.core.errors import CompressorError
    from compressor.data.inputs import batches_fidelity

    source, out, _ = bert
    held = tmp_path / "held.txt"
    held.write_text("\n".join(SENTENCES) + "\n")
    report = compressor.compress(source, tmp_path / "again", rank=12, include=["encoder.*"], eval_inputs=held)
    assert report.fidelity["inputs"] == "3 held-out samples from held.txt"
    name = "sentence_embedding:mean:normalize"
    enc = _encode(out)
    with torch.no_grad():
        want = batches_fidelity([(compressor.load(source)(**enc), compressor.load(out)(**enc),
                                  enc["attention_mask"])], [name])
    assert report.fidelity["cosine_mean"] == pytest.approx(want["cosine_mean"], abs=1e-6)
    assert "3 held-out samples" in (tmp_path / "again" / "README.md").read_text()
    with pytest.raises(CompressorError, match="writes none"):
        compressor.compress(source, tmp_path / "plan", mode="analyze", rank=12, eval_inputs=held)


def test_a_streamed_output_loads_too_and_keeps_the_source_card_aside(bert, tmp_path):
    from compressor.jobs.stream import stream_compress
    from compressor.report.card import BASE_CARD

    source = tmp_path / "src"
    shutil.copytree(bert[0], source)
    (source / "README.md").write_text("# The original model\n")
    stream_compress(source, tmp_path / "s", mode="compress", rank=6, include=["encoder.*"], workers=1)
    out = tmp_path / "s"
    assert (out / "1_Pooling" / "config.json").is_file() and (out / BASE_CARD).read_text() == "# The original model\n"
    assert "compressor" in (out / "README.md").read_text().split("---")[1]
    enc = _encode(out)
    with torch.no_grad():
        assert torch.equal(transformers.AutoModel.from_pretrained(out).eval()(**enc).last_hidden_state,
                           compressor.load(out)(**enc).last_hidden_state)
