"""Hostile inputs, round three: the surfaces added since the last round (streamed resume state, LoRA merge
and extract, links and special files in model folders, checkpoint JSON, plans, ONNX, Ray, SVD sizes).

Each case runs as a user runs it (``python -m compressor`` in a subprocess) and checks the contract: exit 2,
one stderr line naming the problem and the fix, no traceback, the folder it ran in unchanged byte for byte
(inputs, and the tool's own state) with nothing left behind, in bounded time and memory.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SECONDS = 120  # a refusal is interpreter + torch start-up and one check; far below this unless it hangs
MEMORY = 4 << 30  # address space of one CLI run: small runs fit, reading /dev/zero to the end does not
transformers = pytest.importorskip("transformers")


def cli(args, cwd: Path, *, timeout: float = SECONDS, memory: int | None = MEMORY) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}

    def limit():
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], cwd=cwd, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    res.seconds = time.monotonic() - start
    return res


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too, links not followed): a file by its hash, others by type."""
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
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], res.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert res.seconds < SECONDS
    return lines[0]


def refused_untouched(args, folder: Path, *words: str, **kw) -> str:
    """Run the CLI in ``folder`` and check the refusal contract; returns the error line."""
    before = snapshot(folder)
    line = refused(cli(args, folder, **kw), *words)
    assert snapshot(folder) == before, "inputs or state changed, or something was left behind"
    return line


def llama(folder: Path) -> Path:
    """A tiny Llama (2 decoder layers, 15 factorable layers) as a sharded Hugging Face folder."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="60KB", safe_serialization=True)
    return folder


# ------------------------------------------------------------------------------ 1. streamed resume state

STREAM = ["m", "--stream", "--rank", "4", "--out", "o", "--quiet"]


def crashed_run(work: Path, monkeypatch, after: int = 3) -> Path:
    """Leave the state of a streamed run of ``work/m`` that died after ``after`` finished layers; returns
    the state folder."""
    import compressor.jobs.stream as s

    run, calls = s.timed_layer, []

    def dies(task):
        if len(calls) == after:
            raise RuntimeError("killed")
        calls.append(task.name)
        return run(task)

    with monkeypatch.context() as m:
        m.setattr(s, "timed_layer", dies)
        with pytest.raises(RuntimeError, match="killed"):
            s.stream_compress(work / "m", work / "o", mode="compress", rank=4)
    return s.state_dir(work / "o")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return llama(tmp_path_factory.mktemp("llama") / "m")


@pytest.fixture(scope="module")
def clean_stream(model_dir, tmp_path_factory) -> dict[str, bytes]:
    """The plan and weights of an uninterrupted streamed run: what every resumed run must reproduce."""
    from compressor.jobs.stream import stream_compress

    out = tmp_path_factory.mktemp("clean") / "o"
    stream_compress(model_dir, out, mode="compress", rank=4)
    return output_bytes(out)


def output_bytes(folder: Path) -> dict[str, bytes]:
    """What a streamed output holds that must not depend on how the run got there (stream.json and the
    reports record timings and are left out)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors" or p.name in ("plan.json", "model.safetensors.index.json", "config.json")}


@pytest.fixture
def work(model_dir, tmp_path) -> Path:
    shutil.copytree(model_dir, tmp_path / "w" / "m")
    return tmp_path / "w"


def _flip(path: Path, where: float = 0.9) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, words", [
    (lambda st: _flip(st / "layers" / "00001.layer.safetensors"), ["00001.layer.safetensors", "sha256"]),
    (lambda st: (st / "layers" / "00000.layer.safetensors").write_bytes(b"{"), ["00000.layer", "bytes"]),
    (lambda st: (st / "fingerprint.json").write_text("[[[[" * 5000), ["fingerprint.json"]),
    (lambda st: (st / "fingerprint.json").unlink(), ["no intact fingerprint.json"]),
    (lambda st: (st / "layers" / "00002.layer.safetensors.sha256").write_text("not a checksum"), ["checksum"]),
])
def test_stream_resume_state_is_verified_before_it_is_trusted(work, monkeypatch, damage, words):
    state = crashed_run(work, monkeypatch)
    damage(state)
    refused_untouched(STREAM, work, *words, "rerun with --restart")


def test_stream_resume_state_after_a_crash_gives_the_clean_bytes(work, monkeypatch, clean_stream):
    """The baseline: an intact state resumes to the same bytes; a layer cut off before its seal is redone."""
    state = crashed_run(work, monkeypatch)
    (state / "layers" / "00002.layer.safetensors.sha256").unlink()  # as if killed between the two writes
    res = cli(STREAM, work)
    assert res.returncode == 0, res.stderr
    assert output_bytes(work / "o") == clean_stream and not state.exists()
