"""Data-aware compression of the real all-MiniLM-L6-v2, side by side with plain SVD and SVD-LLM.

    python benchmarks/data_aware.py [--quick] [--out benchmarks/results]

For 10..50% removal of the encoder's linear-layer parameters, compares on held-out real sentences
(standard-library docstrings, disjoint from the calibration sentences):

* (a) plain SVD: ``compressor.analyze(model, target=t)`` without calibration;
* (b) an SVD-LLM-style baseline implemented HERE, independently of compressor's calibration code: the
  same rank ratio in every layer, factors from the SVD of ``W L`` with ``L`` the Cholesky factor of the
  layer input's ``X^T X`` on the calibration data, no sequential correction;
* (c) compressor's best data-aware setting: ``analyze(model, target=t, calibration=...)`` with its
  defaults (whitened factors, sensitivity-based rank allocation, sequential least-squares refits).

Reports mean and 5th-percentile cosine of each sentence embedding to the original model's, and the
agreement of the top-10 nearest neighbours over the evaluation set. Writes ``data_aware.json``, ``.md``
and ``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from _common import minilm_missing
from torch import nn

import compressor
from compressor.core.fileio import atomic_write_bytes, atomic_write_text
from compressor.core.svd import Decomposition, max_saving_rank
from compressor.data.calibration import tokenize_batches
from compressor.examples import embed, load_minilm, sentence_splits

INCLUDE = ["encoder.*"]
OUTPUTS = ["last_hidden_state"]  # what sensitivity compares: the sentence embeddings' source
METHODS = {"a": "plain SVD", "b": "SVD-LLM (uniform, whitened)", "c": "compressor data-aware"}


# ------------------------------------------------------------------------- (b) the SVD-LLM baseline


@torch.no_grad()
def svd_llm(model: nn.Module, batches: list[dict], target: float) -> nn.Module:
    """SVD-LLM-style compression of a copy of ``model``: uniform rank ratio, Cholesky whitening."""
    model = copy.deepcopy(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")}
    grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    mask = None

    def hook(name):
        def fn(_mod, args):
            x = args[0][mask.bool()] if mask is not None else args[0].reshape(-1, args[0].shape[-1])
            grams[name] += x.double().T @ x.double()
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    for b in batches:
        mask = b["attention_mask"]
        model(**b)
    for h in handles:
        h.remove()
    for name, mod in layers.items():
        m, n = mod.weight.shape
        rank = max(1, min(max_saving_rank(m, n), round((1 - target) * m * n / (m + n))))
        gram = grams[name]
        eye = torch.eye(n, dtype=gram.dtype)
        jitter = 0.0
        while True:  # SVD-LLM adds a small ridge only when the Cholesky factorization fails
            L, info = torch.linalg.cholesky_ex(gram + jitter * gram.diagonal().mean() * eye)
            if int(info) == 0:
                break
            jitter = max(1e-8, jitter * 10)
        U, S, Vh = torch.linalg.svd(mod.weight.double() @ L, full_matrices=False)
        L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
        dec = Decomposition(U.float(), S.float(), Vh.float(), L_inv.float())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, compressor.factor_module(mod, rank, dec))
    return model


def removed_fraction(model: nn.Module, original: nn.Module) -> float:
    """Fraction of the encoder's linear weights removed, counted from the module tree itself."""
    def count(mod):
        return sum(p.numel() for n, p in mod.named_parameters()
                   if n.startswith("encoder.") and n.endswith("weight") and p.dim() == 2)
    return 1 - count(model) / count(original)


# ---------------------------------------------------------------------------------------- metrics


def metrics(emb: torch.Tensor, ref: torch.Tensor, ref_nn: torch.Tensor, k: int = 10) -> dict[str, float]:
    cos = (emb * ref).sum(-1)
    return {"mean_cosine": float(cos.mean()), "p5_cosine": float(torch.quantile(cos, 0.05)),
            "embedding_error": float(1 - cos.mean()),
            "top10_agreement": _agreement(neighbours(emb, k), ref_nn)}


def neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    return sim.topk(k, dim=-1).indices


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().sum(-1)
    return float(hits.mean() / a.shape[1])


# ------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sentences and two targets (for CI)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 is much faster on a machine shared with other jobs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if minilm_missing():
        return 2
    n_cal, n_eval = (128, 300) if args.quick else (256, 1000)
    targets = (0.2, 0.4) if args.quick else (0.1, 0.2, 0.3, 0.4, 0.5)
    started = time.perf_counter()
    model, tok = load_minilm()
    cal_sents, eval_sents = sentence_splits(n_cal, n_eval)
    eval_sents = sorted(eval_sents, key=len)  # less padding; the metrics do not depend on the order
    batches = tokenize_batches(tok, cal_sents, batch_size=32)
    ref = embed(model, tok, eval_sents)
    ref_nn = neighbours(ref, 10)

    rows = []
    for t in targets:
        for key in METHODS:
            t0 = time.perf_counter()
            if key == "b":
                small = svd_llm(model, batches, t)
            else:
                work = copy.deepcopy(model)  # analyzed and rewritten: data-aware factors are tied to it
                plan = compressor.analyze(work, target=t, include=INCLUDE, outputs=OUTPUTS,
                                          calibration=batches if key == "c" else None)
                small = compressor.rewrite(work, plan)
            seconds = time.perf_counter() - t0
            row = {"target": t, "method": key, "label": METHODS[key], "compress_seconds": round(seconds, 2),
                   "removed_fraction": round(removed_fraction(small, model), 5),
                   **metrics(embed(small, tok, eval_sents), ref, ref_nn)}
            rows.append(row)
            print(f"target {t:.0%}  ({key}) {METHODS[key]:<28} removed {row['removed_fraction']:.4f}  "
                  f"cos {row['mean_cosine']:.4f}  p5 {row['p5_cosine']:.4f}  "
                  f"top10 {row['top10_agreement']:.3f}  ({seconds:.1f} s)", flush=True)
    write(args, rows, targets, n_cal, n_eval, time.perf_counter() - started)
    return 0


def write(args, rows: list[dict], targets, n_cal: int, n_eval: int, seconds: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import transformers

    def get(t, k):
        return next(r for r in rows if r["target"] == t and r["method"] == k)

    checks = {}
    for t in (0.2, 0.4):
        if t in targets:
            b, c = get(t, "b"), get(t, "c")
            checks[f"{t:.0%}"] = {"error_ratio_c_over_b": c["embedding_error"] / b["embedding_error"],
                                  "c_at_most_0.7x_b": c["embedding_error"] <= 0.7 * b["embedding_error"],
                                  "c_higher_top10": c["top10_agreement"] > b["top10_agreement"]}
    command = ("python benchmarks/data_aware.py" + (" --quick" if args.quick else "")
               + (f" --threads {args.threads}" if args.threads else ""))
    now = datetime.datetime.now(datetime.timezone.utc)
    env = {"command": command, "date": now.isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "compressor": compressor.__version__,
           "threads": torch.get_num_threads(), "machine": platform.machine(),
           "calibration_sentences": n_cal, "evaluation_sentences": n_eval, "include": INCLUDE,
           "total_seconds": round(seconds, 1)}
    name = "data_aware_quick" if args.quick else "data_aware"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{name}.json",
                      json.dumps({"env": env, "acceptance": checks, "results": rows}, indent=1) + "\n")

    lines = ["# all-MiniLM-L6-v2: data-aware compression vs plain SVD and SVD-LLM", "",
             f"Produced by `{command}` on {env['date']} (torch {env['torch']}, transformers "
             f"{env['transformers']}, {env['threads']} threads, {seconds:.0f} s in all). Calibration: "
             f"{n_cal} docstring sentences; evaluation: {n_eval} other docstring sentences. Removal is of "
             "the encoder's linear-layer weights.", "",
             "| removed | method | mean cos | p5 cos | 1 - mean cos | top-10 agreement | compress s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['removed_fraction']:.1%} | ({r['method']}) {r['label']} | "
                     f"{r['mean_cosine']:.4f} | "
                     f"{r['p5_cosine']:.4f} | {r['embedding_error']:.4f} | {r['top10_agreement']:.3f} | "
                     f"{r['compress_seconds']:.1f} |")
    lines += ["", "Acceptance (c vs b): " + "; ".join(
        f"{t}: error ratio {v['error_ratio_c_over_b']:.2f} (<= 0.7: {v['c_at_most_0.7x_b']}), "
        f"higher top-10: {v['c_higher_top10']}" for t, v in checks.items()), ""]
    atomic_write_text(args.out / f"{name}.md", "\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in METHODS.items():
        xs = [get(t, key)["removed_fraction"] * 100 for t in targets]
        axes[0].plot(xs, [get(t, key)["mean_cosine"] for t in targets], "o-", label=f"({key}) {label}")
        axes[1].plot(xs, [get(t, key)["top10_agreement"] for t in targets], "o-", label=f"({key}) {label}")
    for ax, ylabel in zip(axes, ("mean cosine to original", "top-10 neighbour agreement"), strict=True):
        ax.set_xlabel("% of encoder linear weights removed")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("all-MiniLM-L6-v2, held-out docstring sentences")
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(args.out / f"{name}.png", buf.getvalue())
    print(f"wrote {args.out / name}.json, .md and .png")


if __name__ == "__main__":
    sys.exit(main())
