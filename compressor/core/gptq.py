"""GPTQ: rounding a layer's weights to a grid one input column at a time, each column's rounding error moved
onto the columns not yet rounded so that the layer's output on the calibration inputs moves least.

Frantar et al. 2022 ("GPTQ: Accurate post-training quantization for generative pre-trained transformers", after
Optimal Brain Quantization, Frantar & Alistarh 2022). With ``H = X Xᵀ + λI`` over the layer's calibration inputs
``X`` and ``U`` the upper Cholesky factor of ``H⁻¹``, column ``i``'s error ``eᵢ = (wᵢ - qᵢ) / Uᵢᵢ`` is subtracted
as ``eᵢ Uᵢⱼ`` from every later column ``j``: the least-squares update that keeps ``W X`` closest. ``λ``
(:data:`GPTQ_DAMP` of the mean diagonal) keeps ``H`` invertible where inputs are dead or collinear; columns go
in decreasing ``Hᵢᵢ`` order (:data:`GPTQ_ACT_ORDER`, GPTQ's "act-order"), so the inputs that matter most are
rounded while the most columns are left to take their error.

The grid is the caller's: :func:`gptq` takes a function that rounds one column (given which column it is) and
returns the rounded values, so the same loop serves the static int8 export (a symmetric step per output
channel) and the int4 export (a scale and zero point per block of input columns)."""

from __future__ import annotations

from collections.abc import Callable

import torch

GPTQ_DAMP = 0.01  # λ, as a fraction of the mean diagonal of H (GPTQ's default)
GPTQ_ACT_ORDER = True  # round the columns with the largest mean squared input first
_BATCH = 128  # columns rounded between two updates of the columns after them (GPTQ's lazy batch)

# (column indices (groups,), that column's current values (groups, rows)) -> its rounded values, same shape
RoundColumn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, round_column: RoundColumn, *, damp: float = GPTQ_DAMP,
         act_order: bool = GPTQ_ACT_ORDER) -> torch.Tensor:
    """``weight`` (groups, rows, columns) rounded column by column by ``round_column``, each column's error
    compensated on the columns after it; ``hessian`` (groups, columns, columns) is the ``X Xᵀ`` of each
    group's inputs. Returns the rounded weights (what ``round_column`` returned), float64, in the original
    column order."""
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    groups, _, cols = w.shape
    diag = h.diagonal(dim1=-2, dim2=-1)
    mean = diag.mean(-1)
    h += (damp * torch.where(mean > 0, mean, 1))[:, None, None] * torch.eye(cols, dtype=h.dtype)
    order = torch.argsort(diag, dim=-1, descending=True) if act_order else torch.arange(cols).expand(groups, -1)
    w = w.gather(-1, order[:, None, :].expand_as(w))
    h = h.gather(1, order[:, :, None].expand_as(h)).gather(2, order[:, None, :].expand_as(h))
    chol, info = torch.linalg.cholesky_ex(h)
    u, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    # A group whose H is not positive definite even damped: round it to nearest (U = I spreads no error).
    bad = (info != 0) | (info2 != 0) | ~torch.isfinite(u).all(-1).all(-1)
    u[bad] = torch.eye(cols, dtype=u.dtype)
    q = torch.empty_like(w)
    # GPTQ's lazy batches: within a batch of columns each error updates only the batch's later columns; the
    # columns after the batch take the whole batch's errors at once, one matrix product instead of a pass
    # over the whole matrix per column (the same result, far less memory traffic).
    for start in range(0, cols, _BATCH):
        end = min(start + _BATCH, cols)
        block = w[..., start:end].clone()
        errors = torch.empty_like(block)
        for i in range(end - start):
            col = block[..., i]
            qi = round_column(order[:, start + i], col).to(torch.float64)
            q[..., start + i] = qi
            errors[..., i] = (col - qi) / u[:, start + i, start + i, None]
            block[..., i + 1:] -= errors[..., i, None] * u[:, None, start + i, start + i + 1:end]
        w[..., end:] -= errors @ u[:, start:end, end:]
    return q.gather(-1, torch.argsort(order, dim=-1)[:, None, :].expand_as(q))
