"""Causal language models compressed and measured as the low-rank LLM papers measure them: perplexity.

    python benchmarks/causal.py --folder models/gemma3-270m --label "Gemma 3 270M" --targets 0.2 0.4 \
        --name causal_gemma3_270m [--samples 256] [--windows 16] [--window 512] [--threads 2]

For each target (the fraction of the decoder blocks' linear weights removed; embeddings and head stay dense)
it compares, each method in a child process of its own (peak RSS from the kernel, ``wait4``):

* ``plain``: ``compressor.analyze(target=...)`` without data (truncated SVD, global allocation by spectrum);
* ``reference``: an SVD-LLM-style method written here, independently of the package: each layer's
  calibration Gram matrix ``X^T X`` from the original model, Cholesky whitening (a tiny ridge only when the
  factorization fails), the truncated SVD of ``W S`` mapped back, and the same parameter ratio for every
  layer (no sequential update, no allocation);
* ``data-aware``: ``compressor.analyze(target=..., calibration=...)``, the package's default for decoders
  (block-by-block, sequential refits, Fisher-weighted factors and allocation);
* ``data-aware+healed``: ``data-aware``, then ``compressor.heal`` with KL distillation from the dense model
  on ``--heal-samples`` sequences of the calibration text (default: the calibration sequences; the last 4 held
  out to pick the best step), ``--heal-steps`` steps of 4 sequences (lr 1e-4, cosine schedule, 2 warm-up steps;
  the KL over the text's tokens, the package's default for causal LMs, unless ``--heal-kl-tokens all``); its
  process CPU seconds are recorded;
* ``data-aware-kfac``: the same with ``weighting="kfac"`` (each layer's output error weighted by the full
  second moment of its output gradients, not only its diagonal);
* ``data-aware (relative)``: the same with ``weighting=None`` (each layer's relative output error counts the
  same, as compressor allocated before the Fisher weighting);
* ``data-aware (uniform ranks)``: the package's factors at the reference's uniform ranks (the allocation's
  share of the gain);
* ``data-aware-pivoted`` (``+healed``): ``data-aware`` (healed) with ``pivoted=True``: the factored layers
  stored in the pivoted form, ``r (m + n - r)`` weights at rank ``r`` instead of ``r (m + n)``, so the same
  budget keeps more rank;
* ``data-aware-pivoted+healed-lora``: the same, healed with ``train="lora"`` (rank-8 adapters on each factor,
  merged at the end) at lr 3e-4 instead of training the factors themselves at 1e-4;
* ``data-aware+healed-all``: ``data-aware``, healed with ``train="all"``: the factors and every block linear layer
  left dense train (embedding / head and norms fixed), at ``--heal-lr`` (default 1e-5, the better of the two measured).

``--heal-text full`` heals on the whole calibration side of the docstrings (``write_docstring_texts`` uncut: its
first sequences are the calibration sequences; none of its modules is in the evaluation text) instead of the
calibration text the analysis reads.

"removed (measured)" counts the 2-D weights the rewritten blocks hold against the dense ones (the reference
keeps dense rank-``r`` products: its fraction is the one its uniform ranks give).

Perplexity: :func:`compressor.data.perplexity.perplexity` on the evaluation text (windows of ``--window``
tokens, no overlap, BOS first in each window, the first ``--windows`` windows). Texts: the standard
library's docstrings (:func:`compressor.examples.write_docstring_texts`), evaluation and calibration from
disjoint modules; calibration is ``--samples`` sequences of 128 tokens cut from the calibration text's token
stream. Writes ``benchmarks/results/NAME.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import environment, load_average, log, md_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("plain", "reference", "data-aware", "data-aware+healed", "data-aware-kfac", "data-aware-relative",
           "data-aware-uniform", "data-aware-pivoted", "data-aware-pivoted+healed", "data-aware-pivoted+healed-lora",
           "data-aware+healed-all")
BLOCKS = "model.layers.*"


def load(folder: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def uniform_ranks(model, target: float) -> dict[str, int]:
    """The rank giving every block linear layer the same share ``target`` of its parameters removed."""
    return {n: int((1 - target) * m.in_features * m.out_features / (m.in_features + m.out_features))
            for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def reference_svd_llm(model, batches: list[dict], target: float) -> None:
    """SVD-LLM-style truncation in place: per layer Cholesky whitening of its calibration Gram matrix, the
    same parameter ratio everywhere (the dense weight is replaced by its rank-r product)."""
    ranks = uniform_ranks(model, target)
    layers = {n: model.get_submodule(n) for n in ranks}
    grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    def gram(name: str, x: torch.Tensor) -> None:  # returns None: the layer's input is not replaced
        x = x.reshape(-1, x.shape[-1]).double()
        grams[name].add_(x.T @ x)

    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: gram(n, a[0])) for n, m in layers.items()]
    for b in batches:
        model.model(**b)  # the decoder body only: the reference needs no logits either
    for h in hooks:
        h.remove()
    for n, m in layers.items():
        C = grams[n]
        eps = 0.0
        while True:
            L, info = torch.linalg.cholesky_ex(C + eps * torch.eye(len(C), dtype=C.dtype))
            if int(info) == 0:
                break
            eps = max(eps * 10, 1e-6 * float(C.diagonal().mean()))
        W = m.weight.double()
        U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
        r = ranks[n]
        L_inv = torch.linalg.solve_triangular(L, torch.eye(len(L), dtype=L.dtype), upper=False)
        m.weight.copy_(((U[:, :r] * S[:r]) @ (Vh[:r] @ L_inv)).float())


def block_weights(model) -> int:
    """The weights of the decoder blocks' linear layers (2-D parameters: factors included, norms not)."""
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(BLOCKS[:-1]) and p.dim() == 2)


def child(spec: dict) -> dict:
    """One method at one target: analysis (timed), rewrite, perplexity."""
    import compressor
    from compressor.core.rewrite import rewrite
    from compressor.data.calibration import load_calibration
    from compressor.data.perplexity import perplexity, read_corpus

    torch.set_num_threads(spec["threads"])
    model, tok = load(spec["folder"])
    corpus = read_corpus(spec["eval"], tok)
    method, target = spec["method"], spec["target"]
    out: dict = {"method": method, "target": target}
    dense_weights = block_weights(model)
    start = time.perf_counter()
    if method != "dense":
        cal = None
        if method != "plain":
            cal = load_calibration(spec["calibration"], tokenizer=tok, samples=spec["samples"], stream=True)
        if method == "reference":  # kept as dense rank-r products: removed by construction, not counted
            reference_svd_llm(model, cal, target)
            out["removed_fraction"] = target
        else:
            kw: dict = {"target": target, "include": [BLOCKS], "progress": True}
            if cal is not None:
                kw["calibration"] = cal
            if method == "data-aware-relative":
                kw["weighting"] = None
            if method == "data-aware-kfac":
                kw["weighting"] = "kfac"
            if method == "data-aware-uniform":
                kw["overrides"] = uniform_ranks(model, target)
            if method.startswith("data-aware-pivoted"):
                kw["pivoted"] = True
            plan = compressor.analyze(model, **kw)
            rewrite(model, plan)
            if "+healed" in method:
                heal_text = spec.get("heal_text") or spec["calibration"]
                same = spec.get("heal_samples", spec["samples"]) == spec["samples"] and heal_text == spec["calibration"]
                heal_cal = cal if same else load_calibration(heal_text, tokenizer=tok, samples=spec["heal_samples"],
                                                             stream=True)
                out.update(heal_lm(model, spec, heal_cal))
            out["layers_factored"] = plan.totals()["layers_factored"]
            out["params_after"] = plan.totals()["params_after"]
        out.setdefault("removed_fraction", round(1 - block_weights(model) / dense_weights, 4))
        out["analysis_s"] = round(time.perf_counter() - start, 1)
        out["analysis_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    p = perplexity(model, corpus, window=spec["window"], max_windows=spec["windows"])
    out.update(ppl=round(p.ppl, 3), protocol=p.describe(), eval_tokens=p.tokens)
    return out


def heal_lm(model, spec: dict, cal: list) -> dict:
    """KL distillation of the rewritten ``model`` from a fresh load of the dense one, in place."""
    from compressor.train.heal import HealConfig, heal

    ids = torch.cat([b["input_ids"] for b in cal])
    train, val = ids[:-4], ids[-4:]
    steps = spec["heal_steps"]
    # Training the pivoted factors themselves raised the KL from the first steps at any lr tried (1e-4 to 1e-5);
    # adapters on them did not (docs/causal-lm.md).
    train = "lora" if spec["method"].endswith("-lora") else "all" if spec["method"].endswith("-all") else "factors"
    lr = spec.get("heal_lr") or {"lora": 3e-4, "all": 1e-5, "factors": 1e-4}[train]
    cfg = HealConfig(loss="kl", seq_len=ids.shape[1], batch_size=4, steps=steps, every=max(1, steps // 4),
                     lr=lr, train=train, warmup_steps=2, kl_tokens=spec.get("heal_kl_tokens"))
    teacher, _ = load(spec["folder"])
    cpu = time.process_time()
    result = heal(model, cfg, teacher=teacher, data={"input_ids": train, "attention_mask": torch.ones_like(train)},
                  val_data={"input_ids": val, "attention_mask": torch.ones_like(val)}, progress=False)
    del teacher
    model.load_state_dict(result.model.state_dict())
    return {"heal_cpu_s": round(time.process_time() - cpu, 1), "heal_steps": result.steps, "heal_sequences": len(ids),
            "heal_train": cfg.train, "heal_lr": cfg.lr, "heal_text": "full" if spec.get("heal_text") else "calibration",
            "heal_kl_tokens": result.config.kl_tokens,
            "heal_best_step": result.best_step, "heal_val_before": result.before, "heal_val_after": result.after}


def run_child(spec: dict, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec), "--result", str(result)],
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            return {**{k: spec[k] for k in ("method", "target")}, "error": f"exit {os.waitstatus_to_exitcode(status)}"}
        out = json.loads(result.read_text())
        out["wall_s"] = round(time.perf_counter() - start, 1)
        out["peak_rss_gib"] = round(usage.ru_maxrss / 2**20, 2)  # KiB on Linux
        out["load_after"] = load_average()
        return out


def markdown(res: dict) -> str:
    dense = next(r["ppl"] for r in res["runs"] if r["method"] == "dense")
    lines = [f"# {res['label']}: perplexity after low-rank compression", "",
             f"Command: `{res['env']['command']}`"
             + "".join(f"; earlier: `{c}`" for c in res["env"].get("earlier_commands", [])), "",
             f"Model folder: `{res['folder']}`. Evaluation: {res['protocol']}. Calibration: {res['samples']} "
             f"sequences of 128 tokens from `{res['calibration_name']}` (sha256 {res['calibration_sha256'][:12]}). "
             f"Threads {res['threads']}; load average before {res['load_before']}.", "",
             f"Dense perplexity: **{dense:.3f}**.", ""]
    rows = []
    for r in res["runs"]:
        if r["method"] == "dense":
            continue
        if "error" in r:
            rows.append([f"{r['target']:.0%}", r["method"], r["error"], "", "", "", "", ""])
            continue
        healed = f"{r['heal_cpu_s']:,} CPU s, {r['heal_steps']} steps" if "heal_cpu_s" in r else ""
        if healed:  # runs before kl_tokens existed compared over the whole vocabulary
            healed += f", {r.get('heal_sequences', res['samples'])} sequences"
            healed += f", kl over {'the text tokens' if r.get('heal_kl_tokens') == 'text' else 'all tokens'}"
            healed += f", train {r.get('heal_train', 'factors')} at lr {r.get('heal_lr', 1e-4):g}"
            if r.get("heal_text") == "full":
                healed += ", the whole calibration side of the docstrings"
        rows.append([f"{r['target']:.0%}", r["method"], f"{r['ppl']:.3f}", f"{r['ppl'] / dense:.3f}x",
                     r.get("removed_fraction", ""), r.get("analysis_s", ""), r.get("peak_rss_gib", ""), healed])
    lines.append(md_table(["removed (block linear weights)", "method", "perplexity", "x dense",
                           "removed (measured)", "analysis + rewrite (+ heal) s", "peak RSS GiB", "heal"], rows))
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Perplexity per method and target (log scale), the dense model's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in res["runs"] if "ppl" in r]
    dense = next(r["ppl"] for r in runs if r["method"] == "dense")
    targets = sorted({r["target"] for r in runs if r["method"] != "dense"})
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(methods))
    for k, method in enumerate(methods):
        xs, ys = [], []
        for i, t in enumerate(targets):
            r = next((r for r in runs if r["method"] == method and r["target"] == t), None)
            if r is not None:
                xs.append(i + k * width)
                ys.append(r["ppl"])
        ax.bar(xs, ys, width, label=method)
    ax.axhline(dense, color="black", linestyle="--", label=f"dense {dense:.2f}")
    ax.set_yscale("log")
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(targets))],
                  [f"{t:.0%} removed" for t in targets])
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{res['label']}: perplexity on held-out docstrings")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder")
    ap.add_argument("--label", default="model")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heal-steps", type=int, default=40, help="steps of data-aware+healed")
    ap.add_argument("--heal-samples", type=int, default=None,
                    help="sequences of 128 tokens data-aware+healed trains on, the last 4 validating "
                         "[default: --samples]")
    ap.add_argument("--heal-lr", type=float, default=None,
                    help="learning rate of the +healed methods [default: 1e-4 factors, 3e-4 lora, 1e-5 all]")
    ap.add_argument("--heal-text", choices=["calibration", "full"], default="calibration",
                    help="the text +healed methods train on: the calibration text, or the whole calibration side "
                         "of the docstrings (uncut)")
    ap.add_argument("--heal-kl-tokens", choices=["all", "text"], default=None,
                    help="HealConfig.kl_tokens of data-aware+healed [default: the package's for causal LMs]")
    ap.add_argument("--name", default="causal")
    ap.add_argument("--append", action="store_true", help="add to (or redo in) an earlier result of --name")
    ap.add_argument("--child")
    ap.add_argument("--result")
    a = ap.parse_args()
    if a.child:
        Path(a.result).write_text(json.dumps(child(json.loads(a.child))))
        return
    from compressor.core.fileio import atomic_write_text
    from compressor.examples import write_docstring_texts

    texts = Path(tempfile.mkdtemp(prefix="causal-texts-"))
    info = write_docstring_texts(texts)
    heal_text = None
    if a.heal_text == "full":
        info["heal"] = write_docstring_texts(texts / "full", calibration_chars=None)["calibration"]
        heal_text = info["heal"]["path"]
    base = {"folder": a.folder, "eval": info["eval"]["path"], "calibration": info["calibration"]["path"],
            "samples": a.samples, "windows": a.windows, "window": a.window, "threads": a.threads,
            "heal_steps": a.heal_steps, "heal_kl_tokens": a.heal_kl_tokens, "heal_samples": a.heal_samples or a.samples,
            "heal_lr": a.heal_lr, "heal_text": heal_text}
    res = {"label": a.label, "folder": a.folder, "samples": a.samples, "threads": a.threads,
           "env": environment(" ".join(["python", *sys.argv])), "load_before": load_average(),
           "texts": info, "calibration_name": "docstrings.calibration.txt",
           "calibration_sha256": info["calibration"]["sha256"], "runs": []}
    out = RESULTS / a.name
    if a.append and out.with_suffix(".json").exists():  # add runs to an earlier result (same texts, dense)
        earlier = json.loads(out.with_suffix(".json").read_text())
        if earlier["calibration_sha256"] != res["calibration_sha256"]:
            raise SystemExit("the earlier result used another calibration text")
        res["runs"], res["env"]["earlier_commands"] = earlier["runs"], [earlier["env"]["command"],
                                                                       *earlier["env"].get("earlier_commands", [])]
    else:
        res["runs"].append(run_child({**base, "method": "dense", "target": 0.0}, a.threads))
        log(f"dense: {res['runs'][0]}")
    res["protocol"] = res["runs"][0].get("protocol", "")
    for target in a.targets:
        for method in a.methods.split(","):
            r = run_child({**base, "method": method, "target": target}, a.threads)
            log(f"{target} {method}: {r}")
            res["runs"] = [x for x in res["runs"] if (x["method"], x["target"]) != (method, target)] + [r]
            atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=1))
            atomic_write_text(out.with_suffix(".md"), markdown(res) + f"\n![perplexity]({out.name}.png)\n")
            plot(res, out.with_suffix(".png"))
    log(markdown(res))


if __name__ == "__main__":
    main()
