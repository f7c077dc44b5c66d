"""Healing for the int8 / int4 file: all-MiniLM-L6-v2 with 40% of its encoder removed (data-aware start),
exported to int8 (onnxruntime dynamic) and int4 (MatMulNBits, blocks of 128), healed without and with
simulated quantization (``HealConfig.quant``), each file's held-out sentence-embedding cosine measured by
onnxruntime.

    python benchmarks/heal_quant.py [--threads 1] [--steps 60] [--out benchmarks/results]

The heal is end-to-end distillation from the original model (masked MSE on the last hidden state), the
same settings in every row, its best step picked on validation sentences: in float without simulation,
through the simulated rounding of the target file with it. The cosine is that of the exported file's
embeddings to the original float model's, on held-out sentences disjoint from training and validation.
Writes ``heal_quant.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import environment, load_average, log, md_table, minilm_missing

import compressor
from compressor.core.fileio import atomic_write_text
from compressor.examples import docstring_sentences, load_minilm
from compressor.export.onnx import export_int4, export_int8, export_onnx
from compressor.train.heal import HealConfig, heal

N_CALIB, N_EVAL, TOKENS = 256, 300, 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--removed", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--train", type=int, default=1920)
    ap.add_argument("--val", type=int, default=128)
    ap.add_argument("--quants", default="int8,int4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if minilm_missing():
        return 2
    torch.set_num_threads(args.threads)
    env = environment("python benchmarks/heal_quant.py " + " ".join(sys.argv[1:]))
    start = time.perf_counter()
    import onnxruntime as ort

    model, tok = load_minilm()
    sents = docstring_sentences(seed=0)
    calib, train = sents[:N_CALIB], sents[N_CALIB:N_CALIB + args.train]
    val, held_out = sents[-N_EVAL - args.val:-N_EVAL], sents[-N_EVAL:]

    def batches(s: list[str], size: int = 32, pad: bool | str = True) -> list[dict[str, torch.Tensor]]:
        return [dict(tok(s[i:i + size], padding=pad, truncation=True, max_length=TOKENS, return_tensors="pt"))
                for i in range(0, len(s), size)]

    eval_b = batches(held_out, 50, "max_length")

    def pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        m = mask[..., None].astype(np.float64)
        v = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    with torch.no_grad():
        ref = np.concatenate([pool(model(**b).last_hidden_state.numpy(), b["attention_mask"].numpy()) for b in eval_b])

    def file_cosine(path: Path) -> float:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = args.threads
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in s.get_inputs()}
        got = np.concatenate([pool(s.run(["last_hidden_state"], {k: v.numpy() for k, v in b.items() if k in names})[0],
                                   b["attention_mask"].numpy()) for b in eval_b])
        return float((got * ref).sum(1).mean())

    compressed = copy.deepcopy(model)
    plan = compressor.analyze(compressed, target=args.removed, include=["encoder.*"], progress=False,
                              calibration=batches(calib))
    compressor.rewrite(compressed, plan)
    # End-to-end on the output, as heal_quant.md was measured (a transformer's defaults are block-wise first).
    cfg = HealConfig(loss="mse", lr=args.lr, steps=args.steps, every=max(1, args.steps // 6), warmup_steps=4,
                     batch_size=32, seed=0, method="end-to-end", distill="output")
    train_b, val_b = batches(train), batches(val)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def files(m: torch.nn.Module, name: str) -> dict[str, float]:
            fp32 = export_onnx(m, eval_b[0], work / f"{name}.onnx", exporter="legacy")
            out = {"fp32": file_cosine(fp32)}
            for q in args.quants.split(","):
                path = (export_int8(fp32, work / f"{name}.int8.onnx") if q == "int8" else
                        export_int4(fp32, work / f"{name}.int4.onnx"))
                out[q] = file_cosine(path)
            return out

        rows.append({"model": "compressed (data-aware start), not healed", "quant": None, **files(compressed, "start")})
        log(f"start: {rows[-1]}, load {load_average()}")
        for quant in [None, *args.quants.split(",")]:
            wall, cpu = time.perf_counter(), time.process_time()
            r = heal(compressed, cfg.replace(quant=quant), teacher=model, data=train_b, val_data=val_b, progress=False)
            rows.append({"model": f"healed, simulating {quant}" if quant else "healed in float", "quant": quant,
                         **files(r.model, f"healed-{quant}"), "heal_cpu_seconds": round(time.process_time() - cpu, 1),
                         "heal_wall_seconds": round(time.perf_counter() - wall, 1), "best_step": r.best_step,
                         "val_before": r.before, "val_after": r.after, "note": r.note})
            log(f"{quant}: {rows[-1]}, load {load_average()}")
    result = {"env": env, "load_average_at_end": load_average(), "total_seconds": round(time.perf_counter() - start),
              "removed_fraction": plan.totals()["removed_fraction"],
              "sentences": {"calibration": N_CALIB, "train": args.train, "val": args.val, "held_out": N_EVAL,
                            "max_length": TOKENS}, "settings": cfg.to_dict(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "heal_quant"
    atomic_write_text(base.with_suffix(".json"), json.dumps(result, indent=1, default=str) + "\n")
    atomic_write_text(base.with_suffix(".md"), _markdown(result))
    print(f"wrote {base}.md and .json ({result['total_seconds']} s in all)")
    return 0


def _markdown(r: dict) -> str:
    env, s, n = r["env"], r["settings"], r["sentences"]
    quants = [q for q in ("int8", "int4") if q in r["rows"][0]]
    return "\n".join([
        "# Healing for the quantized file: all-MiniLM-L6-v2, data-aware start", "",
        f"Produced by `{env['command']}` on {env['date']} ({env['processor']}, {env['cpu_count']} CPUs, "
        f"torch {env['torch']}, {env['torch_threads']} thread; load average {env['load_average_at_start']} at "
        f"start and {r['load_average_at_end']} at the end: the machine was shared); {r['total_seconds']} s in all.",
        "",
        f"{r['removed_fraction']:.0%} of the encoder's linear weights removed (whitened SVD, calibrated on "
        f"{n['calibration']} sentences); healed end-to-end {s['steps']} steps (lr {s['lr']}, batch "
        f"{s['batch_size']}, masked MSE on the last hidden state) on {n['train']} training sentences, best step "
        f"on {n['val']} validation sentences, measured on the same simulated rounding; every file exported "
        f"(ONNX fp32, then onnxruntime's int8 dynamic / int4 MatMulNBits blocks of 128) and run by onnxruntime "
        f"on {n['held_out']} held-out sentences ({n['max_length']} tokens): cosine of its sentence embeddings "
        "to the original float model's.", "",
        md_table(["model", "fp32 file cosine", *[f"{q} file cosine" for q in quants], "heal CPU s"],
                 [[x["model"], x["fp32"], *[x[q] for q in quants], x.get("heal_cpu_seconds")] for x in r["rows"]]),
        "", *[f"- {x['model']}: {x['note']}" for x in r["rows"] if x.get("note")], ""])


if __name__ == "__main__":
    sys.exit(main())
