"""Healing a compressed causal LM: perplexity on held-out text before and after ``compressor.heal``.

    python benchmarks/heal_gemma.py COMPRESSED DENSE OUT.json [--threads 2] [--train-seqs 128] [--val-seqs 4]
        [--windows 8] [setting=value ...]

COMPRESSED is a folder written by compress (e.g. Gemma 3 270M, 20% of ``model.layers.*`` removed with
``--calibration``), DENSE the original. Training sequences are cut from the start of ``--cal`` (one token
stream, BOS first, ``seq_len`` tokens), the validation sequences that pick the best step from its end; the
perplexity is measured on ``--eval`` (never seen by heal) in windows of 512 tokens, each starting with BOS, the
head applied 256 positions at a time. ``setting=value`` pairs are ``HealConfig`` settings (``lr=1e-4``). The
heal's process CPU seconds (all threads) and wall seconds are recorded with the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch
from _common import load_average
from torch.nn import functional as F

from compressor.formats.load import load_model
from compressor.train.heal import HealConfig, heal


def token_stream(tok, path: str) -> torch.Tensor:
    return tok(Path(path).read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int, windows: int, bos: int | None, chunk: int = 256) -> float:
    """exp(mean next-token NLL) over ``windows`` windows of ``window`` tokens (BOS first when given)."""
    model.eval()
    nll, count = 0.0, 0
    logits_of = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    for w in range(min(windows, len(ids) // window)):
        x = ids[w * window:(w + 1) * window]
        if bos is not None:
            x = torch.cat([torch.tensor([bos]), x[:-1]])
        h = model.model(input_ids=x[None], use_cache=False).last_hidden_state[0]
        for s in range(0, window - 1, chunk):
            e = min(s + chunk, window - 1)
            logits = logits_of(h[s:e]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            nll += F.cross_entropy(logits, x[s + 1:e + 1], reduction="sum").item()
            count += e - s
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("compressed")
    p.add_argument("dense")
    p.add_argument("out")
    p.add_argument("--cal", required=True, help="training text (e.g. docstrings.calibration.txt)")
    p.add_argument("--eval", required=True, help="held-out text (e.g. docstrings.eval.txt)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-seqs", type=int, default=128)
    p.add_argument("--val-seqs", type=int, default=4)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--dense-ppl", action="store_true", help="Also measure the dense model's perplexity.")
    p.add_argument("settings", nargs="*", help="HealConfig settings as name=value")
    args = p.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    settings = {}
    for item in args.settings:  # numbers as JSON (lr=1e-4, steps=24), anything else a name (method=both)
        name, value = item.split("=", 1)
        try:
            settings[name] = json.loads(value)
        except json.JSONDecodeError:
            settings[name] = value
    cfg = HealConfig(**settings)

    teacher = load_model(args.dense).model
    loaded = load_model(args.compressed)
    student, tok = loaded.model, loaded.tokenizer
    bos = tok.bos_token_id
    stream = token_stream(tok, args.cal)
    length = cfg.seq_len - 1
    n = len(stream) // length
    seqs = torch.cat([torch.full((n, 1), bos), stream[:n * length].reshape(n, length)], 1)
    train, val = seqs[:args.train_seqs], seqs[-args.val_seqs:]
    ev = token_stream(tok, args.eval)
    out: dict = {"compressed": args.compressed, "settings": settings, "threads": args.threads,
                 "train_seqs": args.train_seqs, "val_seqs": args.val_seqs, "windows": args.windows}
    if args.dense_ppl:
        out["ppl_dense"] = perplexity(teacher, ev, 512, args.windows, bos)
    out["ppl_before"] = perplexity(student, ev, 512, args.windows, bos)
    print(out, flush=True)
    load0, cpu0, wall0 = load_average(), time.process_time(), time.perf_counter()
    result = heal(student, cfg, teacher=teacher, data={"input_ids": train, "attention_mask": torch.ones_like(train)},
                  val_data={"input_ids": val, "attention_mask": torch.ones_like(val)}, progress=False)
    out.update(heal_cpu_s=round(time.process_time() - cpu0, 1), heal_wall_s=round(time.perf_counter() - wall0, 1),
               load_average=[load0, load_average()], steps=result.steps, best_step=result.best_step,
               before=result.before, after=result.after, note=result.note,
               history=[(h["step"], h["metrics"]) for h in result.history],
               blocks=[(b["block"], b["before"], b["after"]) for b in result.blocks])
    out["ppl_after"] = perplexity(result.model, ev, 512, args.windows, bos)
    out["max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
