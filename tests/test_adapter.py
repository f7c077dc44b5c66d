"""LoRA adapters as PEFT files: compressor writes them, compressor and peft read them back and compute
the same outputs; ``compress heal --train lora --save-adapter`` keeps the trained adapter."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.train.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, load_adapter, save_adapter
from compressor.train.lora import apply_lora, merge_lora

REPO = Path(__file__).resolve().parents[1]


class ConvEmbed(nn.Module):
    """Every plain-torch layer kind compressor adapts: Conv1d, Conv2d, Embedding, Linear (one capped)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.conv1 = nn.Conv1d(8, 6, 3, padding=1)
        self.emb = nn.Embedding(20, 6)
        self.head = nn.Linear(6, 3)  # full rank 3 < the requested 4: capped, alpha scaled (patterns)

    def forward(self, x, ids):
        h = self.conv(x).flatten(2)  # (B, 8, 36)
        h = self.conv1(h).mean(-1) + self.emb(ids).mean(1)
        return self.head(h)


def _conv_embed():
    g = torch.Generator().manual_seed(1)
    return ConvEmbed(), (torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 20, (2, 5), generator=g)), None


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    model = transformers.GPT2Model(cfg).eval()
    return model, (torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1)),), None


def _minilm():
    from compressor.examples import minilm_path

    if minilm_path() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed")
    from compressor.examples import load_minilm

    model, tok = load_minilm()
    enc = tok(["a short sentence", "another one, a little longer"], return_tensors="pt", padding=True)
    return model, (enc["input_ids"], enc["attention_mask"]), (lambda name, _: name.endswith(("query", "value")))


def _out(model, inputs):
    with torch.no_grad():
        y = model(*inputs)
    return y.last_hidden_state if hasattr(y, "last_hidden_state") else y


CASES = {  # name: (builder, layer kinds the adapter must hold, fan_in_fan_out)
    "conv-embedding-linear": (_conv_embed, {"conv", "embedding", "matrix"}, False),
    "gpt2-conv1d": (_gpt2, {"matrix", "embedding"}, True),  # Conv1D layers, wte and wpe
    "minilm": (_minilm, {"matrix"}, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_round_trips_through_compressor_and_peft(tmp_path, case):
    build, layouts, fan_in_fan_out = CASES[case]
    base, inputs, only = build()
    model = copy.deepcopy(base)
    wrapped = apply_lora(model, rank=4, alpha=8, filter_fn=only)
    torch.manual_seed(3)
    with torch.no_grad():
        for w in wrapped.values():  # a trained adapter: both factors non-zero
            w.lora_A.normal_(0, 0.2)
            w.lora_B.normal_(0, 0.2)
    expected = _out(model, inputs)
    assert (expected - _out(base, inputs)).abs().max() > 1e-3  # the adapter changes the outputs

    folder = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["fan_in_fan_out"] is fan_in_fan_out
    assert sorted(config["target_modules"]) == sorted(wrapped)
    adapter = Adapter.load(folder)
    assert {lay.layout for lay in adapter.layers.values()} == layouts
    if case == "conv-embedding-linear":  # the capped head: its own rank and alpha, as PEFT spells them
        assert config["rank_pattern"] == {"head": 3} and config["alpha_pattern"] == {"head": 6}
    from safetensors import safe_open

    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert all(k.startswith("base_model.model.") for k in keys) and len(keys) == 2 * len(wrapped)

    # compressor's loader: the same outputs, and merged the same again
    again = copy.deepcopy(base)
    load_adapter(again, folder)
    torch.testing.assert_close(_out(again, inputs), expected, rtol=1e-5, atol=1e-5)
    merge_lora(again)
    torch.testing.assert_close(_out(again, inputs), expected, rtol=1e-4, atol=1e-4)

    # peft's loader, on a fresh copy of the base
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    torch.testing.assert_close(_out(loaded, inputs), expected, rtol=1e-5, atol=1e-5)


def test_peft_written_adapter_loads_in_compressor(tmp_path):
    peft = pytest.importorskip("peft")
    base, inputs, _ = _conv_embed()
    cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["conv", "head", "emb"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    expected = _out(pm, inputs)
    pm.save_pretrained(str(tmp_path / "peft"))
    model = copy.deepcopy(base)
    wrapped = load_adapter(model, tmp_path / "peft")
    assert sorted(wrapped) == ["conv", "emb", "head"]
    torch.testing.assert_close(_out(model, inputs), expected, rtol=1e-5, atol=1e-5)


def _refusals(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = tmp / "good"
    m = nn.Sequential(nn.Linear(4, 4))
    apply_lora(m, rank=2)
    save_adapter(m, good)
    out = {}
    for name, edit, match in (
            ("dora", lambda c: {**c, "use_dora": True}, "use_dora"),
            ("not-lora", lambda c: {**c, "peft_type": "IA3"}, "not a LoRA adapter"),
            ("rank-mismatch", lambda c: {**c, "r": 3}, "rank 2 but its config says 3")):
        folder = tmp / name
        folder.mkdir()
        (folder / ADAPTER_WEIGHTS).write_bytes((good / ADAPTER_WEIGHTS).read_bytes())
        (folder / ADAPTER_CONFIG).write_text(json.dumps(edit(json.loads((good / ADAPTER_CONFIG).read_text()))))
        out[name] = (folder, match)
    pickled = tmp / "pickled"
    pickled.mkdir()
    (pickled / "adapter_model.bin").write_bytes(b"x")
    out["pickle-only"] = (pickled, "is a pickle and is not read")
    return out


def test_bad_adapters_are_refused_in_one_line(tmp_path):
    for name, (folder, match) in _refusals(tmp_path).items():
        with pytest.raises(CompressorError, match=match):
            load_adapter(nn.Sequential(nn.Linear(4, 4)), folder)
        assert name  # every case raised
    # the wrong model: checked before anything is wrapped
    model = nn.Sequential(nn.Linear(5, 4))
    with pytest.raises(CompressorError, match="does not fit"):
        load_adapter(model, tmp_path / "good")
    assert isinstance(model[0], nn.Linear)


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_heal_lora_saves_the_adapter_it_trained(tmp_path):
    from compressor.examples import digits_splits, train_digits_cnn

    model, _ = train_digits_cnn(seed=0, epochs=2)
    torch.save(model, tmp_path / "cnn.pt")
    x, y = digits_splits(0)["train"]
    torch.save({"inputs": x[:256], "targets": y[:256]}, tmp_path / "train.pt")
    assert _cli(tmp_path / "cnn.pt", "--rank-ratio", "0.3", "--input-shape", "1x1x8x8", "--out", "small",
                "--quiet", cwd=tmp_path).returncode == 0

    bad = _cli("heal", "small", "--data", "train.pt", "--save-adapter", "ad", "--steps", "2", cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--train lora" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.pt", "small", "train.pt"]

    ok = _cli("heal", "small", "--data", "train.pt", "--train", "lora", "--lora-rank", "2", "--lr", "0.01",
              "--steps", "6", "--save-adapter", "ad", "--out", "healed", "--quiet", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    import compressor

    small, healed = compressor.load(tmp_path / "small"), compressor.load(tmp_path / "healed")
    config = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "small").resolve())
    assert all(t.rpartition(".")[2] in ("down", "up") for t in config["target_modules"])
    load_adapter(small, tmp_path / "ad")
    x = x[:64]
    with torch.no_grad():
        assert (small(x) - compressor.load(tmp_path / "small")(x)).abs().max() > 1e-4  # it trained
        torch.testing.assert_close(small(x), healed(x), rtol=1e-4, atol=1e-4)
        peft = pytest.importorskip("peft")  # peft reads it onto the compressed model too
        via_peft = peft.PeftModel.from_pretrained(compressor.load(tmp_path / "small"), str(tmp_path / "ad")).eval()
        torch.testing.assert_close(via_peft(x), healed(x), rtol=1e-4, atol=1e-4)
