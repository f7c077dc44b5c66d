"""Outputs appear whole or not at all, never replace an input, and survive SIGINT and SIGTERM.

Every case runs the command-line tool as a user would (``python -m compressor`` in a subprocess) and checks
the exit code, one line on stderr without a traceback, and that the folder it ran in holds byte for byte
what it held before (the inputs unchanged, no output, no temporary file or folder, no lock).
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_file, atomic_folder, clean_stale, folder_lock, is_ours, temp_name
from compressor.core.output import check_not_over_inputs
from compressor.examples import digits_cnn, minilm_path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
CNN_ARGS = ("--energy", "0.9", "--input-shape", "1x1x8x8", "--quiet")


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too): a file's sha256, a link's target, or 'dir'."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(*args, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300, **kw)


def one_error(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def work(tmp_path) -> Path:
    """A folder with a pickled CNN (d/cnn.pt), a compressed folder (c/), inputs files, a plan."""
    from compressor.formats.save import save

    torch.manual_seed(0)
    model = digits_cnn()
    (tmp_path / "d").mkdir()
    torch.save(model, tmp_path / "d" / "cnn.pt")
    save(model, tmp_path / "c")
    torch.save(torch.randn(4, 1, 8, 8), tmp_path / "d" / "x.pt")
    return tmp_path


# ----------------------------------------------------------------------------- outputs over inputs


@pytest.mark.parametrize("case", [
    "model-in-out", "export-dir-onto-itself", "analyze-dir-onto-itself", "out-dot", "out-inside-input-dir",
    "calibration-in-out", "example-inputs-is-out", "plan-in-out", "symlinked-input-dir", "out-is-symlink-to-input",
    "heal-data-in-out", "heal-checkpoints-in-out", "search-cache-is-out",
])
def test_output_over_an_input_is_refused_before_any_work(work, case):
    plan = work / "d" / "plan.json"
    plan.write_text("{}")
    (work / "link").symlink_to(work / "c")
    (work / "outlink").symlink_to(work / "d")
    args, cwd = {
        "model-in-out": ((work / "d" / "cnn.pt", *CNN_ARGS, "--out", work / "d", "--force"), work),
        "export-dir-onto-itself": (("export", "c", "--input-shape", "1x1x8x8", "--out", "c", "--force"), work),
        "analyze-dir-onto-itself": (("analyze", "c", "--energy", "0.9", "--out", "c", "--force"), work),
        "out-dot": (("cnn.pt", *CNN_ARGS, "--out", ".", "--force"), work / "d"),
        "out-inside-input-dir": (("export", "c", "--input-shape", "1x1x8x8", "--out", "c/sub"), work),
        "calibration-in-out": (("c", *CNN_ARGS, "--calibration", "d/x.pt", "--out", "d", "--force"), work),
        "example-inputs-is-out": (("export", "c", "--example-inputs", "d/x.pt", "--out", "d/x.pt", "--force"),
                                  work),
        "plan-in-out": (("apply", "c", "d/plan.json", "--input-shape", "1x1x8x8", "--out", "d", "--force"), work),
        "symlinked-input-dir": (("export", "link", "--input-shape", "1x1x8x8", "--out", "c/new"), work),
        "out-is-symlink-to-input": (("d/cnn.pt", *CNN_ARGS, "--out", "outlink", "--force"), work),
        "heal-data-in-out": (("heal", "c", "--data", "d/x.pt", "--out", "d", "--force"), work),
        "heal-checkpoints-in-out": (("heal", "c", "--data", "d/x.pt", "--checkpoint-dir", "h/ck", "--out", "h"),
                                    work),
        "search-cache-is-out": (("search", "d/cnn.pt", "--max-size", "0.5", "--input-shape", "1x1x8x8",
                                 "--cache", "s", "--out", "s"), work),
    }[case]
    before = snapshot(work)
    res = cli(*args, cwd=cwd)
    if case == "heal-checkpoints-in-out":  # heal's own check of --checkpoint-dir answers first
        one_error(res, 2, "--checkpoint-dir h/ck is the output folder or inside it")
    else:
        one_error(res, 2, "error: the output folder", "choose an --out outside every input")
    assert snapshot(work) == before


def test_check_not_over_inputs_resolves_links_and_allows_siblings(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "m")
    check_not_over_inputs(tmp_path / "m.compressed", [("model", tmp_path / "m"), ("plan", None)])
    check_not_over_inputs(tmp_path / "mm", [("model", tmp_path / "m")])  # a name prefix is no parent
    for out in (tmp_path / "alias", tmp_path / "alias" / "x", tmp_path, tmp_path / "m" / ".." / "m"):
        with pytest.raises(CompressorError, match="outside every input"):
            check_not_over_inputs(out, [("model", tmp_path / "m")])


# ------------------------------------------------------------------------------ where it cannot go


def test_out_that_is_a_file_or_under_a_file_is_one_line(work):
    (work / "f").write_text("not a folder")
    before = snapshot(work)
    for out, needle in (("f", "is a file"), ("f/sub", "cannot write the output folder")):
        res = cli("d/cnn.pt", *CNN_ARGS, "--out", out, "--force", cwd=work)
        one_error(res, 2, f"'{out}'", needle)
    assert snapshot(work) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_one_line(work):
    (work / "ro").mkdir()
    (work / "ro").chmod(0o555)
    before = snapshot(work)
    try:
        res = cli("d/cnn.pt", *CNN_ARGS, "--out", "ro/out", cwd=work)
    finally:
        (work / "ro").chmod(0o755)
    one_error(res, 2, "cannot write the output folder")
    assert snapshot(work) == before


def _small_files(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_while_writing_leaves_nothing(work):
    before = snapshot(work)
    res = cli("d/cnn.pt", *CNN_ARGS, "--out", "out", cwd=work, preexec_fn=_small_files(200_000))
    one_error(res, 2, "cannot write the output folder 'out'")
    assert snapshot(work) == before


# ------------------------------------------------------------------------------------- races, locks


def test_a_second_writer_of_the_same_out_is_refused(work):
    before = snapshot(work)
    with folder_lock(work / "out"):  # what a running compress holds while it writes 'out'
        res = cli("d/cnn.pt", *CNN_ARGS, "--out", "out", "--force", cwd=work)
        one_error(res, 2, "another compress run is writing 'out'")
    assert snapshot(work) == before  # the lock file goes with its holder


def test_two_racing_runs_leave_one_whole_folder(work):
    procs = [subprocess.Popen([sys.executable, "-m", "compressor", "d/cnn.pt", *CNN_ARGS, "--out", "out",
                               "--force"], cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    assert 0 in [rc for _, _, rc in results], results
    for _, err, rc in results:
        if rc:
            assert rc == 2 and "another compress run is writing 'out'" in err and "Traceback" not in err
    assert {"model.onnx", "report.json", "model.safetensors"} <= {p.name for p in (work / "out").iterdir()}
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_a_failed_run_removes_the_parents_it_made(work):
    before = snapshot(work)
    res = cli("export", "d/cnn.pt", "--input-shape", "1x3x8x8", "--quiet", "--out", "new/deeper/out", cwd=work)
    one_error(res, 2, "fails on the example inputs")  # found inside the output folder being built
    assert snapshot(work) == before


def test_existing_folder_is_refused_again_when_publishing(tmp_path):
    with pytest.raises(CompressorError, match="already exists"), atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a").write_text("new")
        (tmp_path / "out").mkdir()  # appeared while the run worked
        (tmp_path / "out" / "theirs").write_text("keep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "theirs").read_text() == "keep"
    with atomic_folder(tmp_path / "out", force=True) as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "out"]


def test_stale_temporaries_and_locks_of_dead_runs_are_cleaned(work):
    dead = subprocess.Popen(["true"])
    dead.wait()
    junk = [work / f".out.tmp-compressor-{dead.pid}-abcdef", work / f".out.old-compressor-{dead.pid}-012345"]
    for j in junk:
        j.mkdir()
        (j / "model.safetensors").write_bytes(b"x" * 1000)
    (work / f".cnn.pt.tmp-compressor-{dead.pid}-a1b2c3").write_bytes(b"half a file")
    (work / ".out.lock").write_text(f"{dead.pid}\n")  # its holder died: the kernel freed the flock
    live = temp_name(work / "out")  # this process is alive: its temporary is not ours to remove
    live.mkdir()
    mine = work / ".out.tmp-compressor-1-zzzzzz"  # not our exact form: left alone
    mine.mkdir()
    res = cli("d/cnn.pt", *CNN_ARGS, "--out", "out", cwd=work)
    assert res.returncode == 0, res.stderr
    left = sorted(p.name for p in work.iterdir() if p.name.startswith("."))
    assert left == sorted([live.name, mine.name, f".cnn.pt.tmp-compressor-{dead.pid}-a1b2c3"])
    assert clean_stale(work) == [work / f".cnn.pt.tmp-compressor-{dead.pid}-a1b2c3"]
    assert is_ours(live.name) and not is_ours(mine.name)


def test_atomic_file_keeps_the_old_file_on_failure(tmp_path):
    (tmp_path / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "f") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["f"] and (tmp_path / "f").read_text() == "old"


# ----------------------------------------------------------------------------------------- signals


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def _temps(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.glob(f".{name}.tmp-compressor-*")]


def _moment(when: str, work: Path, out: str):
    if when == "start":
        return lambda: True
    if when == "analysis":  # the output's temporary folder exists as soon as the model is loaded
        return lambda: bool(_temps(work, out))
    if when == "save":  # plan.json written: rewriting and saving the weights
        return lambda: any((t / "plan.json").exists() for t in _temps(work, out))
    if when == "export":  # the ONNX file's own temporary folder, inside the output's
        return lambda: any(_temps(t, "model.onnx") for t in _temps(work, out))
    raise ValueError(when)


def _default_sigint() -> None:
    """The child takes SIGINT even when the tests run in a background job, which ignores it (a Python started
    with SIGINT ignored keeps ignoring it, as a user's `nohup`/`&` run should)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(args, work: Path, sig: int, when: str, out: str = "X", delay: float = 0.0) -> None:
    before = snapshot(work)
    for _attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "compressor", *map(str, args), "--out", out], cwd=work,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_sigint)
        try:
            reached = _wait_for(_moment(when, work, out), proc)
            time.sleep(delay)
            assert reached, f"the run ended before '{when}': {proc.communicate()}"
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            break
        # On a loaded machine this process can be descheduled between seeing the moment and signalling, and
        # a small run finishes meanwhile: then its output must be whole (published by one rename). Try again.
        assert (work / out / "model.onnx").is_file() and not _temps(work, out), snapshot(work)
        shutil.rmtree(work / out)
    one_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), 128 + sig,
              "interrupted: nothing was written")
    assert snapshot(work) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("when", ["start", "analysis", "save", "export"])
def test_signal_during_a_cnn_run_leaves_only_the_input(work, sig, when):
    interrupt(["d/cnn.pt", "--energy", "0.9", "--input-shape", "1x1x8x8", "--int8"], work, sig, when,
              delay=0.5 if when == "start" else 0.0)


@pytest.mark.slow
@pytest.mark.minilm
@pytest.mark.parametrize("sig,when", [(signal.SIGTERM, "analysis"), (signal.SIGTERM, "save"),
                                      (signal.SIGINT, "export")],
                         ids=["SIGTERM-analysis", "SIGTERM-save", "SIGINT-export"])
def test_signal_during_a_minilm_run_leaves_only_the_input(tmp_path, sig, when):
    if minilm_path() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed")
    (tmp_path / "minilm").symlink_to(minilm_path(), target_is_directory=True)
    before = snapshot(Path(minilm_path()))
    interrupt(["minilm", "--target", "0.3", "--include", "encoder.*"], tmp_path, sig, when)
    assert snapshot(Path(minilm_path())) == before
