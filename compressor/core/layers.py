"""The modules compressor puts into a model: low-rank replacements of dense layers, and LoRA wrappers.

Each factored layer is two thin layers, ``down`` (input -> rank) then ``up`` (rank -> output), so that
``W ~ up.weight @ down.weight`` and the state_dict keys of a layer ``name`` are predictable:
``name.down.weight``, ``name.up.weight`` and ``name.up.bias`` (the original bias, if any, lives on
``up``). Both factors are ordinary ``nn.Linear``/``nn.Conv*d``/``nn.Embedding`` modules, so an ONNX
export keeps them as two MatMul/Gemm/Conv nodes and quantizers treat them like any other layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from compressor.core.errors import CompressorError


class _Factored(nn.Module):
    """What every factored layer shares: ``down`` then ``up``, and a read-only dense ``weight``."""

    down: nn.Module
    up: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight this layer computes, detached: for code that inspects ``layer.weight``
        (its dtype, device or shape, as ViT's patch embedding does on every call). Cached until a factor
        changes, so such reads cost nothing in steady state; training goes through the factors."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():  # fake tensors have no storage to key on
            return self.dense_weight().detach()
        key = tuple((p.data_ptr(), p._version) for p in (self.down.weight, self.up.weight))
        cached = self.__dict__.get("_dense_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.dense_weight().detach())
            self.__dict__["_dense_cache"] = cached
        return cached[1]


class LowRankLinear(_Factored):
    """``y = up(down(x))`` with ``down: in -> rank`` (no bias) and ``up: rank -> out`` (original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix this layer computes: ``up.weight @ down.weight``."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in={self.down.in_features}, out={self.up.out_features}, rank={self.rank}"


class PivotedLowRankLinear(_Factored):
    """The same rank-``r`` map as :class:`LowRankLinear` in fewer weights: ``down`` (in -> rank) computes ``r``
    of the outputs themselves, ``up`` (rank -> out - rank) the other outputs as combinations of those, and
    ``positions`` puts them in place: ``y[positions] = cat([z, up(z)])``, ``z = down(x)``.

    Why: a rank-``r`` ``m x n`` matrix has ``r (m + n - r)`` degrees of freedom and this form stores exactly
    that many weights (and costs as many multiply-adds), where two factors store ``r (m + n)`` and save
    nothing above ``m n / (m + n)``, half the rank of a square matrix. So every rank below ``min(m, n)``
    saves, and at a given size the layer keeps more of its spectrum. The price is writing the outputs into
    their places (two index copies; docs/causal-lm.md measures it). Biases: ``down``'s is the original bias
    of its outputs, ``up``'s is ``b_rest - C b_rows`` (so that ``up(z)`` adds back exactly ``b_rest``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise CompressorError(f"a pivoted low-rank layer needs 1 <= rank <= min(in, out), got rank {rank} "
                                  f"for {in_features} -> {out_features}", "choose a smaller rank")
        self.down = nn.Linear(in_features, rank, bias=bias, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features - rank, bias=bias, device=device, dtype=dtype)
        self.register_buffer("positions", torch.arange(out_features, device=device))

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.down(x)
        return self._place(z, self.up(z))

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix this layer computes."""
        return self._place(self.down.weight.T, (self.up.weight @ self.down.weight).T).T

    def _place(self, first: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """The outputs in their places, from ``first`` (the rank computed ones) and ``rest`` along the last axis
        (the rank read from ``first``: ``down`` may be wrapped, by a LoRA adapter during healing)."""
        k = first.shape[-1]
        out = first.new_empty(*first.shape[:-1], self.positions.numel())
        out.index_copy_(-1, self.positions[:k], first)
        return out.index_copy_(-1, self.positions[k:], rest)

    def extra_repr(self) -> str:
        return f"in={self.down.in_features}, out={self.positions.numel()}, rank={self.rank}, pivoted"


class LowRankConv(_Factored):
    """A ``k``-sized conv to ``rank`` channels followed by a 1x1 conv to the output channels.

    The first conv keeps the original kernel, stride, padding, dilation and padding mode; the second
    carries the original bias. Works for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` with ``groups == 1``.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, rank: int):
        super().__init__()
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[conv.weight.dim() - 3]  # plain class, even for subclasses
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.down = cls(conv.in_channels, rank, conv.kernel_size, stride=conv.stride,
                        padding=conv.padding, dilation=conv.dilation, bias=False,
                        padding_mode=conv.padding_mode, **factory)
        self.up = cls(rank, conv.out_channels, 1, bias=conv.bias is not None, **factory)

    @property
    def rank(self) -> int:
        return self.down.out_channels

    def dense_weight(self) -> torch.Tensor:
        """The original-shaped kernel ``(out, in, *k)`` this layer computes."""
        up = self.up.weight.reshape(self.up.out_channels, self.rank)
        down = self.down.weight.reshape(self.rank, -1)
        return (up @ down).reshape(self.up.out_channels, *self.down.weight.shape[1:])


class LowRankSpatialConv(_Factored):
    """The spatial decomposition of a 2-D ``kh x kw`` conv (Jaderberg et al. 2014, Tai et al. 2016): a
    ``kh x 1`` conv to ``rank`` channels, then a ``1 x kw`` conv to the outputs.

    The first conv keeps the vertical stride, padding and dilation, the second the horizontal ones and the
    bias; the padding mode is kept on both. At full rank it computes the original conv exactly: the first
    acts on each input column alone, so padding its output's columns equals padding the input's.
    """

    def __init__(self, conv: nn.Conv2d, rank: int):
        super().__init__()
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        (sh, sw), (dh, dw) = conv.stride, conv.dilation
        if isinstance(conv.padding, str):  # "same"/"valid" mean the same thing along each axis
            pad_v = pad_h = conv.padding
        else:
            pad_v, pad_h = (conv.padding[0], 0), (0, conv.padding[1])
        self.down = nn.Conv2d(conv.in_channels, rank, (conv.kernel_size[0], 1), stride=(sh, 1), padding=pad_v,
                              dilation=(dh, 1), bias=False, padding_mode=conv.padding_mode, **factory)
        self.up = nn.Conv2d(rank, conv.out_channels, (1, conv.kernel_size[1]), stride=(1, sw), padding=pad_h,
                            dilation=(1, dw), bias=conv.bias is not None, padding_mode=conv.padding_mode, **factory)

    @property
    def rank(self) -> int:
        return self.down.out_channels

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in, kh, kw)`` kernel: ``W[o, c, i, j] = sum_r up[o, r, 0, j] * down[r, c, i, 0]``."""
        return torch.einsum("orj,rci->ocij", self.up.weight[:, :, 0], self.down.weight[..., 0])

    def extra_repr(self) -> str:
        return f"spatial, rank={self.rank}"


class LowRankEmbedding(_Factored):
    """``Embedding(num, rank)`` followed by ``Linear(rank, dim)`` (no bias).

    Note the cost: a dense embedding is a lookup (no multiply-adds); the factored one adds
    ``rank * dim`` multiply-adds per token in exchange for its smaller table.
    """

    def __init__(self, emb: nn.Embedding, rank: int):
        super().__init__()
        factory = {"device": emb.weight.device, "dtype": emb.weight.dtype}
        self.down = nn.Embedding(emb.num_embeddings, rank, padding_idx=emb.padding_idx,
                                 scale_grad_by_freq=emb.scale_grad_by_freq, sparse=emb.sparse,
                                 **factory)
        self.up = nn.Linear(rank, emb.embedding_dim, bias=False, **factory)

    @property
    def rank(self) -> int:
        return self.down.embedding_dim

    def dense_weight(self) -> torch.Tensor:
        """The (num, dim) table this layer computes: ``down.weight @ up.weight.T``."""
        return self.down.weight @ self.up.weight.T


LOW_RANK_TYPES = (LowRankLinear, PivotedLowRankLinear, LowRankConv, LowRankSpatialConv, LowRankEmbedding)


# ------------------------------------------------------------------------------------------- LoRA


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
        # PiSSA: the adapter's values at step 0 (the base then holds the residual W - W_r); None for
        # the standard init, where the adapter starts at zero and the base is the original weight.
        self.register_buffer("init_A", None, persistent=False)
        self.register_buffer("init_B", None, persistent=False)
        base.weight.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` in the base weight's shape."""
        return (self.scale * (self.lora_B @ self.lora_A)).reshape(self.base.weight.shape)

    @torch.no_grad()
    def init_pissa(self, w: torch.Tensor) -> None:
        """PiSSA (Meng et al. 2024): put the top-``rank`` singular triplets of ``w`` (the base weight as the
        ``(m, n)`` matrix this wrapper adapts) into the adapter, ``B = U_r sqrt(S_r) / sqrt(scale)`` and
        ``A = sqrt(S_r) Vh_r / sqrt(scale)`` so ``scale * B @ A = W_r``, and leave the residual ``W - W_r`` in
        the base: the layer computes what it computed before, but training starts on the principal part."""
        if self.merged or self.init_A is not None:
            raise CompressorError("PiSSA init needs a fresh, unmerged adapter", "apply it once, before training")
        wd = w.detach().to(torch.float64)
        U, S, Vh = torch.linalg.svd(wd, full_matrices=False)
        r, root = self.rank, S[: self.rank].sqrt() / math.sqrt(self.scale)
        self.lora_B.copy_((U[:, :r] * root).reshape(self.lora_B.shape))
        self.lora_A.copy_((root[:, None] * Vh[:r]).reshape(self.lora_A.shape))
        self.base.weight.sub_(self.delta_weight())
        self.init_A, self.init_B = self.lora_A.detach().clone(), self.lora_B.detach().clone()

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


class LoRAMatrix(LoRALayer):
    """Any layer computing ``y = W x + b`` on the last axis, with ``W`` stored as ``weight`` or, with
    ``transposed``, as ``weight.T`` (transformers' ``Conv1D``)."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                 transposed: bool = False):
        self.transposed = transposed
        w = base.weight.T if transposed else base.weight
        super().__init__(base, rank, alpha, dropout, w.shape[0], w.shape[1])

    def delta_weight(self) -> torch.Tensor:
        delta = self.scale * (self.lora_B @ self.lora_A)
        return delta.T if self.transposed else delta

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


class LoRALinear(LoRAMatrix):
    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)


class LoRAConv(LoRALayer):
    """``A`` is a conv with the base kernel/stride/padding to ``rank`` channels, ``B`` a 1x1 conv."""

    def __init__(self, base: nn.Conv1d | nn.Conv2d | nn.Conv3d, rank: int = 8, alpha: float = 16, dropout: float = 0.0):
        if base.groups != 1 or base.padding_mode != "zeros":
            raise CompressorError("LoRA supports convs with groups=1 and zero padding only",
                                  "leave this layer out with filter_fn")
        super().__init__(base, rank, alpha, dropout, base.out_channels, base.weight[0].numel())

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.base.weight.dim() - 3]
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
