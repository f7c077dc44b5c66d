"""Why training a pivoted decoder's factors diverges: how far one sign-like (Adam's first) step along the
gradient moves the KL to the dense model, on the very batch the gradient came from (docs/causal-lm.md).

    python benchmarks/pivoted_sharpness.py --dense /tmp/gemma/dense --folder PIVOTED [--folder TWO_FACTOR]

For each compressed folder: the factored layers' amplification (the largest L1 norm of a row of ``up``: how
many times a step of every ``down`` weight can move one entry of the layer's matrix, when the steps' signs
line up, as Adam's first steps' do), the KL of 2 calibration sequences of 64 tokens to the dense model, and
the change of that KL after one step of ``lr * sign(gradient)`` at a few ``lr``, next to the change the
gradient predicts to first order (``-lr * |g|_1``). Then the same steps with each factor's step divided by
its amplification (every entry of the layer's matrix moves at most ``lr``)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from compressor.core.layers import LOW_RANK_TYPES, PivotedLowRankLinear
from compressor.data.calibration import load_calibration
from compressor.examples import write_docstring_texts
from compressor.formats.load import load_model

STEPS = (1e-7, 1e-6, 1e-5, 1e-4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", required=True, help="the dense model's folder")
    ap.add_argument("--folder", action="append", required=True, help="a compressed folder (repeat for more)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    teacher = load_model(a.dense).model.eval()
    texts = write_docstring_texts(Path(tempfile.mkdtemp(prefix="pivoted-sharpness-")))
    tok = AutoTokenizer.from_pretrained(a.dense, trust_remote_code=False)
    cal = load_calibration(texts["calibration"]["path"], tokenizer=tok, samples=2, stream=True)
    batch = torch.cat([b["input_ids"] for b in cal])[:2, :64]
    with torch.no_grad():
        target = F.log_softmax(teacher(input_ids=batch).logits.float(), -1).flatten(0, 1)
    for folder in a.folder:
        probe(folder, batch, target)


def probe(folder: str, batch: torch.Tensor, target: torch.Tensor) -> None:
    student = load_model(folder).model.eval()
    layers = [m for m in student.modules() if isinstance(m, LOW_RANK_TYPES)]

    def kl() -> torch.Tensor:
        logp = F.log_softmax(student(input_ids=batch).logits.float(), -1).flatten(0, 1)
        return F.kl_div(logp, target, log_target=True, reduction="batchmean")

    with torch.no_grad():
        # How far a unit step of every weight of a factor can move one entry of the layer's matrix.
        amp = {}
        for m in layers:
            pivot = isinstance(m, PivotedLowRankLinear)  # its down rows are rows of the matrix themselves
            amp[m.down.weight] = max(1.0 if pivot else 0.0, float(m.up.weight.abs().sum(1).max()))
            amp[m.up.weight] = float(m.down.weight.abs().sum(0).max())
    downs = [amp[m.down.weight] for m in layers]
    print(f"{folder}: {len(layers)} factored layers ({type(layers[0]).__name__}); amplification of down's steps: "
          f"median {statistics.median(downs):.1f}, max {max(downs):.1f}", flush=True)
    loss = kl()
    loss.backward()
    base = float(loss.detach())
    params = list(amp)
    saved = [p.detach().clone() for p in params]
    l1 = sum(float(p.grad.abs().sum()) for p in params)
    print(f"  KL {base:.4f}, |gradient|_1 {l1:.0f}", flush=True)
    for scaled in (False, True):
        for lr in STEPS:
            with torch.no_grad():
                for p in params:
                    p -= lr / (amp[p] if scaled else 1.0) * p.grad.sign()
                change = float(kl()) - base
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
            predicted = -lr * (sum(float((p.grad.abs() / amp[p]).sum()) for p in params) if scaled else l1)
            print(f"  sign step {lr:g}{' / amplification' if scaled else ''}: KL change {change:+.4f} "
                  f"(first order {predicted:+.4f})", flush=True)


if __name__ == "__main__":
    main()
