"""Where a calibrated ``analyze`` spends its time: cProfile of the runs calibration_cost.py and
onnx_calibration_cost.py time, per step of the analysis.

    python benchmarks/calibration_profile.py --label after [--threads 1] [--models MobileNetV2 detector]

MobileNetV2 and EfficientNet-Lite0 as benchmarks/calibration_cost.py analyses them (160 px, 4 views per photo,
batches of 8, ``target=0.4``), and the ONNX text detector as benchmarks/onnx_calibration_cost.py does
(``analyze_onnx``, one calibration view per photo): one plain analysis, then one calibrated analysis under
cProfile (which adds its own overhead, mostly to the many small Python calls). Each step is the cumulative time of
the function that runs it; steps nest (the indented ones are part of the one above), and an SVD counted in a
step is also counted in the linear algebra totals. Results are stored under ``--label`` in
``calibration_profile.json`` (other labels kept) and all labels are written to ``calibration_profile.md``.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch
from _common import environment, load_average, log, md_table

from compressor.core.fileio import atomic_write_text

TARGET = 0.4
# (label, file suffix, function): the steps of compressor.analysis.calibration.calibrated_analysis.
STEPS = [
    ("BatchNorm folding (the plain analysis does it too)", "analysis/analyze.py", "_folds"),
    ("moments pass: forward over every batch with hooks", "analysis/tracing.py", "moments"),
    ("  X^T X products", "analysis/whitened.py", "_accumulate"),
    ("  conv patches (im2col)", "core/handlers.py", "conv_patches"),
    ("data-starved layers' ridge search", "analysis/calibration.py", "_starved_ridges"),
    ("whitened decompositions on all batches", "analysis/whitened.py", "decompose"),
    ("alternatives (spatial factorization)", "analysis/calibration.py", "_alternatives"),
    ("sensitivity", "analysis/calibration.py", "_sensitivities"),
    ("  probe passes", "analysis/tracing.py", "measure"),
    ("held-out choice", "analysis/held_out.py", "choose_on_held_out"),
    ("  plain SVDs (the plain candidate)", "core/svd.py", "svd"),
    ("  joint passes of the candidates", "analysis/tracing.py", "joint_errors"),
    ("factors fit without the held-out batches (probes and choice)", "analysis/held_out.py", "_fit"),
    ("sequential refits: paired passes", "analysis/tracing.py", "paired_moments"),
]
TOTALS = [("forward passes", "data/inputs.py", "call"),
          ("SVDs (LAPACK)", "~", "<built-in method torch._C._linalg.linalg_svd>"),
          ("eigendecompositions", "~", "<built-in method torch._C._linalg.linalg_eigh>"),
          ("Cholesky factorizations", "~", "<built-in method torch._C._linalg.linalg_cholesky_ex>"),
          ("conv2d calls", "~", "<built-in method torch.conv2d>"),
          ("onnxruntime segment runs", "~", "<built-in method onnxruntime.capi.onnxruntime_pybind11_state.run>")]


def _find(stats: pstats.Stats, suffix: str, func: str) -> tuple[int, float, float]:
    """(calls, own seconds, cumulative seconds) of the function, summed over its matches."""
    calls, own, cum = 0, 0.0, 0.0
    for (path, _line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():
        if name == func and (path.endswith(suffix) or suffix == "~" == path):
            calls, own, cum = calls + nc, own + tt, cum + ct
    return calls, own, cum


def _torch_model(name: str):
    from cnn import BATCH, MODELS, split_images

    import compressor

    make, normalization = MODELS[name]
    original = make()
    batches = list(split_images(160, 4, normalization)[0].split(BATCH))

    def plain():
        return compressor.analyze(copy.deepcopy(original), target=TARGET, example_inputs=batches[0])

    def calibrated():
        return compressor.analyze(copy.deepcopy(original), target=TARGET, calibration=batches)
    return plain, calibrated


def _onnx_model(_name: str):
    from cnn_dense import MODELS, split_images

    from compressor.analysis.onnx_model import OnnxModel, analyze_onnx
    from compressor.formats.onnx_graph import read_onnx

    locate, make, batch, _, _, exclude = MODELS["detector"]
    graph = read_onnx(locate())
    batches = list(split_images(make, 1, 1)[0].split(batch))

    def plain():
        return analyze_onnx(OnnxModel(graph), target=TARGET, exclude=exclude)

    def calibrated():
        return analyze_onnx(OnnxModel(graph), target=TARGET, calibration=batches, exclude=exclude)
    return plain, calibrated


def profile(name: str) -> dict:
    plain, calibrated = (_onnx_model if name == "detector" else _torch_model)(name)
    clock = time.perf_counter()
    plain()
    plain_s = time.perf_counter() - clock
    prof = cProfile.Profile()
    clock = time.perf_counter()
    prof.runcall(calibrated)
    calibrated_s = time.perf_counter() - clock
    stats = pstats.Stats(prof)
    steps = {label: dict(zip(("calls", "own_s", "cumulative_s"), _find(stats, *where), strict=True))
             for label, *where in STEPS}
    totals = {label: dict(zip(("calls", "own_s", "cumulative_s"), _find(stats, *where), strict=True))
              for label, *where in TOTALS}
    log(f"{name}: plain {plain_s:.2f} s, calibrated (profiled) {calibrated_s:.2f} s")
    return {"plain_s": plain_s, "calibrated_profiled_s": calibrated_s, "steps": steps, "totals": totals}


def markdown(results: dict) -> str:
    lines = ["# Where a calibrated `analyze` spends its time", "",
             "cProfile of one calibrated analysis (`target=0.4`) of each model as benchmarks/calibration_cost.py "
             "(MobileNetV2, EfficientNet-Lite0: 160 px, 36 calibration views in batches of 8) and "
             "benchmarks/onnx_calibration_cost.py (the ONNX text detector, 9 calibration views) run it, 1 torch "
             "thread, after one plain analysis (timed without the profiler). Seconds are cumulative (a step "
             "includes what it calls; indented steps are part of the one above); cProfile's overhead inflates "
             "them somewhat. Written by `benchmarks/calibration_profile.py`.", ""]
    for label, run in results.items():
        env = run["environment"]
        lines += [f"## {label} (commit {env.get('commit', '')})", "",
                  f"`{env['command']}`, {env['date']}, load average at start {env['load_average_at_start']}, "
                  f"at end {run['load_average_at_end']}.", ""]
        names = list(run["models"])
        head = ["step"] + [f"{n}: s (calls)" for n in names]
        rows = [["plain analysis (no profiler)"] + [f"{run['models'][n]['plain_s']:.2f}" for n in names],
                ["calibrated analysis (profiled)"] + [f"{run['models'][n]['calibrated_profiled_s']:.2f}"
                                                      for n in names]]
        for group in ("steps", "totals"):
            for step in run["models"][names[0]][group]:
                cells = []
                for n in names:
                    got = run["models"][n][group][step]
                    secs = got["cumulative_s"] if group == "steps" else got["own_s"]
                    if step == "forward passes":
                        secs = got["cumulative_s"]
                    cells.append(f"{secs:.2f} ({got['calls']})" if got["calls"] else "-")
                rows.append([step.replace("  ", "&nbsp;&nbsp;") if group == "steps" else f"total: {step}", *cells])
        lines += [md_table(head, rows), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--commit", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="*", default=["MobileNetV2", "EfficientNet-Lite0", "detector"])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = environment("python benchmarks/calibration_profile.py " + " ".join(sys.argv[1:]))
    env["commit"] = args.commit
    run = {"environment": env, "models": {name: profile(name) for name in args.models}}
    run["load_average_at_end"] = load_average()
    path = args.out / "calibration_profile.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.label] = run
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    atomic_write_text(args.out / "calibration_profile.md", markdown(results) + "\n")
    log(f"wrote {path} and calibration_profile.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
