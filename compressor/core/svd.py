"""The linear algebra: weight matrices, their SVD, and the truncated factors.

Every supported weight is viewed as a matrix ``W`` of shape ``(m, n)`` by its layer handler
(:mod:`compressor.core.handlers`): ``nn.Linear`` as stored, a conv as ``(out, in * prod(kernel))``, an
embedding table as stored, transformers' ``Conv1D`` transposed.

A rank-``r`` factorization replaces ``m * n`` weights by ``r * (m + n)``; it saves parameters only when
``r < m * n / (m + n)`` (the break-even rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.core.threads import linalg_threads


def break_even_rank(m: int, n: int) -> float:
    """``m * n / (m + n)``: at this rank or above, two factors hold at least as many weights as ``W``."""
    return m * n / (m + n)


def max_saving_rank(m: int, n: int) -> int:
    """The largest rank whose factors hold strictly fewer weights than the ``m x n`` matrix (0 if none)."""
    return (m * n - 1) // (m + n)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """SVDs run in float32, or float64 for float64 weights: half precision is too coarse for them."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Decomposition:
    """``W = diag(left_inv) U diag(S) Vh @ right_inv``; ``left_inv`` and ``right_inv`` are None for a
    plain SVD of ``W``.

    Activation-aware methods decompose ``W @ R`` for an invertible ``R`` built from calibration data;
    then ``right_inv = R^-1`` maps the factors back, and the singular values measure output error.
    Embeddings weight their rows instead (``D W``, ``D`` diagonal from token frequencies):
    ``left_inv`` is the vector ``1 / diag(D)``.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    right_inv: torch.Tensor | None = None
    left_inv: torch.Tensor | None = None

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` of shapes ``(m, rank)`` and ``(rank, n)`` with ``up @ down`` the best rank-``rank``
        approximation. The singular values are split evenly (``sqrt(S)`` on each side), which keeps the
        two factors on the same scale: better for fine-tuning and for per-channel quantization."""
        root = self.S[:rank].sqrt()
        up = self.U[:, :rank] * root
        down = root[:, None] * self.Vh[:rank]
        if self.right_inv is not None:
            down = down @ self.right_inv
        if self.left_inv is not None:
            up = self.left_inv[:, None] * up
        return up, down


def svd(matrix: torch.Tensor) -> Decomposition:
    """Thin SVD of ``matrix`` on its own device, in float32 or better, with :func:`linalg_threads`."""
    a = matrix.detach().to(compute_dtype(matrix.dtype))
    with linalg_threads():
        U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    return Decomposition(U, S, Vh)


def energy_kept(S: torch.Tensor, rank: int) -> float:
    """Fraction of ``sum(S**2)`` held by the first ``rank`` singular values (1.0 for a zero matrix)."""
    sq = S.double().square()
    total = float(sq.sum())
    if total == 0.0:
        return 1.0
    return float(sq[:rank].sum()) / total


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """The smallest rank (at least 1) whose kept energy reaches ``energy`` of the total."""
    sq = S.double().square()
    total = float(sq.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    # Tolerance for float round-off so that energy=1.0 does not demand more than the full rank.
    idx = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)))
    return min(idx + 1, len(S))
