"""Streamed, resumable, parallel analysis of safetensors checkpoints (compressor.jobs.stream), and the
randomized SVD with its a-posteriori check (compressor.core.svd)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from compressor.core.errors import CompressorError
from compressor.core.statefile import write_sealed
from compressor.core.svd import leading_svd, randomized_svd, svd
from compressor.examples import minilm_path
from compressor.jobs.compress import compress
from compressor.jobs.stream import state_dir, stream_compress

ROOT = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")


def _llama(folder: Path, dtype=torch.bfloat16, shard: str = "60KB") -> Path:
    """A tiny Llama (2 decoder layers) saved as a sharded Hugging Face folder in ``dtype``."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder, max_shard_size=shard, safe_serialization=True)
    return folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


def _bytes(folder: Path) -> dict[str, bytes]:
    """The plan and the weight files of an output folder (stream.json holds timings: left out)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors" or p.name in ("plan.json", "model.safetensors.index.json")}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


# ----------------------------------------------------------------------------------- randomized SVD


def test_randomized_svd_finds_leading_triplets_and_bounds_them():
    torch.manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(300, 120))
    q2, _ = torch.linalg.qr(torch.randn(200, 120))
    s = 0.9 ** torch.arange(120.0)  # a decaying spectrum, as trained weights have
    w = q1 @ torch.diag(s) @ q2.T
    dec = randomized_svd(w, 20, seed=1)
    exact = svd(w).S[:20]
    err = float(((dec.S - exact).abs() / exact[-1]).max())
    assert dec.check["bound"] < 1e-3 and err <= dec.check["bound"] + 1e-5  # + float32 round-off
    assert dec.total_energy == pytest.approx(float(s.double().square().sum()), rel=1e-5)
    again = randomized_svd(w, 20, seed=1)
    assert torch.equal(dec.S, again.S)  # seeded: the same on every run


def test_leading_svd_falls_back_to_exact_when_the_bound_fails():
    w = torch.randn(200, 150)  # a flat (Marchenko-Pastur) spectrum: the range finder cannot resolve it
    dec = leading_svd(w, 20, tol=1e-6)
    assert dec.check["method"] == "exact" and "bound" in dec.check["reason"]
    assert len(dec.S) == 150 and dec.total_energy is None
    assert leading_svd(w, 60).check == {"method": "exact", "reason": "rank above a third of the full rank"}


# ------------------------------------------------------------------------------------------ streaming


def test_stream_plan_and_weights_match_in_memory_on_a_sharded_bf16_llama(llama, tmp_path):
    assert len(list(llama.glob("*.safetensors"))) >= 2 and (llama / "model.safetensors.index.json").is_file()
    torch.set_num_threads(1)  # the in-memory SVDs on one thread, as the streamed ones run
    compress(llama, tmp_path / "mem", mode="analyze", energy=0.8, progress=False)
    summary = stream_compress(llama, tmp_path / "stream", mode="compress", energy=0.8, shard_bytes=40_000)
    assert (tmp_path / "mem/plan.json").read_bytes() == (tmp_path / "stream/plan.json").read_bytes()
    assert summary.totals["layers_factored"] == 16  # 7 Linear per block x 2, lm_head, embed_tokens
    assert len(summary.files) > 2 and summary.files[-1] == "model.safetensors.index.json"
    assert (tmp_path / "stream/stream.json").read_text() == json.dumps(summary.to_dict(), indent=2) + "\n"
    assert not state_dir(tmp_path / "stream").exists()

    # The factored weights are those of the in-memory rewrite, in the checkpoint's dtype (bf16).
    from compressor.analysis.analyze import analyze
    from compressor.core.rewrite import rewrite
    from compressor.formats.load import load_model

    model = load_model(llama).model
    rewrite(model, analyze(model, energy=0.8))
    expected = model.state_dict()
    got = _tensors(tmp_path / "stream")
    assert set(got) == set(expected)
    for k, t in expected.items():
        assert got[k].dtype == t.dtype == torch.bfloat16 and torch.equal(got[k], t), k
    index = json.loads((tmp_path / "stream/model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)


def test_streamed_output_loads_with_compressor_load_as_the_in_memory_rewrite(llama, tmp_path):
    import compressor
    from compressor.core.plan import Plan
    from compressor.core.rewrite import rewrite
    from compressor.formats.load import load_model

    out = tmp_path / "stream"
    stream_compress(llama, out, mode="compress", energy=0.8, shard_bytes=40_000)
    meta = json.loads((out / "compressor.json").read_text())
    assert meta["architecture"]["kind"] == "hf" and meta["factored_layers"] == 16
    assert not (out / "model.safetensors").exists()  # shards + index only
    loaded = load_model(out)
    plan = Plan.from_json(out / "plan.json")
    assert loaded.format == "compressor" and loaded.meta["plan"].to_dict() == plan.to_dict()
    model = compressor.load(out)
    expected = load_model(llama).model
    rewrite(expected, plan)  # the in-memory rewrite with the same plan
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, expected.eval()(input_ids=ids).logits
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)

    # Strict: a tensor missing from the shards (index and shards agreeing) is refused, not filled in.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "elsewhere.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CompressorError):
        compressor.load(out)


def test_streamed_output_exports_to_onnx(tmp_path):
    src = _llama(tmp_path / "llama", dtype=torch.float32)
    stream_compress(src, tmp_path / "s", mode="compress", rank=4, shard_bytes=40_000)
    torch.save({"input_ids": torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))},
               tmp_path / "ex.pt")
    report = compress(tmp_path / "s", tmp_path / "e", mode="export", progress=False, example_inputs=tmp_path / "ex.pt")
    assert report.to_dict()["passed"] and (tmp_path / "e/model.onnx").is_file()


def test_stream_gpt2_layout_transposed_and_tied(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    torch.set_num_threads(1)
    compress(tmp_path / "gpt2", tmp_path / "mem", mode="analyze", rank=4, progress=False)
    stream_compress(tmp_path / "gpt2", tmp_path / "stream", mode="analyze", rank=4)
    plan = (tmp_path / "stream/plan.json").read_text()
    assert (tmp_path / "mem/plan.json").read_text() == plan
    kinds = {lp["name"]: (lp["kind"], lp["reason"]) for lp in json.loads(plan)["layers"]}
    assert kinds["transformer.h.0.attn.c_attn"][0] == "hf-conv1d"
    assert "tied" in kinds["lm_head"][1] and "tied" in kinds["transformer.wte"][1]


@pytest.mark.slow
def test_stream_matches_in_memory_on_minilm_and_a_sharded_copy(minilm, tmp_path):
    from compressor.analysis.analyze import analyze

    src = Path(minilm_path())
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (sharded / f).write_bytes((src / f).read_bytes())
    from safetensors.torch import save_file

    # The same tensors in three shards, named by an index as transformers writes it.
    tensors = _tensors(src)
    names = list(tensors)
    weight_map = {}
    for i, part in enumerate((names[:30], names[30:70], names[70:]), 1):
        save_file({k: tensors[k] for k in part}, str(sharded / f"model-{i:05d}-of-00003.safetensors"))
        weight_map.update(dict.fromkeys(part, f"model-{i:05d}-of-00003.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.set_num_threads(1)
    opts = {"energy": 0.9, "include": ["embeddings.position_embeddings", "encoder.layer.[05].*"]}
    analyze(minilm[0], **opts).to_json(tmp_path / "mem.json")  # what `compress analyze` writes as plan.json
    stream_compress(src, tmp_path / "one", **opts)
    stream_compress(sharded, tmp_path / "three", **opts)
    ref = (tmp_path / "mem.json").read_bytes()
    assert json.loads(ref)["totals"]["layers_factored"] >= 6
    assert ref == (tmp_path / "one/plan.json").read_bytes() == (tmp_path / "three/plan.json").read_bytes()


def test_randomized_stream_records_the_check_in_the_plan(llama, tmp_path):
    stream_compress(llama, tmp_path / "r", rank=4, svd="randomized")
    layers = {lp["name"]: lp for lp in json.loads((tmp_path / "r/plan.json").read_text())["layers"]}
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q["rank"] == 4 and q["svd"]["rank"] == 4 and "bound" in q["svd"]
    assert q["svd"]["method"] in ("randomized", "exact")
    assert 0 < q["energy_kept"] < 1
    assert "svd" not in layers["model.embed_tokens"] or layers["model.embed_tokens"]["svd"]["method"]
    with pytest.raises(CompressorError, match="include pattern 'nope' matches no layer"):
        stream_compress(llama, tmp_path / "t", rank=4, include=["nope"])
    with pytest.raises(CompressorError, match="randomized SVD finds only") as err:
        stream_compress(llama, tmp_path / "t", target=0.3, svd="randomized")
    assert "--max-rank" in err.value.for_cli() and "\n" not in err.value.for_cli()
    with pytest.raises(CompressorError, match="device 'nosuch' cannot be used"):
        stream_compress(llama, tmp_path / "t", rank=4, device="nosuch")
    assert not state_dir(tmp_path / "t").exists()


def _decaying(path: Path) -> Path:
    """A bare .safetensors of a small MLP whose weights have decaying spectra (as trained weights do)."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for i, (m, n, decay) in enumerate([(96, 80, 0.85), (80, 64, 0.8), (120, 64, 0.9), (64, 96, 0.75)]):
        q1, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
        q2, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
        tensors[f"net.{i}.weight"] = (q1 * decay ** torch.arange(float(min(m, n)))) @ q2.T
        tensors[f"net.{i}.bias"] = torch.randn(m, generator=g)
    from safetensors.torch import save_file

    save_file(tensors, path)
    return path


def test_bounded_randomized_target_plans_the_ranks_of_the_exact_one(tmp_path):
    model = _decaying(tmp_path / "mlp.safetensors")
    exact = stream_compress(model, tmp_path / "exact", target=0.4, max_rank=12)
    rand = stream_compress(model, tmp_path / "rand", mode="compress", target=0.4, max_rank=12, svd="randomized")
    plans = {k: json.loads((tmp_path / k / "plan.json").read_text()) for k in ("exact", "rand")}
    ranks = {k: {lp["name"]: lp["rank"] for lp in p["layers"]} for k, p in plans.items()}
    assert ranks["exact"] == ranks["rand"] and exact.totals == rand.totals
    assert all(r is None or r <= 12 for r in ranks["rand"].values()) and any(ranks["rand"].values())
    assert rand.totals["removed_fraction"] >= 0.4  # above it by a step from dense to <= 12 at most
    assert plans["rand"]["policy"]["max_rank"] == 12 and plans["rand"]["policy"]["svd"] == "randomized"
    checks = [lp["svd"] for lp in plans["rand"]["layers"] if lp.get("svd")]
    assert len(checks) == 4 and all(c["method"] == "randomized" and c["rank"] == 12 for c in checks)
    report = json.loads((tmp_path / "rand/report.json").read_text())  # the in-memory job's report, streamed
    assert report["params_after"] == rand.totals["params_after"] < report["params_before"]
    assert [lp["rank"] for lp in report["layers"]] == list(ranks["rand"].values())
    st = report["stream"]
    assert set(st["seconds_per_layer"]) == set(ranks["rand"]) and st["peak_rss_gib"] >= st["peak_rss_analyze_gib"] > 0
    assert st["bytes_written"] == sum(p.stat().st_size for p in (tmp_path / "rand").glob("*.safetensors"))
    md = (tmp_path / "rand/report.md").read_text()
    assert "## Streamed run" in md and "4 layers randomized" in md and "| `net.3` |" in md
    weights = _tensors(tmp_path / "rand")  # the factors of the bounded ranks, from the same 12 triplets
    for name, r in ranks["rand"].items():
        if r is not None:
            assert weights[f"{name}.down.weight"].shape[0] == weights[f"{name}.up.weight"].shape[1] == r, name
    # Without a bound the spectrum is whole: the bound is what makes the ranks small here.
    stream_compress(model, tmp_path / "free", target=0.4)
    plan = json.loads((tmp_path / "free/plan.json").read_text())
    assert "max_rank" not in plan["policy"] and any((lp["rank"] or 0) > 12 for lp in plan["layers"])


def test_streamed_bare_safetensors_output_loads_into_the_users_module(tmp_path):
    from torch import nn

    import compressor

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 48), nn.ReLU(),
                             nn.Linear(48, 10)).to(torch.bfloat16)

    from safetensors.torch import save_file

    model = net()
    save_file(model.state_dict(), tmp_path / "net.safetensors")
    stream_compress(tmp_path / "net.safetensors", tmp_path / "out", mode="compress", rank=4, shard_bytes=2_000)
    assert (tmp_path / "out/model.safetensors.index.json").is_file()  # sharded: the index is followed
    with pytest.raises(CompressorError, match=r"holds only weights and their plan.*load_into"):
        compressor.load(tmp_path / "out")  # no architecture in the folder: hence load_into

    got = compressor.load_into(tmp_path / "out", net())
    expected = compressor.rewrite(model, compressor.analyze(model, rank=4))  # the same plan, in memory
    assert [type(m).__name__ for m in got.modules()] == [type(m).__name__ for m in expected.modules()]
    ref = expected.state_dict()
    assert {k: (t.dtype, t.shape) for k, t in got.state_dict().items()} == {k: (t.dtype, t.shape)
                                                                           for k, t in ref.items()}
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.allclose(got(x).float(), expected(x).float(), atol=0.05, rtol=0.05)
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(compressor.PlanError, match="is Linear in the model but"):
        compressor.load_into(tmp_path / "out", other)
    assert isinstance(other[0], nn.Linear)  # a plan that does not fit changes nothing


# ---------------------------------------------------------------------------------------- resumable

_SLOW_RUN = """
import sys, time
import compressor.jobs.stream as s
import compressor.jobs.stream_workers as w
run = w.timed_layer
def slow(task):
    time.sleep(0.15)  # long enough for the test to kill the run between layers
    return run(task)
w.timed_layer = slow
s.stream_compress(sys.argv[1], sys.argv[2], mode="compress", energy=0.8, workers=1, shard_bytes=40_000)
"""


def test_sigkill_then_rerun_continues_and_writes_the_same_bytes(llama, tmp_path):
    stream_compress(llama, tmp_path / "whole", mode="compress", energy=0.8, workers=1, shard_bytes=40_000)
    out = tmp_path / "killed"
    layers = state_dir(out) / "layers"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(llama), str(out)], env=env)
    try:
        deadline = time.time() + 60
        # count seals, not files: a kill between a layer file and its seal leaves the layer to be redone
        while time.time() < deadline and len(list(layers.glob("*.sha256")) if layers.is_dir() else []) < 3:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = len(list(layers.glob("*.sha256")))  # sealed: finished (a file without its seal is redone)
    assert proc.returncode == -signal.SIGKILL and 3 <= done < 16 and not out.exists()

    # The rest in a process pool: resumed and parallel, the bytes are those of the serial whole run.
    summary = stream_compress(llama, out, mode="compress", energy=0.8, workers=2, shard_bytes=40_000)
    assert summary.resumed_layers == done and summary.workers == 2
    assert _bytes(out) == _bytes(tmp_path / "whole")


def test_a_changed_setting_is_refused_in_one_line_or_restarted(llama, tmp_path):
    out = tmp_path / "o"
    state = state_dir(out)
    (state / "layers").mkdir(parents=True)
    stamp = {"format": 2, "checkpoint": "other", "settings": {}}
    write_sealed(state / "fingerprint.json", json.dumps(stamp).encode())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "compressor", "analyze", str(llama), "--stream", "--rank", "4",
                        "--out", str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "the model files, settings changed" in r.stderr and "--restart" in r.stderr
    with pytest.raises(CompressorError, match="the model files, settings changed"):
        stream_compress(llama, out, rank=4)
    summary = stream_compress(llama, out, rank=4, restart=True)
    assert summary.resumed_layers == 0 and (out / "plan.json").is_file() and not state.exists()


def test_one_byte_changed_in_place_with_size_and_mtime_restored_is_refused(tmp_path, monkeypatch):
    model = _llama(tmp_path / "m")
    out = tmp_path / "o"
    import compressor.jobs.stream_workers as w

    run, calls = w.timed_layer, []

    def crash_after_two(task):  # a run that dies after two finished layers, leaving its state behind
        if len(calls) == 2:
            raise RuntimeError("killed")
        calls.append(task.name)
        return run(task)

    monkeypatch.setattr(w, "timed_layer", crash_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        stream_compress(model, out, rank=4)
    monkeypatch.setattr(w, "timed_layer", run)
    assert len(list((state_dir(out) / "layers").glob("*.safetensors"))) == 2

    # One byte in the middle of a weight's data, size and mtime put back: only the content differs.
    from compressor.formats.shards import Checkpoint

    key = "model.layers.1.mlp.down_proj.weight"
    shard = Checkpoint.open(model).tensors[key].file
    with open(shard, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        start, end = json.loads(f.read(header))[key]["data_offsets"]
    where = 8 + header + (start + end) // 2
    st = os.stat(shard)
    with open(shard, "r+b") as f:
        f.seek(where)
        old = f.read(1)
        f.seek(where)
        f.write(bytes([old[0] ^ 0x01]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(shard).st_size == st.st_size and os.stat(shard).st_mtime_ns == st.st_mtime_ns

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "compressor", "analyze", str(model), "--stream", "--rank", "4", "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
    assert "(the model files changed)" in r.stderr and "--restart" in r.stderr
    summary = stream_compress(model, out, rank=4, restart=True)
    assert summary.resumed_layers == 0 and (out / "plan.json").is_file() and not state_dir(out).exists()


# ------------------------------------------------------------------------------------------ parallel


@pytest.mark.slow  # starting Ray takes about 20 s here
def test_ray_local_gives_the_serial_plan(llama, tmp_path):
    pytest.importorskip("ray")
    stream_compress(llama, tmp_path / "serial", energy=0.8, workers=1)
    stream_compress(llama, tmp_path / "ray", energy=0.8, ray="local", workers=2)
    assert (tmp_path / "serial/plan.json").read_bytes() == (tmp_path / "ray/plan.json").read_bytes()
    assert json.loads((tmp_path / "ray/stream.json").read_text())["ray"] == "local"


@pytest.mark.slow
def test_streaming_benchmark_tiny_variant(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import streaming

    assert streaming.main(["--tiny", "--layers", "3", "--analyse", "1", "--rank", "4", "--dir",
                           str(tmp_path / "work"), "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "streaming_tiny.json").read_text())
    assert 0 < res["run"]["peak_rss_gib"] < 4 and res["run"]["layers"] == 7
    assert set(res["exact_svd_floor_s"]) == set(res["run"]["seconds_per_layer"])  # --floor-layers 1 = --analyse
    assert res["run"]["output_bytes"] > 0 and not (tmp_path / "work").exists()  # the checkpoint is deleted
