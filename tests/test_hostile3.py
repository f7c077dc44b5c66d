"""Hostile inputs, round three: the surfaces added since the last round (streamed resume state, LoRA merge
and extract, links and special files in model folders, checkpoint JSON, plans, ONNX, Ray, SVD sizes).

Each case runs as a user runs it (``python -m compressor`` in a subprocess) and checks the contract: exit 2,
one stderr line naming the problem and the fix, no traceback, the folder it ran in unchanged byte for byte
(inputs, and the tool's own state) with nothing left behind, in bounded time and memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_hostile_formats import snapshot

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
    import compressor.jobs.stream_workers as w

    run, calls = w.timed_layer, []

    def dies(task):
        if len(calls) == after:
            raise RuntimeError("killed")
        calls.append(task.name)
        return run(task)

    with monkeypatch.context() as m:
        m.setattr(w, "timed_layer", dies)
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


# -------------------------------------------------------------------------------- 2. lora merge / extract


def _mlp(extra: bool = False) -> nn.Module:
    layers = [nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5)]
    return nn.Sequential(*layers, *([nn.Tanh(), nn.Linear(5, 5)] if extra else []))


@pytest.fixture(scope="module")
def lora_assets(tmp_path_factory) -> Path:
    """A base model file, a trained-looking adapter for it, a tuned copy and one with an extra layer."""
    from compressor.train.adapter import Adapter
    from compressor.train.lora import apply_lora

    d = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = _mlp()
    torch.save(base, d / "base.pt")
    tuned = _mlp()
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned[0].weight.add_(0.01 * torch.randn(24, 1) @ torch.randn(1, 12))
    torch.save(tuned, d / "tuned.pt")
    wider = _mlp(extra=True)
    wider.load_state_dict({**base.state_dict(), **{k: v for k, v in wider.state_dict().items() if k.startswith("4.")}})
    torch.save(wider, d / "tuned_extra.pt")
    wrapped = _mlp()
    wrapped.load_state_dict(base.state_dict())
    for w in apply_lora(wrapped, rank=2, alpha=4).values():
        nn.init.normal_(w.lora_B, std=0.1)
    Adapter.from_model(wrapped).save(d / "adapter")
    return d


@pytest.fixture
def lwork(lora_assets, tmp_path) -> Path:
    shutil.copytree(lora_assets, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


MERGE = ["lora", "merge", "base.pt", "adapter", "--out", "merged"]


def _config(**changes):
    def edit(folder: Path) -> None:
        path = folder / "adapter" / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)


def _fifo_config(folder: Path) -> None:
    path = folder / "adapter" / "adapter_config.json"
    path.unlink()
    os.mkfifo(path)


def _link(name: str, target: str):
    def edit(folder: Path) -> None:
        path = folder / "adapter" / name
        if target != "/dev/zero":
            shutil.copyfile(path, folder / target)
        path.unlink()
        path.symlink_to(target if target == "/dev/zero" else Path("..") / target)
    return edit


@pytest.mark.parametrize("edit, words", [
    (_config(lora_alpha=float("nan")), ["lora_alpha nan", "not a finite"]),
    (_config(lora_alpha=1e308), ["non-finite weights", "lora_alpha"]),
    (_nan_weights, ["not finite numbers"]),
    (_config(target_modules=["nothing"]), ["not among its target_modules", "peft would not load it"]),
    (_config(target_modules="nothing"), ["not among its target_modules"]),
    (_config(r=None), ["has r None"]),
    (_config(lora_alpha="16"), ["lora_alpha '16'"]),
    (_config(rank_pattern=[1, 2]), ["rank_pattern"]),
    (_config(alpha_pattern={"0": "x"}), ["alpha_pattern"]),
    (_fifo_config, ["named pipe"]),
    (_link("adapter_config.json", "/dev/zero"), ["leads outside"]),
    (_link("adapter_model.safetensors", "outside.safetensors"), ["leads outside", "outside.safetensors"]),
])
def test_lora_merge_refuses(lwork, edit, words):
    edit(lwork)
    refused_untouched(MERGE, lwork, *words)


def test_lora_merge_of_the_intact_adapter_works(lwork):
    """The baseline the cases above break."""
    res = cli(MERGE, lwork)
    assert res.returncode == 0, res.stderr
    assert (lwork / "merged").is_dir()


def test_lora_extract_names_layers_only_the_tuned_model_has(lwork):
    refused_untouched(["lora", "extract", "base.pt", "tuned_extra.pt", "--rank", "2", "--out", "x"], lwork,
                      "tuned model has 1 layer(s) the base model lacks (4)", "same architecture")
    res = cli(["lora", "extract", "base.pt", "tuned.pt", "--rank", "2", "--out", "x"], lwork)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------- 3. links out of the folder, special files


def _link_out(work: Path, name: str) -> None:
    """Replace ``m/name`` by a link to a copy of it outside the model's folder."""
    shutil.copyfile(work / "m" / name, work / f"outside-{name}")
    (work / "m" / name).unlink()
    (work / "m" / name).symlink_to(Path("..") / f"outside-{name}")


def test_stream_companion_linked_out_of_the_folder_is_not_copied(work):
    (work / "secret.txt").write_text("not part of the model\n")
    (work / "m" / "notes.txt").symlink_to(Path("..") / "secret.txt")
    refused_untouched(STREAM, work, "notes.txt", "leads outside", "secret.txt")


def test_stream_companion_fifo_is_refused_before_any_work(work):
    os.mkfifo(work / "m" / "notes.txt")
    refused_untouched(STREAM, work, "notes.txt", "named pipe")


def test_stream_shard_linked_out_of_the_folder_is_not_read(work):
    shard = sorted((work / "m").glob("model-*.safetensors"))[1].name
    _link_out(work, shard)
    refused_untouched(STREAM, work, shard, "leads outside")
    refused_untouched(["analyze", "m", "--stream", "--rank", "4", "--out", "o"], work, shard, "leads outside")


def test_links_of_a_hugging_face_cache_snapshot_are_inside_the_rule(tmp_path):
    """The hub cache keeps a snapshot's files as links into the repository's blobs/: those are followed."""
    from compressor.core.errors import CompressorError
    from compressor.core.fileio import file_in_folder

    snap = tmp_path / "models--x" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (tmp_path / "models--x" / "blobs").mkdir()
    (tmp_path / "models--x" / "blobs" / "123").write_text("{}")
    (tmp_path / "models--x" / "refs").write_text("abc")
    (snap / "config.json").symlink_to("../../blobs/123")
    (snap / "refs").symlink_to("../../refs")
    assert file_in_folder(snap, snap / "config.json") == snap / "config.json"
    with pytest.raises(CompressorError, match="leads outside"):
        file_in_folder(snap, snap / "refs")


# ------------------------------------------------------------------------- 4. checkpoint JSON and tensors

DEEP = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit: a RecursionError for json.loads


@pytest.fixture(scope="module")
def heal_run(tmp_path_factory) -> Path:
    """A compressed MLP, its training data and a finished checkpointed heal run (steps 0, 2, 4) in ``ck``."""
    import copy

    import compressor
    from compressor.jobs.heal import heal_folder
    from compressor.train.heal import HealConfig

    d = tmp_path_factory.mktemp("heal")
    torch.manual_seed(0)
    teacher = _mlp()
    torch.save(teacher, d / "teacher.pt")
    plan = compressor.analyze(teacher, rank=3)
    compressor.save(compressor.rewrite(copy.deepcopy(teacher), plan), d / "small", plan,
                    source=compressor.load_model(d / "teacher.pt"))
    x = torch.randn(120, 12)
    torch.save({"inputs": x, "targets": teacher(x).argmax(-1).detach()}, d / "train.pt")
    heal_folder(d / "small", d / "done", data=d / "train.pt", config=HealConfig(steps=4, every=2),
                checkpoint_dir=d / "ck", progress=False)
    shutil.rmtree(d / "done")
    return d


@pytest.fixture
def hwork(heal_run, tmp_path) -> Path:
    shutil.copytree(heal_run, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


RESUME = ["heal", "small", "--data", "train.pt", "--steps", "4", "--every", "2", "--checkpoint-dir", "ck",
          "--resume", "--quiet"]
NEWEST = "ck/step-00000004"


def resign(step: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and record its new size and sha256 in COMPLETE.json, so that only a check
    of its content can catch the change."""
    (step / name).write_bytes(data)
    marker = json.loads((step / "COMPLETE.json").read_text())
    marker["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "COMPLETE.json").write_text(json.dumps(marker))


def _tensors_edit(edit):
    def apply(work: Path) -> None:
        from safetensors.torch import load, save

        step = work / NEWEST
        tensors = load((step / "tensors.safetensors").read_bytes())
        edit(tensors)
        resign(step, "tensors.safetensors", save(tensors, metadata={"format": "1"}))
    return apply


def test_deep_checkpoints_json(hwork):
    (hwork / "ck" / "checkpoints.json").write_text(DEEP)
    res = cli(["checkpoints", "ck"], hwork)  # only a summary: the listing goes on without it
    assert res.returncode == 0 and "Traceback" not in res.stderr and "step" in res.stdout, res.stderr
    refused_untouched(["checkpoints", "ck", "--plot", "p.png"], hwork, "checkpoints.json", "nests deeper")


def test_checkpoints_json_history_of_the_wrong_type(hwork):
    path = hwork / "ck" / "checkpoints.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "history": [{"step": "x", "metrics": 3}]}))
    refused_untouched(["checkpoints", "ck", "--plot", "p.png"], hwork, "malformed", "history holds")


def test_deep_state_json(hwork):
    resign(hwork / NEWEST, "state.json", DEEP.encode())
    for args in (RESUME, ["checkpoints", "diff", "ck/step-00000002", NEWEST]):
        refused_untouched(args, hwork, "malformed", "nests deeper")
    refused_untouched(["checkpoints", "ck"], hwork, "refused", "nests deeper")


def test_deep_complete_json(hwork):
    (hwork / NEWEST / "COMPLETE.json").write_text(DEEP)
    refused_untouched(["checkpoints", "diff", "ck/step-00000002", NEWEST], hwork, "completeness marker is unreadable")
    res = cli(["checkpoints", "ck"], hwork)  # damage a crash could leave: listed as INVALID
    assert res.returncode == 0 and "INVALID: completeness marker is unreadable" in res.stdout, res.stderr


def test_optimizer_state_of_the_wrong_shape(hwork):
    _tensors_edit(lambda t: t.update({"optim.0.exp_avg": torch.zeros(7, 7)}))(hwork)
    refused_untouched(RESUME, hwork, "optimizer state 0.exp_avg is [7, 7]", "resume with the same model")


def test_adapter_of_mismatched_shapes_in_a_checkpoint(hwork):
    _tensors_edit(lambda t: t.update({"param.0.lora_A": torch.zeros(2, 12), "param.0.lora_B": torch.zeros(24, 3)}))(
        hwork)
    refused_untouched(["checkpoints", "diff", "ck/step-00000002", NEWEST], hwork, "lora_A [2, 12]", "do not multiply")


# ------------------------------------------------------------------------------------------------- 5. plans


@pytest.fixture
def pwork(tmp_path) -> Path:
    """A small MLP with an unsupported layer (a depthwise conv) and its analysed plan."""
    import compressor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 6))
    torch.save(model, tmp_path / "m.pt")
    compressor.analyze(model, rank=4).to_json(tmp_path / "plan.json")
    return tmp_path


def _plan_edit(edit):
    def apply(folder: Path) -> None:
        path = folder / "plan.json"
        plan = json.loads(path.read_text())
        edit(plan)
        path.write_text(json.dumps(plan))
    return apply


def _layer(name: str, **changes):
    return _plan_edit(lambda p: next(lp for lp in p["layers"] if lp["name"] == name).update(changes))


APPLY = ["apply", "m.pt", "plan.json", "--input-shape", "1x4x8", "--out", "o"]


@pytest.mark.parametrize("edit, words", [
    (_layer("2", shape=[32, 20]), ["layer '2' is [32, 24] in the model but [32, 20] in the plan"]),
    (_plan_edit(lambda p: p["layers"].append(dict(p["layers"][1]))), ["lists layer '2' twice"]),
    (_layer("0", rank=1), ["layer '0' has rank 1", "cannot be factored", "null"]),
    (_plan_edit(lambda p: p.update(layers=[])), ["lists no layers"]),
    (_layer("2", shape="32x24"), ["wrong type"]),
    (lambda f: (f / "plan.json").write_text(DEEP), ["nests deeper"]),
])
def test_apply_refuses_a_plan_that_does_not_describe_the_model(pwork, edit, words):
    edit(pwork)
    refused_untouched(APPLY, pwork, *words)


def test_apply_of_the_plan_as_written_works(pwork):
    res = cli(APPLY, pwork)
    assert res.returncode == 0, res.stderr


# -------------------------------------------------------------------------------------------------- 6. ONNX


def onnx_mlp(path: Path, *, opset: int = 17, in_shape=(1, 16), weight_input: bool = False,
             external: bool = False) -> Path:
    """x [in_shape] -> MatMul fc.weight [16, 32] -> Tanh -> MatMul fc2.weight [32, 8] -> y."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
               for n, s in (("fc.weight", (16, 32)), ("fc2.weight", (32, 8)))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*in_shape[:-1], 8])
    nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["h"], name="mm1"), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "fc2.weight"], ["y"], name="mm2")]
    inputs = [x, *([helper.make_tensor_value_info("fc.weight", TensorProto.FLOAT, [16, 32])] if weight_input else [])]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [y], weights),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path, save_as_external_data=external, location="w.data", size_threshold=0)
    return path


@pytest.mark.parametrize("make, words", [
    (lambda d: onnx_mlp(d / "m.onnx", opset=99), ["opset 99", "1 to"]),
    (lambda d: onnx_mlp(d / "m.onnx", in_shape=(100000, 100000, 16)), ["[100000, 100000, 16]", "--input-shape"]),
    (lambda d: (d / "m.onnx").write_bytes(onnx_mlp(d / "full.onnx").read_bytes()[:200]),
     ["does not load as ONNX", "m.onnx"]),
])
def test_onnx_inputs_refused(tmp_path, make, words):
    make(tmp_path)
    refused_untouched(["m.onnx", "--rank", "4", "--out", "o"], tmp_path, *words)


def test_onnx_external_data_linked_out_of_the_folder(tmp_path):
    onnx_mlp(tmp_path / "m" / "m.onnx", external=True)
    (tmp_path / "m" / "w.data").rename(tmp_path / "w.data")
    (tmp_path / "m" / "w.data").symlink_to(Path("..") / "w.data")
    refused_untouched(["m/m.onnx", "--rank", "4", "--out", "o"], tmp_path, "w.data", "symbolic link")


def test_onnx_weight_that_is_also_a_graph_input_keeps_that_input(tmp_path):
    import onnx

    onnx_mlp(tmp_path / "m.onnx", weight_input=True)
    res = cli(["m.onnx", "--rank", "4", "--out", "o", "--quiet"], tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    out = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert [i.name for i in out.graph.input] == ["x", "fc.weight"]
    plan = {lp["name"]: lp for lp in json.loads((tmp_path / "o" / "plan.json").read_text())["layers"]}
    assert plan["fc"]["rank"] is None and "also a graph input" in plan["fc"]["reason"]
    assert plan["fc2"]["rank"] == 4


# --------------------------------------------------------------------------------------------------- 7. Ray


def test_ray_address_that_does_not_answer_is_refused_at_once(work):
    import socket

    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = refused_untouched([*STREAM, "--ray", f"127.0.0.1:{port}"], work, f"Ray at 127.0.0.1:{port} does not answer",
                             "ray start --head")
    assert "--ray" in line
    refused_untouched([*STREAM, "--ray", "nowhere"], work, "is not HOST:PORT")


# ------------------------------------------------------------- 8. property: mutated state files of the tool

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def mutate(data: bytes, how: str, where: float, junk: bytes) -> bytes:
    """One kind of damage to a file's bytes: a flipped bit, a cut, junk written over or appended, or all gone."""
    i = min(int(where * len(data)), max(len(data) - 1, 0))
    if how == "flip" and data:
        return data[:i] + bytes([data[i] ^ (1 << int(where * 8) % 8)]) + data[i + 1:]
    if how == "cut":
        return data[:i]
    if how == "overwrite":
        return data[:i] + junk + data[i + len(junk):]
    if how == "append":
        return data + junk
    return b""


damage = st.tuples(st.sampled_from(["flip", "cut", "overwrite", "append", "empty", "delete"]),
                   st.floats(0, 1), st.binary(min_size=1, max_size=32))


@pytest.fixture(scope="module")
def crashed_state(model_dir, tmp_path_factory) -> Path:
    """A folder with the model and the state a streamed run left when it died after 3 layers."""
    d = tmp_path_factory.mktemp("crashed")
    shutil.copytree(model_dir, d / "m")
    with pytest.MonkeyPatch.context() as mp:
        crashed_run(d, mp)
    return d


def _apply(path: Path, how: str, where: float, junk: bytes) -> None:
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(mutate(path.read_bytes(), how, where, junk))


@PROPERTY
@given(pick=st.floats(0, 1), damage=damage)
def test_property_mutated_stream_state_refuses_or_gives_the_clean_bytes(crashed_state, clean_stream, tmp_path_factory,
                                                                       pick, damage):
    from compressor.core.errors import CompressorError
    from compressor.jobs.stream import state_dir, stream_compress

    d = tmp_path_factory.mktemp("run")
    shutil.copytree(crashed_state, d, dirs_exist_ok=True)
    files = sorted(p for p in state_dir(d / "o").rglob("*") if p.is_file())
    _apply(files[min(int(pick * len(files)), len(files) - 1)], *damage)
    try:
        stream_compress(d / "m", d / "o", mode="compress", rank=4)
    except CompressorError as err:
        assert "\n" not in str(err) and "--restart" in err.for_cli(), str(err)
        return
    assert output_bytes(d / "o") == clean_stream


@PROPERTY
@given(name=st.sampled_from(["state.json", "COMPLETE.json", "tensors.safetensors"]), damage=damage)
def test_property_mutated_checkpoint_refuses_or_gives_the_clean_diff(heal_run, tmp_path_factory, name, damage):
    from compressor.core.errors import CompressorError
    from compressor.train.diff import diff_weights, format_diff, read_weights

    def diff(root: Path) -> str:
        return format_diff(diff_weights(read_weights(root / "ck/step-00000002"), read_weights(root / NEWEST)))

    d = tmp_path_factory.mktemp("ck")
    shutil.copytree(heal_run / "ck", d / "ck")
    clean = diff(d).replace(str(d), "ROOT")
    _apply(d / NEWEST / name, *damage)
    try:
        got = diff(d)
    except CompressorError as err:
        assert "\n" not in str(err)
        return
    assert got.replace(str(d), "ROOT") == clean


json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=6)


@PROPERTY
@given(key=st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "lora_dropout",
                            "use_rslora", "peft_type"]), value=json_values)
def test_property_mutated_adapter_config_refuses_or_merges_finite_weights(lora_assets, tmp_path_factory, key, value):
    """An adapter's config is a user's file (no seal): any value is refused in one line or merged into finite
    weights, never a traceback or NaN written."""
    from safetensors.torch import load_file

    from compressor.core.errors import CompressorError
    from compressor.jobs.lora import merge_folder

    d = tmp_path_factory.mktemp("adapter")
    shutil.copytree(lora_assets / "adapter", d / "adapter")
    path = d / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    try:
        merge_folder(lora_assets / "base.pt", d / "adapter", d / "out")
    except CompressorError as err:
        assert "\n" not in str(err) and not (d / "out").exists()
        return
    weights = load_file(next((d / "out").glob("*.safetensors")))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


@PROPERTY
@given(field=st.sampled_from(["rank", "shape", "name", "supported", "kind", "matrix_shape"]), layer=st.integers(0, 2),
       value=json_values)
def test_property_mutated_plan_refuses_or_applies(tmp_path_factory, field, layer, value):
    """A plan is edited by users: any value is refused in one line or applied, never a traceback."""
    import compressor
    from compressor.core.errors import CompressorError
    from compressor.core.plan import Plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 6))
    data = compressor.analyze(model, rank=4).to_dict()
    data["layers"][layer][field] = value
    try:
        plan = compressor.analyze(model, plan=Plan.from_dict(data))
        compressor.rewrite(model, plan)
    except CompressorError as err:
        assert "\n" not in str(err)
        return
    assert model(torch.randn(2, 4, 8)).isfinite().all()


# ------------------------------------------------------------------------------------------ 9. SVD size guard


def test_exact_svd_too_large_is_refused_before_reading(tmp_path):
    """A sparse 3.6 GB safetensors file holding one 30000x30000 matrix: refused before it is read or hashed
    (an exact SVD of it overflows LAPACK's 32-bit workspace: torch failed with an internal assert)."""
    header = json.dumps({"fc.weight": {"dtype": "F32", "shape": [30000, 30000],
                                       "data_offsets": [0, 4 * 30000 * 30000]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 4 * 30000 * 30000)  # sparse: no disk used
    before = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()]  # not hashed: 3.6 GB
    res = cli(["analyze", "big.safetensors", "--stream", "--rank", "8", "--out", "o"], tmp_path,
              memory=8 << 30)  # the file is mapped whole: room for 3.6 GB of address space
    refused(res, "layer 'fc' (30000x30000) is too large for an exact SVD", "--svd randomized --max-rank")
    assert [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()] == before
