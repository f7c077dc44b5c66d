"""Randomized SVD (leading k triplets, a-posteriori check, exact fallback) against the exact SVD, timed
side by side on one thread: every Linear weight of the real all-MiniLM-L6-v2, and 4096x11008 matrices
(the shape of a 7B Llama's MLP weights; synthetic, since no such checkpoint installs here).

    python benchmarks/randomized_svd.py [--out benchmarks/results] [--big 2] [--threads 1]

Per layer and rank k: time of the exact SVD, of the randomized SVD alone and of the checked path
(``compressor.core.svd.leading_svd``: randomized, exact where the bound fails); the worst error of the
k singular values (``max_i |s_i - sigma_i| / sigma_k``), the bound, and the excess truncation error
``(||W - W_k||_F - ||W - W*_k||_F) / ||W - W*_k||_F`` of the randomized rank-k factors against the
optimal ones. Writes ``randomized_svd.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _common import environment, load_average, minilm_missing

from compressor.core.fileio import atomic_write_text
from compressor.core.svd import RSVD_POWER_ITERS, RSVD_TOL, leading_svd, randomized_svd, svd


def measure(name: str, w: torch.Tensor, ranks: list[int]) -> list[dict]:
    start = time.perf_counter()
    exact = svd(w)
    t_exact = time.perf_counter() - start
    total = float(w.double().square().sum())
    rows = []
    for k in ranks:
        start = time.perf_counter()
        rand = randomized_svd(w, k, seed=0)
        t_rand = time.perf_counter() - start
        start = time.perf_counter()
        checked = leading_svd(w, k, seed=0)
        t_checked = time.perf_counter() - start
        s, sigma = rand.S.double(), exact.S[:k].double()
        opt = max(total - float(sigma.square().sum()), 0.0) ** 0.5
        got = max(total - float(s.square().sum()), 0.0) ** 0.5  # exact for the randomized factors (see svd.py)
        rows.append({"layer": name, "shape": list(w.shape), "rank": k, "exact_s": round(t_exact, 4),
                     "randomized_s": round(t_rand, 4), "checked_s": round(t_checked, 4),
                     "speedup_randomized": round(t_exact / t_rand, 3), "speedup_checked": round(t_exact / t_checked, 3),
                     "sv_error": float(((s - sigma).abs() / sigma[-1]).max()), "bound": rand.check["bound"],
                     "accepted": checked.check["method"] == "randomized",
                     "excess_truncation_error": (got - opt) / opt if opt > 0 else 0.0})
        print(f"{name:<48} {'x'.join(map(str, w.shape)):>11} k={k:<5} exact {t_exact:7.3f}s rand {t_rand:7.3f}s "
              f"checked {t_checked:7.3f}s  sv err {rows[-1]['sv_error']:.2e} bound {rand.check['bound']:.2e} "
              f"excess {rows[-1]['excess_truncation_error']:.2e} {'ok' if rows[-1]['accepted'] else 'fallback'}",
              flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    by_rank: dict[int, list[dict]] = {}
    for r in rows:
        by_rank.setdefault(r["rank"], []).append(r)
    out = {}
    for k, rs in by_rank.items():
        exact = sum(r["exact_s"] for r in rs)
        out[str(k)] = {"layers": len(rs), "exact_s": round(exact, 3),
                       "randomized_s": round(sum(r["randomized_s"] for r in rs), 3),
                       "checked_s": round(sum(r["checked_s"] for r in rs), 3),
                       "speedup_randomized": round(exact / sum(r["randomized_s"] for r in rs), 3),
                       "speedup_checked": round(exact / sum(r["checked_s"] for r in rs), 3),
                       "worst_sv_error": max(r["sv_error"] for r in rs),
                       "worst_bound": max(r["bound"] for r in rs),
                       "worst_excess_truncation_error": max(r["excess_truncation_error"] for r in rs),
                       "accepted": sum(r["accepted"] for r in rs)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--big", type=int, default=2, help="how many 4096x11008 matrices (0: none)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if minilm_missing():
        return 2
    from compressor.examples import load_minilm

    env = environment("python " + " ".join(sys.argv))
    model, _ = load_minilm()
    minilm = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            minilm += measure(name, mod.weight.detach(), [32, 96])
    big = []
    g = torch.Generator().manual_seed(0)
    for i in range(args.big):
        # Columns scaled by j**-0.5 (i even) give a decaying spectrum like trained weights'; i odd stays
        # Gaussian: a flat spectrum, the randomized method's worst case.
        w = torch.randn(4096, 11008, generator=g)
        if i % 2 == 0:
            w *= torch.arange(1, 11009, dtype=torch.float32).rsqrt()
        big += measure(f"synthetic {'decaying' if i % 2 == 0 else 'gaussian'} #{i}", w, [256, 1024])
    result = {"environment": env, "load_average_at_end": load_average(),
              "settings": {"power_iters": RSVD_POWER_ITERS, "tol": RSVD_TOL, "threads": args.threads},
              "minilm": {"summary": summarize(minilm), "layers": minilm},
              "big": {"summary": summarize(big), "layers": big}}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "randomized_svd.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / "randomized_svd.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# Randomized SVD against exact SVD", "",
             f"`{env['command']}`, {env['date']}, {env['processor']}, {env['cpu_count']} cores, torch "
             f"{env['torch']}, {result['settings']['threads']} thread(s), load average {env['load_average_at_start']} "
             f"at start and {result['load_average_at_end']} at end (other processes share the machine). Power "
             f"iterations {result['settings']['power_iters']}; the check accepts a randomized result when every "
             f"triplet's residual is at most {result['settings']['tol']} of the k-th singular value, otherwise the "
             "exact SVD is taken (its time is then both).", "",
             "| matrices | k | layers | exact s | randomized s | checked s | speed-up rand. | speed-up checked "
             "| accepted | worst sv error | worst bound | worst excess trunc. error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, key in (("MiniLM Linear weights", "minilm"), ("4096x11008 synthetic", "big")):
        for k, s in result[key]["summary"].items():
            lines.append(f"| {label} | {k} | {s['layers']} | {s['exact_s']:.2f} | {s['randomized_s']:.2f} | "
                         f"{s['checked_s']:.2f} | {s['speedup_randomized']:.2f}x | {s['speedup_checked']:.2f}x | "
                         f"{s['accepted']} of {s['layers']} | {s['worst_sv_error']:.2e} | {s['worst_bound']:.2e} | "
                         f"{s['worst_excess_truncation_error']:.2e} |")
    lines += ["", "Per 4096x11008 matrix:", "", "| matrix | k | exact s | randomized s | checked s | sv error | bound "
              "| excess trunc. error | accepted |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["big"]["layers"]:
        lines.append(f"| {r['layer']} | {r['rank']} | {r['exact_s']:.1f} | {r['randomized_s']:.1f} | "
                     f"{r['checked_s']:.1f} | {r['sv_error']:.2e} | {r['bound']:.2e} | "
                     f"{r['excess_truncation_error']:.2e} | {r['accepted']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
