"""LoRA for transfer learning: a digits CNN trained on digits 0-4, adapted to digits 5-9 (real UCI digits).

    python benchmarks/lora_transfer.py [--seeds 0,1,2] [--threads 1] [--out benchmarks/results]
    python benchmarks/lora_transfer.py --task minilm --threads 1    # the sentence task below

``--task minilm``: all-MiniLM-L6-v2 adapted to tell Python standard-library docstring sentences from
docstring sentences of numpy, scipy, torch and scikit-learn (the same sentence splitter, ``SCIENTIFIC``),
with a linear head on the mean-pooled last hidden state: head only (on frozen embeddings), LoRA r=8 (zero
init), LoRA r=8 (PiSSA init) on every Linear layer of the encoder, and full fine-tuning; same steps, batch
and seed for all, learning rates fixed per method (not tuned). Its results are added to the same files
under ``minilm`` (the digits results are kept).

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
from compressor.examples import accuracy, digits_cnn, digits_splits, fit_classifier
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
    fit_classifier(model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), x, y, ADAPT_EPOCHS, 32, seed)
    return model, params, time.perf_counter() - t0


def run_seed(seed: int, splits: dict, work: Path) -> dict:
    torch.manual_seed(seed)
    base = digits_cnn()
    x_old, y_old = _subset(splits["train"], OLD)
    t0 = time.perf_counter()
    fit_classifier(base, torch.optim.AdamW(base.parameters(), lr=2e-3, weight_decay=0.0), x_old, y_old,
                   BASE_EPOCHS, 32, seed)
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


SCIENTIFIC = ["numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial.polynomial",
              "scipy.linalg", "scipy.stats", "scipy.signal", "scipy.optimize", "scipy.sparse", "torch",
              "torch.nn.functional", "torch.linalg", "torch.fft", "torch.nn.modules.conv", "torch.nn.modules.linear",
              "torch.nn.modules.activation", "torch.nn.modules.loss", "torch.optim", "torch.utils.data",
              "sklearn.linear_model", "sklearn.metrics"]
MINILM = {"train_per_class": 500, "test_per_class": 250, "max_length": 64, "batch": 16, "epochs": 2,
          "rank": 8, "alpha": 16}
MINILM_LRS = {"head only": 1e-2, "LoRA r=8 (zero init)": 5e-4, "LoRA r=8 (PiSSA init)": 5e-4,
              "full fine-tuning": 5e-5}


class Classifier(nn.Module):
    """An encoder, masked mean pooling of its last hidden state, a linear head."""

    def __init__(self, encoder: nn.Module, classes: int = 2):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.config.hidden_size, classes)

    def pool(self, enc: dict) -> torch.Tensor:
        hidden = self.encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, enc: dict) -> torch.Tensor:
        return self.head(self.pool(enc))


def _sentence_data(seed: int):
    from compressor.examples import docstring_sentences

    k, t = MINILM["train_per_class"], MINILM["test_per_class"]
    std, sci = docstring_sentences(seed=seed), docstring_sentences(seed=seed, modules=SCIENTIFIC)
    sci_set = set(sci)
    std = [x for x in std if x not in sci_set]  # a sentence in both corpora has no true label
    if len(std) < k + t or len(sci) < k + t:
        raise SystemExit(f"only {len(std)} / {len(sci)} sentences")
    train = [(x, 0) for x in std[:k]] + [(x, 1) for x in sci[:k]]
    test = [(x, 0) for x in std[k:k + t]] + [(x, 1) for x in sci[k:k + t]]
    return train, test, {"stdlib_available": len(std), "scientific_available": len(sci)}


def _batches(tok, data, batch: int, gen: torch.Generator | None = None):
    order = torch.randperm(len(data), generator=gen).tolist() if gen is not None else range(len(data))
    order = list(order)
    for i in range(0, len(order), batch):
        chunk = [data[j] for j in order[i:i + batch]]
        enc = tok([x for x, _ in chunk], padding=True, truncation=True, max_length=MINILM["max_length"],
                  return_tensors="pt")
        yield dict(enc), torch.tensor([y for _, y in chunk])


@torch.no_grad()
def _sentence_accuracy(model: Classifier, tok, data) -> float:
    model.eval()
    right = sum(int((model(enc).argmax(-1) == y).sum()) for enc, y in _batches(tok, data, 64))
    return right / len(data)


def run_minilm(seed: int, work: Path) -> dict:
    from compressor.examples import load_minilm

    train, test, available = _sentence_data(seed)
    encoder, tok = load_minilm()
    model_bytes = _file_bytes(encoder, work)
    rows = {}
    for method, lr in MINILM_LRS.items():
        torch.manual_seed(seed)
        model = Classifier(copy.deepcopy(encoder))
        for p in model.parameters():
            p.requires_grad_(False)
        if method == "full fine-tuning":
            params = list(model.parameters())
        elif method == "head only":
            params = list(model.head.parameters())
        else:
            init = "pissa" if "PiSSA" in method else "zero"
            apply_lora(model.encoder, rank=MINILM["rank"], alpha=MINILM["alpha"], init=init,
                       filter_fn=lambda name, mod: name.startswith("encoder.") and isinstance(mod, nn.Linear))
            params = list(lora_parameters(model).values()) + list(model.head.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        t0, steps = time.perf_counter(), 0
        frozen = method == "head only"
        for _ in range(MINILM["epochs"]):
            model.train()
            model.encoder.train(not frozen)
            for enc, y in _batches(tok, train, MINILM["batch"], gen):
                if frozen:
                    with torch.no_grad():
                        feats = model.pool(enc)
                    logits = model.head(feats)
                else:
                    logits = model(enc)
                loss = nn.functional.cross_entropy(logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
        seconds = time.perf_counter() - t0
        row = {"lr": lr, "steps": steps, "seconds": seconds, "acc": _sentence_accuracy(model, tok, test),
               "trained_params": sum(p.numel() for p in params),
               "head_bytes": _file_bytes(model.head, work)}
        if method.startswith("LoRA"):
            folder = save_adapter(model.encoder, work / f"minilm-adapter-{len(rows)}")
            row["adapter_bytes"] = (folder / "adapter_model.safetensors").stat().st_size
            row["adapter_rank_written"] = json.loads((folder / "adapter_config.json").read_text())["r"]
            reloaded = Classifier(copy.deepcopy(encoder))
            reloaded.head.load_state_dict(model.head.state_dict())
            load_adapter(reloaded.encoder, folder)  # onto the untouched original encoder
            row["reloaded_acc"] = _sentence_accuracy(reloaded, tok, test)
            row["bytes"] = row["adapter_bytes"] + row["head_bytes"]
        elif method == "head only":
            row["bytes"] = row["head_bytes"]
        else:
            row["bytes"] = _file_bytes(model, work)
        rows[method] = row
        print(method, {k: v for k, v in row.items()}, flush=True)
    return {"seed": seed, "rows": rows, "model_bytes": model_bytes, "settings": MINILM,
            "samples": {"train": len(train), "test": len(test), **available}, "scientific_modules": SCIENTIFIC}


def minilm_markdown(r: dict) -> str:
    env, s = r["environment"], r["rows"]
    full = r["model_bytes"]
    st = r["settings"]
    lines = ["", "# LoRA for transfer learning: all-MiniLM-L6-v2, stdlib vs scientific-library docstring sentences",
             "", f"Produced by `{env['command']}` on {env['date']} (python {env['python']}, torch {env['torch']}, "
             f"{env['torch_threads']} threads, {env['cpu_count']} CPUs at load average "
             f"{env['load_average_at_start']}).", "",
             f"Task: is a sentence from a Python standard-library docstring (label 0) or from a docstring of "
             f"numpy, scipy, torch or scikit-learn (label 1; modules in the JSON)? Sentences split and filtered "
             f"the same way (`compressor.examples.docstring_sentences`), balanced: {r['samples']['train']} train, "
             f"{r['samples']['test']} held-out test sentences, at most {st['max_length']} tokens. A linear head on "
             f"the mean-pooled last hidden state; {st['epochs']} epochs at batch {st['batch']} (AdamW, seed "
             f"{r['seed']}), learning rates fixed per method, not tuned. LoRA: r={st['rank']}, alpha={st['alpha']} "
             "on every Linear of the encoder (the head trains too). Bytes per task: the adapter_model.safetensors "
             "`save_adapter` writes plus the head's weights (a PiSSA adapter is written as a rank-2r LoRA on the "
             f"original weights, so it is twice as large); the whole model.safetensors of the encoder is "
             f"{full:,} bytes.", "",
             "| method | test acc | trained params | bytes per task | vs model | lr | steps | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for m, v in s.items():
        lines.append(f"| {m} | {v['acc']:.4f} | {v['trained_params']:,} | {v['bytes']:,} | {v['bytes'] / full:.2%} "
                     f"| {v['lr']:g} | {v['steps']} | {v['seconds']:.0f} |")
    lora = [m for m in s if "reloaded_acc" in s[m]]
    lines += ["", "The written adapters, loaded onto the untouched encoder with `load_adapter` (same head), score "
              + ", ".join(f"{s[m]['reloaded_acc']:.4f} ({m})" for m in lora) + ".", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("digits", "minilm"), default="digits")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/lora_transfer.py " + " ".join(sys.argv[1:])
    env = environment(command)
    seeds = [int(s) for s in args.seeds.split(",")]
    old_path = args.out / "lora_transfer.json"
    old = json.loads(old_path.read_text()) if old_path.is_file() else None
    if args.task == "minilm":
        if old is None:
            raise SystemExit("run the digits task first: the MiniLM results are added to its files")
        with tempfile.TemporaryDirectory() as tmp:
            old["minilm"] = {"environment": env, **run_minilm(seeds[0], Path(tmp))}
        atomic_write_text(old_path, json.dumps(old, indent=1) + "\n")
        atomic_write_text(args.out / "lora_transfer.md", markdown(old))
        print(markdown(old))
        return 0
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
    if old is not None and "minilm" in old:
        result["minilm"] = old["minilm"]
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
    return "\n".join(lines) + (minilm_markdown(r["minilm"]) if "minilm" in r else "")


if __name__ == "__main__":
    raise SystemExit(main())
