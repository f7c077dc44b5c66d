"""ONNX in, compressed ONNX out, on all-MiniLM-L6-v2: the torch path and the ONNX path side by side.

    python benchmarks/onnx_input.py [--out benchmarks/results] [--targets 0.1 ...]

MiniLM is exported to ONNX (``export_onnx``, the dynamo exporter). For each ``--target``, with the same 128
calibration sentences (stdlib docstrings), the default data-aware analysis (whitened factors, sequential
refits, measured sensitivity) on both paths:

* torch: ``analyze(model, target=t, exclude=["embeddings.*"], calibration=...)``, then ``rewrite``
  (embeddings excluded: the ONNX graph's Gather lookups are not factored);
* ONNX: ``compress("minilm.onnx", target=t, calibration="cal.npz")``, the whole job (analysis through the
  graph in onnxruntime, rewrite of the graph, validation against the original graph).

Fidelity: mean cosine of mean-pooled sentence embeddings to the dense model's on 100 held-out sentences;
the largest |difference| between the ONNX and torch compressed models' last_hidden_state; onnxruntime
latency of the compressed graph against the original (1 thread, batch 32 x 64 tokens, median of runs
interleaved in the same process). Writes ``onnx_input.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import environment, load_average, minilm_missing

from compressor.analysis.analyze import analyze
from compressor.core.fileio import atomic_write_text
from compressor.core.plan import Plan
from compressor.core.rewrite import rewrite
from compressor.data.inputs import sequence_axes
from compressor.examples import load_minilm, sentence_splits
from compressor.export.onnx import export_onnx
from compressor.jobs.compress import compress

THREADS = 1
MAX_LENGTH = 64
LATENCY_RUNS = 15


def tokens(tok, sentences: list[str]) -> dict[str, torch.Tensor]:
    return dict(tok(sentences, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=1)


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(sess, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    feed = {i.name: batch[i.name].numpy() for i in sess.get_inputs()}
    return torch.from_numpy(sess.run(None, feed)[0])


def latency(paths: dict[str, Path], batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Median seconds per run of each file, runs interleaved so that machine load hits all alike."""
    sessions = {k: session(p) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for s in sessions.values():
        run_onnx(s, batch)  # warm-up
    for _ in range(LATENCY_RUNS):
        for k, s in sessions.items():
            t = time.perf_counter()
            run_onnx(s, batch)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.1])
    args = ap.parse_args()
    if minilm_missing():
        return 2
    torch.set_num_threads(THREADS)
    env = environment("python benchmarks/onnx_input.py " + " ".join(sys.argv[1:]))
    start = time.perf_counter()
    model, tok = load_minilm()
    cal_sents, eval_sents = sentence_splits(n_calibration=128, n_eval=100)
    cal, held = tokens(tok, cal_sents), tokens(tok, eval_sents)
    with torch.no_grad():
        ref = pooled(model(**held).last_hidden_state, held["attention_mask"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        src = export_onnx(model, tokens(tok, eval_sents[:4]), tmp / "minilm.onnx", dynamic_axes=sequence_axes(held))
        export_s = time.perf_counter() - t
        np.savez(tmp / "cal.npz", **{k: v.numpy() for k, v in cal.items()})
        np.savez(tmp / "held.npz", **{k: v.numpy() for k, v in tokens(tok, eval_sents[:16]).items()})
        for target in args.targets:
            twin = copy.deepcopy(model)
            t = time.perf_counter()
            plan = analyze(twin, target=target, exclude=["embeddings.*"], calibration=[cal])
            torch_s = time.perf_counter() - t
            with torch.no_grad():
                rewrite(twin, plan)
                torch_hidden = twin(**held).last_hidden_state
            t = time.perf_counter()
            out = tmp / f"onnx_{target}"
            report = compress(src, out, target=target, calibration=tmp / "cal.npz", example_inputs=tmp / "held.npz")
            onnx_s = time.perf_counter() - t
            onnx_ranks = Plan.from_json(out / "plan.json").ranks()
            torch_ranks = {k: v for k, v in plan.ranks().items() if not k.startswith("embeddings.")}
            onnx_hidden = run_onnx(session(out / "model.onnx"), held)
            lat = latency({"original": src, "compressed": out / "model.onnx"}, tokens(tok, eval_sents[:32]))
            mask = held["attention_mask"]
            rows.append({
                "target": target,
                "layers_factored_torch": len(plan.factored),
                "layers_factored_onnx": report.plan_totals["layers_factored"],
                "same_ranks": onnx_ranks == torch_ranks,
                "params_after_over_before_onnx": report.params_ratio,
                "cosine_torch_path": float((pooled(torch_hidden, mask) * ref).sum(1).mean()),
                "cosine_onnx_path": float((pooled(onnx_hidden, mask) * ref).sum(1).mean()),
                "max_abs_diff_onnx_vs_torch": float((onnx_hidden - torch_hidden).abs().max()),
                "max_abs_hidden": float(torch_hidden.abs().max()),
                "seconds_torch_analyze": round(torch_s, 2),
                "seconds_onnx_job": round(onnx_s, 2),
                "onnx_bytes_original": src.stat().st_size,
                "onnx_bytes_compressed": (out / "model.onnx").stat().st_size,
                "latency_s_original": lat["original"],
                "latency_s_compressed": lat["compressed"],
                "latency_ratio": lat["compressed"] / lat["original"],
            })
            print(json.dumps(rows[-1]), flush=True)
    result = {"environment": env, "load_average_at_end": load_average(), "export_seconds": round(export_s, 2),
              "seconds": round(time.perf_counter() - start, 1), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "onnx_input.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / "onnx_input.md", markdown(result))
    return 0


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = ["# ONNX in, compressed ONNX out: all-MiniLM-L6-v2, torch path vs ONNX path", "",
             f"`{env['command']}`, {env['date']}, {env['processor']} ({env['cpu_count']} cores), "
             f"{THREADS} thread(s); load average {env['load_average_at_start']} at start, "
             f"{r['load_average_at_end']} at end (other processes share the machine: times are indicative, "
             f"the latency ratio is measured side by side); total {r['seconds']} s.", "",
             "Both paths: default data-aware analysis (whitened factors, sequential refits, measured sensitivity), "
             "128 calibration sentences; the torch path excludes the embeddings (the ONNX graph's lookups are not "
             "factored). Embedding cosine: mean-pooled sentence embeddings vs the dense model's, 100 held-out "
             f"sentences x {MAX_LENGTH} tokens.", "",
             "| target | layers factored (torch / ONNX) | same ranks | params kept (ONNX) | cosine, torch path | "
             "cosine, ONNX path | max abs diff ONNX vs torch (max abs value) | ONNX file | onnxruntime latency "
             "ratio |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        lines.append(f"| {x['target']} | {x['layers_factored_torch']} / {x['layers_factored_onnx']} | "
                     f"{'yes' if x['same_ranks'] else 'no'} | {x['params_after_over_before_onnx']:.3f} | "
                     f"{x['cosine_torch_path']:.5f} | {x['cosine_onnx_path']:.5f} | "
                     f"{x['max_abs_diff_onnx_vs_torch']:.2e} ({x['max_abs_hidden']:.2f}) | "
                     f"{x['onnx_bytes_compressed'] / 1e6:.1f} / {x['onnx_bytes_original'] / 1e6:.1f} MB | "
                     f"{x['latency_ratio']:.3f} |")
    lines += ["", "Seconds (under the load above): " + "; ".join(
        f"target {x['target']}: torch analyze {x['seconds_torch_analyze']}, ONNX job (analysis, rewrite, "
        f"validation) {x['seconds_onnx_job']}" for x in r["rows"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
