"""Factoring all-MiniLM-L6-v2's word-embedding table: plain SVD against token-frequency weighting.

    python benchmarks/embedding_factoring.py [--out benchmarks/results]

Only ``embeddings.word_embeddings`` (30522 x 384) is factored, at fixed ranks, by
``compressor.analyze(model, rank=r, include=[...])`` (plain SVD) and the same with ``calibration=`` (rows
weighted by how often 512 calibration sentences use each token, every row projected on the chosen
subspace). Fidelity: mean cosine of sentence embeddings to the dense model's on 300 held-out real
sentences (stdlib docstrings, disjoint from calibration). A second table varies the uniform share mixed
into the token weights (``compressor.analysis.whitened.embedding_decomposition``). Writes
``embedding_factoring.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from _common import environment, minilm_missing

import compressor
from compressor.analysis.whitened import Moments, embedding_decomposition
from compressor.core.fileio import atomic_write_text
from compressor.core.rewrite import factor_module
from compressor.examples import load_minilm, sentence_splits

LAYER = "embeddings.word_embeddings"
RANKS = (352, 320, 256, 192)
SHARES = (0.002, 0.02, 0.1, 0.5, 1.0)
THREADS = 2


def tokens(tok, sentences: list[str]) -> dict[str, torch.Tensor]:
    return dict(tok(sentences, padding="max_length", truncation=True, max_length=64, return_tensors="pt"))


def sentence_embeddings(model: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for b in batches:
            mask = b["attention_mask"][..., None].float()
            v = (model(**b).last_hidden_state * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(v, dim=1))
    return torch.cat(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if minilm_missing():
        return 2
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    model, tok = load_minilm()
    cal_sents, eval_sents = sentence_splits(n_calibration=512, n_eval=300)
    calibration = [tokens(tok, cal_sents[i:i + 64]) for i in range(0, len(cal_sents), 64)]
    held_out = [tokens(tok, eval_sents[i:i + 50]) for i in range(0, len(eval_sents), 50)]
    ref = sentence_embeddings(model, held_out)

    def fidelity(small: torch.nn.Module) -> float:
        return float((sentence_embeddings(small, held_out) * ref).sum(1).mean())

    rows = []
    for rank in RANKS:
        row = {"rank": rank}
        for method, extra in (("plain SVD", {}), ("token-weighted", {"calibration": calibration})):
            small = copy.deepcopy(model)
            plan = compressor.analyze(small, rank=rank, include=[LAYER], progress=False, **extra)
            compressor.rewrite(small, plan)
            row[method] = fidelity(small)
            row["params_after"] = plan.layer(LAYER).params_after
        rows.append(row)
        print(row, flush=True)

    # The uniform share: near 0 weights tokens by calibration frequency only, 1 is the plain SVD.
    counts = Moments()
    for b in calibration:
        counts.add_tokens(b["input_ids"][b["attention_mask"].bool()], model.config.vocab_size)
    table = dict(model.named_modules())[LAYER]
    shares = []
    for share in SHARES:
        dec, _ = embedding_decomposition(table.weight, counts, uniform_share=share)
        entry = {"uniform_share": share}
        for rank in (320, 256):
            small = copy.deepcopy(model)
            small.embeddings.word_embeddings = factor_module(table, rank, dec)
            entry[str(rank)] = fidelity(small)
        shares.append(entry)
        print(entry, flush=True)
    unseen = sum(int((~torch.isin(b["input_ids"][b["attention_mask"].bool()],
                                   torch.nonzero(counts.tokens).flatten())).sum()) for b in held_out)
    total = sum(int(b["attention_mask"].sum()) for b in held_out)
    record = {"benchmark": "embedding_factoring", "env": environment("python benchmarks/embedding_factoring.py"),
              "layer": LAYER, "calibration_sentences": len(cal_sents), "held_out_sentences": len(eval_sents),
              "held_out_tokens_unseen_in_calibration": unseen / total, "ranks": rows, "uniform_share": shares,
              "seconds": round(time.perf_counter() - start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "embedding_factoring.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(args.out / "embedding_factoring.md", render(record))
    print(f"wrote {args.out / 'embedding_factoring.md'}")
    return 0


def render(r: dict) -> str:
    lines = ["# all-MiniLM-L6-v2 word-embedding table: plain SVD vs token-frequency weighting", "",
             f"Only `{r['layer']}` (30522 x 384, 11,720,448 weights) is factored. Fidelity: mean cosine of "
             f"sentence embeddings to the dense model's on {r['held_out_sentences']} held-out sentences; "
             f"calibration: {r['calibration_sentences']} other sentences "
             f"({r['held_out_tokens_unseen_in_calibration']:.1%} of the held-out tokens never occur in them).",
             "", "| rank | weights after | plain SVD | token-weighted (calibration) |", "|---:|---:|---:|---:|"]
    lines += [f"| {x['rank']} | {x['params_after']:,} | {x['plain SVD']:.5f} | {x['token-weighted']:.5f} |"
              for x in r["ranks"]]
    lines += ["", "Uniform share mixed into the token weights (small: calibration frequencies; 1: plain SVD):",
              "", "| uniform share | rank 320 | rank 256 |", "|---:|---:|---:|"]
    lines += [f"| {x['uniform_share']:g} | {x['320']:.5f} | {x['256']:.5f} |" for x in r["uniform_share"]]
    e = r["env"]
    lines += ["", f"Command: `{e['command']}`; {e['date']}; torch {e['torch']}, {e['torch_threads']} threads; "
              f"{r['seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
