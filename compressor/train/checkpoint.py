"""Training checkpoints that survive crashes, resume exactly, and never run code when loaded.

A checkpoint is a folder ``DIR/step-00000100/`` with three files:

* ``tensors.safetensors``: trainable weights, optimiser tensors, torch RNG states (no pickle);
* ``state.json``: everything else (step, epoch, data position, metrics, optimiser hyper-parameters,
  scheduler, python/numpy RNG states, history), human-readable;
* ``COMPLETE.json``: written last, the size and sha256 of the other two. No marker, or a mismatch, means
  the checkpoint is incomplete or corrupt: it is reported and skipped, never loaded silently.

The folder is built under a temporary name, every file fsynced, then renamed into place, so a crash
leaves either a whole checkpoint or a temporary folder that is ignored and cleaned up. ``DIR/
checkpoints.json`` is a small state file a person can read: monitor, mode, history, best and latest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_folder, atomic_write_text, clean_stale, regular_file
from compressor.core.statefile import load_json, read_json

FORMAT = 1
TENSORS, STATE, MARKER = "tensors.safetensors", "state.json", "COMPLETE.json"
STATE_FILE = "checkpoints.json"
PREFIX = "step-"
# First bytes of a pickle (protocol 2+) and of torch.save's zip archive (which holds a pickle).
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (truncated, failing its checksum, incomplete)."""


class UnsafeCheckpointError(CompressorError):
    """A checkpoint holds a pickle payload: loading it could run code, so it is refused."""


class MalformedCheckpointError(CompressorError):
    """A checkpoint whose files pass their checksums but whose content is not a checkpoint's (a field of
    the wrong type, a negative step, a subfolder or a symlink): no crash leaves one, so it is refused
    rather than skipped."""


def _malformed(path: Path, problem: str) -> MalformedCheckpointError:
    return MalformedCheckpointError(f"checkpoint {path} is malformed: {problem}",
                                    f"delete {path} (or resume from another run's folder)")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
        return None
    return int(name[len(PREFIX):])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be loaded, or None when it is whole and safe.

    Raises :class:`UnsafeCheckpointError` when any file in it is a pickle (checked before anything else,
    and whatever its checksum says: a valid checksum of a pickle is still a pickle).
    """
    path = Path(path)
    if path.is_symlink():
        raise _malformed(path, "it is a symlink, not a folder")
    entries = sorted(path.iterdir()) if path.is_dir() else []
    for f in entries:
        if f.is_symlink() or f.is_dir():
            raise _malformed(path, f"it holds {'a symlink' if f.is_symlink() else 'a subfolder'} ({f.name}), "
                                   "but a checkpoint holds only plain files")
    for f in entries:
        try:
            regular_file(f, "checkpoint file")  # a FIFO would block the read forever: damaged, skipped
        except CompressorError as err:
            return err.problem
        with open(f, "rb") as fh:
            head = fh.read(9)
        # A safetensors file starts with its header length (8 bytes, which may look like a pickle's
        # first two) followed by its JSON header: only a file that is not one counts as a pickle.
        pickled = head.startswith(PICKLE_MAGIC) and head[8:9] != b"{"
        if f.suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin") or pickled:
            raise UnsafeCheckpointError(f"checkpoint {path} contains a pickle payload ({f.name}); "
                                        "loading it could run code, so it is refused",
                                        "delete that checkpoint folder or resume from another one")
    marker = path / MARKER
    if not marker.is_file():
        return "incomplete: no completeness marker"
    try:
        files = load_json(marker.read_bytes(), MARKER, "")["files"]
        wants = {name: (int(files[name]["bytes"]), str(files[name]["sha256"])) for name in (TENSORS, STATE)
                 if name in files}
    except (CompressorError, ValueError, KeyError, TypeError, AttributeError):
        return "completeness marker is unreadable"
    for name in (TENSORS, STATE):
        f, want = path / name, wants.get(name)
        if want is None or not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != want[0]:
            return f"{name} is truncated or resized ({f.stat().st_size} bytes, expected {want[0]})"
        if _sha256(f) != want[1]:
            return f"{name} fails its sha256 checksum"
    try:  # bounded: a deeply nested state.json is one line, not a RecursionError
        state = load_json((path / STATE).read_bytes(), STATE, "", kind=None)
    except CompressorError as err:
        raise _malformed(path, err.problem) from None
    problem = _state_problem(state, _step_of(path))
    if problem:
        raise _malformed(path, problem)
    return None


def _state_problem(state: Any, step: int | None) -> str | None:
    """What is wrong with the fields every checkpoint's ``state.json`` has, or None."""
    if not isinstance(state, dict):
        return f"{STATE} holds a {type(state).__name__}, not an object"
    if state.get("format") != FORMAT:
        return f"{STATE} has format {state.get('format')!r}, this version reads format {FORMAT}"
    if not _whole(state.get("step")):
        return f"its step is {state.get('step')!r}, not a whole number >= 0"
    if step is not None and state["step"] != step:
        return f"its step is {state['step']} but its folder name says {step}"
    if _metrics_problem(state.get("metrics")):
        return f"its metrics {_metrics_problem(state.get('metrics'))}"
    history = state.get("history")
    if not isinstance(history, list):
        return f"its history is a {type(history).__name__}, not a list"
    for h in history:
        if not isinstance(h, dict) or not _whole(h.get("step")) or _metrics_problem(h.get("metrics")):
            return f"its history holds {json.dumps(h)[:60]}, not {{\"step\": N >= 0, \"metrics\": {{...}}}}"
    return None


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _metrics_problem(metrics: Any) -> str | None:
    if not isinstance(metrics, dict):
        return f"are a {type(metrics).__name__}, not an object of numbers"
    bad = [k for k, v in metrics.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    return f"hold non-numbers ({', '.join(bad[:3])})" if bad else None


def check_training_state(tensors: dict[str, torch.Tensor], state: dict[str, Any], path: Path) -> None:
    """Refuse (:class:`MalformedCheckpointError`) a checkpoint that lacks what resuming a training run
    needs: its config, optimizer, scheduler, data position and RNG states, each of the right form."""
    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise _malformed(path, problem)

    need(isinstance(state.get("config"), dict), "its state has no training config")
    opt = state.get("optimizer")
    need(isinstance(opt, dict) and isinstance(opt.get("param_groups"), list) and opt["param_groups"]
         and all(isinstance(g, dict) for g in opt["param_groups"])
         and isinstance(opt.get("state_keys"), dict) and isinstance(opt.get("scalars"), dict)
         and all(isinstance(k, list) for k in opt["state_keys"].values()),
         "its state has no optimizer state (param_groups, state_keys, scalars)")
    for idx, keys in opt["state_keys"].items():
        for k in keys:
            need(f"optim.{idx}.{k}" in tensors or k in (opt["scalars"].get(idx) or {}),
                 f"its optimizer state lacks {idx}.{k}")
    need(state.get("scheduler") is None or isinstance(state["scheduler"], dict), "its scheduler state is not an object")
    pos = state.get("data_position")
    need(isinstance(pos, list) and len(pos) == 2 and all(_whole(v) for v in pos),
         f"its data position is {pos!r}, not [epoch, batch] of whole numbers >= 0")
    rng = state.get("rng")
    try:
        version, internal, _ = rng["python"]
        name, keys, *_ = rng["numpy"]
        ok = isinstance(version, int) and isinstance(internal, list) and isinstance(name, str) and \
            isinstance(keys, list) and "rng.torch" in tensors
    except (TypeError, KeyError, ValueError):
        ok = False
    need(ok, "its state has no RNG states (python, numpy, torch)")


@dataclass
class CheckpointRow:
    """One line of ``compress checkpoints DIR``."""

    step: int
    path: str
    metrics: dict[str, float]
    size: int
    valid: bool
    reason: str = ""
    best: bool = False
    refused: bool = False  # malformed or unsafe: resuming would stop with an error, not skip it


def list_checkpoints(directory: str | Path) -> list[CheckpointRow]:
    """Every checkpoint folder in ``directory`` by step: metrics, size in bytes, valid or why not, best."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CompressorError(f"{directory} is not a folder", "pass the --checkpoint-dir of a training run")
    summary = _read_json(directory / STATE_FILE)
    best_path = summary.get("best_path") if isinstance(summary, dict) else None
    best_name = Path(best_path).name if isinstance(best_path, str) else None
    rows = []
    for path in _checkpoint_dirs(directory):
        refused = True
        try:
            reason = check(path)
            refused = False
        except UnsafeCheckpointError:
            reason = "refused: contains a pickle payload"
        except MalformedCheckpointError as err:
            reason = f"refused: {err.problem.split(': ', 1)[-1]}"
        metrics: dict[str, float] = {}
        if reason is None:
            metrics = json.loads((path / STATE).read_text())["metrics"]  # check() read it
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.is_symlink())
        rows.append(CheckpointRow(_step_of(path), str(path), metrics, size, reason is None, reason or "",
                                  best=path.name == best_name, refused=refused))
    return rows


def format_checkpoints(rows: list[CheckpointRow]) -> str:
    """A plain-text table of :func:`list_checkpoints` rows (best marked with ``*``)."""
    if not rows:
        return "no checkpoints"
    keys = sorted({k for r in rows for k in r.metrics})
    head = ["", "step", *keys, "size", "status"]
    table = [head]
    for r in rows:
        vals = [_fmt(r.metrics.get(k)) for k in keys]
        table.append(["*" if r.best else "", str(r.step), *vals, _human(r.size),
                      "valid" if r.valid else f"INVALID: {r.reason}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
             for row in table]
    return "\n".join(lines) + "\n(* best by the monitored metric)"


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _read_json(path: Path) -> dict | None:
    """``checkpoints.json``, or None when it is missing or not what this version writes (it is only a
    summary: the checkpoints themselves are the truth)."""
    try:
        summary = read_json(path, STATE_FILE, "")
    except CompressorError:
        return None
    return summary if _summary_problem(summary) is None else None


def _summary_problem(summary: dict[str, Any]) -> str | None:
    """What is wrong with the fields of ``checkpoints.json`` that are read back, or None."""
    history = summary.get("history")
    if not isinstance(history, list):
        return f"its history is a {type(history).__name__}, not a list"
    for h in history:
        if not isinstance(h, dict) or not _whole(h.get("step")) or _metrics_problem(h.get("metrics")):
            return f"its history holds {json.dumps(h)[:60]}, not {{\"step\": N >= 0, \"metrics\": {{...}}}}"
    if summary.get("mode") not in (None, "min", "max") or not isinstance(summary.get("monitor"), str | None):
        return "its monitor or mode is not a name and 'min' or 'max'"
    best = summary.get("best_step")
    if (best is not None and not _whole(best)) or not isinstance(summary.get("best_path"), str | None):
        return "its best step or path is not a step number and a path"
    return None


def _checkpoint_dirs(directory: Path) -> list[Path]:
    found = [p for p in directory.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of)


@dataclass
class CheckpointManager:
    """Writes checkpoints every time it is asked, keeps the newest ``keep_last`` plus the best by
    ``monitor`` (``mode`` "min" or "max"), and finds the newest valid one to resume from."""

    directory: Path
    keep_last: int = 3
    monitor: str = "val_loss"
    mode: str = "min"
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        self.directory = Path(self.directory)
        if self.mode not in ("min", "max"):
            raise CompressorError(f"mode must be 'min' or 'max', got {self.mode!r}",
                                  "pass mode='min' or 'max'")
        if self.keep_last < 1:
            raise CompressorError(f"keep_last must be >= 1, got {self.keep_last}", "pass e.g. keep_last=3")
        self.directory.mkdir(parents=True, exist_ok=True)

    # -- writing
    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
             metrics: dict[str, float]) -> Path:
        """Write checkpoint ``step`` atomically, update the state file, rotate; returns its folder."""
        from safetensors.torch import save

        self.history = [h for h in self.history if h["step"] < step] + [{"step": step, "metrics": metrics}]
        final = self.directory / checkpoint_name(step)
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        payload = {TENSORS: save(cpu, metadata={"format": str(FORMAT)}),
                   STATE: json.dumps({**state, "format": FORMAT, "step": step, "metrics": metrics,
                                      "history": self.history}, indent=1).encode()}
        # Re-writing a step (a resumed run) swaps the folder whole: never a half state.
        with atomic_folder(final, force=True, lock=False) as tmp:
            for name, data in payload.items():
                _write_synced(tmp / name, data)
            files = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                     for name, data in payload.items()}
            _write_synced(tmp / MARKER, json.dumps({"format": FORMAT, "files": files}, indent=1).encode())
        self._rotate()
        self._write_state_file()
        return final

    def best(self) -> dict[str, Any] | None:
        """The history entry (``{"step", "metrics"}``) best by the monitored metric, or None."""
        scored = [h for h in self.history if _finite(h["metrics"].get(self.monitor))]
        if not scored:
            return None
        sign = 1 if self.mode == "min" else -1
        # Ties go to the earliest step: a later equal score is no improvement.
        return min(scored, key=lambda h: (sign * h["metrics"][self.monitor], h["step"]))

    def best_path(self) -> Path | None:
        b = self.best()
        return None if b is None else self.directory / checkpoint_name(b["step"])

    def _rotate(self) -> None:
        keep = {p.name for p in _checkpoint_dirs(self.directory)[-self.keep_last:]}
        if (b := self.best_path()) is not None:
            keep.add(b.name)
        for p in _checkpoint_dirs(self.directory):
            if p.name not in keep:
                shutil.rmtree(p)
        clean_stale(self.directory)  # leftovers of writes a crash interrupted

    def _write_state_file(self) -> None:
        b = self.best()
        latest = _checkpoint_dirs(self.directory)
        summary = {"format": FORMAT, "monitor": self.monitor, "mode": self.mode, "keep_last": self.keep_last,
                   "best_step": b and b["step"], "best_metric": b and b["metrics"][self.monitor],
                   "best_path": str(self.best_path()) if b else None,
                   "latest_step": _step_of(latest[-1]) if latest else None,
                   "latest_path": str(latest[-1]) if latest else None,
                   "history": self.history}
        atomic_write_text(self.directory / STATE_FILE, json.dumps(summary, indent=1) + "\n")

    # -- reading
    def newest_valid(self) -> Path | None:
        """The newest checkpoint that passes :func:`check`; each newer broken one is warned about and
        skipped. A pickle payload raises :class:`UnsafeCheckpointError`."""
        for path in reversed(_checkpoint_dirs(self.directory)):
            reason = check(path)
            if reason is None:
                return path
            warnings.warn(f"skipping checkpoint {path}: {reason}", CheckpointWarning, stacklevel=2)
        return None

    def load(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, state)`` of a checkpoint, verified first; adopts its history (later steps are
        dropped: that future was lost with the crash)."""
        from safetensors.torch import load_file

        path = Path(path)
        reason = check(path)
        if reason is not None:
            raise CompressorError(f"checkpoint {path} cannot be loaded: {reason}",
                                  "resume from another checkpoint or start afresh")
        state = json.loads((path / STATE).read_text())
        self.history = state.get("history", [])
        return load_file(path / TENSORS), state

    def load_tensors(self, path: Path) -> dict[str, torch.Tensor] | None:
        """Just the tensors of a checkpoint, or None (with a warning) when it is not valid."""
        from safetensors.torch import load_file

        reason = check(path) if Path(path).is_dir() else "missing"
        if reason is not None:
            warnings.warn(f"cannot read checkpoint {path}: {reason}", CheckpointWarning, stacklevel=2)
            return None
        return load_file(Path(path) / TENSORS)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ------------------------------------------------------------------------ packing a training state

def pack_training_state(params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        scheduler: Any, extra: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split weights, optimiser, scheduler and RNG states into safetensors tensors and JSON state."""
    tensors = {f"param.{k}": v for k, v in params.items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    rng_tensors, rng_json = _rng_state()
    tensors.update(rng_tensors)
    state = {"optimizer": {"param_groups": opt["param_groups"], "scalars": scalars,
                           "state_keys": {str(i): sorted(st) for i, st in opt["state"].items()}},
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": rng_json, **extra}
    return tensors, state


def unpack_training_state(tensors: dict[str, torch.Tensor], state: dict[str, Any],
                          params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                          scheduler: Any) -> None:
    """Inverse of :func:`pack_training_state`: copies weights in place and restores every state."""
    saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
    if saved != set(params):
        missing, unexpected = sorted(set(params) - saved), sorted(saved - set(params))
        raise CompressorError(f"checkpoint does not match the trainable weights (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})",
                              "resume with the same model and the same training options")
    with torch.no_grad():
        for k, p in params.items():
            src = tensors[f"param.{k}"]
            if src.shape != p.shape:
                raise CompressorError(f"checkpoint weight '{k}' is {list(src.shape)}, the model's is "
                                      f"{list(p.shape)}", "resume with the same compressed model")
            p.copy_(src)
    opt = state["optimizer"]
    opt_state = {}
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, keys in opt["state_keys"].items():
        opt_state[int(idx)] = {k: tensors[f"optim.{idx}.{k}"] if f"optim.{idx}.{k}" in tensors
                               else opt["scalars"][idx][k] for k in keys}
        # torch loads any shape and fails only inside the next step: each moment must be its weight's shape.
        p = trained[int(idx)] if 0 <= int(idx) < len(trained) else None
        for k, v in opt_state[int(idx)].items():
            if p is None or (isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape):
                raise CompressorError(f"checkpoint optimizer state {idx}.{k} is "
                                      f"{list(v.shape) if isinstance(v, torch.Tensor) else v!r}, but the weight it "
                                      f"belongs to is {list(p.shape) if p is not None else 'missing'}",
                                      "resume with the same model and training options")
    optimizer.load_state_dict({"state": opt_state, "param_groups": opt["param_groups"]})
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(tensors, state["rng"])


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(tensors: dict[str, torch.Tensor], rng: dict[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def run_history(directory: str | Path) -> dict[str, Any]:
    """What a run's ``checkpoints.json`` records: ``history`` (``{"step", "metrics"}`` per evaluation),
    ``monitor``, ``mode`` and ``best_step``."""
    directory = Path(directory)
    fix = "pass the --checkpoint-dir of a training run"
    try:
        summary = read_json(directory / STATE_FILE, STATE_FILE, fix)
    except CompressorError as err:
        raise CompressorError(f"{directory} has no readable {STATE_FILE} ({err.problem})", fix) from None
    problem = _summary_problem(summary)
    if problem:
        raise CompressorError(f"{directory}'s {STATE_FILE} is malformed: {problem}", fix)
    return summary
