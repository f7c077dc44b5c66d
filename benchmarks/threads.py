"""`compress analyze` on all-MiniLM-L6-v2 with the machine idle and under a load this script makes itself.

    python benchmarks/threads.py [--rounds 2] [--out benchmarks/results]

The load is 2 busy processes (pure-Python loops, one core's worth each) started by this script; idle and
loaded runs alternate, so slow drift of the (shared) machine hits both alike. Measured, the same number
of rounds each: the tool's own thread choice (``threads=None``: weight-only work on one thread), ``--threads 1`` and
``--threads`` = every core (torch's default, the behaviour before the per-operation choice). Writes
``threads.md`` and ``threads.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, load_average, md_table, minilm_missing

import compressor
from compressor.core.fileio import atomic_write_text
from compressor.core.threads import available_cores
from compressor.examples import minilm_path

BUSY_PROCESSES = 2


def _busy(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def timed_analyze(threads: int | None, loaded: bool) -> dict:
    """Seconds of one `compress analyze MODEL --energy 0.9` job (loading included), with or without load."""
    stop = mp.Event()
    procs = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(BUSY_PROCESSES if loaded else 0)]
    for p in procs:
        p.start()
    time.sleep(0.5 if procs else 0)  # let the load start
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            compressor.compress(minilm_path(), Path(tmp) / "out", mode="analyze", energy=0.9, threads=threads,
                                progress=False)
            seconds = time.perf_counter() - start
            load = load_average()
    finally:
        stop.set()
        for p in procs:
            p.join()
    return {"threads": threads, "loaded": loaded, "seconds": round(seconds, 3), "load_average_after": load}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if minilm_missing():
        return 2
    env = environment("python " + " ".join(sys.argv))
    cores = available_cores()
    runs = []
    settings = (None, 1, cores)
    timed_analyze(None, False)  # warm-up: imports and file cache
    for _ in range(args.rounds):
        for threads in settings:
            for loaded in (False, True):
                runs.append(timed_analyze(threads, loaded))
                print(runs[-1], flush=True)

    def median(threads, loaded):
        return statistics.median(r["seconds"] for r in runs if r["threads"] == threads and r["loaded"] == loaded)

    rows = []
    labels = {None: "tool's choice (weight-only work on 1 thread)", 1: "--threads 1 (every step)",
              cores: f"--threads {cores} (every core: torch's own default here)"}
    for threads, label in labels.items():
        idle, busy = median(threads, False), median(threads, True)
        n = sum(1 for r in runs if r["threads"] == threads and not r["loaded"])
        rows.append([label, n, f"{idle:.2f}", f"{busy:.2f}", f"{busy / idle:.2f}x"])
    env["load_average_at_end"] = load_average()
    md = "\n".join([
        "# `compress analyze` on all-MiniLM-L6-v2: idle vs loaded machine", "",
        f"`compress analyze MODEL --energy 0.9` as one Python call (loading included), {cores} cores; "
        f"'loaded' = {BUSY_PROCESSES} busy processes (pure-Python loops) started by the script; idle and "
        "loaded runs alternate. The machine is shared: 'idle' means without the generated load, and the load "
        f"average was {env['load_average_at_start']} at the start and {env['load_average_at_end']} at the end.",
        "", md_table(["threads", "runs each", "idle (s, median)", "loaded (s, median)", "loaded / idle"], rows), "",
        "Every run:", "", md_table(["threads", "loaded", "seconds", "load average after"],
                                  [[r["threads"] or "tool", r["loaded"], r["seconds"], r["load_average_after"]]
                                   for r in runs]), "",
        f"Environment: `{json.dumps(env)}`", ""])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "threads.md", md)
    atomic_write_text(args.out / "threads.json", json.dumps({"environment": env, "runs": runs}, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
