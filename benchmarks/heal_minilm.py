"""Heal all-MiniLM-L6-v2 with 40% of its encoder's linear parameters removed, by distillation.

    python benchmarks/heal_minilm.py [--seed 0] [--epochs 2] [--threads N] [--out benchmarks/results]

Plain truncated SVD (``compressor.analyze(model, target=0.4, include=["encoder.*"])``), then
``compressor.heal`` trains the factor matrices to match the original model's last hidden state (masked
MSE over real tokens) on calibration sentences, selecting the best step by validation loss on a few
held-out calibration sentences. Reported: the cosine between the compressed and the original sentence
embeddings on separate held-out sentences (mean and 5th percentile), before and after healing.
Writes ``heal_minilm.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from _common import minilm_missing

import compressor
from compressor.core.fileio import atomic_write_text
from compressor.examples import embed, load_minilm, sentence_splits
from compressor.train.heal import HealConfig, heal

N_TRAIN, N_VAL, N_EVAL = 512, 64, 500
MAX_LENGTH = 64  # the docstring sentences are short; this bounds the cost of a training step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if minilm_missing():
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/heal_minilm.py " + " ".join(sys.argv[1:])
    start = time.perf_counter()

    model, tokenizer = load_minilm()
    calibration, held_out = sentence_splits(N_TRAIN + N_VAL, N_EVAL, seed=args.seed)
    compressed = copy.deepcopy(model)
    plan = compressor.analyze(compressed, target=0.4, include=["encoder.*"])
    compressor.rewrite(compressed, plan)
    totals = plan.totals()

    reference = embed(model, tokenizer, held_out)

    def cosines(m: torch.nn.Module) -> dict[str, float]:
        c = (embed(m, tokenizer, held_out) * reference).sum(-1)
        return {"mean": float(c.mean()), "p5": float(c.quantile(0.05)), "min": float(c.min())}

    def batches(sentences: list[str], size: int = 32) -> list[dict[str, torch.Tensor]]:
        return [dict(tokenizer(sentences[i:i + size], padding=True, truncation=True, max_length=MAX_LENGTH,
                               return_tensors="pt")) for i in range(0, len(sentences), size)]

    before = cosines(compressed)
    print(f"compressed: removed {totals['removed_fraction']:.3f} of the encoder's linear parameters; "
          f"embedding cosine mean {before['mean']:.4f}, p5 {before['p5']:.4f}", flush=True)
    train, val = batches(calibration[:N_TRAIN]), batches(calibration[N_TRAIN:])
    # End-to-end on the output, as heal_minilm.md was measured (a transformer's defaults are block-wise first).
    config = HealConfig(loss="mse", lr=args.lr, epochs=args.epochs, warmup_steps=4, seed=args.seed,
                        method="end-to-end", distill="output")
    r = heal(compressed, config, teacher=model, data=train, val_data=val, progress=None)
    after = cosines(r.model)
    print(f"healed ({r.steps} steps, {r.seconds:.0f} s): embedding cosine mean {after['mean']:.4f}, "
          f"p5 {after['p5']:.4f}", flush=True)

    env = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "machine": platform.machine(), "cpus": os.cpu_count(),
           # Other jobs on the machine slow every timing here: the load says how busy it was.
           "load_average_1m": round(os.getloadavg()[0], 1), "seed": args.seed}
    result = {"env": env, "policy": plan.policy, "totals": totals,
              "sentences": {"train": N_TRAIN, "val": N_VAL, "held_out_eval": N_EVAL,
                            "max_length": MAX_LENGTH},
              "heal": {"loss": "mse (last_hidden_state, real tokens)", "lr": args.lr, "epochs": args.epochs,
                       "batch_size": 32, "optimizer": "adamw", "schedule": "cosine", "warmup_steps": 4,
                       "steps": r.steps, "best_step": r.best_step, "seconds": round(r.seconds, 1),
                       "history": r.history},
              "cosine_before": before, "cosine_after": after,
              "params": {"original": sum(p.numel() for p in model.parameters()),
                         "compressed": sum(p.numel() for p in r.model.parameters())},
              "total_seconds": round(time.perf_counter() - start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "heal_minilm.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "heal_minilm.md", _markdown(result))
    print(f"wrote {args.out / 'heal_minilm.md'} and .json ({result['total_seconds']} s in all)")
    return 0 if after["mean"] > before["mean"] else 1


def _markdown(r: dict) -> str:
    env, b, a, h, t = r["env"], r["cosine_before"], r["cosine_after"], r["heal"], r["totals"]
    return "\n".join([
        "# Healing all-MiniLM-L6-v2 after removing 40% of its encoder's linear parameters",
        "",
        f"Produced by `{env['command']}` on {env['date']} (python {env['python']}, torch {env['torch']}, "
        f"{env['threads']} threads, {env['cpus']} CPUs at load average {env['load_average_1m']}, "
        f"seed {env['seed']}); {r['total_seconds']} s in all.",
        "",
        f"Compression: plain truncated SVD, `target=0.4, include=['encoder.*']`: removed "
        f"{100 * t['removed_fraction']:.1f}% of the encoder's linear parameters; the model goes from "
        f"{r['params']['original']:,} to {r['params']['compressed']:,} parameters.",
        "",
        f"Healing: distillation from the original model (masked MSE on the last hidden state) on "
        f"{r['sentences']['train']} calibration sentences (max {r['sentences']['max_length']} tokens), "
        f"{h['epochs']} epochs = {h['steps']} steps of batch 32, AdamW lr {h['lr']}, cosine schedule, "
        f"best step {h['best_step']} by validation loss on {r['sentences']['val']} other sentences; "
        f"{h['seconds']} s.",
        "",
        f"Sentence-embedding cosine to the original model on {r['sentences']['held_out_eval']} held-out "
        "sentences (docstrings of the Python standard library, disjoint from the calibration set):",
        "",
        "| model | mean cosine | p5 cosine | min cosine |",
        "|---|---|---|---|",
        f"| compressed (plain SVD) | {b['mean']:.4f} | {b['p5']:.4f} | {b['min']:.4f} |",
        f"| healed | {a['mean']:.4f} | {a['p5']:.4f} | {a['min']:.4f} |",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
