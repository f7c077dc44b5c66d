"""What the pivoted form costs at run time: one Gemma-3-270M-shaped MLP (640 -> 2048, 640 -> 2048, 2048 -> 640,
gated) dense, factored as two factors and in the pivoted form, each matrix at the same size (``--keep`` of its
weights; the pivoted form then holds more rank), exported to ONNX and timed in onnxruntime at batch 1 (one
token and ``--tokens`` tokens), one thread, the three files interleaved round by round (medians of
``--rounds`` rounds of 20 calls).

    python benchmarks/pivoted_latency.py [--keep 0.8] [--tokens 128] [--rounds 15]

Writes ``benchmarks/results/pivoted_latency.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from _common import environment, md_table
from torch import nn
from torch.nn import functional as F

from compressor.core.fileio import atomic_write_text
from compressor.core.rewrite import factor_module
from compressor.core.svd import factored_params
from compressor.export.onnx import export_onnx

RESULTS = Path(__file__).resolve().parent / "results"


class MLP(nn.Module):
    def __init__(self, hidden: int = 640, inner: int = 2048):
        super().__init__()
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.gate(x)) * self.up(x))


def factored(dense: MLP, keep: float, pivoted: bool) -> tuple[MLP, dict[str, int]]:
    """``dense`` with each matrix at the largest rank whose factors hold at most ``keep`` of its weights."""
    model, ranks = copy.deepcopy(dense), {}
    for name in ("gate", "up", "down"):
        m, n = getattr(model, name).weight.shape
        ranks[name] = max(r for r in range(1, min(m, n)) if factored_params(m, n, r, pivoted) <= keep * m * n)
        setattr(model, name, factor_module(getattr(model, name), ranks[name],
                                           kind="linear-pivoted" if pivoted else None))
    return model, ranks


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    torch.manual_seed(0)
    dense = MLP().eval()
    two, two_ranks = factored(dense, a.keep, pivoted=False)
    pivoted, pivoted_ranks = factored(dense, a.keep, pivoted=True)
    models = {"dense": dense, "two factors": two, "pivoted": pivoted}
    res = {"env": environment(" ".join(["python", *sys.argv])), "keep": a.keep,
           "ranks": {"two factors": two_ranks, "pivoted": pivoted_ranks}, "rows": []}
    folder = Path(tempfile.mkdtemp(prefix="pivoted-latency-"))
    for tokens in (1, a.tokens):
        x = torch.randn(1, tokens, 640)
        sessions = {k: session(export_onnx(m, x, folder / f"{k.replace(' ', '-')}-{tokens}.onnx"))
                    for k, m in models.items()}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(a.rounds):
            for k, s in sessions.items():
                feed = {s.get_inputs()[0].name: x.numpy()}
                start = time.perf_counter()
                for _ in range(20):
                    s.run(None, feed)
                times[k].append((time.perf_counter() - start) / 20)
        med = {k: statistics.median(v) for k, v in times.items()}
        res["rows"].append({"tokens": tokens, "median_s": med})
    rows = [[r["tokens"], *(f"{r['median_s'][k] * 1e6:,.0f}" for k in models),
             f"{r['median_s']['pivoted'] / r['median_s']['two factors']:.2f}x",
             f"{r['median_s']['pivoted'] / r['median_s']['dense']:.2f}x"] for r in res["rows"]]
    md = (f"# The pivoted form's run-time cost (onnxruntime, 1 thread)\n\nCommand: `{res['env']['command']}`; "
          f"onnxruntime {res['env']['onnxruntime']}, load average at start {res['env']['load_average_at_start']}."
          f"\n\nEach matrix at {a.keep:.0%} of its weights. Ranks (gate, up, down): two factors "
          f"{list(two_ranks.values())}, pivoted {list(pivoted_ranks.values())}.\n\n"
          + md_table(["tokens", "dense us", "two factors us", "pivoted us", "pivoted / two factors",
                      "pivoted / dense"], rows) + "\n")
    atomic_write_text(RESULTS / "pivoted_latency.json", json.dumps(res, indent=1))
    atomic_write_text(RESULTS / "pivoted_latency.md", md)
    print(md)


if __name__ == "__main__":
    main()
