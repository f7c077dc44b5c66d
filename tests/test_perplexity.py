"""Perplexity of causal language models (compressor.data.perplexity, compressor.export.perplexity): the
papers' protocol against a hand computation from full logits, the chunked output head, memory that does
not grow with vocabulary x tokens, ONNX files against torch, and the command line (compress eval,
compress --eval-text)."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from compressor.cli.main import main  # noqa: E402
from compressor.core.errors import CompressorError  # noqa: E402
from compressor.data import perplexity as ppl_module  # noqa: E402
from compressor.data.perplexity import Perplexity, perplexity, read_corpus, spans  # noqa: E402

BOS = 2


def byte_tokenizer():
    """A real byte-level BPE tokenizer with no merges: 256 byte tokens after <pad>, <eos>, <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": BOS, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>")


def gemma(vocab: int = 259, softcap: float | None = 30.0):
    """Gemma 3 with a sliding window (4) far below the windows measured, and soft-capped logits."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=softcap,
        bos_token_id=BOS, pad_token_id=0, eos_token_id=1)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def llama(vocab: int = 259, tied: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied, bos_token_id=BOS, pad_token_id=0, eos_token_id=1)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    import csv
    import json as json_module
    import textwrap

    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join(inspect.getdoc(m) for m in (json_module, csv, textwrap)) + "\n", encoding="utf-8")
    return path


def hand_perplexity(model, ids: torch.Tensor, window: int, stride: int | None, bos: bool) -> tuple[float, int]:
    """The protocol written out plainly: full logits of each window, cross-entropy of every token not
    counted before (a token needs a token before it in its window)."""
    length = window - 1 if bos else window
    stride = stride or length
    total, count, done = 0.0, 0, 0
    for start in range(0, len(ids) - length + 1, stride):
        x = ids[start:start + length]
        inp = torch.cat([torch.tensor([BOS]), x]) if bos else x
        with torch.no_grad():
            logits = model(input_ids=inp[None]).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits.double(), inp[1:], reduction="none")
        position = torch.arange(len(nll)) + start + (0 if bos else 1)  # where each target sits in the stream
        keep = position >= done
        total += float(nll[keep].sum())
        count += int(keep.sum())
        done = start + length
    return math.exp(total / count), count


@pytest.mark.parametrize("build", [gemma, llama], ids=["gemma3-softcap", "llama"])
@pytest.mark.parametrize(("bos", "stride"), [(True, None), (False, None), (True, 20), (False, 23)])
def test_perplexity_matches_a_hand_computation_from_full_logits(build, bos, stride, tokenizer, text_file):
    model = build()
    corpus = read_corpus(text_file, tokenizer)
    result = perplexity(model, corpus, window=48, stride=stride, bos=bos)
    expected, tokens = hand_perplexity(model, corpus.ids, 48, stride, bos)
    assert result.tokens == tokens
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.mean_nll == pytest.approx(math.log(expected), rel=1e-5)
    assert (result.window, result.bos, result.corpus) == (48, bos, "eval.txt")
    assert result.stride == (stride or (47 if bos else 48))
    if stride is None:  # windows tile the stream: every whole window's tokens count (less its first, without BOS)
        assert result.windows == len(corpus.ids) // (47 if bos else 48)
        assert result.tokens == result.windows * 47


def test_chunked_head_equals_one_chunk_per_window(tokenizer, text_file, monkeypatch):
    model = gemma()
    corpus = read_corpus(text_file, tokenizer)
    whole = perplexity(model, corpus, window=64)  # 259 x 64 float32 logits fit one chunk
    assert ppl_module.head_chunk(259) >= 64
    monkeypatch.setattr(ppl_module, "HEAD_CHUNK_BYTES", 4 * 259 * 5)  # 5 positions per chunk
    chunked = perplexity(model, corpus, window=64)
    assert chunked.ppl == pytest.approx(whole.ppl, rel=1e-9)
    assert chunked.tokens == whole.tokens


class _LargestOutputs(TorchDispatchMode):
    """Records the shape of every tensor an operation allocates (views, such as the transposed head
    weight, allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("vocab", [300, 3000])
def test_no_tensor_holds_a_window_of_logits(vocab, text_file, monkeypatch, tokenizer):
    """The chunked path never creates a tensor with a vocabulary-sized row for more than a chunk of
    positions, at any vocabulary; the full-logits path (the probe's control) does."""
    model = llama(vocab)
    corpus = read_corpus(text_file, tokenizer)  # token ids < 259 <= vocab
    monkeypatch.setattr(ppl_module, "HEAD_CHUNK_BYTES", 4 * vocab * 8)  # 8 positions per chunk
    window = 64
    with _LargestOutputs() as seen:
        perplexity(model, corpus, window=window, max_windows=2)
    rows = [math.prod(s[:-1]) for s in seen.shapes if s and s[-1] == vocab]
    assert rows and max(rows) <= 8
    biggest = max(math.prod(s) for s in seen.shapes)
    assert biggest < window * vocab / 2
    with _LargestOutputs() as control, torch.no_grad():
        model(input_ids=corpus.ids[None, :window])
    assert max(math.prod(s) for s in control.shapes) >= window * vocab


def test_protocol_settings_are_refused_in_one_line(tokenizer, text_file):
    corpus = read_corpus(text_file, tokenizer)
    model = llama()
    with pytest.raises(CompressorError, match="stride 48 is longer than a window's 47 text tokens"):
        perplexity(model, corpus, window=48, stride=48)
    with pytest.raises(CompressorError, match="window must be a whole number >= 2"):
        perplexity(model, corpus, window=1)
    with pytest.raises(CompressorError, match=r"fewer than one window of 100000"):
        spans(len(corpus.ids), 100_001)
    assert len(spans(len(corpus.ids), 48, max_windows=3)[0]) == 3
    no_bos = read_corpus(text_file, tokenizer)
    no_bos = type(no_bos)(no_bos.name, no_bos.sha256, no_bos.ids, None)
    with pytest.raises(CompressorError, match="no BOS token"):
        perplexity(model, no_bos, window=48)
    assert perplexity(model, no_bos, window=48, bos=False).tokens > 0


def test_default_window_is_capped_at_the_context(tokenizer, text_file):
    result = perplexity(llama(), read_corpus(text_file, tokenizer), max_windows=1)
    assert result.window == 64  # max_position_embeddings, below 2048
    assert result.to_dict()["max_windows"] == 1
    assert Perplexity.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_a_model_that_rescales_its_logits_is_refused(tokenizer, text_file):
    model = llama()
    forward = model.forward

    def halved(*args, **kwargs):  # a logit scale applied after the head, as some architectures do
        out = forward(*args, **kwargs)
        out["logits"] = out.logits * 0.5
        return out

    model.forward = halved
    with pytest.raises(CompressorError, match="not its output head applied"):
        perplexity(model, read_corpus(text_file, tokenizer), window=48)


# ------------------------------------------------------------------------------------------- ONNX


def _export(model, folder):
    from compressor.data.inputs import sequence_axes
    from compressor.export.onnx import export_onnx

    ids = torch.randint(3, 259, (1, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return export_onnx(model, inputs, folder / "model.onnx", dynamic_axes=sequence_axes(inputs))


@pytest.mark.slow
def test_onnx_perplexity_equals_torch(tmp_path, tokenizer, text_file, monkeypatch):
    """Gemma 3 (soft-capped logits, a sliding window of 4 inside 48-position windows) exported to ONNX:
    the trunk and head sessions give torch's perplexity; the head never sees more than a chunk."""
    from compressor.export import perplexity as onnx_module

    model = gemma()
    corpus = read_corpus(text_file, tokenizer)
    path = _export(model, tmp_path)
    expected = perplexity(model, corpus, window=48, stride=30)
    monkeypatch.setattr(ppl_module, "HEAD_CHUNK_BYTES", 4 * 259 * 7)
    sizes = []
    logits = onnx_module.HeadSplit.logits
    monkeypatch.setattr(onnx_module.HeadSplit, "logits", lambda self, h: sizes.append(len(h)) or logits(self, h))
    got = onnx_module.onnx_perplexity(path, corpus, window=48, stride=30)
    assert got.ppl == pytest.approx(expected.ppl, rel=1e-5)
    assert got.protocol() == expected.protocol()
    assert max(sizes) <= 7
    # compress eval FILE.onnx: the tokenizer and config.json come from the file's folder.
    res = run(["eval", path, "--text", text_file, "--json"])
    assert res.exit_code == 2 and "needs its tokenizer" in res.output
    tokenizer.save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)
    res = run(["eval", path, "--text", text_file, "--json"])
    assert res.exit_code == 0, res.output
    whole = Perplexity.from_dict(json.loads(res.output))
    assert whole.window == 128  # the config's max_position_embeddings caps the default 2048
    assert whole.ppl == pytest.approx(perplexity(model, corpus, window=128).ppl, rel=1e-5)


@pytest.mark.slow
def test_onnx_int8_head_says_how_it_was_run(tmp_path, tokenizer, text_file, monkeypatch):
    """An untied Llama head is quantized by the int8 variant: its perplexity stays near fp32's and the
    result notes that the activation scale came from chunks of positions, not whole windows."""
    from compressor.export.onnx import export_int8
    from compressor.export.perplexity import onnx_perplexity

    model = llama()
    corpus = read_corpus(text_file, tokenizer)
    path = _export(model, tmp_path)
    monkeypatch.setattr(ppl_module, "HEAD_CHUNK_BYTES", 4 * 259 * 10)  # 10 positions per run of the head
    fp32 = onnx_perplexity(path, corpus, window=48)
    int8 = onnx_perplexity(export_int8(path, tmp_path / "model.int8.onnx"), corpus, window=48)
    assert fp32.notes == ()
    assert int8.ppl == pytest.approx(fp32.ppl, rel=0.05) and int8.ppl != fp32.ppl
    assert int8.notes == ("the int8 output head's activation scale was computed over at most 10 positions at a "
                          "time (over the window's 48 in one run of the whole file)",)


# ------------------------------------------------------------------------------------- command line


@pytest.fixture
def hf_folder(tmp_path, tokenizer):
    folder = tmp_path / "tiny-llama"
    llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compress_eval_prints_the_perplexity_and_its_protocol(hf_folder, text_file, tokenizer):
    res = run(["eval", hf_folder, "--text", text_file, "--window", 48, "--max-windows", 3])
    assert res.exit_code == 0, res.output
    expected = perplexity(llama(), read_corpus(text_file, tokenizer), window=48, max_windows=3)
    assert f"perplexity {expected.ppl:.4f}" in res.output
    assert "141 predicted tokens in 3 windows (the first ones) of 48 positions, stride 47" in res.output
    res = run(["eval", hf_folder, "--text", text_file, "--window", 48, "--no-bos", "--json"])
    assert res.exit_code == 0, res.output
    got = Perplexity.from_dict(json.loads(res.output))
    assert got.bos is False
    assert got.ppl == pytest.approx(perplexity(llama(), read_corpus(text_file, tokenizer), window=48,
                                               bos=False).ppl, rel=1e-6)


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    (b"", "is empty"),
    (b" \n\t\n", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text"),
    (b"text\x00with a NUL byte", "binary file"),
    (b"too short", "fewer than one window"),
])
def test_compress_eval_refuses_a_bad_text_in_one_line(hf_folder, tmp_path, content, message):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    res = CliRunner().invoke(main, ["eval", str(hf_folder), "--text", str(path)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_compress_eval_text_reports_every_model(hf_folder, text_file, tmp_path):
    """compress --eval-text: dense, compressed and each ONNX file measured by one protocol, in report.json
    (typed, round-tripping) and report.md; the ONNX file's perplexity is the compressed model's."""
    from compressor.report.report import Report

    out = tmp_path / "out"
    res = run([hf_folder, "--rank", 8, "--out", out, "--int8", "--eval-text", text_file, "--eval-window", 48,
               "--eval-max-windows", 4])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "report.json").read_text())
    protocol = data["perplexity"]["protocol"]
    assert protocol["window"] == 48 and protocol["windows"] == 4 and protocol["tokens"] == 4 * 47
    assert protocol["sha256"] == __import__("hashlib").sha256(text_file.read_bytes()).hexdigest()
    models = data["perplexity"]["models"]
    assert list(models) == ["dense", "compressed", "model.onnx", "model.int8.onnx"]
    assert models["model.onnx"]["ppl"] == pytest.approx(models["compressed"]["ppl"], rel=1e-4)
    assert models["compressed"]["ratio_to_dense"] == pytest.approx(
        models["compressed"]["ppl"] / models["dense"]["ppl"])
    assert Report.from_dict(data).to_dict()["perplexity"] == data["perplexity"]
    md = (out / "report.md").read_text()
    assert "## Perplexity" in md and "188 predicted tokens in 4 windows" in md
    assert "perplexity        dense" in res.output


def test_each_perplexity_measured_is_said_when_progress_is_on(hf_folder, text_file, tmp_path, capsys):
    """A decoder's perplexity takes a minute or more per model: with progress on, one line per model, in order."""
    from compressor.jobs.compress import compress

    compress(hf_folder, tmp_path / "a", rank=8, eval_text=text_file, eval_window=48, eval_max_windows=2,
             progress=True)
    said = [line.split(" (")[0].rsplit(" ", 1) for line in capsys.readouterr().err.splitlines()
            if line.startswith("perplexity: ")]
    assert [name for name, _ in said] == ["perplexity: dense", "perplexity: compressed", "perplexity: model.onnx"]
    assert all(float(ppl) > 1 for _, ppl in said)


def test_eval_options_need_the_text_and_a_text_model(hf_folder, text_file, tmp_path):
    res = run([hf_folder, "--rank", 8, "--out", tmp_path / "o", "--eval-window", 48])
    assert res.exit_code == 2 and "only with --eval-text" in res.output
    res = run([hf_folder, "--rank", 8, "--out", tmp_path / "o", "--eval-text", text_file, "--eval-stride", 100,
               "--eval-window", 48])
    assert res.exit_code == 2 and "--eval-stride 1 to 47" in res.output, res.output
    with pytest.raises(CompressorError, match="analyze writes none"):
        from compressor.jobs.compress import compress

        compress(hf_folder, tmp_path / "a", mode="analyze", rank=8, eval_text=text_file)


@pytest.mark.slow
def test_search_bounds_the_perplexity_ratio(hf_folder, text_file, tmp_path, tokenizer):
    """compress search --max-perplexity-ratio: every file's perplexity measured on the evaluation text and
    divided by the dense fp32 export's; the chosen file meets the bound; an unmeetable bound names itself."""
    args = [hf_folder, "--targets", "0.5", "--precisions", "fp32,int8", "--int4-corrections", "",
            "--no-latency-aware", "--cache", tmp_path / "cache", "--eval-inputs", text_file,
            "--eval-text", text_file, "--eval-window", 48,
            "--eval-max-windows", 3]
    res = run(["search", *args, "--max-perplexity-ratio", 1.5, "--out", tmp_path / "a", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    points = {p["name"]: p for p in report["front"]["points"]}
    dense = perplexity(llama(), read_corpus(text_file, tokenizer), window=48, max_windows=3)
    assert points["dense-fp32"]["perplexity"] == pytest.approx(dense.ppl, rel=1e-5)
    assert points["dense-fp32"]["perplexity_ratio"] == 1.0
    assert all(p["perplexity_ratio"] is not None and p["meets"]["max_perplexity_ratio"] ==
               (p["perplexity_ratio"] <= 1.5) for p in points.values())
    assert report["chosen"]["perplexity_ratio"] <= 1.5
    assert report["front"]["perplexity"] == {**dense.protocol()}
    md = (tmp_path / "a" / "report.md").read_text()
    assert "perplexity <= 1.5x dense fp32's" in md and "- perplexity: on `eval.txt`" in md
    low = min(p["perplexity_ratio"] for p in points.values())
    res = run(["search", *args, "--max-perplexity-ratio", low / 2, "--out", tmp_path / "b"])
    assert res.exit_code == 2, res.output
    assert "error: --max-perplexity-ratio cannot be met by any candidate" in res.output
    res = run(["search", *args[:-6], "--max-perplexity-ratio", 1.5, "--out", tmp_path / "c"])
    assert res.exit_code == 2 and "needs an evaluation text" in res.output, res.output


def test_docstring_texts_share_no_module(tmp_path, monkeypatch):
    """Whole docstrings, split by module: every evaluation passage comes from an evaluation module and every
    calibration line from another; the files are the same bytes each time, with the sha256 returned."""
    import hashlib

    from compressor import examples

    modules = ["json", "decimal", "shlex", "csv", "textwrap", "argparse", "random", "difflib"]
    passages = examples.docstring_passages(modules)
    monkeypatch.setattr(examples, "docstring_passages", lambda: passages)
    info = examples.write_docstring_texts(tmp_path, eval_chars=None, calibration_chars=None)
    evaluation = (tmp_path / "docstrings.eval.txt").read_text(encoding="utf-8")
    calibration = (tmp_path / "docstrings.calibration.txt").read_text(encoding="utf-8").splitlines()
    owner = {p: m for m, ps in passages.items() for p in ps}
    flat = {" ".join(p.split()): m for p, m in owner.items()}
    eval_modules = {m for p, m in owner.items() if p in evaluation}
    cal_modules = {flat[line] for line in calibration}
    assert eval_modules == {m for m in passages if examples.is_eval_module(m)} == {"json", "decimal"}
    assert cal_modules == set(passages) - eval_modules and len(cal_modules) >= 4
    assert info["eval"]["passages"] == sum(len(passages[m]) for m in eval_modules)
    assert info["eval"]["sha256"] == hashlib.sha256((tmp_path / "docstrings.eval.txt").read_bytes()).hexdigest()
    assert info["calibration"]["passages"] == len(calibration)
    again = examples.write_docstring_texts(tmp_path / "again", eval_chars=None, calibration_chars=None)
    assert again["eval"]["sha256"] == info["eval"]["sha256"]
    short = examples.write_docstring_texts(tmp_path / "short", eval_chars=3000, calibration_chars=3000)
    assert short["eval"]["chars"] <= 3000 and short["calibration"]["chars"] <= 3000
    assert evaluation.startswith((tmp_path / "short" / "docstrings.eval.txt").read_text(encoding="utf-8")[:-1])
