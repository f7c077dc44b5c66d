"""LoRA for transfer learning: a digits CNN trained on digits 0-4, adapted to digits 5-9 (real UCI digits).

    python benchmarks/lora_transfer.py [--seeds 0,1,2] [--threads 1] [--out benchmarks/results]

The CNN of ``compressor.examples`` (10-way head) is trained on the train-split images of 0-4 only, then
adapted on the train-split images of 5-9 three ways, each for the same epochs with AdamW: full
fine-tuning (every weight), the head alone (the last Linear, weight and bias), and LoRA adapters on every
conv and linear layer (base frozen, biases frozen) at ranks 4 and 8. Reported on the test-split images of
5-9 (the new task) and of 0-4 (what the adapted model still knows of the old one), the bytes each method
must store per task (the adapter file as written, in PEFT's format, vs the full model's weights file), and
that the written adapter, loaded back onto the base model, scores exactly what the trained one did.
Adaptation runs once per seed (base model, data order and initialisation); the table shows the mean and the
range over seeds. Writes ``lora_transfer.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment

from compressor.core.fileio import atomic_write_text
from compressor.examples import accuracy, digits_cnn, digits_splits
from compressor.train.adapter import load_adapter, save_adapter
from compressor.train.lora import apply_lora, lora_parameters

OLD, NEW = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
BASE_EPOCHS, ADAPT_EPOCHS = 15, 10
METHODS = ("full fine-tuning", "head only", "LoRA r=4", "LoRA r=8")
LRS = (1e-3, 3e-3, 1e-2, 3e-2)  # each method's learning rate: the best of these on the 5-9 validation images


def _subset(split: tuple[torch.Tensor, torch.Tensor], classes: tuple[int, ...]):
    x, y = split
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def _train(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, epochs: int,
           lr: float, seed: int) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 32):
            idx = perm[i:i + 32]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def _file_bytes(model: nn.Module, folder: Path) -> int:
    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"))
    return (folder / "model.safetensors").stat().st_size


def _adapt(base: nn.Module, method: str, x: torch.Tensor, y: torch.Tensor, lr: float, seed: int):
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "full fine-tuning":
        params = list(model.parameters())
    elif method == "head only":
        params = list(model[-1].parameters())
    else:
        rank = int(method.rpartition("=")[2])
        apply_lora(model, rank=rank, alpha=2 * rank)
        params = list(lora_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    _train(model, params, x, y, ADAPT_EPOCHS, lr, seed)
    return model, params, time.perf_counter() - t0


def run_seed(seed: int, splits: dict, work: Path) -> dict:
    torch.manual_seed(seed)
    base = digits_cnn()
    x_old, y_old = _subset(splits["train"], OLD)
    t0 = time.perf_counter()
    _train(base, list(base.parameters()), x_old, y_old, BASE_EPOCHS, 2e-3, seed)
    base_seconds = time.perf_counter() - t0
    test_old, test_new = _subset(splits["test"], OLD), _subset(splits["test"], NEW)
    x_new, y_new = _subset(splits["train"], NEW)
    full_bytes = _file_bytes(base, work)
    rows = {"base (trained on 0-4)": {"new": accuracy(base, *test_new), "old": accuracy(base, *test_old),
                                      "bytes": full_bytes, "trained_params": sum(p.numel() for p in base.parameters()),
                                      "seconds": base_seconds}}
    val_new = _subset(splits["val"], NEW)
    for method in METHODS:
        tried = {}
        for lr in LRS:
            model, params, seconds = _adapt(base, method, x_new, y_new, lr, seed)
            tried[lr] = (accuracy(model, *val_new), model, params, seconds)
        lr = max(LRS, key=lambda v: (tried[v][0], -v))  # ties: the smaller rate
        val, model, params, seconds = tried[lr]
        row = {"lr": lr, "val_new": val, "new": accuracy(model, *test_new), "old": accuracy(model, *test_old),
               "trained_params": sum(p.numel() for p in params), "seconds": seconds}
        if method.startswith("LoRA"):
            folder = save_adapter(model, work / f"adapter-{method[-1]}-{seed}")
            row["bytes"] = (folder / "adapter_model.safetensors").stat().st_size
            reloaded = copy.deepcopy(base)
            load_adapter(reloaded, folder)
            row["reloaded_new"] = accuracy(reloaded, *test_new)
        elif method == "head only":
            row["bytes"] = _file_bytes(model[-1], work)
        else:
            row["bytes"] = _file_bytes(model, work)
        rows[method] = row
    return {"seed": seed, "rows": rows, "samples": {"train_old": len(y_old), "train_new": len(y_new),
                                                    "val_new": len(val_new[1]),
                                                    "test_old": len(test_old[1]), "test_new": len(test_new[1])}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/lora_transfer.py " + " ".join(sys.argv[1:])
    env = environment(command)
    seeds = [int(s) for s in args.seeds.split(",")]
    splits = digits_splits(0)  # one fixed split; the seeds vary the models
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_seed(s, splits, Path(tmp)) for s in seeds]
    methods = list(runs[0]["rows"])
    summary = {}
    for m in methods:
        vals = {k: [r["rows"][m][k] for r in runs] for k in ("new", "old", "bytes", "trained_params", "seconds")}
        lrs = [r["rows"][m].get("lr") for r in runs]
        summary[m] = {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for k, v in vals.items()}
        summary[m]["lr"] = lrs
        if "reloaded_new" in runs[0]["rows"][m]:
            summary[m]["reloaded_equal"] = all(r["rows"][m]["reloaded_new"] == r["rows"][m]["new"] for r in runs)
    result = {"environment": env, "seeds": seeds, "samples": runs[0]["samples"], "base_epochs": BASE_EPOCHS,
              "adapt_epochs": ADAPT_EPOCHS, "lrs": LRS, "summary": summary, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "lora_transfer.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "lora_transfer.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    env, s, n = r["environment"], r["summary"], r["samples"]
    full = s["full fine-tuning"]["bytes"]["mean"]

    def acc(v):
        return f"{v['mean']:.4f} ({v['min']:.3f}-{v['max']:.3f})"

    lines = ["# LoRA for transfer learning: digits 0-4 -> 5-9 (real UCI digits, 8x8)", "",
             f"Produced by `{env['command']}` on {env['date']} (python {env['python']}, torch {env['torch']}, "
             f"{env['torch_threads']} threads, {env['cpu_count']} CPUs at load average "
             f"{env['load_average_at_start']}).",
             "",
             f"Base: the digits CNN trained {r['base_epochs']} epochs on the {n['train_old']} train images of 0-4. "
             f"Each method then trains {r['adapt_epochs']} epochs (AdamW, batch 32) on the "
             f"{n['train_new']} train images of 5-9, at the learning rate among {list(r['lrs'])} that scores best "
             f"on the {n['val_new']} validation images of 5-9 (chosen per method and seed). Accuracy on the "
             f"{n['test_new']} test images of 5-9 (new) and "
             f"the {n['test_old']} of 0-4 (old); mean (min-max) over seeds {r['seeds']} (base model, data order, "
             "initialisation). Bytes: what must be stored per task (LoRA: the adapter_model.safetensors written; "
             "head only: the head's weights; full: the whole model.safetensors). Every method retrains the 10-way "
             "head's view of 5-9, so the adapted models no longer predict 0-4 (old-task accuracy 0); LoRA leaves the "
             "base weights untouched, so the base model and its 0-4 accuracy come back by removing the adapter.", "",
             "| method | new-task acc (5-9) | old-task acc (0-4) | trained params | bytes per task | vs full | lr |",
             "|---|---|---|---|---|---|---|"]
    for m, v in s.items():
        lines.append(f"| {m} | {acc(v['new'])} | {acc(v['old'])} | {int(v['trained_params']['mean']):,} | "
                     f"{int(v['bytes']['mean']):,} | {v['bytes']['mean'] / full:.1%} | "
                     f"{', '.join(f'{x:g}' for x in v['lr'] if x is not None) or '-'} |")
    lora = [m for m in s if "reloaded_equal" in s[m]]
    lines += ["", "The written adapters, loaded back onto the base model with `compressor.train.adapter.load_adapter`, "
              "score " + ("exactly" if all(s[m]["reloaded_equal"] for m in lora) else "NOT exactly")
              + " what the trained models scored (every seed). One thread, CPU; timings are in the JSON.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
