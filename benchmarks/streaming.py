"""Streamed `compress --stream` on a synthetic 7B-shaped Llama checkpoint: peak memory and time of the
analysis and the shard-by-shard rewrite, against the exact-SVD floor of the same matrices.

    python benchmarks/streaming.py [--layers 4] [--analyse 2] [--floor-layers 1] [--rank 512]
                                   [--svd randomized] [--dir /tmp/compressor-stream-bench] [--tiny]

Writes a Hugging Face folder (LlamaForCausalLM config, ``--layers`` decoder layers of Llama-2-7B's shapes,
its embedding and head, random bf16 weights, 1 GB shards and an index) under ``--dir``, then runs
``compress MODEL --stream`` in a child process on the first ``--analyse`` decoder layers (``--include``;
every other tensor is copied through) and reads the child's peak RSS from ``wait4``. The floor is
``torch.linalg.svd`` alone (float32, same threads) of the matrices of the first ``--floor-layers``
decoder layers, timed in this process after the child is done. Times for 32 decoder layers are
extrapolated from the measured ones, labelled as such. ``--tiny`` runs the same on a small model in
seconds (the test suite does). The checkpoint and the output are deleted at the end.
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
summary = stream_compress(sys.argv[1], sys.argv[2], mode="compress", rank=int(sys.argv[3]), svd=sys.argv[4],
                          include=json.loads(sys.argv[5]), workers=1, force=True)
"""


def run_child(model: Path, out: Path, rank: int, method: str, include: list[str], threads: int) -> dict:
    """The streamed run in a child process; its peak RSS from the kernel (wait4), its times from stream.json."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(model), str(out), str(rank), method,
                             json.dumps(include)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"streamed run failed with exit code {proc.returncode}")
    summary = json.loads((out / "stream.json").read_text())
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    summary["peak_rss_gib"] = round(usage.ru_maxrss * 1024 / 2**30, 3)  # ru_maxrss is in KiB on Linux
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
    ap.add_argument("--analyse", type=int, default=2, help="decoder layers analysed and factored (the first ones)")
    ap.add_argument("--floor-layers", type=int, default=1,
                    help="decoder layers whose matrices get the exact-SVD floor (each 4096x11008 SVD takes minutes)")
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--svd", default="randomized", choices=["exact", "randomized"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/compressor-stream-bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--tiny", action="store_true", help="a small model: seconds, for the test suite")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes, shard = (TINY, 200_000) if args.tiny else (LLAMA_7B, 10**9)  # 1 GB: a few decoder layers still shard
    env = environment("python benchmarks/streaming.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.dir.exists():
        shutil.rmtree(args.dir)
    model, out = args.dir / "llama", args.dir / "out"
    try:
        start = time.perf_counter()
        size = write_checkpoint(model, shapes, args.layers, shard)
        write_s = time.perf_counter() - start
        print(f"checkpoint: {size / 1e9:.2f} GB in {len(list(model.glob('*.safetensors')))} shards, "
              f"written in {write_s:.1f} s", flush=True)
        include = [f"model.layers.{i}.*" for i in range(args.analyse)]
        run = run_child(model, out, args.rank, args.svd, include, args.threads)
        print(f"streamed: analyze {run['analyze_seconds']} s, rewrite {run['rewrite_seconds']} s, peak RSS "
              f"{run['peak_rss_gib']} GiB", flush=True)
        floored = [n for n in run["seconds_per_layer"]
                   if any(n.startswith(f"model.layers.{i}.") for i in range(args.floor_layers))]
        floor = svd_floor(model, floored)
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    per_block = sum(run["seconds_per_layer"].values()) / args.analyse
    floor_block = sum(floor.values()) / args.floor_layers
    result = {"environment": env, "load_average_at_end": load_average(), "tiny": args.tiny,
              "checkpoint": {"decoder_layers": args.layers, "shapes": shapes, "dtype": "bfloat16", "bytes": size,
                             "shards": shard, "write_s": round(write_s, 1)},
              "floor_decoder_layers": args.floor_layers,
              "run": {"policy": {"rank": args.rank}, "svd": args.svd, "threads": args.threads, "workers": 1,
                      "decoder_layers_analysed": args.analyse, "output_bytes": out_bytes, **run},
              "exact_svd_floor_s": floor,
              "per_decoder_layer": {"streamed_s": round(per_block, 2), "exact_svd_floor_s": round(floor_block, 2)},
              "extrapolated_32_layers": {"streamed_analyze_s": round(32 * per_block, 1),
                                         "exact_svd_floor_s": round(32 * floor_block, 1)}}
    name = "streaming_tiny" if args.tiny else "streaming"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    env, run, ck = r["environment"], r["run"], r["checkpoint"]
    lines = ["# Streamed analysis and rewrite of a 7B-shaped checkpoint" + (" (tiny variant)" if r["tiny"] else ""),
             "", f"`{env['command']}`, {env['date']}, {env['processor']}, {env['cpu_count']} cores, torch "
             f"{env['torch']}, {run['threads']} thread(s), 1 worker, load average {env['load_average_at_start']} at "
             f"start and {r['load_average_at_end']} at end (other processes share the machine).", "",
             f"Checkpoint: Llama layout, {ck['decoder_layers']} decoder layers, hidden {ck['shapes']['hidden_size']}, "
             f"MLP {ck['shapes']['intermediate_size']}, vocabulary {ck['shapes']['vocab_size']}, random bf16 weights, "
             f"{ck['bytes'] / 1e9:.2f} GB in shards of at most {ck['shards'] / 1e9:.1f} GB (written in "
             f"{ck['write_s']} s). `compress --stream --rank {run['policy']['rank']} --svd {run['svd']}` on the first "
             f"{run['decoder_layers_analysed']} decoder layers (`--include`); every other tensor is copied through "
             "shard by shard.", "",
             "| | measured |", "|---|---|",
             f"| peak RSS of the run (analyze + rewrite, whole checkpoint streamed) | {run['peak_rss_gib']:.2f} GiB |",
             f"| analyze, {run['layers']} matrices | {run['analyze_seconds']:.1f} s |",
             f"| rewrite (factored + copied shards, {run['output_bytes'] / 1e9:.2f} GB written) | "
             f"{run['rewrite_seconds']:.1f} s |",
             f"| whole run (child process, with imports) | {run['wall_s']:.1f} s |",
             f"| per decoder layer: streamed (read, SVD, factors) | {r['per_decoder_layer']['streamed_s']:.1f} s |",
             f"| per decoder layer: exact-SVD floor (torch.linalg.svd alone, first {r['floor_decoder_layers']} "
             "decoder layer(s)) | "
             f"{r['per_decoder_layer']['exact_svd_floor_s']:.1f} s |",
             f"| **extrapolated** to 32 decoder layers: streamed analyze | "
             f"{r['extrapolated_32_layers']['streamed_analyze_s']:.0f} s |",
             f"| **extrapolated** to 32 decoder layers: exact-SVD floor | "
             f"{r['extrapolated_32_layers']['exact_svd_floor_s']:.0f} s |", "",
             "| matrix | streamed s | exact SVD floor s |", "|---|---|---|"]
    for name, s in run["seconds_per_layer"].items():
        floor = r["exact_svd_floor_s"].get(name)
        lines.append(f"| {name} | {s:.2f} | {'not measured' if floor is None else f'{floor:.2f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
