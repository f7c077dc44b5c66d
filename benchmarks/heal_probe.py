"""Heal a compressed causal-LM folder briefly and print its held-out validation history: how the KL to the
dense model moves over the first steps (docs/causal-lm.md, "Heal a pivoted model with LoRA").

    python benchmarks/heal_probe.py --dense /tmp/gemma/dense --folder PIVOTED --lr 1e-4 --steps 40 [--ppl]

The folder is a compressed one (``compress ... --pivoted``, or ``compressor.formats.save.save``); the texts are
the causal benchmark's (``compressor.examples.write_docstring_texts``): 512 calibration sequences of 128 tokens
at most (``--samples``), the last 4 held out. Prints one line per validation (every ``--steps // 4`` steps);
with ``--ppl``, then the healed model's perplexity by ``benchmarks/causal.py``'s protocol (the evaluation text,
the first 16 windows of 512 positions, BOS first)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from compressor.data.calibration import load_calibration
from compressor.data.perplexity import perplexity, read_corpus
from compressor.examples import write_docstring_texts
from compressor.formats.load import load_model
from compressor.train.heal import HealConfig, heal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", required=True, help="the dense model's folder (the teacher)")
    ap.add_argument("--folder", required=True, help="the compressed folder to heal")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--layers", default=None, help="HealConfig.layers: globs of the factored layers that train")
    ap.add_argument("--train", choices=["factors", "lora", "all"], default="factors")
    ap.add_argument("--kl-tokens", choices=["all", "text"], default=None,
                    help="HealConfig.kl_tokens [default: the package's for causal LMs]")
    ap.add_argument("--samples", type=int, default=512, help="calibration sequences of 128 tokens at most")
    ap.add_argument("--ppl", action="store_true", help="measure the healed model's perplexity at the end")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    teacher, student = load_model(a.dense).model, load_model(a.folder).model
    texts = write_docstring_texts(Path(tempfile.mkdtemp(prefix="heal-probe-")))
    tok = AutoTokenizer.from_pretrained(a.dense, trust_remote_code=False)
    cal = load_calibration(texts["calibration"]["path"], tokenizer=tok, samples=a.samples, stream=True)
    ids = torch.cat([b["input_ids"] for b in cal])
    train, val = ids[:-4], ids[-4:]
    cfg = HealConfig(loss="kl", seq_len=ids.shape[1], batch_size=4, steps=a.steps, every=max(1, a.steps // 4),
                     lr=a.lr, warmup_steps=2, layers=a.layers, train=a.train, kl_tokens=a.kl_tokens)
    cpu = time.process_time()
    r = heal(student, cfg, teacher=teacher, data={"input_ids": train, "attention_mask": torch.ones_like(train)},
             val_data={"input_ids": val, "attention_mask": torch.ones_like(val)}, progress=False)
    for h in r.history:
        print(h["step"], {k: round(v, 4) for k, v in h["metrics"].items()})
    print(f"best step {r.best_step}; {time.process_time() - cpu:.0f} CPU s")
    if a.ppl:
        p = perplexity(r.model, read_corpus(texts["eval"]["path"], tok), window=512, max_windows=16)
        print(f"perplexity {p.ppl:.3f} ({p.describe()})")


if __name__ == "__main__":
    main()
