"""Low-rank + quantization recipes on the digits CNN, against dense fp32 / fp16 / int8 measured in the same run.

    python benchmarks/recipes_digits.py [--out benchmarks/results] [--cache DIR]

Fidelity is test accuracy (the 20% test split, never trained on; top-1 agreement with the fp32 model and
logit cosine are recorded too). Healing distills on the training split; calibration (data-aware factors,
when compressor.analysis.analyze supports it) uses 256 training images. First the three dense references are
measured, then every recipe under ``--min-fidelity`` = dense int8's test accuracy, so the chosen point is
the smallest file at least as accurate as int8 (the second search reuses the first one's measurements).
Writes ``recipes_digits.json``, ``.md`` and ``recipes_digits_size.png`` / ``_latency.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import compressor
from compressor.core.fileio import atomic_write_text
from compressor.examples import digits_splits, train_digits_cnn
from compressor.report.report import versions
from compressor.search.cache import fingerprint
from compressor.search.evaluate import Evaluation
from compressor.search.front import front_markdown, plot_front, versus, versus_headline
from compressor.search.recipes import REFERENCES, Constraints, default_recipes
from compressor.search.search import search

THREADS = 2


def accuracy_evaluation(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Evaluation:
    """Test accuracy as the fidelity; agreement with the fp32 model's predictions and logit cosine beside."""
    with torch.no_grad():
        ref = model(x).double().numpy()

    def score(outputs: list[list[np.ndarray]]) -> dict[str, float]:
        logits = np.asarray(outputs[0][0], dtype=np.float64)
        cos = np.sum(logits * ref, 1) / (np.linalg.norm(logits, axis=1) * np.linalg.norm(ref, axis=1))
        acc = float((logits.argmax(1) == y.numpy()).mean())
        return {"fidelity": acc, "test_accuracy": acc,
                "top1_agreement": float((logits.argmax(1) == ref.argmax(1)).mean()), "cosine": float(cos.mean())}

    return Evaluation([x], f"test accuracy on the {len(y)} held-out digits test images", score,
                      fingerprint(["digits-test-accuracy", x, y]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--cache", type=Path, default=None, help="measurement cache [default: a temporary folder]")
    ap.add_argument("--heal-steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    model, accs = train_digits_cnn(seed=0)
    splits = digits_splits(seed=0)
    xtr, _ = splits["train"]
    xte, yte = splits["test"]
    calibrated = "calibration" in inspect.signature(compressor.analysis.analyze).parameters
    calibration = [xtr[:256]] if calibrated else None
    recipes = default_recipes((0.5, 0.7, 0.8, 0.9), calibrated=calibrated, heal_steps=(0, args.heal_steps))
    cache = args.cache or Path(tempfile.mkdtemp(prefix="recipes-digits-cache-"))
    kw = dict(example_inputs=xte[:8], evaluation=accuracy_evaluation(model, xte, yte), cache_dir=cache,
              calibration=calibration, heal_data=xtr, threads=THREADS, latency_runs=200,
              heal_options={"lr": 1e-3, "batch_size": 64}, log=print,
              latency_aware=False)  # the size / fidelity front as committed; latency: benchmarks/latency.py
    refs = search(model, constraints=Constraints(min_fidelity=0.0), recipes=list(REFERENCES), **kw)
    int8 = refs.reference("int8")
    result = search(model, constraints=Constraints(min_fidelity=int8.fidelity), recipes=recipes, **kw)
    front = result.to_dict()
    vs = versus(result)
    command = "python benchmarks/recipes_digits.py " + " ".join(sys.argv[1:])
    record = {"benchmark": "recipes_digits", "command": command.strip(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "threads": {"torch": THREADS, "onnxruntime": THREADS},
              "model": {"name": "digits CNN (compressor.examples.train_digits_cnn, seed 0)", **accs},
              "calibrated": calibrated, "heal_steps": args.heal_steps, "versus_dense_int8": vs,
              "seconds": round(time.perf_counter() - start, 1), "load_average_1_5_15": os.getloadavg(), "front": front}
    args.out.mkdir(parents=True, exist_ok=True)
    plots = plot_front(front, args.out, prefix="recipes_digits")
    atomic_write_text(args.out / "recipes_digits.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(args.out / "recipes_digits.md", render(record, plots))
    print(versus_headline(vs, "test accuracy", mb_digits=4, digits=4))
    return 0



def render(record: dict, plots: list[str]) -> str:
    v = record["versions"]
    return "\n".join([
        "# Recipes on the digits CNN: low-rank x fp32 / fp16 / int8 against dense int8", "",
        f"**Headline:** {versus_headline(record['versus_dense_int8'], 'test accuracy', mb_digits=4, digits=4)}.", "",
        f"Points that strictly beat dense int8 (smaller at equal or better accuracy, or more accurate at equal "
        f"or smaller size): {', '.join(record['versus_dense_int8']['beaten_by']) or 'none'}.", "",
        f"The fp32 torch model: validation accuracy {record['model']['val']:.4f}, test {record['model']['test']:.4f}. "
        f"Calibrated (data-aware) factors: {record['calibrated']}; healing: {record['heal_steps']} distillation "
        "steps on the training split.", "",
        front_markdown(record["front"], plots),
        "## Provenance", "", f"- command: `{record['command']}`", f"- date: {record['date']}",
        f"- threads: torch {record['threads']['torch']}, onnxruntime {record['threads']['onnxruntime']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- wall time: {record['seconds']} s; machine load average at the end (1/5/15 min): "
        f"{', '.join(f'{x:.1f}' for x in record['load_average_1_5_15'])} on 2 cores shared with other jobs, "
        "so latencies are comparable within this run only", ""])


if __name__ == "__main__":
    sys.exit(main())
