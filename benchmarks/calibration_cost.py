"""Cost of a calibrated analysis against a plain one on two real CNNs, and the quality it buys.

    python benchmarks/calibration_cost.py --label after [--size 160] [--views 4] [--rounds 3]

Per model (benchmarks/cnn.py's EfficientNet-Lite0 and MobileNetV2, its photos, calibration split and batches):
``compressor.analyze(model, target=0.4, example_inputs=...)`` (plain) and ``compressor.analyze(model, target=0.4,
calibration=batches)`` timed in alternating rounds, the fastest round of each (other processes only ever
slow a round down), and the held-out top-1 agreement / logit cosine of each rewritten model. Then the whole
job, ``compressor.compress(weights, target=0.4, arch=..., input_shapes=[...])`` with and without
``calibration=`` (a file of the same batches): load, analyze, rewrite, save, ONNX export and validation,
report, also in alternating rounds (the issue's 17 min against 65 s were whole runs). Results are
stored under ``--label`` in ``calibration_cost.json`` (other labels kept, so the same script run on an
older commit gives the "before" row) and all labels are written to ``calibration_cost.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from _common import environment, load_average, log, md_table
from cnn import BATCH, MODELS, fidelity, split_images, whole_runs

import compressor
from compressor.core.fileio import atomic_write_text

TARGET = 0.4


def run_model(name: str, args) -> dict:
    make, normalization = MODELS[name]
    original = make()
    cal, held_out = split_images(args.size, args.views, normalization)
    batches = list(cal.split(BATCH))
    with torch.no_grad():
        ref = torch.cat([original(b) for b in held_out.split(32)])
    seconds: dict[str, list[float]] = {"plain": [], "calibrated": []}
    last = {}
    for _ in range(args.rounds):
        # Plain as benchmarks/cnn.py runs it (example inputs: BatchNorm folding), so the ratios compare.
        for kind, extra in (("plain", {"example_inputs": batches[0]}), ("calibrated", {"calibration": batches})):
            model = copy.deepcopy(original)  # a plan's calibrated factors belong to the model analysed
            clock = time.perf_counter()
            last[kind] = model, compressor.analyze(model, target=TARGET, **extra)
            seconds[kind].append(time.perf_counter() - clock)
    row = {"seconds": seconds, "ratio": min(seconds["calibrated"]) / min(seconds["plain"])}
    for kind, (model, plan) in last.items():
        compressor.rewrite(model, plan)
        row[kind] = fidelity(model, held_out, ref)
    row["whole"] = whole_runs(name, original, batches, TARGET, args.rounds)
    log(f"{name}: calibrated / plain time x{row['ratio']:.1f} (analyze), x{row['whole']['ratio']:.1f} (whole job); "
        f"logit cosine plain {row['plain']['logit_cosine']:.3f}, calibrated {row['calibrated']['logit_cosine']:.3f}")
    return row


def markdown(results: dict) -> str:
    lines = ["# Calibration cost: calibrated vs plain `analyze` on real CNNs", "",
             f"`analyze(model, target={TARGET})` with `example_inputs=` (plain) or `calibration=` "
             "(benchmarks/cnn.py's photos and calibration batches), 1 torch thread, each time the fastest of "
             "alternating rounds; quality: top-1 agreement / logit cosine to the original model on the held-out "
             "views, after `rewrite`. Whole job: `compressor.compress(weights, target=0.4, arch=..., "
             "input_shapes=[...])` with or without `calibration=` (load, analyze, rewrite, save, ONNX export and "
             "validation, report), fastest of alternating rounds (not measured in runs before it was added).", ""]
    rows = []
    for label, run in results.items():
        env = run["environment"]
        for name, r in run["models"].items():
            whole = r.get("whole")
            rows.append([label, env.get("commit", ""), name, f"{min(r['seconds']['plain']):.2f}",
                         f"{min(r['seconds']['calibrated']):.2f}", f"{r['ratio']:.1f}x",
                         f"{min(whole['seconds']['plain']):.1f} / {min(whole['seconds']['calibrated']):.1f} s, "
                         f"{whole['ratio']:.1f}x" if whole else "not measured",
                         f"{r['plain']['top1_agreement']:.3f} / {r['plain']['logit_cosine']:.3f}",
                         f"{r['calibrated']['top1_agreement']:.3f} / {r['calibrated']['logit_cosine']:.3f}",
                         f"{env['load_average_at_start']} / {run['load_average_at_end']}"])
    lines += [md_table(["run", "commit", "model", "analyze: plain s", "calibrated s", "calibrated / plain",
                        "whole job: plain / calibrated, ratio", "plain quality", "calibrated quality",
                        "load avg start / end"], rows), ""]
    lines += [f"- {label}: `{run['environment']['command']}`, {run['environment']['date']}"
              + (f", compressor of {run['environment']['commit']} from {run['environment']['compressor_path']}"
                 if "compressor_path" in run["environment"] else "")
              for label, run in results.items()]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True, help="row name, e.g. before / after")
    ap.add_argument("--commit", default="", help="the commit measured, for the table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--views", type=int, default=4, help="views per photo (18 photos, half of them held out)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = environment("python benchmarks/calibration_cost.py " + " ".join(sys.argv[1:]))
    env["commit"] = args.commit
    env["compressor_path"] = str(Path(compressor.__file__).parent)  # the package measured (PYTHONPATH may differ)
    run = {"environment": env, "models": {name: run_model(name, args) for name in args.models}}
    run["load_average_at_end"] = load_average()
    path = args.out / "calibration_cost.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.label] = run
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    atomic_write_text(args.out / "calibration_cost.md", markdown(results) + "\n")
    log(f"wrote {path} and calibration_cost.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
