"""How a candidate's fidelity is measured: held-out inputs through onnxruntime, scored against the original."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.export.onnx import torch_outputs
from compressor.formats.onnx_graph import feeds
from compressor.formats.runtime import session
from compressor.search.cache import fingerprint

# --------------------------------------------------------------------------------------- evaluation

# onnxruntime threads when measuring fidelity and latency.
THREADS = 2


@dataclass
class Evaluation:
    """How fidelity is measured: onnxruntime runs each held-out batch in ``inputs``; ``score`` maps the
    list of per-batch outputs (each a list of numpy arrays) to metrics, ``score(...)["fidelity"]`` the
    one constraints use, described by ``metric``. ``fingerprint`` identifies data and metric in the cache."""

    inputs: list[Any]
    metric: str
    score: Callable[[list[list[np.ndarray]]], dict[str, float]]
    fingerprint: str


def output_fidelity(model: nn.Module, batches: Sequence[Any], outputs: Sequence[str] = ()) -> Evaluation:
    """Fidelity to ``model``'s own compared outputs (:func:`compressor.data.inputs.compared_outputs`:
    every floating output, or those named) on held-out ``batches``: the mean per-sample cosine over
    samples and outputs, or, when the one compared output is class scores ``(N, C)``, top-1 agreement
    (cosine is kept as well). An exported graph returns the model's outputs in the same order."""
    from compressor.data.inputs import attention_mask, call, compared_outputs, eval_mode, is_pooled, named_outputs

    batches = list(batches)
    masks = [attention_mask(b) for b in batches]  # padding positions count in no cosine
    with eval_mode(model), torch.no_grad():
        first = call(model, batches[0])
    order = [name for name, _ in named_outputs(first)]
    names = [name for name, _ in compared_outputs(first, outputs or None, masks[0])]
    index = [0 if is_pooled(name) else order.index(name) for name in names]  # pooled from the first output
    refs = [_compared(ref, index, names, mask) for ref, mask in
            zip(([v for _, v in torch_outputs(model, b)] for b in batches), masks, strict=True)]
    classifier = (len(index) == 1 and not is_pooled(names[0]) and refs[0][0].ndim == 2
                  and refs[0][0].shape[1] > 1)

    def score(got_per_batch: list[list[np.ndarray]]) -> dict[str, float]:
        cos = np.concatenate([_cosines(g, r) for got, ref, mask in zip(got_per_batch, refs, masks, strict=True)
                              for g, r in zip(_compared(got, index, names, mask), ref, strict=True)])
        out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}
        if classifier:
            agree = np.concatenate([np.asarray(got[index[0]]).argmax(1) == ref[0].argmax(1)
                                    for got, ref in zip(got_per_batch, refs, strict=True)])
            out["top1_agreement"] = float(agree.mean())
        out["fidelity"] = out["top1_agreement"] if classifier else out["cosine"]
        return out

    metric = ("top-1 agreement with the original model's predictions" if classifier else
              "mean per-sample cosine similarity of the outputs to the original model's")
    key = fingerprint(["output_fidelity", "padding left out", batches, refs, index, names])
    return Evaluation(batches, metric, score, key)


def _compared(values: Sequence[Any], index: Sequence[int], names: Sequence[str], mask) -> list[np.ndarray]:
    """The compared outputs of one batch's ``values`` (a model's outputs in order, arrays or tensors) as
    float64 arrays: padding left out, or pooled into the sentence embedding a pooled name asks for."""
    from compressor.data.inputs import is_pooled, pool, unpadded

    out = []
    for i, name in zip(index, names, strict=True):
        v = np.asarray(values[i], dtype=np.float64)
        out.append(pool(torch.from_numpy(v), mask, name).numpy() if is_pooled(name) else unpadded(v, mask))
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    return np.sum(a * b, axis=1) / den


def onnx_fidelity(path: str | Path, evaluation: Evaluation, threads: int = THREADS) -> dict[str, float]:
    """Run ``evaluation``'s held-out batches through the ONNX file at ``path`` and score them."""
    sess = session(path, threads=threads)
    return evaluation.score([sess.run(None, feeds(sess, batch)) for batch in evaluation.inputs])
