"""Cost of a calibrated analysis of an ONNX file against a plain one, before and after a change, side by side.

    python benchmarks/onnx_calibration_cost.py --threads 1 [--before ec5cca9] [--rounds 2] [--target 0.4]

The detector of benchmarks/cnn_dense.py (ddddocr's text detector, zoo.ddddocr_detector_onnx; its images, 1
calibration view per photo) is analysed with ``analyze_onnx(OnnxModel(graph), target=t)`` (plain) and with
``calibration=batches`` (calibrated), each in a fresh process, by this checkout's ``compressor`` ("after") and
by the ``--before`` commit's (``git archive`` into a temporary folder, "before"), in alternating rounds; each
timing is the fastest of its rounds (other processes only ever slow a round down). Quality: each version's
calibrated plan, rewritten and written, run in onnxruntime on the held-out views (cnn_dense's detector
fidelity: cosine of the output map / of the per-anchor scores), and whether both versions chose the same ranks.
Writes results/onnx_calibration_cost.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(args) -> dict:
    """One version's plain and calibrated analysis times (and, with --quality, its calibrated plan's fidelity)."""
    import torch

    torch.set_num_threads(args.threads)
    from cnn_dense import MODELS, split_images

    import compressor
    from compressor.analysis.onnx_model import OnnxModel, analyze_onnx
    from compressor.formats.onnx_graph import read_onnx

    locate, make, batch, fidelity, _, exclude = MODELS["detector"]
    source = locate()
    graph = read_onnx(source)
    cal, held_out = split_images(make, 1, 1)
    batches = list(cal.split(batch))
    clock = time.perf_counter()
    analyze_onnx(OnnxModel(graph), target=args.target, exclude=exclude)
    plain = time.perf_counter() - clock
    model = OnnxModel(graph)
    clock = time.perf_counter()
    plan = analyze_onnx(model, target=args.target, calibration=batches, exclude=exclude)
    calibrated = time.perf_counter() - clock
    out = {"compressor": str(Path(compressor.__file__).parent), "plain_s": plain, "calibrated_s": calibrated,
           "ranks": {lp.name: lp.rank for lp in plan.layers}, "kinds": {lp.name: lp.kind for lp in plan.layers},
           "sensitivity": plan.calibration.get("sensitivity") if plan.calibration else None}
    if args.quality:
        from cnn_dense import outputs

        from compressor.core.rewrite import rewrite
        from compressor.export.onnx_factor import write_factored

        rewrite(model, plan)
        factors = {n: (m.up.weight, m.down.weight) for n, m in model.named_modules() if hasattr(m, "up")}
        with tempfile.TemporaryDirectory() as tmp:
            path = write_factored(graph, factors, Path(tmp) / "calibrated.onnx")
            out["fidelity"] = fidelity(outputs(path, held_out, batch), outputs(source, held_out, batch))
    return out


def run_version(src: Path, args, quality: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{HERE}", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(args.threads),
           "--target", str(args.target)] + (["--quality"] if quality else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", default="ec5cca9", help="commit of the 'before' version")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.4)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quality", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    from _common import environment, load_average, log, md_table

    from compressor.core.fileio import atomic_write_text

    env = environment("python benchmarks/onnx_calibration_cost.py " + " ".join(sys.argv[1:]))
    after_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=ROOT, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "compressor"], capture_output=True, text=True,
                           cwd=ROOT, check=True).stdout.strip()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        before_src = Path(tmp)
        archive = subprocess.run(["git", "archive", args.before, "compressor"], capture_output=True, cwd=ROOT,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before_src)], input=archive, check=True)
        srcs = {"before": before_src, "after": ROOT}
        for r in range(args.rounds):
            for label in (("before", "after") if r % 2 == 0 else ("after", "before")):
                got = run_version(srcs[label], args, quality=r == 0)
                runs[label].append(got)
                log(f"round {r + 1} {label}: plain {got['plain_s']:.1f} s, calibrated {got['calibrated_s']:.1f} s"
                    + (f", fidelity {got['fidelity']}" if "fidelity" in got else ""))
    env["load_average_at_end"] = load_average()
    env["total_s"] = round(time.perf_counter() - start, 1)
    rows, result = [], {"environment": env, "target": args.target, "commits": {"before": args.before,
                        "after": after_commit + (" + uncommitted changes" if dirty else "")}, "versions": {}}
    for label, rs in runs.items():
        plain, calibrated = min(r["plain_s"] for r in rs), min(r["calibrated_s"] for r in rs)
        fid = rs[0]["fidelity"]
        result["versions"][label] = {"plain_s": [r["plain_s"] for r in rs],
                                     "calibrated_s": [r["calibrated_s"] for r in rs],
                                     "plain_best_s": plain, "calibrated_best_s": calibrated,
                                     "ratio": calibrated / plain, "fidelity": fid, "ranks": rs[0]["ranks"],
                                     "sensitivity": rs[0]["sensitivity"]}
        rows.append([label, result["commits"][label], f"{plain:.2f}", f"{calibrated:.1f}",
                     f"{calibrated / plain:.1f}x", f"{fid['map_cosine']:.4f} / {fid['score_cosine']:.4f}"])
    b, a = result["versions"]["before"], result["versions"]["after"]
    result["same_plan"] = b["ranks"] == a["ranks"] and b["sensitivity"] == a["sensitivity"]
    result["calibrated_before_over_after"] = b["calibrated_best_s"] / a["calibrated_best_s"]
    md = ["# Calibrated analysis of an ONNX file: cost before and after, side by side", "",
          f"Command: `{env['command']}`  ",
          f"Machine: {env['processor']}, {env['cpu_count']} cores shared with other jobs, torch threads "
          f"{args.threads} (onnxruntime's segment sessions: their default); load average at start "
          f"{env['load_average_at_start']}, at end {env['load_average_at_end']}; total {env['total_s']} s.", "",
          f"ddddocr's text detector (`zoo.ddddocr_detector_onnx`, benchmarks/cnn_dense.py's images: 9 calibration "
          f"/ 9 held-out views), `analyze_onnx(OnnxModel(graph), target={args.target})` plain and with "
          "`calibration=`, each version in its own process, alternating rounds, fastest of "
          f"{args.rounds} rounds. Quality: the calibrated plan rewritten and run in onnxruntime on the held-out "
          "views (cosine of the output map / of the per-anchor scores to the original's).", "",
          md_table(["version", "commit", "plain s", "calibrated s", "calibrated / plain",
                    "calibrated quality"], rows), "",
          f"Calibrated analysis, before / after: {result['calibrated_before_over_after']:.2f}x faster. "
          f"Same ranks and sensitivities in both versions: {'yes' if result['same_plan'] else 'NO'}. "
          "Calibrated s per round, before / after (in the order run): " +
          "; ".join(f"{x:.1f} / {y:.1f}" for x, y in zip(b["calibrated_s"], a["calibrated_s"], strict=True)) + ".", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "onnx_calibration_cost.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "onnx_calibration_cost.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
