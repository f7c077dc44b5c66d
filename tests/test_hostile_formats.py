"""Hostile model files, run through the command line as a user would: each is refused with one line and
exit code 2, in bounded time and memory, without running code from it, without changing it and without
leaving an output or temporary folder beside it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.examples import digits_cnn

REPO = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 3 << 30  # address space for one CLI run: a normal small run fits, a 6.4 GB tensor does not
MALICIOUS_PY = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def cli(args, cwd: Path, *, input: str | None = None, timeout: float = 90, memory: int | None = MEMORY_LIMIT):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}

    def limit():
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], cwd=cwd, env=env,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit)


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too, links not followed): a file by its hash, a link by its
    target, others by type."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root, name)
            mode = os.lstat(p).st_mode
            out[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(mode)
                                               else f"link -> {os.readlink(p)}" if stat.S_ISLNK(mode)
                                               else f"type {stat.S_IFMT(mode)}")
    return out


def refused(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "[y/N]" not in res.stdout + res.stderr and res.stdout == "", res.stdout
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def refused_untouched(args, folder: Path, *words: str, **kw) -> str:
    before = snapshot(folder)
    line = refused(cli(args, folder, **kw), *words)
    assert snapshot(folder) == before  # inputs byte for byte, and no output or temp folder beside them
    return line


# ------------------------------------------------------------------------------------------- fixtures


def tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**data, **changes}))


def evil_module(folder: Path, name: str = "evil") -> Path:
    marker = folder.parent / f"{folder.name}.{name}.ran"
    (folder / f"{name}.py").write_text(MALICIOUS_PY.format(marker=str(marker)))
    return marker


# ----------------------------------------------------------------------------- 1. code from a folder


@pytest.mark.parametrize("how", ["stdin closed", "stdin y", "quiet"])
def test_hf_folder_with_auto_map_never_runs_or_asks(tmp_path, bert_dir, how):
    folder = copy_dir(bert_dir, tmp_path / "m")
    marker = evil_module(folder)
    edit_json(folder / "config.json", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
              architectures=["EvilModel"])
    args = [folder, "--energy", "0.9", *(["--quiet"] if how == "quiet" else [])]
    line = refused_untouched(args, tmp_path, "custom Python code", "auto_map in config.json",
                             input="y\n" if how == "stdin y" else None)
    assert "--trust-pickle" not in line  # pickle trust is not remote-code trust
    assert not marker.exists()


def test_tokenizer_auto_map_is_refused(tmp_path, bert_dir):
    folder = copy_dir(bert_dir, tmp_path / "m")
    marker = evil_module(folder)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    edit_json(folder / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]},
              tokenizer_class="EvilTokenizer")
    refused_untouched([folder, "--energy", "0.9"], tmp_path, "auto_map in tokenizer_config.json",
                      input="y\n")
    assert not marker.exists()


def test_compressed_folder_with_auto_map_is_refused(tmp_path, bert_dir):
    from transformers import BertModel

    import compressor

    out = tmp_path / "c"
    compressor.save(BertModel.from_pretrained(bert_dir), out)
    assert json.loads((out / "compressor.json").read_text())["architecture"]["kind"] == "hf"
    marker = evil_module(out)
    edit_json(out / "config.json", auto_map={"AutoConfig": "evil.EvilConfig"})
    for args in ([out, "--energy", "0.9"], ["export", out, "--quiet"]):
        refused_untouched(args, tmp_path, "custom Python code", input="y\n")
    assert not marker.exists()


# ------------------------------------------------------------------ 2. the pickle scan imports nothing


def crafted_torch_zip(path: Path, pickle_bytes: bytes) -> Path:
    """A torch.save zip whose data.pkl is ``pickle_bytes``."""
    buf = io.BytesIO()
    torch.save({"a": 1}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = pickle_bytes if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, data, compress_type=zipfile.ZIP_STORED)
    return path


@pytest.mark.parametrize("module", ["torch.utils.model_dump.__main__", "torch.nn.modules.not_imported_yet",
                                    "torch.utils.bottleneck.__main__"])
def test_pickle_scan_never_imports_what_the_file_names(tmp_path, module):
    path = crafted_torch_zip(tmp_path / "m.pt", b"\x80\x02c" + module.encode() + b"\nX\n)\x81q\x00.")
    line = refused_untouched([path, "--energy", "0.9"], tmp_path, f"{module}.X", "--trust-pickle")
    assert "usage" not in line.lower()


# ---------------------------------------------------------------------- 3. tensors bigger than the file


@pytest.mark.parametrize("whole_module", [False, True])
def test_stride_zero_tensor_is_refused_within_memory(tmp_path, whole_module):
    big = torch.zeros(1).expand(40000, 40000)  # 6.4 GB once copied, 4 bytes stored
    if whole_module:
        model = nn.Sequential(nn.Linear(2, 2))
        model[0].weight = nn.Parameter(big)
        torch.save(model, tmp_path / "m.pt")
    else:
        torch.save({"0.weight": big, "0.bias": torch.zeros(40000)}, tmp_path / "m.pt")
    assert (tmp_path / "m.pt").stat().st_size < 200_000
    refused_untouched([tmp_path / "m.pt", "--energy", "0.9"], tmp_path, "0.weight", "stored in only 4 bytes",
                      timeout=60)


def test_many_views_of_one_storage_are_refused(tmp_path):
    base = torch.randn(256 * 256)
    torch.save({f"l{i}.weight": base.view(2 ** (i % 8 + 1), -1) for i in range(40)}, tmp_path / "m.pt")
    refused_untouched([tmp_path / "m.pt", "--energy", "0.9"], tmp_path, "view the same data")


# ------------------------------------------------------------------------------------------ 4. FIFOs


def test_fifo_model_file_and_folder_members(tmp_path, bert_dir):
    os.mkfifo(tmp_path / "model.pt")
    refused_untouched([tmp_path / "model.pt", "--energy", "0.9"], tmp_path, "named pipe", timeout=30)
    for name in ("config.json", "model.safetensors"):
        folder = copy_dir(bert_dir, tmp_path / f"hf-{name}")
        (folder / name).unlink()
        os.mkfifo(folder / name)
        refused_untouched([folder, "--energy", "0.9"], tmp_path, "named pipe", name, timeout=30)
        os.unlink(folder / name)


def test_fifo_inside_compressed_folder(tmp_path):
    import compressor

    compressor.save(digits_cnn(), tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    os.mkfifo(tmp_path / "c" / "model.safetensors")
    refused_untouched(["export", tmp_path / "c", "--input-shape", "1x1x8x8"], tmp_path, "named pipe",
                      timeout=30)


def test_fifo_plan_calibration_and_inputs(tmp_path):
    torch.save(digits_cnn(), tmp_path / "cnn.pt")
    os.mkfifo(tmp_path / "fifo")
    for args in (["apply", "cnn.pt", "fifo", "--input-shape", "1x1x8x8"],
                 ["cnn.pt", "--energy", "0.9", "--input-shape", "1x1x8x8", "--calibration", "fifo"],
                 ["cnn.pt", "--energy", "0.9", "--example-inputs", "fifo"]):
        refused_untouched(args, tmp_path, "named pipe", timeout=30)


def test_fifo_in_checkpoint_is_not_read(tmp_path):
    import compressor

    model = digits_cnn()
    plan = compressor.analyze(model, rank_ratio=0.3)
    compressor.save(compressor.rewrite(model, plan), tmp_path / "c", plan)
    torch.save({"inputs": torch.randn(8, 1, 8, 8), "targets": torch.arange(8) % 10}, tmp_path / "d.pt")
    step = tmp_path / "ckpt" / "step-00000001"
    step.mkdir(parents=True)
    for name in ("tensors.safetensors", "state.json", "COMPLETE.json"):
        os.mkfifo(step / name)
    res = cli(["heal", "c", "--data", "d.pt", "--epochs", "1", "--checkpoint-dir", "ckpt", "--resume",
               "--out", "healed", "--quiet"], tmp_path, timeout=60)
    # The FIFO checkpoint is skipped with a warning naming it (as a truncated one is); training starts afresh.
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "named pipe" in res.stderr and (tmp_path / "healed").is_dir()


# --------------------------------------------------------------------------------- 5. missing weights


def test_hf_folder_with_missing_weights_is_refused(tmp_path, bert_dir):
    from safetensors.torch import load_file, save_file

    ok = copy_dir(bert_dir, tmp_path / "ok")
    res = cli(["analyze", ok, "--energy", "0.9", "--quiet"], tmp_path)
    assert res.returncode == 0, res.stderr
    folder = copy_dir(bert_dir, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    dropped = [k for k in tensors if k.startswith("encoder.layer.1.")]
    save_file({k: v for k, v in tensors.items() if k not in dropped}, folder / "model.safetensors",
              metadata={"format": "pt"})
    refused_untouched([folder, "--energy", "0.9"], tmp_path, "missing", "encoder.layer.1.")
    tensors["extra.weight"] = torch.zeros(2, 2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    refused_untouched([folder, "--energy", "0.9"], tmp_path, "unexpected 1 (extra.weight)")


def test_state_dict_with_missing_weights_and_arch_is_refused(tmp_path):
    sd = digits_cnn().state_dict()
    del sd["6.weight"]
    torch.save(sd, tmp_path / "sd.pt")
    refused_untouched([tmp_path / "sd.pt", "--arch", "compressor.examples:digits_cnn", "--energy", "0.9",
                       "--input-shape", "1x1x8x8"], tmp_path, "missing 1 (6.weight)")


# ------------------------------------------------------------------------------- 6. wrapper prefixes


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
@pytest.mark.parametrize("nested", [False, True])
def test_wrapper_prefix_is_stripped_with_a_note(tmp_path, prefix, nested):
    sd = {prefix + k: v for k, v in digits_cnn().state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 3} if nested else sd, tmp_path / "sd.pt")
    res = cli([tmp_path / "sd.pt", "--arch", "compressor.examples:digits_cnn", "--energy", "0.9",
               "--input-shape", "1x1x8x8", "--out", tmp_path / "out"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"note: every weight name in '{tmp_path / 'sd.pt'}' started with '{prefix}'" in res.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any(prefix in n for n in report["notes"])


def test_wrapper_prefix_stripped_without_arch(tmp_path):
    from safetensors.torch import load_file

    sd = {"module." + k: v for k, v in digits_cnn().state_dict().items()}
    torch.save(sd, tmp_path / "sd.pt")
    res = cli([tmp_path / "sd.pt", "--energy", "0.9", "--out", tmp_path / "out", "--quiet"], tmp_path)
    assert res.returncode == 0, res.stderr
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    names = [layer["name"] for layer in plan["layers"]]
    assert names and not any(n.startswith("module.") for n in names)
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(k.startswith("module.") for k in saved)


def test_prefix_kept_when_the_model_wants_it(tmp_path):
    torch.save(nn.DataParallel(digits_cnn()).state_dict(), tmp_path / "sd.pt")
    (tmp_path / "wrapped.py").write_text("from torch import nn\nfrom compressor.examples import digits_cnn\n"
                                         "def make():\n    return nn.DataParallel(digits_cnn())\n")
    res = cli(["analyze", tmp_path / "sd.pt", "--arch", "wrapped:make", "--energy", "0.9", "--out",
               tmp_path / "out"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "note:" not in res.stdout


# ---------------------------------------------------------------------- the worst files we could think of


def test_symlink_loops(tmp_path, bert_dir):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    refused_untouched([tmp_path / "loop", "--energy", "0.9"], tmp_path, "loop", timeout=30)
    folder = copy_dir(bert_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    os.symlink(folder / "model.safetensors", folder / "model.safetensors")
    refused_untouched([folder, "--energy", "0.9"], tmp_path, "model.safetensors", timeout=30)


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("case", ["offsets past the end", "offsets overlap", "dtype size lies", "huge shape",
                                  "negative shape", "unknown dtype", "deep json", "header length lies"])
def test_lying_safetensors_headers(tmp_path, case):
    w = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
    header, data = {"0.weight": w}, bytes(64)
    if case == "offsets past the end":
        header = {"0.weight": {**w, "data_offsets": [0, 1 << 40]}}
    elif case == "offsets overlap":
        header = {"0.weight": w, "1.weight": w}
    elif case == "dtype size lies":
        header = {"0.weight": {**w, "dtype": "F64"}}
    elif case == "huge shape":
        header = {"0.weight": {**w, "shape": [1 << 31, 1 << 31]}}
    elif case == "negative shape":
        header = {"0.weight": {**w, "shape": [-4, -4]}}
    elif case == "unknown dtype":
        header = {"0.weight": {**w, "dtype": "X99"}}
    raw = safetensors_bytes(header, data)
    if case == "deep json":
        deep = b"{" + b'"a":[' * 100_000 + b"]" * 100_000 + b"}"
        raw = struct.pack("<Q", len(deep)) + deep
    elif case == "header length lies":
        raw = struct.pack("<Q", 90_000_000) + raw[8:]
    (tmp_path / "w.safetensors").write_bytes(raw)
    refused_untouched([tmp_path / "w.safetensors", "--energy", "0.9"], tmp_path, "w.safetensors", timeout=30)


def test_zip_bomb_torch_file(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, \
            zipfile.ZipFile(tmp_path / "m.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        with dst.open("bomb/data/1", "w", force_zip64=True) as f:  # 2 GB of zeros, ~2 MB on disk
            chunk = bytes(1 << 24)
            for _ in range(128):
                f.write(chunk)
    assert (tmp_path / "m.pt").stat().st_size < 10_000_000
    refused_untouched([tmp_path / "m.pt", "--energy", "0.9"], tmp_path, "compressed", timeout=30)


@pytest.mark.parametrize("case", ["unknown model_type", "not utf-8", "not a dict", "deep json"])
def test_odd_hf_configs(tmp_path, bert_dir, case):
    folder = copy_dir(bert_dir, tmp_path / "m")
    if case == "unknown model_type":
        edit_json(folder / "config.json", model_type="no-such-model", architectures=["NoSuchModel"])
    elif case == "not utf-8":
        (folder / "config.json").write_bytes(b'{"model_type": "bert", "name": "\xff\xfe"}')
    elif case == "not a dict":
        (folder / "config.json").write_text("[1, 2]")
    else:
        (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    line = refused_untouched([folder, "--energy", "0.9"], tmp_path, timeout=60)
    assert str(folder) in line


def test_config_far_bigger_than_its_weights(tmp_path, bert_dir):
    # transformers would build and randomly initialise the 298 layers the file lacks before reporting them.
    folder = copy_dir(bert_dir, tmp_path / "m")
    edit_json(folder / "config.json", num_hidden_layers=300)
    refused_untouched([folder, "--energy", "0.9"], tmp_path, "describes a model of", "weights files hold only")
    edit_json(folder / "config.json", num_hidden_layers=2, vocab_size=100_000_000)  # 12.8 GB of embeddings
    refused_untouched([folder, "--energy", "0.9"], tmp_path, "describes a model of")


def test_stride_zero_example_inputs_are_refused(tmp_path):
    torch.save(digits_cnn(), tmp_path / "cnn.pt")
    torch.save(torch.zeros(1).expand(40000, 1, 200, 200), tmp_path / "x.pt")
    refused_untouched(["export", "cnn.pt", "--example-inputs", "x.pt"], tmp_path, "stored in only 4 bytes",
                      timeout=60)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_stride_zero_calibration_is_refused(tmp_path, suffix):
    torch.save(digits_cnn(), tmp_path / "cnn.pt")
    bomb = torch.zeros(1).expand(40000, 1, 200, 200)
    if suffix == ".pt":
        torch.save(bomb, tmp_path / "cal.pt")
    else:  # safetensors cannot store a view: a header that lies about its data instead
        header = json.dumps({"x": {"dtype": "F32", "shape": [40000, 1, 200, 200], "data_offsets": [0, 4]}}).encode()
        (tmp_path / "cal.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    refused_untouched(["cnn.pt", "--target", "0.3", "--input-shape", "1x1x8x8", "--calibration", f"cal{suffix}"],
                      tmp_path, f"cal{suffix}", timeout=60)


class _Runs:
    """Pickles to a call of ``target`` (os.system or subprocess.Popen) that would write a marker file."""

    def __init__(self, target, marker: Path):
        self.target, self.marker = target, marker

    def __reduce__(self):
        import os as _os

        arg = f"touch {self.marker}" if self.target is _os.system else ["touch", str(self.marker)]
        return self.target, (arg,)


@pytest.mark.parametrize("target, shown", [("os.system", "posix.system"), ("subprocess.Popen", "subprocess.Popen")])
def test_code_in_a_torch_pickle_is_named_as_python_3_resolves_it(tmp_path, target, shown):
    module, _, name = target.rpartition(".")
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(2, 2), "x": _Runs(getattr(__import__(module), name), marker)}, tmp_path / "m.pt")
    line = refused_untouched(["m.pt", "--energy", "0.9"], tmp_path, shown, "--trust-pickle")
    assert "commands." not in line and not marker.exists()
