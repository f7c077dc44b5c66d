"""int4 rounded to nearest against int4 rounded by GPTQ, on real decoders: perplexity on held-out text.

    python benchmarks/int4_gptq.py --folder models/smollm2-135m --folder models/gemma3-270m \
        [--samples 64] [--windows 16] [--out benchmarks/results]

Each folder (``make gemma`` writes both) is a float32 Hugging Face causal LM. The int4 weights are the ones
``compress --int4`` writes (onnxruntime's MatMulNBits, asymmetric, blocks of 128 along the input dimension):
:func:`compressor.analysis.int4.simulate_int4` puts exactly those rounded weights into the torch model (the
tests check it against onnxruntime), so the perplexity of each int4 model is computed in torch, on the same
windows as the dense model's. Both models tie their output head to the embedding table, and their int4 files
(``compress export FOLDER --int4``) hold the table twice: the lookup in 4 bits (GatherBlockQuantized, rounded to
nearest: a lookup has no other columns to take a row's error) and the head in float32 (onnxruntime's quantizer
leaves the MatMul on the transposed table: SmolLM2-135M's int4 file is 191.6 MB, 113 MB of it that head). The
torch model is untied to match: the head keeps the float table. A tied weight is left out of GPTQ. GPTQ fits
each Linear to its inputs on ``--samples`` sequences of 128 tokens of the calibration text, one transformer
block at a time. Texts: the docstrings of Python's standard library
(:func:`compressor.examples.write_docstring_texts`), evaluation and calibration from different modules.
Writes ``int4_gptq.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import environment, load_average, log, md_table

from compressor.analysis.int4 import gptq_int4, simulate_int4
from compressor.core.fileio import atomic_write_text
from compressor.data.perplexity import perplexity, read_corpus
from compressor.examples import write_docstring_texts

SEQUENCE = 128
WINDOW = 256
BLOCK = 128


def measure(folder: Path, texts: dict, samples: int, windows: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    corpus = read_corpus(texts["eval"]["path"], tok)
    ids = tok(Path(texts["calibration"]["path"]).read_text())["input_ids"]
    seqs = [ids[i:i + SEQUENCE] for i in range(0, samples * SEQUENCE, SEQUENCE)]
    calibration = [{"input_ids": torch.tensor(seqs[i:i + 8])} for i in range(0, len(seqs), 8)]

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, corpus, window=WINDOW, max_windows=windows).ppl

    def int4(weights: dict | None) -> torch.nn.Module:
        out = simulate_int4(model, BLOCK, weights=weights)
        head = out.get_output_embeddings()
        head.weight = torch.nn.Parameter(model.get_output_embeddings().weight.detach().clone())  # as the file
        return out

    dense = ppl(model)
    log(f"{folder.name}: dense {dense:.3f}")
    nearest = ppl(int4(None))
    log(f"{folder.name}: int4 nearest {nearest:.3f}")
    start = time.perf_counter()
    weights = gptq_int4(model, calibration, block_size=BLOCK)
    seconds = time.perf_counter() - start
    gptq = ppl(int4(weights))
    log(f"{folder.name}: int4 gptq {gptq:.3f} ({len(weights)} layers, {seconds:.0f} s)")
    return {"model": folder.name, "dense": dense, "nearest": nearest, "gptq": gptq, "gptq_layers": len(weights),
            "gptq_seconds": round(seconds, 1), "calibration_tokens": samples * SEQUENCE,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, action="append", required=True)
    ap.add_argument("--samples", type=int, default=64, help="calibration sequences of 128 tokens")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 256 tokens")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = environment(" ".join(["python", *sys.argv]))
    with tempfile.TemporaryDirectory() as tmp:
        texts = write_docstring_texts(tmp)
        rows = [measure(f, texts, args.samples, args.windows) for f in args.folder]
        texts = {k: {x: v[x] for x in ("sha256", "chars", "passages", "python")} for k, v in texts.items()}
    env["load_average_at_end"] = load_average()
    result = {"environment": env, "texts": texts, "rows": rows, "block_size": BLOCK, "window": WINDOW,
              "windows": args.windows}
    table = md_table(["model", "dense", "int4 nearest", "int4 GPTQ", "GPTQ layers", "GPTQ seconds",
                      "calibration tokens"],
                     [[r["model"], f"{r['dense']:.3f}", f"{r['nearest']:.3f} ({r['nearest'] / r['dense']:.2f}x)",
                       f"{r['gptq']:.3f} ({r['gptq'] / r['dense']:.2f}x)", r["gptq_layers"], r["gptq_seconds"],
                       r["calibration_tokens"]] for r in rows])
    md = (f"# int4 rounded to nearest vs GPTQ: perplexity on held-out text\n\nCommand: `{env['command']}`; "
          f"{env['date']}; torch {env['torch']}, 1 thread; {env['cpu_count']} CPUs ({env['processor']}), load "
          f"average {env['load_average_at_start']} at start, {env['load_average_at_end']} at end.\n\n"
          f"Perplexity over {args.windows} windows of {WINDOW} tokens of the evaluation text (Python "
          f"{texts['eval']['python']} standard-library docstrings, sha256 {texts['eval']['sha256'][:16]}...); "
          f"int4: onnxruntime's MatMulNBits rounding (asymmetric, blocks of {BLOCK}), put into the torch model "
          "as the export stores it: the embedding lookup rounded to nearest in both, the tied output head float32 "
          "(as the int4 files hold it).\n\n" + table + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "int4_gptq.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "int4_gptq.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
