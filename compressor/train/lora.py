"""LoRA: trainable low-rank adapters on frozen layers, merged back so the model keeps its size.

    apply_lora(model, rank=8, alpha=16)       # wraps Linear / Conv1d / Conv2d / Embedding layers
    ...train only the lora_A / lora_B parameters...
    merge_lora(model)                          # W += (alpha / rank) * B @ A; plain modules again

A wrapped layer computes ``base(x) + scale * B(A(dropout(x)))`` with ``A`` initialised like a Linear
layer and ``B`` at zero, so a fresh adapter changes nothing (as in peft). ``extract_lora`` goes the other
way: the adapters that best explain the difference between two checkpoints (truncated SVD).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from compressor.core.errors import CompressorError
from compressor.core.svd import compute_dtype, layer_kind


class LoRALayer(nn.Module):
    """Common part of the wrappers: the frozen ``base`` layer, ``lora_A`` (rank, n), ``lora_B`` (m, rank)
    over the base weight seen as an ``(m, n)`` matrix, and merge/unmerge."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, m: int, n: int):
        super().__init__()
        if rank < 1:
            raise CompressorError(f"LoRA rank must be >= 1, got {rank}", "pass e.g. rank=8")
        w = base.weight
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, n, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(m, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        base.weight.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` in the base weight's shape."""
        return (self.scale * (self.lora_B @ self.lora_A)).reshape(self.base.weight.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into the base weight; forward then costs what the base layer costs."""
        if not self.merged:
            self.base.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the base weight (exact up to floating-point rounding)."""
        if self.merged:
            self.base.weight.sub_(self.delta_weight())
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out if self.merged else out + self.scale * self.adapter(self.lora_dropout(x))

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


class LoRALinear(LoRALayer):
    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout, base.out_features, base.in_features)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


class LoRAConv(LoRALayer):
    """``A`` is a conv with the base kernel/stride/padding to ``rank`` channels, ``B`` a 1x1 conv."""

    def __init__(self, base: nn.Conv1d | nn.Conv2d, rank: int = 8, alpha: float = 16, dropout: float = 0.0):
        if base.groups != 1 or base.padding_mode != "zeros":
            raise CompressorError("LoRA supports convs with groups=1 and zero padding only",
                                  "leave this layer out with filter_fn")
        super().__init__(base, rank, alpha, dropout, base.out_channels, base.weight[0].numel())

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d if isinstance(self.base, nn.Conv2d) else F.conv1d
        b = self.base
        kernel = self.lora_A.reshape(self.rank, *b.weight.shape[1:])
        a = conv(x, kernel, None, b.stride, b.padding, b.dilation)
        return conv(a, self.lora_B.reshape(*self.lora_B.shape, *([1] * (b.weight.dim() - 2))))


class LoRAEmbedding(LoRALayer):
    """The table is ``(num, dim)``: ``A`` is ``(rank, dim)`` and ``B`` is ``(num, rank)``, so the
    adapter is a rank-``rank`` lookup table; dropout does not apply to integer ids."""

    def __init__(self, base: nn.Embedding, rank: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__(base, rank, alpha, 0.0, base.num_embeddings, base.embedding_dim)
        # Zero B and random A would look up zero rows forever; peft zeroes A instead and draws B.
        with torch.no_grad():
            nn.init.normal_(self.lora_B)
            self.lora_A.zero_()

    def adapter(self, ids: torch.Tensor) -> torch.Tensor:
        b = self.base
        return F.embedding(ids, self.lora_B, b.padding_idx, b.max_norm, b.norm_type,
                           b.scale_grad_by_freq, b.sparse) @ self.lora_A


def _wrap(module: nn.Module, rank: int, alpha: float, dropout: float) -> LoRALayer:
    kind = layer_kind(module)
    if kind == "linear":
        return LoRALinear(module, rank, alpha, dropout)
    if kind in ("conv1d", "conv2d"):
        return LoRAConv(module, rank, alpha, dropout)
    if kind == "embedding":
        return LoRAEmbedding(module, rank, alpha, dropout)
    raise CompressorError(f"{type(module).__name__} cannot take a LoRA adapter",
                          "select Linear, Conv1d/2d or Embedding layers with filter_fn")


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
               filter_fn: Callable[[str, nn.Module], bool] | None = None) -> dict[str, LoRALayer]:
    """Wrap every supported layer that ``filter_fn(name, module)`` accepts (default: all) in place.

    The adapter rank is capped at each layer's full rank. Returns ``{name: wrapper}``.
    """
    wrapped_bases = {id(m.base) for m in model.modules() if isinstance(m, LoRALayer)}
    chosen = [(name, mod) for name, mod in model.named_modules()
              if layer_kind(mod) is not None and id(mod) not in wrapped_bases
              and (filter_fn is None or filter_fn(name, mod))]
    wrapped = {}
    for name, mod in chosen:
        r = min(rank, *mod.weight.reshape(mod.weight.shape[0], -1).shape)
        # Keep alpha / rank of the requested rank, so a capped layer is not scaled up.
        wrapped[name] = _wrap(mod, r, alpha * r / rank, dropout)
        _set_submodule(model, name, wrapped[name])
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the plain base modules back; returns ``model``."""
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]:
        mod.merge()
        _set_submodule(model, name, mod.base)
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


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
