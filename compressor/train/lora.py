"""LoRA: trainable low-rank adapters on frozen layers, merged back so the model keeps its size.

    apply_lora(model, rank=8, alpha=16)       # wraps every layer kind with a handler (core.handlers)
    ...train only the lora_A / lora_B parameters...
    merge_lora(model)                          # W += (alpha / rank) * B @ A; plain modules again

A wrapped layer computes ``base(x) + scale * B(A(dropout(x)))`` with ``A`` initialised like a Linear
layer and ``B`` at zero, so a fresh adapter changes nothing (as in peft); or, with ``init="pissa"``,
with the top singular directions of W in the adapter and the residual in the frozen base (same outputs).
``extract_lora`` goes the other
way: the adapters that best explain the difference between two checkpoints (truncated SVD).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.handlers import handler_for
from compressor.core.layers import LoRALayer
from compressor.core.svd import compute_dtype


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
               filter_fn: Callable[[str, nn.Module], bool] | None = None,
               init: Literal["zero", "pissa"] = "zero") -> dict[str, LoRALayer]:
    """Wrap every layer whose handler takes an adapter and that ``filter_fn(name, module)`` accepts
    (default: all) in place; each layer kind's wrapper comes from its handler.

    ``init="zero"``: the standard LoRA start (the adapter adds nothing). ``init="pissa"``: the adapter
    holds the top-``r`` singular triplets of each weight and the base weight becomes the residual
    ``W - W_r`` (see ``LoRALayer.init_pissa``); the model computes the same at step 0 either way.
    ``save_adapter`` writes a PiSSA adapter as a plain LoRA of twice the rank on the *original* weights.

    The adapter rank is capped at each layer's full rank. Returns ``{name: wrapper}``.
    """
    if init not in ("zero", "pissa"):
        raise CompressorError(f"unknown LoRA init {init!r}", "pass init='zero' or init='pissa'")
    wrapped_bases = {id(m.base) for m in model.modules() if isinstance(m, LoRALayer)}
    chosen = []
    for name, mod in model.named_modules():
        h = handler_for(mod)
        if (h is not None and h.dense_reason(mod) is None and id(mod) not in wrapped_bases
                and not isinstance(mod, LoRALayer) and (filter_fn is None or filter_fn(name, mod))):
            chosen.append((name, mod, h))
    if init == "pissa":
        weights = [id(h.weight(mod)) for _, mod, h in chosen]
        for (name, mod, h) in chosen:
            if weights.count(id(h.weight(mod))) > 1:  # a tied weight would get the residual twice
                raise CompressorError(f"'{name}' shares its weight with another adapted layer; PiSSA cannot "
                                      "split a tied weight", "leave one of the tied layers out with filter_fn")
    wrapped = {}
    for name, mod, h in chosen:
        r = min(rank, *h.weight_matrix(mod).shape)
        # Keep alpha / rank of the requested rank, so a capped layer is not scaled up.
        wrapped[name] = h.lora(mod, r, alpha * r / rank, dropout)
        set_submodule(model, name, wrapped[name])
    if init == "pissa":
        for (name, mod, h) in chosen:
            wrapped[name].init_pissa(h.weight_matrix(mod))
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the plain base modules back; returns ``model``."""
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]:
        mod.merge()
        set_submodule(model, name, mod.base)
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.rpartition(".")[2] in ("lora_A", "lora_B")}


@dataclass
class ExtractedLoRA:
    """Adapter for one weight: ``tuned ~ base + B @ A`` (weight seen as ``(m, n)``), and what it misses."""

    A: torch.Tensor  # (rank, n)
    B: torch.Tensor  # (m, rank)
    shape: tuple[int, ...]
    rel_error: float  # ||delta - B @ A|| / ||delta|| (Frobenius)


def extract_lora(base_state_dict: dict[str, torch.Tensor], tuned_state_dict: dict[str, torch.Tensor],
                 rank: int) -> dict[str, ExtractedLoRA]:
    """Rank-``rank`` adapters for every weight (2-D or more) that differs between the two state dicts.

    The truncated SVD of ``delta = tuned - base`` is the best rank-``rank`` approximation (Eckart-Young),
    so ``rel_error`` is the smallest error any adapter of that rank can leave.
    """
    if rank < 1:
        raise CompressorError(f"rank must be >= 1, got {rank}", "pass e.g. rank=8")
    out = {}
    for key, tuned in tuned_state_dict.items():
        base = base_state_dict.get(key)
        if base is None or tuned.dim() < 2 or not tuned.is_floating_point():
            continue
        if base.shape != tuned.shape:
            raise CompressorError(f"'{key}' is {list(base.shape)} in the base but {list(tuned.shape)} tuned",
                                  "extract adapters between checkpoints of the same model")
        delta = (tuned.to(compute_dtype(tuned.dtype)) - base.to(device=tuned.device,
                                                                 dtype=compute_dtype(tuned.dtype)))
        delta = delta.reshape(delta.shape[0], -1)
        norm = torch.linalg.matrix_norm(delta)
        if norm == 0:
            continue
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, S.numel())
        B, A = U[:, :r] * S[:r], Vh[:r]
        err = float(torch.linalg.matrix_norm(delta - B @ A) / norm)
        out[key] = ExtractedLoRA(A.to(tuned.dtype), B.to(tuned.dtype), tuple(tuned.shape), err)
    return out


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
