"""Greedy generation with a key/value cache: the files `compress --kv-cache` writes, against their torch models.

    python -m compressor export models/gemma3-270m --int4 --kv-cache --threads 1 --out DENSE
    python -m compressor models/gemma3-270m --target 0.2 --include 'model.layers.*' --int4 --kv-cache \
        --threads 1 --out COMPRESSED
    python benchmarks/kv_generate.py --folder DENSE --folder COMPRESSED --name gemma3_270m

For each output folder: the greedy check of each model_kv*.onnx against the folder's torch model (32 tokens
on 10 built-in prompts), run again here on 1 thread beside the compress command's own result; then tokens/s
of every model_kv*.onnx file and of each torch model, each generating 32 greedy tokens from each of the
10 prompts (prompt step included), on 1 onnxruntime / torch thread, in alternating rounds (the machine is
shared: each file's median over the rounds, and its ratio to the dense fp32 file in the same round).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, load_average, log, md_table

from compressor.export.kv_cache import (
    GENERATION_PROMPTS,
    NEW_TOKENS,
    check_generation,
    greedy_onnx,
    greedy_torch,
    prompt_token_ids,
    torch_generation,
)
from compressor.export.onnx import VARIANTS
from compressor.formats.load import load_model

RESULTS = Path(__file__).resolve().parent / "results"


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, action="append", required=True,
                    help="an output folder of compress/compress export with --kv-cache (first: the dense one)")
    ap.add_argument("--name", required=True, help="result files benchmarks/results/kv_NAME.md/.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timing-prompts", type=int, default=10, help="the first N prompts in each timing round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = environment("python benchmarks/kv_generate.py " + " ".join(sys.argv[1:]))
    models, checks, files = {}, {}, {}
    for folder in args.folder:
        report = json.loads((folder / "report.json").read_text())
        # The torch model the files came from: the folder's (compress), or the exported input (compress export).
        loaded = load_model(folder if report["mode"] != "export" else Path(report["source"]["path"]))
        model = loaded.model.eval()
        models[folder.name] = model
        tokenizer = loaded.tokenizer  # the folders hold one model's tokenizer: the prompts are the same
        prompts = prompt_token_ids(tokenizer, GENERATION_PROMPTS)
        log(f"{folder.name}: torch generation")
        reference = torch_generation(model, prompts)
        for name, check in report["kv_cache"]["files"].items():
            log(f"{folder.name}/{name}: greedy check on 1 thread")
            variant = name.split(".")[1] if name.count(".") == 2 else "fp32"
            c = check_generation(folder / name, model, prompts, threads=1, same_tokens=variant == "fp32",
                                 min_cosine=VARIANTS[variant].min_cosine, variant=variant, reference=reference)
            checks[f"{folder.name}/{name}"] = {**c.to_dict(), "command": report.get("command"),
                                               "command_check_passed": check["passed"]}
            files[f"{folder.name}/{name}"] = folder / name
    timed = prompts[:args.timing_prompts]
    sessions = {k: session(p) for k, p in files.items()}
    times: dict[str, list[float]] = {k: [] for k in [*sessions, *(f"{m} (torch)" for m in models)]}
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}, load {load_average()}")
        for key, sess in sessions.items():
            start = time.perf_counter()
            for p in timed:
                greedy_onnx(sess, p, NEW_TOKENS)
            times[key].append(time.perf_counter() - start)
        for name, model in models.items():
            start = time.perf_counter()
            for p in timed:
                greedy_torch(model, p, NEW_TOKENS)
            times[f"{name} (torch)"].append(time.perf_counter() - start)
    tokens = len(timed) * NEW_TOKENS
    dense_key = next(iter(sessions))
    rows, speed = [], {}
    for key, ts in times.items():
        ratios = [t / d for t, d in zip(ts, times[dense_key], strict=True)]
        speed[key] = {"seconds": ts, "tokens_per_s_median": tokens / statistics.median(ts),
                      "time_ratio_to_dense_fp32_median": statistics.median(ratios)}
        c = checks.get(key)
        size = c["size_bytes"] / 1e6 if c else None
        rows.append([key, f"{size:.1f}" if size else "-", f"{tokens / statistics.median(ts):.1f}",
                     f"{statistics.median(ratios):.3f}",
                     f"{c['identical']}/{c['prompts']}" if c else "-", f"{c['token_agreement']:.3f}" if c else "-",
                     f"{c['cosine']:.6f}" if c else "-", ("PASS" if c["passed"] else "FAIL") if c else "-"])
    env["load_average_at_end"] = load_average()
    out = {"environment": env, "tokens_per_round": tokens, "rounds": args.rounds, "checks": checks, "speed": speed}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"kv_{args.name}.json").write_text(json.dumps(out, indent=2))
    table = md_table(["file (folder/name)", "MB", "tokens/s (median)", "time / dense fp32 file",
                      "prompts identical to torch", "token agreement", "prompt logits cosine", "check"], rows)
    (RESULTS / f"kv_{args.name}.md").write_text(
        f"# Greedy generation with a key/value cache: {args.name}\n\n"
        f"Command: `{env['command']}`; 1 onnxruntime thread (intra and inter op), 1 torch thread; load average "
        f"{env['load_average_at_start']} at start, {env['load_average_at_end']} at end on {env['cpu_count']} cores "
        f"({env['processor']}); tokens/s: {args.rounds} alternating rounds, each file generating {NEW_TOKENS} greedy "
        f"tokens from each of the first {len(timed)} built-in prompts (compressor.export.kv_cache.GENERATION_PROMPTS, "
        "prompt step included). The checks (run here; the compress commands' own results and commands are in the "
        "json): each file's tokens against its folder's torch model (fp32: all identical; variants: prompt logits "
        "cosine, one per prompt over its positions, >= the variant's floor, token agreement reported).\n\n"
        + table + "\n")
    log(f"wrote {RESULTS / f'kv_{args.name}.md'}")


if __name__ == "__main__":
    main()
