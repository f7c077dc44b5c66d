"""Low-rank replacements for dense layers.

Each factored layer is two thin layers, ``down`` (input -> rank) then ``up`` (rank -> output), so that
``W ~ up.weight @ down.weight`` and the state_dict keys of a layer ``name`` are predictable:
``name.down.weight``, ``name.up.weight`` and ``name.up.bias`` (the original bias, if any, lives on
``up``). Both factors are ordinary ``nn.Linear``/``nn.Conv*d``/``nn.Embedding`` modules, so an ONNX
export keeps them as two MatMul/Gemm/Conv nodes and quantizers treat them like any other layer.
"""

from __future__ import annotations

import torch
from torch import nn

FACTOR_KINDS = ("linear", "conv1d", "conv2d", "embedding")


class LowRankLinear(nn.Module):
    """``y = up(down(x))`` with ``down: in -> rank`` (no bias) and ``up: rank -> out`` (original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix this layer computes: ``up.weight @ down.weight``."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in={self.down.in_features}, out={self.up.out_features}, rank={self.rank}"


class LowRankConv(nn.Module):
    """A ``k``-sized conv to ``rank`` channels followed by a 1x1 conv to the output channels.

    The first conv keeps the original kernel, stride, padding, dilation and padding mode; the second
    carries the original bias. Works for ``nn.Conv1d`` and ``nn.Conv2d`` with ``groups == 1``.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, rank: int):
        super().__init__()
        cls = type(conv) if type(conv) in (nn.Conv1d, nn.Conv2d) else (
            nn.Conv2d if isinstance(conv, nn.Conv2d) else nn.Conv1d)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.down = cls(conv.in_channels, rank, conv.kernel_size, stride=conv.stride,
                        padding=conv.padding, dilation=conv.dilation, bias=False,
                        padding_mode=conv.padding_mode, **factory)
        self.up = cls(rank, conv.out_channels, 1, bias=conv.bias is not None, **factory)

    @property
    def rank(self) -> int:
        return self.down.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        """The original-shaped kernel ``(out, in, *k)`` this layer computes."""
        up = self.up.weight.reshape(self.up.out_channels, self.rank)
        down = self.down.weight.reshape(self.rank, -1)
        return (up @ down).reshape(self.up.out_channels, *self.down.weight.shape[1:])


class LowRankEmbedding(nn.Module):
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

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(ids))

    def dense_weight(self) -> torch.Tensor:
        """The (num, dim) table this layer computes: ``down.weight @ up.weight.T``."""
        return self.down.weight @ self.up.weight.T


LOW_RANK_TYPES = (LowRankLinear, LowRankConv, LowRankEmbedding)
