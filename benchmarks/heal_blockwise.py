"""Block-wise against end-to-end healing: all-MiniLM-L6-v2 at 20% and 40% of its encoder removed, and the
digits CNN.

    python benchmarks/heal_blockwise.py [--threads 1] [--removed 0.2,0.4] [--out benchmarks/results]

MiniLM: ``compressor.analyze(model, target=R, include=["encoder.*"])`` from a plain (truncated SVD) and
a data-aware (``calibration=`` sentences: whitened SVD) start, then ``compressor.heal`` by distillation
from the original model three ways: ``method="blockwise"`` (each encoder layer learns the original
layer on the inputs the healed layers before it give), ``method="end-to-end"`` (masked MSE on the last
hidden state) and ``method="both"``. The ``both`` row is ``method="end-to-end"`` run on the blockwise row's
model with the same settings, which is what ``method="both"`` does (tests/test_heal_blockwise.py checks
that the two give the same weights); its time is the sum of both phases. Every heal picks its best
checkpoint on held-out validation sentences. Reported on other held-out sentences (docstrings of the
Python standard library, disjoint from training and validation): sentence-embedding cosine to the
original (mean, 5th percentile), top-10 neighbour agreement, and wall and CPU seconds of the heal.
Digits: the CNN of heal_digits.py at a quarter of its full ranks, healed the same three ways (test
accuracy). Writes ``heal_blockwise.json``, ``.md`` and ``.png`` (held-out token cosine over
end-to-end steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from _common import embedding_fidelity, environment, load_average, log, md_table, minilm_missing

import compressor
from compressor.core.fileio import atomic_write_text
from compressor.data.calibration import tokenize_batches
from compressor.examples import accuracy, digits_splits, docstring_sentences, embed, load_minilm, train_digits_cnn
from compressor.train.heal import HealConfig, heal

N_CALIB, N_EVAL = 256, 500
MAX_LENGTH = 64
# Learning rates measured on encoder.layer.2 at 40% removed (60 block steps, held-out block error):
# plain start 1e-4 0.111, 3e-4 0.096, 1e-3 0.083, 3e-3 0.079; data-aware start 3e-5 0.058, 1e-4 0.055,
# 3e-4 0.053, 1e-3 0.056. The data-aware start is nearer its optimum and wants a smaller step.
# End-to-end from the data-aware start (40% removed, 3000 training sentences, 120 steps, held-out sentence
# cosine): lr 3e-4 0.9428 (CPU 139 s); heal_blockwise_40_long.md's lr 1e-4 on 640 sentences, 96 steps: 0.9332.
LR = {"plain": {"block_lr": 1e-3, "lr": 5e-4}, "data-aware": {"block_lr": 3e-4, "lr": 3e-4}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--removed", default="0.2,0.4", help="fractions of the encoder's linear parameters removed")
    ap.add_argument("--starts", default="plain,data-aware")
    ap.add_argument("--block-steps", type=int, default=40)
    ap.add_argument("--steps", type=int, default=24, help="end-to-end steps")
    ap.add_argument("--methods", default="blockwise,end-to-end,both",
                    help="healings to run (both needs blockwise: it continues from that row's model)")
    ap.add_argument("--distill", default="output",
                    help="end-to-end distillation targets to compare (output, hidden: also every encoder layer's "
                         "hidden states); one end-to-end and both row per value")
    ap.add_argument("--train", type=int, default=3000, help="training sentences")
    ap.add_argument("--val", type=int, default=200, help="validation sentences (pick the best checkpoint)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--name", default="heal_blockwise", help="output file name (without .md/.json/.png)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if minilm_missing():
        return 2
    torch.set_num_threads(args.threads)
    env = environment("python benchmarks/heal_blockwise.py " + " ".join(sys.argv[1:]))
    start = time.perf_counter()

    model, tok = load_minilm()
    sents = docstring_sentences(seed=args.seed)
    calib, train, val = sents[:N_CALIB], sents[N_CALIB:N_CALIB + args.train], sents[-N_EVAL - args.val:-N_EVAL]
    if N_CALIB + args.train + args.val + N_EVAL > len(sents):
        raise SystemExit(f"only {len(sents)} sentences: lower --train or --val")
    held_out = sents[-N_EVAL:]

    # Batched by length, as the library batches text (tokenize_batches): random batches of docstrings were
    # 58% padding, and a heal step costs what its padded tokens cost.
    calib_b, train_b, val_b = (tokenize_batches(tok, s, batch_size=32, max_length=MAX_LENGTH)
                               for s in (calib, train, val))
    padding = 1 - sum(int(b["attention_mask"].sum()) for b in train_b) / sum(b["attention_mask"].numel()
                                                                           for b in train_b)
    reference = embed(model, tok, held_out)

    def fidelity(m: torch.nn.Module) -> dict:
        return embedding_fidelity(reference, embed(m, tok, held_out))

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - wall, time.process_time() - cpu

    rows = []
    for removed in (float(r) for r in args.removed.split(",")):
        for start_kind in args.starts.split(","):
            compressed = copy.deepcopy(model)
            kw = {"calibration": calib_b} if start_kind == "data-aware" else {}
            plan, secs, _ = timed(lambda c=compressed, r=removed, kw=kw: compressor.analyze(
                c, target=r, include=["encoder.*"], progress=False, **kw))
            compressor.rewrite(compressed, plan)
            row0 = {"removed": removed, "start": start_kind, "method": "none (compressed)", **fidelity(compressed),
                    "analyze_seconds": round(secs, 1), "removed_fraction": plan.totals()["removed_fraction"]}
            rows.append(row0)
            log(f"{removed} {start_kind}: {row0}")
            cfg = HealConfig(loss="mse", batch_size=32, steps=args.steps, every=max(1, args.steps // 8),
                             warmup_steps=4, block_steps=args.block_steps, seed=args.seed, **LR[start_kind])
            results = {}
            methods = args.methods.split(",")
            if "both" in methods and "blockwise" not in methods:  # both starts from the blockwise result
                methods.insert(0, "blockwise")
            # Blockwise does not distil end to end: one row whatever --distill; the others one per target.
            runs = [(m, d) for m in ("blockwise", "end-to-end", "both") if m in methods
                    for d in (["output"] if m == "blockwise" else args.distill.split(","))]
            for method, distill in runs:
                src = results["blockwise"][0].model if method == "both" else compressed
                run = cfg.replace(method="end-to-end" if method == "both" else method, distill=distill)
                r, wall, cpu = timed(lambda src=src, c=run: heal(
                    src, c, teacher=model, data=train_b, val_data=val_b, progress=False))
                if method == "both":
                    b = results["blockwise"]
                    wall, cpu = wall + b[1], cpu + b[2]
                results.setdefault(method, (r, wall, cpu))
                label = method if method == "blockwise" else f"{method}, distill {distill}"
                row = {"removed": removed, "start": start_kind, "method": label, **fidelity(r.model),
                       "heal_wall_seconds": round(wall, 1), "heal_cpu_seconds": round(cpu, 1),
                       "val_before": r.before, "val_after": r.after, "best_step": r.best_step, "steps": r.steps,
                       "note": r.note, "history": r.history,
                       "blocks": [{k: v for k, v in b.items() if k != "history"} for b in r.blocks]}
                rows.append(row)
                log(f"  {method}: cos {row['cos_mean']:.4f} top10 {row['top10_agreement']:.3f} "
                    f"{wall:.0f} s wall, load {load_average()}")

    digits = None if args.skip_digits else digits_rows(args.seed)
    result = {"env": env, "load_average_at_end": load_average(), "total_seconds": round(time.perf_counter() - start),
              "sentences": {"calibration": N_CALIB, "train": args.train, "val": args.val, "held_out": N_EVAL,
                            "max_length": MAX_LENGTH, "batching": "by length (tokenize_batches)",
                            "train_padding_fraction": round(padding, 4)},
              "settings": {"block_steps": args.block_steps, "end_to_end_steps": args.steps, "batch_size": 32,
                           "distill": args.distill,
                           "lr": LR, "warmup_steps": 4, "schedule": "cosine", "optimizer": "adamw"},
              "minilm": rows, "digits": digits}
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / args.name
    atomic_write_text(base.with_suffix(".json"), json.dumps(result, indent=1, default=str) + "\n")
    _plot(rows, base.with_suffix(".png"))
    atomic_write_text(base.with_suffix(".md"), _markdown(result, base.with_suffix(".png").name))
    print(f"wrote {base}.md, .json and .png ({result['total_seconds']} s in all)")
    return 0


def digits_rows(seed: int) -> dict:
    """The digits CNN at a quarter of its full ranks, healed by distillation three ways (test accuracy)."""
    model, base = train_digits_cnn(seed)
    splits = digits_splits(seed)
    compressed = copy.deepcopy(model)
    compressor.rewrite(compressed, compressor.analyze(compressed, rank_ratio=0.25, exclude=["8"]))
    xtr, _ = splits["train"]
    cfg = HealConfig(loss="kl", lr=2e-3, epochs=8, block_steps=100, block_lr=2e-3, seed=seed, monitor="val_loss")
    out = {"uncompressed_test": base["test"], "compressed_test": accuracy(compressed, *splits["test"]), "healed": {}}
    for method in ("blockwise", "end-to-end", "both"):
        t = time.perf_counter()
        r = heal(compressed, cfg.replace(method=method), teacher=model, data=xtr, val_data=splits["val"][0],
                 progress=False)
        out["healed"][method] = {"test": accuracy(r.model, *splits["test"]),
                                 "seconds": round(time.perf_counter() - t, 1),
                                 "blocks": [(b["block"], round(b["before"], 4), round(b["after"], 4))
                                            for b in r.blocks], "note": r.note}
        log(f"digits {method}: {out['healed'][method]}")
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = [s for s in ("plain", "data-aware") if any(r["start"] == s for r in rows)]  # one panel each
    fig, axes = plt.subplots(1, len(starts), figsize=(5.5 * len(starts), 4), sharey=False, squeeze=False)
    for ax, start in zip(axes[0], starts, strict=True):
        for r in rows:
            if r["start"] != start or "history" not in r or r["method"] == "blockwise":  # one point
                continue
            pts = [(h["step"], h["metrics"]["val_cosine"]) for h in r["history"] if "val_cosine" in h["metrics"]]
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{r['removed']:.0%} removed, {r['method']}")
        ax.set_title(f"{start} start")
        ax.set_xlabel("end-to-end step (step 0: the input, or the blockwise result for 'both')")
        ax.set_ylabel("validation cosine (last hidden state)")
        ax.legend(fontsize=8)
    # A short title per panel and one for the figure: a long panel title was clipped at the edges.
    fig.suptitle("Validation token cosine over end-to-end steps (the split that picks the best step)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(r: dict, png: str) -> str:
    env, s = r["env"], r["settings"]
    lines = [
        "# Block-wise vs end-to-end healing: all-MiniLM-L6-v2 and the digits CNN", "",
        f"Produced by `{env['command']}` on {env['date']} ({env['processor']}, {env['cpu_count']} CPUs, "
        f"torch {env['torch']}, {env['torch_threads']} thread; load average {env['load_average_at_start']} at "
        f"start and {r['load_average_at_end']} at the end: the machine was shared, so times are this run's, "
        f"side by side); {r['total_seconds']} s in all.", "",
        f"Data: {r['sentences']['train']} training, {r['sentences']['val']} validation (picks the best checkpoint) "
        f"and {r['sentences']['held_out']} held-out evaluation sentences, all disjoint, docstrings of the Python "
        f"standard library, max {r['sentences']['max_length']} tokens; the data-aware start is calibrated on "
        f"{r['sentences']['calibration']} others."
        + (f" Batches of 32 sentences of similar length (`tokenize_batches`): "
           f"{r['sentences']['train_padding_fraction']:.1%} of the training tokens are padding."
           if "train_padding_fraction" in r["sentences"] else ""), "",
        f"Settings: blockwise {s['block_steps']} steps per encoder layer (6 layers), end-to-end "
        f"{s['end_to_end_steps']} steps, batch {s['batch_size']}, AdamW, cosine schedule, {s['warmup_steps']} "
        "warm-up steps; learning rates "
        f"(lr: end-to-end, block_lr: blockwise) `{json.dumps(s['lr'])}`. `both` = the blockwise model healed "
        "end-to-end (what `method=\"both\"` does); its time is the sum. `distill output`: the end-to-end loss is "
        "the masked MSE of the last hidden state; `distill hidden`: plus the mean over the 6 encoder layers of "
        "each layer's relative output error to the original's (`HealConfig(distill=\"hidden\")`).", "",
    ]
    table = [[f"{x['removed']:.0%}", x["start"], x["method"], x["cos_mean"], x["cos_p5"], x["top10_agreement"],
              x.get("heal_wall_seconds"), x.get("heal_cpu_seconds")] for x in r["minilm"]]
    lines += [md_table(["removed", "start", "healing", "cosine mean", "cosine p5", "top-10 agreement",
                        "heal wall s", "heal CPU s"], table), ""]
    notes = [f"- {x['removed']:.0%} {x['start']} {x['method']}: {x['note']}" for x in r["minilm"] if x.get("note")]
    if notes:
        lines += ["Notes (never worse):", *notes, ""]
    blockwise = [x for x in r["minilm"] if x["method"] == "blockwise"]
    if blockwise:
        lines += ["Per-block held-out relative output error `||block(x) - teacher_block(x)||^2 / "
                  "||teacher_block(x)||^2` before -> after (blockwise rows):", ""]
    for x in blockwise:
        blocks = ", ".join(f"{b['block'].rsplit('.', 1)[-1]}: {b['before']:.4f} -> {b['after']:.4f}"
                           for b in x["blocks"])
        lines.append(f"- {x['removed']:.0%} {x['start']}: {blocks}")
    lines += ["", f"Validation token cosine over the end-to-end steps: `{png}`.", ""]
    return "\n".join(lines + digits_markdown(r["digits"]))


def digits_markdown(d: dict | None) -> list[str]:
    """The digits CNN's section of a results file (:func:`digits_rows`), or nothing without it."""
    if not d:
        return []
    return ["## Digits CNN (factored layers at 25% of full rank, distillation, KL end-to-end)", "",
            md_table(["model", "test accuracy", "seconds", "per-block error before -> after"],
                     [["uncompressed", d["uncompressed_test"], None, None],
                      ["compressed (plain SVD)", d["compressed_test"], None, None],
                      *[[f"healed {m}", v["test"], v["seconds"],
                         ", ".join(f"{b}: {x:.3f} -> {y:.3f}" for b, x, y in v["blocks"]) or None]
                        for m, v in d["healed"].items()]]), ""]


if __name__ == "__main__":
    sys.exit(main())
