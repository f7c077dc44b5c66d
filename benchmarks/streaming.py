"""Streamed `compress --stream` on a synthetic 7B-shaped Llama checkpoint: peak memory and time of the
analysis and the shard-by-shard rewrite, against the exact-SVD floor of the same matrices.

    python benchmarks/streaming.py [--layers 32] [--analyse N] [--floor-layers 1] [--rank 128 | --target 0.3
                                   --max-rank 256] [--svd randomized] [--dir /tmp/compressor-stream-bench] [--tiny]

Writes a Hugging Face folder (LlamaForCausalLM config, ``--layers`` decoder layers of Llama-2-7B's shapes,
its embedding and head, random bf16 weights, 1 GB shards and an index) under ``--dir``, then runs
``compress MODEL --stream`` in a child process on the whole model (or the first ``--analyse`` decoder
layers, every other tensor copied through) and reads the child's peak RSS from ``wait4``. The floor is
``torch.linalg.svd`` alone (float32, same threads) of the matrices of the first ``--floor-layers``
decoder layers, timed in this process after the child is done; the floor of all decoder layers is
extrapolated from it, labelled as such. ``--tiny`` runs the same on a small model in
seconds (the test suite does). The checkpoint and the output are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from _common import environment, load_average

from compressor.core.fileio import atomic_write_text
from compressor.core.svd import svd

LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000}
TINY = {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 500}
ROOT = Path(__file__).resolve().parents[1]


def write_checkpoint(folder: Path, shapes: dict, layers: int, shard_bytes: int) -> int:
    """A Llama folder of random bf16 weights, written tensor by tensor (never the whole model in memory)."""
    import transformers

    from compressor.formats.shards import ShardWriter

    folder.mkdir(parents=True)
    cfg = transformers.LlamaConfig(**shapes, num_hidden_layers=layers, tie_word_embeddings=False,
                                   torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(folder)
    h, f, v = shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int):  # generated when its shard is written: one tensor in memory at a time
        return shape, torch.bfloat16, lambda: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def ones(n: int):
        return (n,), torch.bfloat16, lambda: torch.ones(n, dtype=torch.bfloat16)

    writer = ShardWriter(folder, shard_bytes)
    writer.add("model.embed_tokens.weight", *rand(v, h))
    for i in range(layers):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            writer.add(f"{p}.self_attn.{name}.weight", *rand(h, h))
        writer.add(f"{p}.mlp.gate_proj.weight", *rand(f, h))
        writer.add(f"{p}.mlp.up_proj.weight", *rand(f, h))
        writer.add(f"{p}.mlp.down_proj.weight", *rand(h, f))
        writer.add(f"{p}.input_layernorm.weight", *ones(h))
        writer.add(f"{p}.post_attention_layernorm.weight", *ones(h))
    writer.add("model.norm.weight", *ones(h))
    writer.add("lm_head.weight", *rand(v, h))
    writer.close()
    return writer.total


_CHILD = """
import json, sys
from compressor.jobs.stream import stream_compress
summary = stream_compress(sys.argv[1], sys.argv[2], mode="compress", svd=sys.argv[4], include=json.loads(sys.argv[5]),
                          workers=1, force=True, **json.loads(sys.argv[3]))
"""


def run_child(model: Path, out: Path, policy: dict, method: str, include: list[str], threads: int) -> dict:
    """The streamed run in a child process; its peak RSS from the kernel (wait4), its times from stream.json;
    the machine's load sampled every 30 s while it runs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(model), str(out), json.dumps(policy), method,
                             json.dumps(include)], env=env)
    loads, done = [], threading.Event()

    def sample() -> None:
        while not done.wait(30):
            loads.append(load_average()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"streamed run failed with exit code {proc.returncode}")
    summary = json.loads((out / "stream.json").read_text())
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    summary["peak_rss_child_gib"] = round(usage.ru_maxrss * 1024 / 2**30, 3)  # ru_maxrss is in KiB on Linux
    summary["load_1min_during"] = {"samples": len(loads), "min": min(loads, default=None),
                                   "max": max(loads, default=None),
                                   "mean": round(sum(loads) / len(loads), 2) if loads else None}
    return summary


def svd_floor(model: Path, names: list[str]) -> dict[str, float]:
    """Seconds of torch.linalg.svd alone for each named matrix (read here, in float32)."""
    from compressor.formats.shards import Checkpoint

    ckpt = Checkpoint.open(model)
    out = {}
    for name in names:
        w = ckpt.tensor(f"{name}.weight").float()
        start = time.perf_counter()
        svd(w)
        out[name] = round(time.perf_counter() - start, 3)
        print(f"  exact SVD {name} {list(w.shape)}: {out[name]:.2f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers in the checkpoint (Llama-2-7B: 32)")
    ap.add_argument("--analyse", type=int, default=None,
                    help="analyse and factor only the first N decoder layers (default: the whole model, embedding "
                         "and head included)")
    ap.add_argument("--floor-layers", type=int, default=1,
                    help="decoder layers whose matrices get the exact-SVD floor (each 4096x11008 SVD takes minutes)")
    ap.add_argument("--rank", type=int, default=None, help="fixed rank (the default policy: --rank 128)")
    ap.add_argument("--target", type=float, default=None, help="global target instead of --rank (needs --max-rank "
                                                                   "with --svd randomized)")
    ap.add_argument("--max-rank", type=int, default=None)
    ap.add_argument("--svd", default="randomized", choices=["exact", "randomized"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/compressor-stream-bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--tiny", action="store_true", help="a small model: seconds, for the test suite")
    ap.add_argument("--name", default=None, help="results file stem (default: streaming, or streaming_tiny)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = {"target": args.target} if args.target is not None else {"rank": args.rank or 128}
    if args.max_rank is not None:
        policy["max_rank"] = args.max_rank
    shapes, shard = (TINY, 200_000) if args.tiny else (LLAMA_7B, 10**9)  # 1 GB: a few decoder layers still shard
    env = environment("python benchmarks/streaming.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.dir.exists():
        shutil.rmtree(args.dir)
    model, out = args.dir / "llama", args.dir / "out"
    analysed = args.layers if args.analyse is None else args.analyse
    try:
        start = time.perf_counter()
        size = write_checkpoint(model, shapes, args.layers, shard)
        write_s = time.perf_counter() - start
        print(f"checkpoint: {size / 1e9:.2f} GB in {len(list(model.glob('*.safetensors')))} shards, "
              f"written in {write_s:.1f} s", flush=True)
        include = [] if args.analyse is None else [f"model.layers.{i}.*" for i in range(args.analyse)]
        run = run_child(model, out, policy, args.svd, include, args.threads)
        print(f"streamed: analyze {run['analyze_seconds']} s, rewrite {run['rewrite_seconds']} s, peak RSS "
              f"{run['peak_rss_child_gib']} GiB", flush=True)
        checks = [lp.get("svd") for lp in json.loads((out / "plan.json").read_text())["layers"] if lp.get("svd")]
        floored = [n for n in run["seconds_per_layer"]
                   if any(n.startswith(f"model.layers.{i}.") for i in range(args.floor_layers))]
        floor = svd_floor(model, floored)
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    blocks = [sum(s for n, s in run["seconds_per_layer"].items() if n.startswith(f"model.layers.{i}."))
              for i in range(analysed)]
    others = {n: s for n, s in run["seconds_per_layer"].items() if not n.startswith("model.layers.")}
    floor_block = sum(floor.values()) / args.floor_layers if args.floor_layers else None  # 0: no floor
    randomized = [c for c in checks if c.get("method") == "randomized"]
    result = {"environment": env, "load_average_at_end": load_average(), "tiny": args.tiny,
              "checkpoint": {"decoder_layers": args.layers, "shapes": shapes, "dtype": "bfloat16", "bytes": size,
                             "shards": shard, "write_s": round(write_s, 1)},
              "floor_decoder_layers": args.floor_layers,
              "run": {"policy": policy, "svd": args.svd, "threads": args.threads, "workers": 1,
                      "decoder_layers_analysed": analysed, "whole_model": args.analyse is None,
                      "output_bytes": out_bytes, **run},
              "svd_checks": {"randomized": len(randomized), "exact": len(checks) - len(randomized),
                             "exact_reasons": sorted({c.get("reason", "") for c in checks
                                                      if c.get("method") != "randomized"}),
                             "worst_bound": max((c["bound"] for c in randomized), default=None)},
              "exact_svd_floor_s": floor,
              "per_decoder_layer": {"streamed_mean_s": round(sum(blocks) / len(blocks), 2),
                                    "streamed_min_s": round(min(blocks), 2), "streamed_max_s": round(max(blocks), 2),
                                    "exact_svd_floor_s": None if floor_block is None else round(floor_block, 2)},
              "embedding_and_head_s": others,
              "extrapolated": {"exact_svd_floor_decoder_layers_s": None if floor_block is None
                               else round(args.layers * floor_block, 1)}}
    name = args.name or ("streaming_tiny" if args.tiny else "streaming")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    env, run, ck, per = r["environment"], r["run"], r["checkpoint"], r["per_decoder_layer"]
    pol = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in run["policy"].items())
    scope = ("the whole model (every decoder layer, the embedding and the head)" if run["whole_model"] else
             f"the first {run['decoder_layers_analysed']} decoder layers (`--include`; every other tensor is "
             "copied through)")
    load = run["load_1min_during"]
    chk = r["svd_checks"]
    mbps = run["checkpoint_bytes"] / 1e6 / max(run["fingerprint_seconds"], 1e-9)
    lines = ["# Streamed analysis and rewrite of a 7B-shaped checkpoint" + (" (tiny variant)" if r["tiny"] else ""),
             "", f"`{env['command']}`, {env['date']}, {env['processor']}, {env['cpu_count']} cores, torch "
             f"{env['torch']}, {run['threads']} thread(s), 1 worker, load average {env['load_average_at_start']} at "
             f"start and {r['load_average_at_end']} at end; 1-minute load during the streamed run "
             f"{load['min']}-{load['max']} (mean {load['mean']}, {load['samples']} samples): other processes share "
             "the machine.", "",
             f"Checkpoint: Llama layout, {ck['decoder_layers']} decoder layers, hidden {ck['shapes']['hidden_size']}, "
             f"MLP {ck['shapes']['intermediate_size']}, vocabulary {ck['shapes']['vocab_size']}, random bf16 weights, "
             f"{ck['bytes'] / 1e9:.2f} GB in shards of at most {ck['shards'] / 1e9:.1f} GB (written in "
             f"{ck['write_s']} s). `compress --stream {pol} --svd {run['svd']}` on {scope}, in a child process.", "",
             "| | measured |", "|---|---|",
             f"| peak RSS, analyze (the run's high-water mark when the analysis ended) | "
             f"{run['peak_rss_analyze_gib']:.2f} GiB |",
             f"| peak RSS, whole run (analyze + rewrite; kernel's wait4) | {run['peak_rss_child_gib']:.2f} GiB |",
             f"| resume fingerprint: sha256 of every byte ({run['checkpoint_bytes'] / 1e9:.2f} GB) | "
             f"{run['fingerprint_seconds']:.1f} s ({mbps:.0f} MB/s) |",
             f"| analyze, {run['layers']} matrices (fingerprint included) | {run['analyze_seconds']:.1f} s |",
             f"| rewrite (factored + copied shards, {run['output_bytes'] / 1e9:.2f} GB written) | "
             f"{run['rewrite_seconds']:.1f} s |",
             f"| whole run (child process, with imports) | {run['wall_s']:.1f} s |",
             f"| per decoder layer, streamed (read, SVD, factors; {run['decoder_layers_analysed']} measured) | "
             f"mean {per['streamed_mean_s']:.1f} s, min {per['streamed_min_s']:.1f}, max {per['streamed_max_s']:.1f} |",
             "| embedding and head, streamed | "
             + (", ".join(f"{n} {s:.1f} s" for n, s in r["embedding_and_head_s"].items()) or "not analysed") + " |",
             *([] if per["exact_svd_floor_s"] is None else [
                 f"| per decoder layer, exact-SVD floor (torch.linalg.svd alone, measured on the first "
                 f"{r['floor_decoder_layers']}) | {per['exact_svd_floor_s']:.1f} s |",
                 f"| **extrapolated** from that: exact-SVD floor of all {ck['decoder_layers']} decoder layers | "
                 f"{r['extrapolated']['exact_svd_floor_decoder_layers_s']:.0f} s |"]),
             f"| SVD checks in the plan | {chk['randomized']} randomized (worst bound {chk['worst_bound']}), "
             f"{chk['exact']} exact{' (' + '; '.join(chk['exact_reasons']) + ')' if chk['exact'] else ''} |", "",
             "| matrix | streamed s | exact SVD floor s |", "|---|---|---|"]
    for name, s in run["seconds_per_layer"].items():
        floor = r["exact_svd_floor_s"].get(name)
        lines.append(f"| {name} | {s:.2f} | {'not measured' if floor is None else f'{floor:.2f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
