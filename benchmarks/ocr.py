"""A CTC text recogniser compressed through the ONNX path, judged on the decoded strings.

    PYTHONPATH=. python benchmarks/ocr.py [--targets 0.3,0.4,0.5] [--eval-lines 400] [--calibration-lines 64]

The model is ddddocr's recogniser ``common.onnx`` (the ``beta=True`` model of ``ddddocr`` 1.6.1: 21 dense
convs, a bidirectional LSTM and an 8210-way Gemm classifier; float32, 13.5M parameters), found with its
charset in the installed package (``pip install --no-deps ddddocr``, as ``make setup`` does;
``zoo.ddddocr_recognizer_onnx`` / ``zoo.ddddocr_recognizer_charset``): nothing of ddddocr's code runs. Its
preprocessing and decoding are re-implemented as ddddocr 1.6.1 does them (``core/ocr_engine.py``): the
image resized to height 64 (width in proportion, Lanczos), grayscale, pixel values / 255, shape
(1, 1, 64, W); the output (steps, 1, 8210) decoded greedily (argmax per step, repeats collapsed, index 0 the
blank, the rest mapped through ``CHARSET_BETA``).

Text lines are rendered by ``zoo.rendered_text_line`` (Pillow, matplotlib's DejaVu Sans / Serif / Sans Mono,
26-46 px, dark grey on light grey, Gaussian pixel noise of std 8, margins 4-14 px) and prepared by
``zoo.ddddocr_recognizer_input``: half random strings of 4-12 digits
and ASCII letters, half runs of 2-4 words from the docstrings of Python's standard library
(``compressor.examples.docstring_passages``; calibration lines from other modules than evaluation lines,
random strings from another seed, no line in both sets).

The reference is the dense model's own decoding: string agreement is the fraction of held-out lines whose
decoded string equals the original's, character agreement 1 - (edit distance / length of the original's
string), step agreement the fraction of output steps whose argmax is the original's. Each method is
``compressor.compress(model, target=..., [calibration=calib.pt])``; the calibration file is a list of
(1, 1, 64, W) tensors (the graph's batch axis is fixed to 1), one per calibration line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import time
from pathlib import Path

import numpy as np

ALPHANUMERIC = string.digits + string.ascii_letters


# ------------------------------------------------------------------------------------------ the model


def decode(logits: np.ndarray, charset: list[str]) -> str:
    """The text of one line's (steps, 1, classes) output: greedy CTC, index 0 the blank, as ddddocr decodes."""
    from compressor.data.sequence import ctc_greedy, step_labels

    return "".join(charset[i] for i in ctc_greedy(step_labels(logits)[0]))


# ------------------------------------------------------------------------------------------ the lines


def word_runs(passages: list[str], rng: random.Random, count: int) -> list[str]:
    """``count`` runs of 2-4 consecutive words (printable ASCII only) from ``passages``."""
    words = [w for p in passages for w in p.split() if w.isascii() and w.isprintable() and len(w) <= 14]
    out: set[str] = set()
    while len(out) < count:
        k = rng.randint(2, 4)
        i = rng.randrange(len(words) - k)
        out.add(" ".join(words[i:i + k]))
    return sorted(out)


def random_strings(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(ALPHANUMERIC) for _ in range(rng.randint(4, 12))) for _ in range(count)]


def lines(n_eval: int, n_cal: int) -> tuple[list[str], list[str]]:
    """Disjoint evaluation and calibration lines: half random strings, half docstring word runs (from
    evaluation and calibration modules respectively)."""
    from compressor.examples import docstring_passages, is_eval_module

    passages = docstring_passages()
    held = [p for m, ps in passages.items() if is_eval_module(m) for p in ps]
    cal = [p for m, ps in passages.items() if not is_eval_module(m) for p in ps]
    evaluation = random_strings(random.Random(1), n_eval - n_eval // 2) + word_runs(held, random.Random(2), n_eval // 2)
    calibration = random_strings(random.Random(3), n_cal - n_cal // 2) + word_runs(cal, random.Random(4), n_cal // 2)
    common = set(evaluation) & set(calibration)
    calibration = [t for t in calibration if t not in common]
    return evaluation, calibration


# ------------------------------------------------------------------------------------------ measuring


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # the graph declares its output (1, seqlen): every run would warn
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(path: Path, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    sess = session(path)
    name = sess.get_inputs()[0].name
    start = time.perf_counter()
    outs = [sess.run(None, {name: x})[0] for x in inputs]
    return outs, time.perf_counter() - start


def agreement(ref: list[np.ndarray], new: list[np.ndarray], charset: list[str]) -> dict:
    """compressor's decoded agreement (greedy CTC) of ``new`` to ``ref``, the logits' cosine, the first lines read
    differently."""
    from compressor.data.sequence import decoded_agreement

    cos = [float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(ref, new, strict=True)]
    changed = [(decode(a, charset), decode(b, charset)) for a, b in zip(ref, new, strict=True)]
    return {**decoded_agreement(ref, new, decoding="ctc"), "logit_cosine_mean": float(np.mean(cos)),
            "changed": [c for c in changed if c[0] != c[1]][:12]}


def truth_accuracy(texts: list[str], outs: list[np.ndarray], charset: list[str]) -> float:
    """Exact reads of the rendered text (spaces removed: the recogniser does not emit them)."""
    return float(np.mean([decode(o, charset) == t.replace(" ", "") for t, o in zip(texts, outs, strict=True)]))


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_bytes(folder_or_file: Path) -> int:
    if folder_or_file.is_file():
        return folder_or_file.stat().st_size
    return sum(p.stat().st_size for p in (folder_or_file / "model.onnx", folder_or_file / "model.onnx.data")
               if p.exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.3", help="comma-separated fractions of factorizable weights removed")
    parser.add_argument("--eval-lines", type=int, default=200)
    parser.add_argument("--calibration-lines", type=int, default=64)
    parser.add_argument("--methods", default="plain,data-aware")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ocr_bench"))
    parser.add_argument("--result", default="benchmarks/results/ocr_ddddocr")
    parser.add_argument("--exclude", default="", help="comma-separated layer globs every method keeps dense "
                        "(e.g. 135, the classifier: the budget then falls on the convs)")
    args = parser.parse_args()

    import torch
    from _common import environment

    import compressor
    from compressor import zoo
    from compressor.export.onnx import write_variant

    torch.set_num_threads(1)
    env = environment("PYTHONPATH=. python " + " ".join(sys.argv))
    args.work.mkdir(parents=True, exist_ok=True)
    model, charset = zoo.ddddocr_recognizer_onnx(), zoo.ddddocr_recognizer_charset()
    evaluation, calibration = lines(args.eval_lines, args.calibration_lines)
    cal_inputs = [zoo.ddddocr_recognizer_input(zoo.rendered_text_line(t, f"cal{i}")) for i, t in enumerate(calibration)]
    eval_inputs = [zoo.ddddocr_recognizer_input(zoo.rendered_text_line(t, f"eval{i}")).numpy()
                   for i, t in enumerate(evaluation)]
    calib = args.work / "calib.pt"
    torch.save(cal_inputs, calib)
    dense, dense_s = run(model, eval_inputs)
    result = {"environment": env, "model": f"{model} (ddddocr 1.6.1, sha256 {sha256(model)})",
              "eval_lines": len(evaluation), "calibration_lines": len(calibration),
              "eval_examples": evaluation[:6] + evaluation[-6:],
              "calibration_examples": calibration[:3] + calibration[-3:],
              "dense": {"bytes": file_bytes(model), "truth_accuracy": truth_accuracy(evaluation, dense, charset),
                        "run_seconds": dense_s}, "rows": []}
    # What rounding alone changes: the dense model in fp16 (compressor's fp16 variant), a floor for the rest.
    fp16 = write_variant("fp16", model, args.work / "dense.fp16.onnx")
    outs, _ = run(fp16, eval_inputs)
    result["dense_fp16"] = {"bytes": file_bytes(fp16), "size_ratio": file_bytes(fp16) / file_bytes(model),
                            "truth_accuracy": truth_accuracy(evaluation, outs, charset),
                            **agreement(dense, outs, charset)}
    print("dense fp16", {k: v for k, v in result["dense_fp16"].items() if k != "changed"}, flush=True)
    for target in [float(t) for t in args.targets.split(",")]:
        for method in args.methods.split(","):
            out = args.work / f"{method}_{target}"
            options = {"target": target, "force": True, "threads": 1,
                       **({"exclude": args.exclude.split(",")} if args.exclude else {})}
            if method == "data-aware":
                options["calibration"] = calib
            start = time.perf_counter()
            report = compressor.compress(model, out, **options)
            seconds = time.perf_counter() - start
            outs, run_s = run(out / "model.onnx", eval_inputs)
            plan = json.loads((out / "plan.json").read_text())
            row = {"target": target, "method": method, "options": {k: str(v) for k, v in options.items()},
                   "compress_seconds": seconds, "bytes": file_bytes(out), "params_before": report.params_before,
                   "params_after": report.params_after,
                   "size_ratio": file_bytes(out) / file_bytes(model),
                   "truth_accuracy": truth_accuracy(evaluation, outs, charset), "run_seconds": run_s,
                   "dense_run_seconds": dense_s, **agreement(dense, outs, charset),
                   "ranks": {lp["name"]: [lp["rank"], lp.get("kind")] for lp in plan["layers"]
                             if lp.get("rank") is not None}}
            result["rows"].append(row)
            print(method, target, {k: v for k, v in row.items() if k not in ("ranks", "changed", "options")},
                  flush=True)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.result + ".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    Path(args.result + ".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    env = r["environment"]
    fmt = "| {} | {} | {:.3f} | {:.3f} | {:.4f} | {:.4f} | {:.5f} | {:.3f} | {:.0f} | {} |"
    rows = [fmt.format("dense fp16 (rounding only)", "-", r["dense_fp16"]["size_ratio"],
                       r["dense_fp16"]["string_agreement"], r["dense_fp16"]["char_agreement"],
                       r["dense_fp16"]["step_agreement"], r["dense_fp16"]["logit_cosine_mean"],
                       r["dense_fp16"]["truth_accuracy"], 0, "-")]
    for row in r["rows"]:
        ranks = ", ".join(f"{name} r{rank}" + (f" ({kind})" if kind not in ("linear", "conv2d") else "")
                          for name, (rank, kind) in row["ranks"].items())
        rows.append(fmt.format(row["method"], row["target"], row["size_ratio"], row["string_agreement"],
                               row["char_agreement"], row["step_agreement"], row["logit_cosine_mean"],
                               row["truth_accuracy"], row["compress_seconds"], ranks))
    changed = [f"- {row['method']} {row['target']}: " + ", ".join(f"`{a}` -> `{b}`" for a, b in row["changed"][:6])
               for row in r["rows"]]
    return "\n".join([
        "# ddddocr's CTC recogniser through the ONNX path, judged on decoded lines", "",
        f"Command: `{env['command']}` ({env['date']}; torch threads {env['torch_threads']}, onnxruntime 1 thread; "
        f"{env['cpu_count']} CPUs ({env['processor']}) shared with other jobs, load average "
        f"{env['load_average_at_start']} at start, {r['load_average_at_end']} at end).", "",
        f"Model: `{r['model']}` (ddddocr's `beta=True` recogniser: 21 dense convs, a bidirectional LSTM that is no "
        "MatMul/Gemm/Conv and stays dense, an 8210-way Gemm classifier; float32, 54.1 MB), found with its charset "
        "in the installed package (`zoo.ddddocr_recognizer_onnx`, `zoo.ddddocr_recognizer_charset`); ddddocr's "
        "preprocessing (height 64, grayscale, /255) and greedy CTC decoding re-implemented "
        "(benchmarks/ocr.py). The reference is the dense model's own decoding of each line.", "",
        f"Data: {r['eval_lines']} held-out and {r['calibration_lines']} calibration lines rendered with Pillow in "
        "matplotlib's DejaVu Sans / Serif / Sans Mono, 26-46 px, dark on light grey with Gaussian pixel noise "
        "(std 8): half random strings of 4-12 digits and ASCII letters (different seeds), half runs of 2-4 words "
        "from Python standard-library docstrings (evaluation and calibration from different modules; no line in "
        f"both). Held-out examples: {', '.join(f'`{t}`' for t in r['eval_examples'][:3] + r['eval_examples'][-3:])}; "
        f"calibration examples: {', '.join(f'`{t}`' for t in r['calibration_examples'])}.", "",
        "Each method is `compressor.compress(common.onnx, target=T[, calibration=calib.pt])` (calib.pt: a list of "
        "(1, 1, 64, W) tensors, one per calibration line; the graph's batch axis is fixed to 1). Size: model.onnx "
        "(+ .data) over the original file. String agreement: lines decoded exactly as the original decodes them; "
        "char agreement: 1 - edit distance / characters of the original's decodings; step agreement: output steps "
        "with the original's argmax (all three `compressor.data.sequence.decoded_agreement`); cosine: of the "
        "logits per line, mean; truth: lines read exactly as rendered (spaces removed; the dense model reads "
        f"{r['dense']['truth_accuracy']:.3f}).", "",
        *([f"Kept dense by every method (`exclude`): {r['rows'][0]['options']['exclude']}, so the budget falls on "
           "the other layers.", ""] if r["rows"] and "exclude" in r["rows"][0]["options"] else []),
        "| method | target | size | string agreement | char agreement | step agreement | logit cosine | truth "
        "| compress s | factored (rank) |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "Lines read differently (original -> compressed), first six:", "", *changed, ""])


if __name__ == "__main__":
    main()
