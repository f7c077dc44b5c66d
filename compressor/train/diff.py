"""How far two sets of weights are apart, per layer: ``compress checkpoints diff A B``.

    diff = diff_weights(read_weights("ckpt/step-100"), read_weights("ckpt/step-400"))
    print(format_diff(diff))

A and B are checkpoint folders (a training run's ``step-N``), state_dict files (``.pt``, ``.safetensors``),
Hugging Face folders or anything else :func:`compressor.load_model` reads. Per tensor both hold: the
relative change ``||B - A|| / ||A||`` (Frobenius) and, for matrices (the weight seen as
``(shape[0], -1)``), the effective rank of the change: the fewest singular values of ``B - A`` holding
``energy`` (0.9) of its squared singular values. A LoRA checkpoint's ``lora_A`` / ``lora_B`` pairs are
compared as their product ``B @ A`` (the adapter's update, up to its fixed scale).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compressor.core.errors import CompressorError
from compressor.formats.load import load_model
from compressor.train.checkpoint import MARKER, STATE, TENSORS, check


@dataclass
class Weights:
    path: str
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, float] | None = None  # a checkpoint's metrics at its step
    step: int | None = None


@dataclass
class TensorDiff:
    name: str
    shape: list[int]
    norm: float  # ||A||
    change: float  # ||B - A||
    relative: float  # change / norm (inf when A is zero and B is not)
    effective_rank: int | None  # of B - A at the energy; None for vectors and unchanged tensors
    full_rank: int | None = None  # min(shape[0], prod(shape[1:])) for matrices


@dataclass
class WeightsDiff:
    a: str
    b: str
    energy: float
    rows: list[TensorDiff]
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    metrics: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    steps: tuple[int | None, int | None] = (None, None)

    def moved_most(self, top: int = 5) -> list[TensorDiff]:
        return sorted((r for r in self.rows if r.change > 0), key=lambda r: -r.relative)[:top]

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "energy": self.energy, "steps": list(self.steps),
                "metrics": {k: list(v) for k, v in self.metrics.items()},
                "moved_most": [r.name for r in self.moved_most()], "only_in_a": self.only_in_a,
                "only_in_b": self.only_in_b, "tensors": [vars(r) for r in self.rows]}


def read_weights(path: str | Path, *, trust_pickle: bool = False, arch: str | None = None) -> Weights:
    """The floating-point tensors in ``path`` (and its metrics, for a checkpoint folder)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir() and (path / TENSORS).exists() and (path / MARKER).exists():
        reason = check(path)
        if reason is not None:
            raise CompressorError(f"checkpoint {path} cannot be read: {reason}", "pass a valid checkpoint")
        state = json.loads((path / STATE).read_text())
        tensors = {k[len("param."):]: v for k, v in load_file(path / TENSORS).items() if k.startswith("param.")}
        return Weights(str(path), _lora_products(tensors), state.get("metrics"), state.get("step"))
    loaded = load_model(path, trust_pickle=trust_pickle, arch=arch)
    sd = loaded.model.state_dict() if loaded.model is not None else loaded.state_dict
    return Weights(str(path), {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()})


def _lora_products(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``x.lora_A`` and ``x.lora_B`` replaced by ``x.lora_B@A`` (their product in the weight's matrix form)."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".lora_A")]:
        prefix = key[: -len(".lora_A")]
        if f"{prefix}.lora_B" in tensors:
            a, b = tensors[key], tensors[f"{prefix}.lora_B"]
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise CompressorError(f"the checkpoint's adapter '{prefix}' has lora_A {list(a.shape)} and lora_B "
                                      f"{list(b.shape)}, which do not multiply", "pass an intact checkpoint")
            out[f"{prefix}.lora_B@A"] = tensors[f"{prefix}.lora_B"].float() @ out.pop(key).float()
            del out[f"{prefix}.lora_B"]
    return out


def effective_rank(delta: torch.Tensor, energy: float = 0.9) -> int:
    """The fewest singular values of ``delta`` (as ``(shape[0], -1)``) holding ``energy`` of the squares."""
    s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
    power = s.pow(2)
    if float(power.sum()) == 0:
        return 0
    cum = torch.cumsum(power, 0) / power.sum()
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype))) + 1


def diff_weights(a: Weights, b: Weights, energy: float = 0.9) -> WeightsDiff:
    """Per tensor in both, how much B moved from A (see the module docstring)."""
    if not 0 < energy <= 1:
        raise CompressorError(f"energy must be in (0, 1], got {energy}", "pass e.g. energy=0.9")
    rows = []
    for name, ta in a.tensors.items():
        tb = b.tensors.get(name)
        if tb is None:
            continue
        if ta.shape != tb.shape:
            raise CompressorError(f"'{name}' is {list(ta.shape)} in {a.path} but {list(tb.shape)} in {b.path}",
                                  "compare two checkpoints of the same model")
        delta = tb.detach().double() - ta.detach().double()
        norm, change = float(ta.double().norm()), float(delta.norm())
        rel = change / norm if norm > 0 else (0.0 if change == 0 else math.inf)
        matrix = ta.dim() >= 2
        rows.append(TensorDiff(name, list(ta.shape), norm, change, rel,
                               effective_rank(delta, energy) if matrix and change > 0 else None,
                               min(ta.shape[0], ta[0].numel()) if matrix else None))
    if not rows:
        raise CompressorError(f"{a.path} and {b.path} have no tensor in common",
                              "compare two checkpoints of the same model (or run)")
    keys = sorted(set(a.metrics or {}) | set(b.metrics or {}))
    metrics = {k: ((a.metrics or {}).get(k), (b.metrics or {}).get(k)) for k in keys}
    return WeightsDiff(a.path, b.path, energy, rows, sorted(set(a.tensors) - set(b.tensors)),
                       sorted(set(b.tensors) - set(a.tensors)), metrics, (a.step, b.step))


def format_diff(diff: WeightsDiff, top: int = 5) -> str:
    """A plain-text table: every tensor, the most moved first, then the metrics side by side."""
    head = ["tensor", "shape", "||B-A||/||A||", f"rank@{diff.energy:g}"]
    table = [head]
    for r in sorted(diff.rows, key=lambda r: -r.relative):
        rank = "-" if r.effective_rank is None else f"{r.effective_rank}/{r.full_rank}"
        table.append([r.name, "x".join(map(str, r.shape)), f"{r.relative:.3e}", rank])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [f"A {diff.a}" + (f" (step {diff.steps[0]})" if diff.steps[0] is not None else ""),
             f"B {diff.b}" + (f" (step {diff.steps[1]})" if diff.steps[1] is not None else ""), ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    moved = diff.moved_most(top)
    lines += ["", "moved most: " + (", ".join(r.name for r in moved) if moved else "nothing changed")]
    if diff.metrics:
        lines += ["", "metric".ljust(16) + "A".ljust(12) + "B"]
        lines += [k.ljust(16) + _fmt(va).ljust(12) + _fmt(vb) for k, (va, vb) in diff.metrics.items()]
    for what, names in (("only in A", diff.only_in_a), ("only in B", diff.only_in_b)):
        if names:
            lines.append(f"{what}: {', '.join(names[:5])}" + (f" (+{len(names) - 5})" if len(names) > 5 else ""))
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"
