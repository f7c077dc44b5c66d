"""Heal a heavily compressed digits CNN back to the uncompressed accuracy (real UCI digits).

    python benchmarks/heal_digits.py [--seed 0] [--threads N] [--out benchmarks/results]

Trains the small CNN of ``compressor.examples`` on the digits train split, factors its conv and hidden
linear layers at a quarter of their full rank (the 10-way classifier, 0.9% of the weights, stays dense),
measures test accuracy, then heals it three ways on the train split, each selecting its best step by
validation accuracy: supervised fine-tuning of the factors (with checkpoints), supervised LoRA adapters
merged into the factors, and distillation from the uncompressed model (KL on logits, no labels).
Writes ``heal_digits.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import compressor
from compressor.core.fileio import atomic_write_text
from compressor.examples import accuracy, digits_splits, train_digits_cnn
from compressor.train.checkpoint import list_checkpoints
from compressor.train.heal import HealConfig, heal

POLICY = {"rank_ratio": 0.25, "exclude": ["8"]}  # "8" is the final Linear(256, 10)
EPOCHS = 8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/heal_digits.py " + " ".join(sys.argv[1:])

    start = time.perf_counter()
    model, base_acc = train_digits_cnn(args.seed)
    splits = digits_splits(args.seed)
    train_seconds = time.perf_counter() - start

    compressed = copy.deepcopy(model)
    plan = compressor.analyze(compressed, **POLICY)
    compressor.rewrite(compressed, plan)
    factored = plan.factored
    kept = sum(lp.params_after for lp in factored) / sum(lp.params_before for lp in factored)
    totals = plan.totals()
    comp_acc = {k: accuracy(compressed, *splits[k]) for k in ("val", "test")}

    xtr, ytr = splits["train"]
    common = {"epochs": EPOCHS, "batch_size": 32, "seed": args.seed}
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {  # name: (what heal acts on, its settings)
            "supervised, factors": (dict(data=xtr, targets=ytr, val_data=splits["val"],
                                         checkpoint_dir=Path(tmp) / "ck"), dict(lr=2e-3, keep_last=2)),
            "supervised, LoRA r=8 merged": (dict(data=xtr, targets=ytr, val_data=splits["val"]),
                                            dict(train="lora", lora_rank=8, lora_alpha=16, lr=5e-3)),
            "distillation (KL), factors": (dict(teacher=model, data=xtr, val_data=splits["val"][0]),
                                           dict(loss="kl", lr=2e-3, monitor="val_loss")),
        }
        for name, (kw, settings) in runs.items():
            r = heal(compressed, HealConfig(**common, **settings), progress=None, **kw)
            test = accuracy(r.model, *splits["test"])
            variants[name] = {
                "test_accuracy": test, "val_accuracy": accuracy(r.model, *splits["val"]),
                "test_drop_points": 100 * (base_acc["test"] - test),
                "within_1_point": 100 * (base_acc["test"] - test) <= 1.0,
                "best_step": r.best_step, "steps": r.steps, "seconds": round(r.seconds, 1),
                "params": sum(p.numel() for p in r.model.parameters()),
                "history": r.history,
                "config": r.config.to_dict(),
            }
            if "checkpoint_dir" in kw:
                rows = list_checkpoints(kw["checkpoint_dir"])
                variants[name]["checkpoints_kept"] = [(row.step, row.valid, row.best) for row in rows]
            print(f"{name}: test accuracy {test:.4f} (uncompressed {base_acc['test']:.4f}, "
                  f"compressed {comp_acc['test']:.4f}), best step {r.best_step}/{r.steps}, {r.seconds:.1f} s",
                  flush=True)

    env = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "machine": platform.machine(), "cpus": os.cpu_count(),
           # Other jobs on the machine slow every timing here: the load says how busy it was.
           "load_average_1m": round(os.getloadavg()[0], 1), "seed": args.seed}
    result = {"env": env, "policy": POLICY, "epochs": EPOCHS,
              "uncompressed": {**base_acc, "params": sum(p.numel() for p in model.parameters()),
                               "train_seconds": round(train_seconds, 1)},
              "compressed": {**comp_acc, "params": totals["params_after"],
                             "factored_layers": {lp.name: {"shape": lp.shape, "rank": lp.rank,
                                                           "params_before": lp.params_before,
                                                           "params_after": lp.params_after}
                                                 for lp in factored},
                             "factored_kept_fraction": kept},
              "healed": variants}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "heal_digits.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "heal_digits.md", _markdown(result))
    print(f"wrote {args.out / 'heal_digits.md'} and .json")
    return 0 if all(v["within_1_point"] for k, v in variants.items() if "LoRA" not in k) else 1


def _markdown(r: dict) -> str:
    env, u, c = r["env"], r["uncompressed"], r["compressed"]
    layers = ", ".join(f"`{n}` {v['shape']} rank {v['rank']} ({v['params_after']}/{v['params_before']})"
                       for n, v in c["factored_layers"].items())
    lines = [
        "# Healing a compressed digits CNN (real UCI digits, 8x8)",
        "",
        f"Produced by `{env['command']}` on {env['date']} (python {env['python']}, torch {env['torch']}, "
        f"{env['threads']} threads, {env['cpus']} CPUs at load average {env['load_average_1m']}, "
        f"seed {env['seed']}).",
        "",
        f"Compression: `{r['policy']}`; factored layers: {layers}. **The factored layers keep "
        f"{100 * c['factored_kept_fraction']:.1f}% of their parameters**; the whole model goes from "
        f"{u['params']:,} to {c['params']:,} parameters.",
        "",
        "| model | params | val acc | test acc | test drop (points) | within 1 point | best step / steps "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|",
        f"| uncompressed | {u['params']:,} | {u['val']:.4f} | {u['test']:.4f} | 0 | - | - "
        f"| {u['train_seconds']} |",
        f"| compressed (plain SVD) | {c['params']:,} | {c['val']:.4f} | {c['test']:.4f} | "
        f"{100 * (u['test'] - c['test']):.2f} | no | - | - |",
    ]
    for name, v in r["healed"].items():
        lines.append(f"| healed: {name} | {v['params']:,} | {v['val_accuracy']:.4f} | "
                     f"{v['test_accuracy']:.4f} | {v['test_drop_points']:.2f} | "
                     f"{'yes' if v['within_1_point'] else 'no'} | "
                     f"{v['best_step']} / {v['steps']} | {v['seconds']} |")
    lines += ["", f"Each heal: {r['epochs']} epochs over the train split, batch 32, AdamW, cosine schedule, "
              "best step by validation accuracy (distillation: by validation KL to the uncompressed model). "
              "Healed models have exactly the compressed model's layers and parameter count.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
