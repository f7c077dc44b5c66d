"""4-bit weights with low-rank error correction, against dense int8, on the real all-MiniLM-L6-v2 and the
digits CNN, every file built and measured in onnxruntime in the same run.

    python benchmarks/int4_minilm.py [--out benchmarks/results] [--ranks 16,32,64] [--blocks 128,64]
        [--budgets 0.05,0.1]

MiniLM: fidelity is the mean cosine of sentence embeddings (attention-masked mean of the last hidden state,
L2-normalised) to the fp32 model's, on held-out real sentences (stdlib docstrings), disjoint from the
calibration sentences the data-aware corrections whiten with; inputs padded to 64 tokens. int4 stores
every Linear as MatMulNBits and the embedding tables as GatherBlockQuantized (asymmetric, one scale and
zero point per block of weights along the input dimension); a correction adds ``x A^T B^T`` beside each
Linear's MatMulNBits, ``B A`` the truncated SVD (plain, or whitened by the calibration activations) of the
Linear's rounding error. Digits CNN: test accuracy and agreement with the fp32 model's predictions; its
convolutions stay fp32 in the int4 files (MatMulNBits covers MatMul only). Latency: median onnxruntime
CPU time, every file timed in the same run, one thread. Writes ``int4_minilm.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import environment, md_table, minilm_missing
from recipes_minilm import embedding_evaluation, tokens

from compressor.analysis.int4 import int4_correction
from compressor.core.fileio import atomic_write_text
from compressor.examples import digits_splits, load_minilm, sentence_splits, train_digits_cnn
from compressor.export.measure import file_size, onnx_latency
from compressor.export.onnx import export_int4, export_int8, export_onnx
from compressor.search.evaluate import onnx_fidelity

THREADS = 1
LATENCY_RUNS = 20


def build(kind: str, fp32: Path, work: Path, name: str, model=None, *, block: int = 64, rule=None,
          calibration=None, factors: str = "fp16", outputs=None) -> dict:
    """One file: its recipe, how long it took to make, and the correction's size."""
    start = time.perf_counter()
    row = {"name": name, "precision": kind, "block": block if kind == "int4" else None, "correction": None,
           "data_aware": calibration is not None, "factors": None, "correction_params": 0}
    if kind == "fp32":
        path = fp32
    elif kind == "int8":
        path = export_int8(fp32, work / f"{name}.onnx")
    else:
        corr = None
        if rule is not None:
            corr = int4_correction(model, block_size=block, calibration=calibration, outputs=outputs, **rule)
            row.update(correction=",".join(f"{k}={v}" for k, v in rule.items()), factors=factors,
                       correction_params=corr.parameters(), ranks=corr.ranks)
        path = export_int4(fp32, work / f"{name}.onnx", block_size=block,
                           corrections=corr.factors if corr else None, factors=factors)
    row.update(path=str(path), size_bytes=file_size(path), build_seconds=round(time.perf_counter() - start, 1))
    return row


def minilm(args, work: Path) -> dict:
    model, tok = load_minilm()
    cal_sents, eval_sents = sentence_splits(n_calibration=args.calibration, n_eval=args.eval)
    calibration = [tokens(tok, cal_sents[i:i + 32]) for i in range(0, len(cal_sents), 32)]
    held_out = [tokens(tok, eval_sents[i:i + 50]) for i in range(0, len(eval_sents), 50)]
    evaluation = embedding_evaluation(model, held_out)
    example = tokens(tok, eval_sents[:2])
    fp32 = export_onnx(model, example, work / "minilm.onnx")
    out = ["last_hidden_state"]
    plans: list[tuple[str, str, dict]] = [("dense-fp32", "fp32", {}), ("dense-int8", "int8", {})]
    plans += [(f"dense-int4-b{b}", "int4", {"block": b}) for b in (128, 64, 32)]
    for b in args.blocks:
        for r in args.ranks:
            plans.append((f"int4-b{b}+rank{r}", "int4", {"block": b, "rule": {"rank": r}, "factors": "int8"}))
            plans.append((f"int4-b{b}+rank{r}-cal", "int4", {"block": b, "rule": {"rank": r},
                                                               "calibration": calibration, "factors": "int8"}))
        for budget in args.budgets:
            plans.append((f"int4-b{b}+budget{budget}-cal", "int4", {"block": b, "rule": {"budget": budget},
                                                                    "calibration": calibration, "factors": "int8"}))
    # The same correction with fp16 factors: what int8 storage of the factors costs in fidelity.
    b, r = args.blocks[0], args.ranks[0]
    plans.append((f"int4-b{b}+rank{r}-cal-fp16", "int4", {"block": b, "rule": {"rank": r}, "calibration": calibration,
                                                           "factors": "fp16"}))
    rows = []
    latency_inputs = tokens(tok, cal_sents[:8])
    for name, kind, kw in plans:
        row = build(kind, fp32, work, name, model, outputs=out, **kw)
        row.update(onnx_fidelity(row["path"], evaluation, THREADS))
        rows.append(row)
        print(f"minilm {name}: {row['size_bytes'] / 1e6:.2f} MB, cosine {row['fidelity']:.5f}", flush=True)
    for row in rows:  # timed together, after every file is built, so that they share the machine's state
        row["latency_ms"] = onnx_latency(row["path"], latency_inputs, threads=THREADS, warmup=3,
                                         runs=LATENCY_RUNS)["median_ms"]
    return {"rows": rows, "metric": evaluation.metric, "calibration_sentences": len(cal_sents),
            "held_out_sentences": len(eval_sents), "latency_inputs": "batch of 8 sentences x 64 tokens"}


def digits(args, work: Path) -> dict:
    import onnxruntime as ort

    model, acc = train_digits_cnn(seed=0)
    splits = digits_splits(0)
    xte, yte = splits["test"]
    calibration = [splits["train"][0][:256]]
    fp32 = export_onnx(model, xte[:2], work / "cnn.onnx")
    with torch.no_grad():
        ref = model(xte).argmax(-1)
    plans: list[tuple[str, str, dict]] = [("dense-fp32", "fp32", {}), ("dense-int8", "int8", {})]
    plans += [(f"dense-int4-b{b}", "int4", {"block": b}) for b in (64, 32, 16)]
    for r in (4, 16):
        plans.append((f"int4-b64+rank{r}", "int4", {"block": 64, "rule": {"rank": r}, "factors": "int8"}))
        plans.append((f"int4-b64+rank{r}-cal", "int4", {"block": 64, "rule": {"rank": r}, "calibration": calibration,
                                                        "factors": "int8"}))
    rows = []
    for name, kind, kw in plans:
        row = build(kind, fp32, work, f"cnn-{name}", model, **kw)
        row["name"] = name
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        s = ort.InferenceSession(row["path"], opts, providers=["CPUExecutionProvider"])
        pred = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: xte.numpy()})[0]).argmax(-1)
        row.update(accuracy=float((pred == yte).float().mean()), agreement=float((pred == ref).float().mean()))
        rows.append(row)
        print(f"digits {name}: {row['size_bytes'] / 1e3:.1f} kB, accuracy {row['accuracy']:.4f}", flush=True)
    for row in rows:
        row["latency_ms"] = onnx_latency(row["path"], xte[:64], threads=THREADS, warmup=3,
                                         runs=LATENCY_RUNS)["median_ms"]
    return {"rows": rows, "torch_accuracy": acc, "test_images": len(yte), "calibration_images": 256,
            "latency_inputs": "batch of 64 images"}


def render(record: dict) -> str:
    env, mini, dig = record["environment"], record["minilm"], record["digits"]
    rows = mini["rows"]
    fp32 = next(r for r in rows if r["name"] == "dense-fp32")
    int8 = next(r for r in rows if r["name"] == "dense-int8")
    goal = fp32["size_bytes"] / 6
    under = [r for r in rows if r["size_bytes"] <= goal]
    best = max(under, key=lambda r: r["fidelity"]) if under else None
    winners = [r for r in rows if r["size_bytes"] <= goal and r["fidelity"] >= int8["fidelity"]]
    if winners:
        w = min(winners, key=lambda r: r["size_bytes"])
        headline = (f"goal met: {w['name']} is {w['size_bytes'] / 1e6:.2f} MB (<= 1/6 of fp32's "
                    f"{fp32['size_bytes'] / 1e6:.2f} MB) with embedding cosine {w['fidelity']:.5f} >= dense int8's "
                    f"{int8['fidelity']:.5f} ({int8['size_bytes'] / 1e6:.2f} MB)")
    elif best is not None:
        headline = (f"goal not met: the most faithful file within 1/6 of fp32's bytes ({goal / 1e6:.2f} MB) is "
                    f"{best['name']}, {best['size_bytes'] / 1e6:.2f} MB with embedding cosine {best['fidelity']:.5f}, "
                    f"{int8['fidelity'] - best['fidelity']:.5f} below dense int8's {int8['fidelity']:.5f} "
                    f"({int8['size_bytes'] / 1e6:.2f} MB)")
    else:
        headline = "goal not met: no file within 1/6 of fp32's bytes"

    def table(rows, metrics, unit, scale):
        head = ["recipe", "size", "vs fp32", "correction", "factors", "extra params", *metrics, "latency",
                "build s"]
        body = [[r["name"], f"{r['size_bytes'] / scale:.2f} {unit}", f"{r['size_bytes'] / rows[0]['size_bytes']:.3f}",
                 r["correction"] or "-", r["factors"] or "-", r["correction_params"],
                 *[f"{r[m]:.5f}" for m in metrics], f"{r['latency_ms']:.2f} ms", f"{r['build_seconds']:.1f}"]
                for r in sorted(rows, key=lambda r: r["size_bytes"])]
        return md_table(head, body)

    return "\n".join([
        "# int4 + low-rank error correction vs dense int8", "",
        f"**MiniLM headline:** {headline}.", "",
        f"Command: `{env['command']}`; {env['date']}; torch {env['torch']}, onnxruntime {env['onnxruntime']}; "
        f"{THREADS} thread (torch and onnxruntime); machine: {env['cpu_count']} CPUs ({env['processor']}), "
        f"load average at start {env['load_average_at_start']}, at end {record['load_average_at_end']} (other "
        "sessions shared the machine: latencies are comparable within this run only); "
        f"{record['seconds']:.0f} s in all.", "",
        "## all-MiniLM-L6-v2", "",
        f"- fidelity: {mini['metric']}; calibration: {mini['calibration_sentences']} other sentences "
        "(`-cal`: corrections whitened by their activations; others: plain SVD of the rounding error)",
        "- `int4-bB`: 4-bit weights in blocks of B along the input dimension (Linear layers as MatMulNBits, "
        "the embedding tables as GatherBlockQuantized); `+rankR`: a rank-R correction beside every Linear "
        "(`budgetF`: correction weights worth F of the Linear weights, ranks chosen per layer by measured "
        "sensitivity); factors stored fp16 or int8 (dynamic int8 MatMuls)",
        f"- latency: median of {LATENCY_RUNS} onnxruntime runs on a {mini['latency_inputs']}", "",
        table(rows, ["fidelity", "cosine_p05", "cosine_min"], "MB", 1e6), "",
        "## Digits CNN (sklearn digits, 8x8)", "",
        f"- {dig['test_images']} test images; fp32 torch accuracy {dig['torch_accuracy']['test']:.4f}; "
        f"agreement: share of test predictions equal to the fp32 model's; calibration: "
        f"{dig['calibration_images']} training images; convolutions stay fp32 in int4 files",
        f"- latency: median of {LATENCY_RUNS} onnxruntime runs on a {dig['latency_inputs']}", "",
        table(dig["rows"], ["accuracy", "agreement"], "kB", 1e3), "",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--ranks", default="16,32,64", help="ranks of the corrections (every Linear)")
    ap.add_argument("--budgets", default="0.05,0.1", help="correction budgets (fractions of the Linear weights)")
    ap.add_argument("--blocks", default="128,64", help="block sizes of the corrected int4 files")
    ap.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=300, help="held-out sentences")
    ap.add_argument("--render", type=Path, help="only write the Markdown again from this run's JSON")
    args = ap.parse_args()
    if args.render:
        atomic_write_text(args.render.with_suffix(".md"), render(json.loads(args.render.read_text())))
        return 0
    args.ranks = [int(r) for r in args.ranks.split(",") if r]
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    args.blocks = [int(b) for b in args.blocks.split(",") if b]
    if minilm_missing():
        return 2
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    env = environment(("python benchmarks/int4_minilm.py " + " ".join(sys.argv[1:])).strip())
    with tempfile.TemporaryDirectory(prefix="int4-bench-") as tmp:
        work = Path(tmp)
        record = {"benchmark": "int4_minilm", "environment": env, "minilm": minilm(args, work),
                  "digits": digits(args, work)}
    for part in ("minilm", "digits"):
        for row in record[part]["rows"]:
            row.pop("path")
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "int4_minilm.json", json.dumps(record, indent=2, default=float) + "\n")
    atomic_write_text(args.out / "int4_minilm.md", render(record))
    print(render(record).splitlines()[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
