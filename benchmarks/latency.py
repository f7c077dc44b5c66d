"""Latency ratio vs multiply-add ratio of every compressed variant, at batch 1 and a larger batch.

    python benchmarks/latency.py [--models minilm,digits_cnn,efficientnet_lite0] [--threads 1] [--tag _x]

For each model: low rank at its policies (plain SVD; MiniLM: targets 0.2 and 0.4 of its encoder, as the
demo; the digits CNN: energy 0.9 and target 0.4) stored as fp32, fp16 and int8, dense fp16 and int8, and
the latency-aware variant of the model's ``aware`` policy made for each batch shape (layers whose
factored form was measured slower stay dense: :mod:`compressor.export.latency`; the search would also
check the whole file and fall back to dense, which this table shows as a ratio >= 1). Every file is
timed side by side with the dense fp32 export (alternating rounds, median per-round ratio) in
onnxruntime; multiply-adds are counted by the layer handlers on the same inputs. Writes ``latency.md``
and ``latency.json`` (``--tag`` adds a suffix). Models are entries of ``MODELS``: add one there.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import environment, load_average, log, md_table
from torch import nn

import compressor
from compressor.core.fileio import atomic_write_text
from compressor.data.inputs import sequence_axes
from compressor.export.latency import (
    LATENCY_MAC_GAP,
    LatencyTable,
    compare_onnx,
    keep_slow_layers_dense,
    latency_decisions,
)
from compressor.export.measure import count_macs
from compressor.export.onnx import VARIANTS, export_onnx

ROUNDS = 11


def minilm() -> dict[str, Any]:
    from compressor.examples import docstring_sentences, load_minilm

    model, tokenizer = load_minilm()
    sentences = docstring_sentences(limit=64, seed=3)

    def inputs(batch: int) -> dict[str, torch.Tensor]:
        enc = tokenizer(sentences[:batch], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        return dict(enc)

    return {"model": model, "inputs": inputs, "batches": (1, 16), "include": ["encoder.*"],
            "shape": "batch x 32 tokens", "policies": [{"target": 0.2}, {"target": 0.4}], "aware": {"target": 0.4}}


def digits_cnn() -> dict[str, Any]:
    from compressor.examples import digits_splits, train_digits_cnn

    model, _ = train_digits_cnn(seed=0)
    images = digits_splits(seed=0)["test"][0][:64]  # real test images
    return {"model": model.eval(), "inputs": lambda b: images[:b], "batches": (1, 64), "include": [],
            "shape": "batch x 1 x 8 x 8", "policies": [{"energy": 0.9}, {"target": 0.4}], "aware": {"energy": 0.9}}


def efficientnet_lite0() -> dict[str, Any]:
    from compressor.zoo import efficientnet_lite, sample_images

    images = sample_images(224, n=8, normalization="symmetric")  # real photos, the net's [-1, 1] range
    return {"model": efficientnet_lite("lite0").eval(), "inputs": lambda b: images[:b], "batches": (1, 8),
            "include": [], "shape": "batch x 3 x 224 x 224", "policies": [{"target": 0.2}, {"target": 0.4}],
            "aware": None}  # ~35 conv shapes x 2 batches of break-even bisection: too long on the shared machine


# name -> builder of {"model", "inputs": batch -> inputs, "batches", "include", "shape", "policies", "aware"}
MODELS: dict[str, Callable[[], dict[str, Any]]] = {"minilm": minilm, "digits_cnn": digits_cnn,
                                                   "efficientnet_lite0": efficientnet_lite0}


def factored(model: nn.Module, policy: dict[str, float], include: list[str], aware_inputs: Any = None,
             threads: int = 1, table: LatencyTable | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A factored copy by ``policy``; with ``aware_inputs``, latency-aware at their shape."""
    plan = compressor.analyze(model, **policy, include=include, progress=False)
    slow: list[str] = []
    if aware_inputs is not None:
        slow = keep_slow_layers_dense(plan, latency_decisions(model, plan, aware_inputs, threads=threads,
                                                              table=table, log=log))
    out = compressor.rewrite(copy.deepcopy(model), plan)
    return out, {"layers_factored": len(plan.factored), "kept_dense_slower": len(slow)}


def label(policy: dict[str, float]) -> str:
    """``energy0.9`` / ``target0.4``."""
    return "".join(f"{k}{v:g}" for k, v in policy.items())


def run_model(name: str, spec: dict[str, Any], threads: int, work: Path, table: LatencyTable) -> list[dict]:
    model, rows = spec["model"], []
    example = spec["inputs"](2)
    axes = sequence_axes(example)

    def export(m: nn.Module, stem: str) -> dict[str, Path]:
        fp32 = export_onnx(m, example, work / f"{name}-{stem}.onnx", dynamic_axes=axes)
        files = {"fp32": fp32}
        for precision in ("fp16", "int8"):
            files[precision] = VARIANTS[precision].write(fp32, work / f"{name}-{stem}.{precision}.onnx")
        return files

    log(f"{name}: exporting dense and low-rank variants")
    dense = export(model, "dense")
    variants: list[tuple[str, nn.Module, Path, dict]] = [(f"dense-{p}", model, dense[p], {}) for p in ("fp16", "int8")]
    for policy in spec["policies"]:
        m, info = factored(model, policy, spec["include"])
        for precision, path in export(m, label(policy)).items():
            variants.append((f"{label(policy)}-{precision}", m, path, info))
    for batch in spec["batches"]:
        inputs = spec["inputs"](batch)
        dense_macs = count_macs(model, inputs)["total"]
        timed = list(variants)
        if spec["aware"] is not None:
            log(f"{name}: latency-aware plan at batch {batch}")
            m, info = factored(model, spec["aware"], spec["include"], inputs, threads, table)
            aware = export(m, f"{label(spec['aware'])}-aware-b{batch}")["fp32"]
            timed.append((f"{label(spec['aware'])}-latency-aware-fp32", m, aware, info))
        for name_, vm, path, vinfo in timed:
            c = compare_onnx(dense["fp32"], path, inputs, threads, rounds=ROUNDS)
            macs = count_macs(vm, inputs)["total"] / dense_macs
            rows.append({"model": name, "batch": batch, "inputs": spec["shape"], "variant": name_, "macs_ratio": macs,
                         "latency_ratio": c.ratio, "dense_ms": c.a_ms, "ms": c.b_ms, **vinfo,
                         "differ": abs(c.ratio - macs) > LATENCY_MAC_GAP, "load_average": load_average()})
            log(f"  batch {batch} {name_}: MACs {macs:.3f}, latency {c.ratio:.3f} ({c.b_ms:.3f} vs {c.a_ms:.3f} ms)")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list among {', '.join(MODELS)}")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime (and torch) threads")
    ap.add_argument("--tag", default="", help="suffix of the output files (latency<tag>.md)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; choose among {', '.join(MODELS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    env = environment("python " + " ".join(sys.argv))
    start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        table = LatencyTable(Path(tmp) / "latency-table.json")  # measured fresh in this run
        for name in names:
            rows += run_model(name, MODELS[name](), args.threads, Path(tmp), table)
        break_even = table.entries
    env["load_average_at_end"] = load_average()
    env["seconds"] = round(time.perf_counter() - start, 1)
    aware_rows = [r for r in rows if "latency-aware" in r["variant"]]
    where = [f"{r['model']} batch {r['batch']}" for r in aware_rows if r["latency_ratio"] >= 1]
    verdict = (f"**Slower than dense: {', '.join(where)}**" if where else
               "None of them is slower than dense." if aware_rows else "(None in this run: no model of it has an "
               "`aware` policy.)")
    md = ["# Latency ratio vs multiply-add ratio, every compressed variant", "",
          f"onnxruntime CPU, {args.threads} thread(s); each file timed side by side with the dense fp32 export on "
          f"the same inputs ({ROUNDS} alternating rounds, median per-round ratio). Ratios below 1 are faster / fewer. "
          f"Multiply-adds are counted by the layer handlers (fp16/int8 files do the same multiply-adds as fp32). "
          f"'differ': |latency ratio - MAC ratio| > {LATENCY_MAC_GAP}. The machine is shared: load average "
          f"{env['load_average_at_start']} at the start, {env['load_average_at_end']} at the end; {env['seconds']} s.",
          "",
          "Latency-aware rows: the model's policy, layers whose factored form was measured slower at that batch "
          "shape kept dense. " + verdict, ""]
    for name in names:
        sub = [r for r in rows if r["model"] == name]
        md += [f"## {name} ({sub[0]['inputs']})", "",
               md_table(["batch", "variant", "MAC ratio", "latency ratio", "dense ms", "variant ms", "differ",
                         "layers factored (kept dense: slower)"],
                        [[r["batch"], r["variant"], f"{r['macs_ratio']:.3f}", f"{r['latency_ratio']:.3f}",
                          f"{r['dense_ms']:.3f}", f"{r['ms']:.3f}", "yes" if r["differ"] else "",
                          "" if "layers_factored" not in r else
                          f"{r['layers_factored']} ({r['kept_dense_slower']})"] for r in sub]), ""]
    md += ["## Measured break-even ranks (largest rank still faster than dense; 0: never)", "",
           md_table(["layer", "input", "break-even", "max saving rank"],
                    [[json.loads(k)[1], "x".join(map(str, v["input_shape"])), v["break_even"], v["max_saving_rank"]]
                     for k, v in break_even.items()]) if break_even else "(none measured in this run)", "",
           f"Environment: `{json.dumps(env)}`", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"latency{args.tag}.md", "\n".join(md))
    atomic_write_text(args.out / f"latency{args.tag}.json",
                      json.dumps({"environment": env, "rows": rows, "break_even": break_even}, indent=2) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
