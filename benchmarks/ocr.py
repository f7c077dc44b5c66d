"""A CTC text recogniser compressed through the ONNX path, judged on the decoded strings.

    python benchmarks/ocr.py [--target 0.3] [--eval-lines 200] [--calibration-lines 64] [--work DIR]

The model is ddddocr's recogniser ``common.onnx`` (the ``beta=True`` model of ``ddddocr`` 1.6.1: 21 dense
convs, a bidirectional LSTM and an 8210-way Gemm classifier; float32, 13.5M parameters), read with its
charset straight out of the wheel (``pip download --no-deps ddddocr==1.6.1``; a zip): nothing of ddddocr's
code runs. Its preprocessing and decoding are re-implemented as ddddocr 1.6.1 does them
(``core/ocr_engine.py``): the image resized to height 64 (width in proportion, Lanczos), grayscale, pixel
values / 255, shape (1, 1, 64, W); the output (steps, 1, 8210) decoded greedily (argmax per step, repeats
collapsed, index 0 the blank, the rest mapped through ``CHARSET_BETA``).

Text lines are rendered with Pillow in matplotlib's DejaVu fonts (Sans, Serif, Mono; 26-46 px; black on a
light grey background, Gaussian pixel noise of std 8, margins 4-14 px): half random strings of 4-12 digits
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
import ast
import json
import os
import random
import string
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

WHEEL = Path("/tmp/ddd/ddddocr-1.6.1-py3-none-any.whl")
MODEL_MEMBER = "ddddocr/common.onnx"
CHARSET_MEMBER = "ddddocr/charsets.py"
HEIGHT = 64  # ddddocr resizes every line to this height
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
NOISE_STD = 8.0
ALPHANUMERIC = string.digits + string.ascii_letters


# ------------------------------------------------------------------------------------------ the model


def extract(wheel: Path, work: Path) -> tuple[Path, list[str]]:
    """``common.onnx`` written into ``work`` and ``CHARSET_BETA``, both read from the wheel (a zip). The
    charset is a literal list in ``charsets.py``: parsed with ``ast.literal_eval``, never imported."""
    with zipfile.ZipFile(wheel) as z:
        model = work / "common.onnx"
        if not model.exists():
            model.write_bytes(z.read(MODEL_MEMBER))
        tree = ast.parse(z.read(CHARSET_MEMBER).decode("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CHARSET_BETA":
            return model, ast.literal_eval(node.value)
    raise SystemExit(f"no CHARSET_BETA in {wheel}:{CHARSET_MEMBER}")


def preprocess(image) -> np.ndarray:
    """ddddocr's: height 64 (Lanczos, width in proportion), grayscale, / 255, (1, 1, 64, W) float32."""
    from PIL import Image

    width = int(image.size[0] * (HEIGHT / image.size[1]))
    image = image.resize((width, HEIGHT), Image.LANCZOS).convert("L")
    return (np.asarray(image, dtype=np.float32) / 255.0)[None, None]


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


def render(text: str, rng: random.Random):
    """``text`` in a random DejaVu font and size, dark on a light background, with pixel noise."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    fonts = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    font = ImageFont.truetype(str(fonts / rng.choice(FONTS)), rng.randint(26, 46))
    left, top, right, bottom = font.getbbox(text)
    mx, my = rng.randint(4, 14), rng.randint(4, 14)
    image = Image.new("L", (right - left + 2 * mx, bottom - top + 2 * my), rng.randint(215, 255))
    ImageDraw.Draw(image).text((mx - left, my - top), text, fill=rng.randint(0, 60), font=font)
    pixels = np.asarray(image, dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, NOISE_STD, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


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


def file_bytes(folder_or_file: Path) -> int:
    if folder_or_file.is_file():
        return folder_or_file.stat().st_size
    return sum(p.stat().st_size for p in (folder_or_file / "model.onnx", folder_or_file / "model.onnx.data")
               if p.exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.3)
    parser.add_argument("--eval-lines", type=int, default=200)
    parser.add_argument("--calibration-lines", type=int, default=64)
    parser.add_argument("--methods", default="plain,data-aware")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ocr_bench"))
    parser.add_argument("--wheel", type=Path, default=WHEEL)
    parser.add_argument("--result", default="benchmarks/results/ocr_ddddocr")
    parser.add_argument("--extra", default="{}", help="JSON of more compressor.compress options for every method")
    args = parser.parse_args()

    import torch
    from _common import environment

    import compressor

    torch.set_num_threads(1)
    env = environment("python " + " ".join(sys.argv))
    args.work.mkdir(parents=True, exist_ok=True)
    model, charset = extract(args.wheel, args.work)
    evaluation, calibration = lines(args.eval_lines, args.calibration_lines)
    eval_inputs = [preprocess(render(t, random.Random(f"eval{i}"))) for i, t in enumerate(evaluation)]
    cal_inputs = [preprocess(render(t, random.Random(f"cal{i}"))) for i, t in enumerate(calibration)]
    calib = args.work / "calib.pt"
    torch.save([torch.from_numpy(x) for x in cal_inputs], calib)
    dense, dense_s = run(model, eval_inputs)
    result = {"environment": env, "model": f"{args.wheel.name}:{MODEL_MEMBER}", "target": args.target,
              "eval_lines": len(evaluation), "calibration_lines": len(calibration),
              "eval_examples": evaluation[:6] + evaluation[-6:],
              "calibration_examples": calibration[:3] + calibration[-3:],
              "dense": {"bytes": file_bytes(model), "truth_accuracy": truth_accuracy(evaluation, dense, charset),
                        "seconds": dense_s}, "methods": {}}
    extra = json.loads(args.extra)
    for method in args.methods.split(","):
        out = args.work / f"{method}_{args.target}"
        options = {"target": args.target, "force": True, "threads": 1, **extra}
        if method == "data-aware":
            options["calibration"] = calib
        start = time.perf_counter()
        report = compressor.compress(model, out, **options).to_dict()
        seconds = time.perf_counter() - start
        outs, run_s = run(out / "model.onnx", eval_inputs)
        totals = report.get("totals") or {}
        row = {"options": {k: str(v) for k, v in options.items()}, "compress_seconds": seconds,
               "bytes": file_bytes(out), "size_ratio": file_bytes(out) / file_bytes(model),
               "params_before": totals.get("params_before"), "params_after": totals.get("params_after"),
               "truth_accuracy": truth_accuracy(evaluation, outs, charset), "run_seconds": run_s,
               "dense_run_seconds": dense_s, **agreement(dense, outs, charset),
               "ranks": {lp["name"]: [lp.get("rank"), lp.get("kind")] for lp in json.loads(
                   (out / "plan.json").read_text())["layers"] if lp.get("rank") is not None}}
        result["methods"][method] = row
        print(method, {k: v for k, v in row.items() if k not in ("ranks", "changed", "options")}, flush=True)
    result["load_average_at_end"] = list(os.getloadavg())
    Path(args.result + ".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({m: {k: r[k] for k in ("size_ratio", "string_agreement", "char_agreement", "step_agreement")}
                      for m, r in result["methods"].items()}, indent=2))


if __name__ == "__main__":
    main()
