"""One way to feed a model and read what it returns, used by every stage.

A *batch* is what one forward call takes: a tensor (``model(x)``), a tuple or list of tensors
(``model(*xs)``) or any ``Mapping`` of named tensors (``model(**batch)``), which includes a Hugging Face
tokenizer's ``BatchEncoding``. Dimension 0 of every tensor is the sample axis.

The outputs that fidelity, sensitivity, distillation and ONNX validation compare are defined here once
(:func:`compared_outputs`): every floating-point tensor the model returns (a tensor, a tuple, a dict or a
``ModelOutput``, flattened with their field names), or those the user names; and so are the positions
compared (:func:`real_tokens`): padding tokens (``attention_mask`` 0) count in no comparison.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from compressor.core.errors import CompressorError

Batch = torch.Tensor | tuple | list | Mapping
ArrayOrTensor = TypeVar("ArrayOrTensor", torch.Tensor, np.ndarray)

INPUTS_FIX = "pass a tensor, a tuple of tensors or a dict of named tensors (e.g. a tokenizer's output)"


# --------------------------------------------------------------------------------------- batches


def is_batch(x: Any) -> bool:
    """Whether ``x`` is ONE batch (a tensor, a tuple of tensors or a mapping), not a list of batches."""
    return (isinstance(x, torch.Tensor | Mapping)
            or (isinstance(x, tuple) and len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x)))


def tensors_of(batch: Batch) -> list[torch.Tensor]:
    """The tensors of a batch, in argument order (a mapping's in its own order)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if isinstance(batch, tuple | list):
        return [t for t in batch if isinstance(t, torch.Tensor)]
    return []


def as_batches(data: Any, what: str = "calibration") -> list[Batch]:
    """``data`` as a list of batches: one batch, or an iterable of batches."""
    if is_batch(data):
        batches = [data]
    elif isinstance(data, Iterable) and not isinstance(data, str | bytes):
        batches = list(data)
    else:
        raise CompressorError(f"{what} data must be model inputs (tensors, tuples or dicts of tensors), got "
                              f"{type(data).__name__}", "pass a list of batches, e.g. [x1, x2]")
    if not batches:
        raise CompressorError(f"{what} data is empty", "pass at least one batch of model inputs")
    for b in batches:
        if not tensors_of(b):
            raise CompressorError(f"a {what} batch holds no tensors ({type(b).__name__})", INPUTS_FIX)
    return batches


def flatten(batch: Batch) -> tuple[list[str], list[torch.Tensor]]:
    """``(names, tensors)`` of a batch: ``input`` for a tensor, ``input_i`` for positional ones, the keys
    of a mapping. Every tensor needs a batch axis."""
    if isinstance(batch, torch.Tensor):
        items = [("input", batch)]
    elif isinstance(batch, Mapping):
        items = [(str(k), v) for k, v in batch.items()]
    elif isinstance(batch, tuple | list):
        items = [(f"input_{i}", t) for i, t in enumerate(batch)]
    else:
        items = []
    if not items or not all(isinstance(t, torch.Tensor) for _, t in items):
        raise CompressorError(f"example inputs must be a tensor, a tuple of tensors or a dict of tensors, "
                              f"got {type(batch).__name__}", INPUTS_FIX)
    if any(t.dim() == 0 for _, t in items):
        raise CompressorError("an example input is a scalar, so it has no batch axis",
                              "give every input a leading batch dimension")
    return [k for k, _ in items], [t for _, t in items]


def rebuild(batch: Batch, tensors: Sequence[torch.Tensor]) -> Batch:
    """A batch of the same structure as ``batch`` holding ``tensors`` (as :func:`flatten` ordered them)."""
    if isinstance(batch, torch.Tensor):
        return tensors[0]
    if isinstance(batch, Mapping):
        return dict(zip(batch.keys(), tensors, strict=True))
    return type(batch)(tensors)


def map_tensors(batch: Any, fn) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it (nested tuples, lists and mappings)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device | str) -> Any:
    return map_tensors(batch, lambda t: t.to(device))


def num_samples(batch: Batch) -> int:
    """Samples in a batch: the common size of dimension 0 of its tensors."""
    sizes = {len(t) for t in tensors_of(batch) if t.dim() > 0}
    if len(sizes) == 1:
        return sizes.pop()
    if not sizes:
        raise CompressorError(f"cannot read samples from data of type {type(batch).__name__}", INPUTS_FIX)
    raise CompressorError("the input tensors have different numbers of samples",
                          "give every tensor the same first dimension")


def take(batch: Any, index: torch.Tensor | slice) -> Any:
    """The samples ``index`` of a batch (or of a plain list of items)."""
    if isinstance(batch, list) and not all(isinstance(t, torch.Tensor) for t in batch):
        return [batch[int(i)] for i in torch.arange(len(batch))[index]]
    return map_tensors(batch, lambda t: t[index.to(t.device) if isinstance(index, torch.Tensor) else index])


def attention_mask(batch: Batch) -> torch.Tensor | None:
    """The (batch, tokens) padding mask of a tokenized batch, or None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def sequence_axes(batch: Batch) -> dict[str, dict[int, str]] | None:
    """For tokenized inputs (a mapping of 2-D integer tensors): their axis 1 named ``sequence``, so an
    export accepts sentences of any length."""
    if not isinstance(batch, Mapping):
        return None
    return {name: {1: "sequence"} for name, t in batch.items()
            if isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point()} or None


# ------------------------------------------------------------------------------------------ models


def call(model: nn.Module, batch: Batch) -> Any:
    """``model(batch)``, ``model(*batch)`` or ``model(**batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode inside the block, its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def check_fits(model: nn.Module, batches: Sequence[Batch], what: str) -> None:
    """Run ``model`` on two samples of the first batch and turn a failure (inputs of the wrong shape or
    dtype for this model) into one :class:`CompressorError` naming ``what`` the inputs were."""
    shapes = ", ".join("x".join(map(str, t.shape)) for t in tensors_of(batches[0]))
    try:
        with eval_mode(model), torch.no_grad():
            call(model, take(batches[0], slice(0, 2)))
    except Exception as err:  # any failure of the user's model on these inputs
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise CompressorError(f"{what} (shape {shapes}) do not fit the model ({type(err).__name__}: {first})",
                              "pass inputs shaped and typed like the model's example inputs") from None


# ----------------------------------------------------------------------------------------- outputs


def named_outputs(out: Any, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a model's output with a name: a tensor, tuple, dict or Hugging Face ModelOutput
    (a mapping of its non-None fields), flattened (``past_key_values_0_1``)."""
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, Mapping):
        return [pair for k, v in out.items() for pair in named_outputs(v, str(k))]
    if isinstance(out, tuple | list):
        return [pair for i, v in enumerate(out) for pair in named_outputs(v, f"{prefix}_{i}")]
    return []  # None, ints, strings, caches: not outputs to compare


# A sentence embedding pooled from the model's first output (its token outputs), as a sentence-transformers
# folder's Pooling (and Normalize) modules compute it: "sentence_embedding:mean", "sentence_embedding:cls:normalize".
POOLED = "sentence_embedding"
POOLINGS = ("mean", "cls", "max")


def pooled_name(mode: str, normalize: bool) -> str:
    """The output name of a sentence embedding pooled by ``mode`` (one of :data:`POOLINGS`)."""
    return f"{POOLED}:{mode}" + (":normalize" if normalize else "")


def is_pooled(name: str) -> bool:
    return name.startswith(POOLED + ":")


def pool(tokens: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """The sentence embedding ``name`` (:func:`pooled_name`) of token outputs ``(batch, tokens, dim)``:
    padding (``mask`` 0) counts in no mean or max, as in sentence-transformers' Pooling."""
    mode, *rest = name.split(":")[1:]
    if mode not in POOLINGS or rest not in ([], ["normalize"]) or tokens.dim() != 3:
        raise CompressorError(f"cannot compute the output {name!r} (from an output of shape {list(tokens.shape)})",
                              f"name {POOLED}:MODE[:normalize] with MODE one of {', '.join(POOLINGS)}, for a "
                              "model whose first output is its token outputs")
    keep = (torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None
            else mask.to(device=tokens.device, dtype=torch.bool))[..., None]
    if mode == "cls":
        out = tokens[:, 0]
    elif mode == "max":
        out = tokens.masked_fill(~keep, torch.finfo(tokens.dtype).min).amax(1)
    else:
        out = (tokens * keep).sum(1) / keep.sum(1).clamp(min=1)
    return nn.functional.normalize(out, dim=-1) if rest else out


def compared_outputs(out: Any, names: Sequence[str] | None = None,
                     mask: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
    """The outputs fidelity, sensitivity and distillation compare: every floating-point output, or the
    ones named in ``names`` (in that order); a pooled sentence embedding (:func:`pool`) by its name, from
    the first output and ``mask`` (the inputs' attention mask)."""
    pairs = named_outputs(out)
    if names:
        have = dict(pairs)
        if pairs:
            have.update({n: pool(pairs[0][1], mask, n) for n in names if is_pooled(n)})
        missing = [n for n in names if n not in have]
        if missing:
            raise CompressorError(f"the model has no output named {', '.join(repr(n) for n in missing)} "
                                  f"(it returns {', '.join(have) or 'no tensor'})",
                                  "name outputs the model returns")
        return [(n, have[n]) for n in names]
    floating = [(k, v) for k, v in pairs if v.is_floating_point()]
    if not floating:
        raise CompressorError("the model's output holds no floating-point tensor",
                              "compare a model that returns float tensors, or name its outputs")
    return floating


def primary_output(out: Any, names: Sequence[str] | None = None) -> torch.Tensor:
    """The one output a loss is computed on: the first compared output (``logits`` or
    ``last_hidden_state`` for Hugging Face models, whose outputs list them first)."""
    return compared_outputs(out, names)[0][1]


def real_tokens(shape: Sequence[int], mask: torch.Tensor | None) -> torch.Tensor | None:
    """The positions of an output of ``shape`` that comparisons count: ``mask`` (the inputs' attention
    mask) as booleans broadcastable to it, True at real tokens, when the output's first two axes are the
    mask's (batch, tokens); None when every position counts (no mask, or an output without that sequence
    axis: pooled logits, an image model's).

    Why padding never counts: what a model computes at a padding position is not defined. Where every key
    a query may see is masked (the first positions of a left-padded causal model), torch's SDPA path gives
    one thing, the ONNX graph of the same model another (Gemma 3 270M factored: max abs diff 37 there, 1e-4
    on real tokens; neither gave NaN, but a softmax over keys all masked with -inf does), and compressing
    the model moves those positions arbitrarily.
    """
    if mask is None or len(shape) < 2 or tuple(shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(torch.bool).reshape(*mask.shape, *(1,) * (len(shape) - 2))


def unpadded(y: ArrayOrTensor, mask: torch.Tensor | None) -> ArrayOrTensor:
    """``y`` (a tensor, or an array from onnxruntime) with the positions :func:`real_tokens` leaves out set
    to 0, so they count in no difference, norm or cosine (``where``, not a product with the mask: a NaN
    there goes too)."""
    keep = real_tokens(y.shape, mask)
    if keep is None:
        return y
    if isinstance(y, np.ndarray):
        return np.where(keep.cpu().numpy(), y, np.zeros((), dtype=y.dtype))
    return torch.where(keep.to(y.device), y, torch.zeros((), dtype=y.dtype, device=y.device))


def relative_change(results: Iterable[tuple[Any, Any, torch.Tensor | None]],
                    names: Sequence[str] | None = None) -> float:
    """How much outputs moved: for each compared output, ``||Y' - Y||^2 / ||Y||^2`` summed over the
    batches of ``results`` (``(new, reference, padding mask)`` forward results per batch), then the mean
    over outputs, so that no output dominates by its scale. Padding positions are left out (:func:`unpadded`)."""
    num: dict[int, float] = {}
    den: dict[int, float] = {}
    for new, ref, mask in results:
        for k, ((name, y_new), (_, y)) in enumerate(zip(compared_outputs(new, names, mask),
                                                        compared_outputs(ref, names, mask), strict=True)):
            if not is_pooled(name):  # a pooled embedding has no padding left
                y_new, y = unpadded(y_new, mask), unpadded(y, mask)
            y_new, y = y_new.double(), y.double()
            num[k] = num.get(k, 0.0) + float((y_new - y).square().sum())
            den[k] = den.get(k, 0.0) + float(y.square().sum())
    ratios = [num[k] / den[k] if den[k] > 0 else 0.0 for k in num]
    return sum(ratios) / len(ratios) if ratios else 0.0


def cosine_fidelity(ref: Any, new: Any, names: Sequence[str] | None = None,
                    mask: torch.Tensor | None = None) -> dict[str, float]:
    """How close two forward results are: per-sample cosine of each compared output (flattened per
    sample), mean and worst over samples and outputs, and the relative error of all of them together.
    ``mask``: the inputs' attention mask (:func:`attention_mask`); padding positions are left out."""
    return batches_fidelity([(ref, new, mask)], names)


def batches_fidelity(results: Iterable[tuple[Any, Any, torch.Tensor | None]],
                     names: Sequence[str] | None = None) -> dict[str, float]:
    """:func:`cosine_fidelity` over several batches' ``(reference, new, mask)`` forward results: every
    sample of every batch counts once."""
    parts = [_cosine_parts(ref, new, names, mask) for ref, new, mask in results]
    cos = torch.cat([c for c, _, _ in parts])
    num, den = sum(n for _, n, _ in parts), sum(d for _, _, d in parts)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "relative_error": (num / den) ** 0.5 if den > 0 else 0.0}


def _cosine_parts(ref: Any, new: Any, names: Sequence[str] | None,
                  mask: torch.Tensor | None) -> tuple[torch.Tensor, float, float]:
    cosines, num, den = [], 0.0, 0.0
    for (name, a), (_, b) in zip(compared_outputs(ref, names, mask), compared_outputs(new, names, mask), strict=True):
        a, b = a.detach().double(), b.detach().double()
        if not is_pooled(name):  # a pooled embedding has no padding left
            a, b = unpadded(a, mask), unpadded(b, mask)
        a, b = (a.reshape(len(a), -1), b.reshape(len(b), -1)) if a.dim() > 1 else (a[None], b[None])
        cosines.append(nn.functional.cosine_similarity(a, b, dim=1))
        num, den = num + float((a - b).square().sum()), den + float(a.square().sum())
    return torch.cat(cosines), num, den
