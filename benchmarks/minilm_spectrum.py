"""Per-layer spectral plan of the real all-MiniLM-L6-v2 at energy 0.90 / 0.95 / 0.99.

    python benchmarks/minilm_spectrum.py [--out benchmarks/results]

Prints each plan's per-layer table (rank, energy kept, relative error, parameters before/after, why a
layer stays dense) and writes them with the totals to ``minilm_spectrum.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from _common import minilm_missing

import compressor
from compressor.core.fileio import atomic_write_text
from compressor.examples import load_minilm

ENERGIES = (0.90, 0.95, 0.99)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if minilm_missing():
        return 2
    model, _ = load_minilm()
    sections, results = [], {}
    for energy in ENERGIES:
        start = time.perf_counter()
        plan = compressor.analyze(model, energy=energy)
        seconds = time.perf_counter() - start
        totals = plan.totals()
        results[str(energy)] = {"analyze_seconds": seconds, "totals": totals,
                                "layers": plan.to_dict()["layers"]}
        sections.append(f"## energy {energy}\n\n```\n{plan.table()}\n```\n")
        print(f"\n=== all-MiniLM-L6-v2, energy {energy} (analyze {seconds:.2f} s) ===\n{plan.table()}")
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "machine": platform.machine(),
           "command": "python benchmarks/minilm_spectrum.py"}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "minilm_spectrum.json", json.dumps({"env": env, "plans": results},
                                                                     indent=1) + "\n")
    atomic_write_text(args.out / "minilm_spectrum.md",
                      "# all-MiniLM-L6-v2: per-layer plans by spectral energy\n\n"
                      f"Produced by `{env['command']}` (torch {env['torch']}, {env['threads']} threads).\n\n"
                      + "\n".join(sections))
    print(f"\nwrote {args.out / 'minilm_spectrum.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
