"""One layer's data-aware factors from its activation statistics: the streamed second moments, whitening and the
whitened (or token-weighted) decompositions every calibrated path shares.

What is computed, per factorizable layer (activations are streamed, never stored):

* the input second moment ``C = X^T X`` (rows of ``X`` are tokens / conv patches; padding tokens are left
  out when a batch is a dict with an ``attention_mask``);
* a whitening ``S`` with ``C + damping = S S^T`` (Cholesky; growing damping, then an eigen-decomposition
  with clamped eigenvalues when ``C`` is singular or not positive definite, e.g. dead or duplicated
  features); then ``||(W - W') X|| = ||(W - W') S||``, so the truncated SVD of ``W S`` mapped back by
  ``S^-1`` is the rank-r ``W'`` with the least output error (SVD-LLM);
* with the cross moments of the compressed model's inputs ``X^`` (sequential correction), the whitened
  truncation of the least-squares map ``W* = W (X^T X^)(X^^T X^)^-1``.

Embeddings take token ids, whose "second moment" is a token count. Their rows are weighted by how
often text uses each token (calibration frequencies mixed with a uniform share, since held-out text
uses tokens calibration never saw): the SVD of the weighted table picks the rank-r subspace, and every
row, rare ones included, is projected onto it (:func:`embedding_decomposition`). A plain SVD spends
rank on the thousands of tokens real text hardly uses.

The passes that collect the statistics are :mod:`compressor.analysis.tracing`; the whole calibrated analysis
is :mod:`compressor.analysis.calibration`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.handlers import LayerHandler, handler_for
from compressor.core.svd import Decomposition, compute_dtype, svd
from compressor.core.threads import linalg_threads

# Ridge added to C, relative to its mean diagonal, tried in order. 1% (not a bare jitter) regularises the
# whitening and the sequential least-squares refits against over-fitting a few thousand calibration
# tokens: on all-MiniLM-L6-v2 at 40% removal it raised held-out embedding cosine from 0.879 (1e-6) to 0.898.
DAMPING = (1e-2, 1e-1)
# Share of an embedding's row weights spread evenly over the vocabulary: every token keeps some weight
# (a few hundred sentences never see most of a 30k vocabulary), while the subspace is chosen mostly by
# the tokens text uses. On all-MiniLM-L6-v2 any share from 0.2% to 50% did about equally well on held-out
# sentences, and far better than the plain SVD (share 1): benchmarks/results/embedding_factoring.md.
UNIFORM_TOKEN_SHARE = 0.1
# Rows per input feature a layer's second moment is estimated from, per batch (a fixed random subset of a
# conv's positions beyond that). Measured (MobileNetV2, 40% removed, no sensitivity probes, 1 thread, load
# ~12): at 320 px the calibrated analysis took 29.5 s instead of 36.5 s with identical held-out top-1
# agreement and logit cosine; at 160 px (and on EfficientNet-Lite0) identical results, no time saved.
ROWS_PER_FEATURE = 64
# Elements of a moment computed (float32) and added (float64) at a time, and the block size of the in-place
# Cholesky and of the products with its factor: temporaries of tens of MB instead of n x n matrices.
PRODUCT_BLOCK = 2**22
CHOLESKY_BLOCK = 512


# ------------------------------------------------------------------------------ activation statistics


def _product_dtype(x: torch.Tensor) -> torch.Tensor:
    """Rows in the precision one batch's products are computed in: float32 (float64 when given), not less.

    A batch's ``X^T X`` in float32 is accurate to ~1e-6 relative, far inside the 1% ``DAMPING`` every
    moment is regularised by, and twice as fast as float64; the sums across batches stay float64."""
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _accumulate(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``total + a^T b`` in float64, in place, a block of :data:`PRODUCT_BLOCK` elements at a time: a whole
    product and its float64 copy are 1.5 times the moment (an 11008-wide one is 1 GB in float64)."""
    if total is None:
        total = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    step = max(1, PRODUCT_BLOCK // max(1, b.shape[1]))
    for i in range(0, a.shape[1], step):
        total[i:i + step] += a[:, i:i + step].T @ b
    return total


@dataclass
class Moments:
    """Streamed sums over calibration rows: ``X^T X`` (and, for sequential correction, the cross moment
    ``X^T X^`` and ``X^^T X^`` of the compressed model's inputs ``X^``), summed in float64
    (each batch's products in float32: :func:`_product_dtype`)."""

    xx: torch.Tensor | None = None
    hh: torch.Tensor | None = None
    xh: torch.Tensor | None = None
    rows: int = 0
    tokens: torch.Tensor | None = None  # embeddings: how often each row was looked up

    def add_tokens(self, ids: torch.Tensor, num_embeddings: int) -> None:
        counts = torch.bincount(ids.detach().reshape(-1).long(), minlength=num_embeddings).double()
        self.tokens = counts if self.tokens is None else self.tokens.add_(counts)
        self.rows += ids.numel()

    def add(self, x: torch.Tensor, h: torch.Tensor | None = None, weight: float = 1.0) -> None:
        """Add rows ``x`` (and ``h``); ``weight``: each row stands for that many (a subsample's)."""
        x = _product_dtype(x)
        xw = x * weight if weight != 1.0 else x
        self.xx = _accumulate(self.xx, xw, x)
        if h is not None:
            h = _product_dtype(h)
            hw = h * weight if weight != 1.0 else h
            self.hh = _accumulate(self.hh, hw, h)
            self.xh = _accumulate(self.xh, xw, h)
        self.rows += round(x.shape[0] * weight)

    def copy(self) -> Moments:
        def c(t):
            return None if t is None else t.clone()
        return Moments(c(self.xx), c(self.hh), c(self.xh), self.rows, c(self.tokens))


@dataclass
class Whitening:
    """``S`` with ``C + damping I = S S^T`` and how it was obtained; ``S^-1`` is applied by :meth:`over`.

    A Cholesky ``S`` is lower triangular and its inverse is never formed (it would be one more n x n
    matrix: 1 GB for an 11008-wide input in float64); the eigh and identity fallbacks keep it (``inverse``)."""

    S: torch.Tensor
    method: str  # "cholesky", "eigh" or "identity"
    damping: float  # relative to the mean diagonal of C
    inverse: torch.Tensor | None = None

    def times(self, M: torch.Tensor) -> torch.Tensor:
        """``M @ S`` in ``M``'s dtype, a block of columns of ``S`` at a time (a triangular ``S``: only its
        nonzero rows), so that ``S`` is never copied whole into that dtype."""
        n = self.S.shape[0]
        out = M.new_empty(M.shape[0], n)
        tri = self.method == "cholesky"
        for j in range(0, n, CHOLESKY_BLOCK):
            k = j if tri else 0
            out[:, j:j + CHOLESKY_BLOCK] = M[:, k:] @ self.S[k:, j:j + CHOLESKY_BLOCK].to(M.dtype)
        return out

    def over(self, M: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``M @ S^-1`` (``M @ S^-T`` with ``transpose``), in ``M``'s dtype."""
        if self.inverse is not None:
            inv = self.inverse.to(M.dtype)
            return M @ (inv.T if transpose else inv)
        S = self.S.to(M.dtype)
        return torch.linalg.solve_triangular(S.T if transpose else S, M, upper=transpose, left=False)

    @property
    def S_inv(self) -> torch.Tensor:
        """``S^-1`` formed (n x n): for inspection; the analysis applies it with :meth:`over`."""
        return self.over(torch.eye(self.S.shape[0], dtype=self.S.dtype, device=self.S.device))


def _blocks(n: int) -> list[tuple[int, int]]:
    return [(j, min(j + CHOLESKY_BLOCK, n)) for j in range(0, n, CHOLESKY_BLOCK)]


def _symmetrize(C: torch.Tensor, out: torch.Tensor) -> None:
    """``out = (C + C^T) / 2``, block pair by block pair (``out`` may be ``C``: then in place)."""
    for i0, i1 in _blocks(C.shape[0]):
        for j0, j1 in _blocks(i1):
            avg = (C[i0:i1, j0:j1] + C[j0:j1, i0:i1].T).div_(2)
            out[i0:i1, j0:j1] = avg
            out[j0:j1, i0:i1] = avg.T


def _cholesky_(A: torch.Tensor) -> int:
    """The lower Cholesky factor of the symmetric ``A`` written over ``A``'s lower triangle and diagonal blocks
    (blocked, right-looking: panel-sized temporaries only; the blocks above the diagonal blocks are left as they
    were). Returns 0, or as LAPACK's ``info`` the order of the first leading minor not positive definite."""
    n = A.shape[0]
    for j0, j1 in _blocks(n):
        L, info = torch.linalg.cholesky_ex(A[j0:j1, j0:j1])
        if int(info):
            return j0 + int(info)
        A[j0:j1, j0:j1] = L
        if j1 < n:
            panel = A[j1:, j0:j1]
            panel.copy_(torch.linalg.solve_triangular(L.T, panel, upper=True, left=False))
            for k0, k1 in _blocks(n - j1):  # the trailing lower triangle, a block of columns at a time
                A[j1 + k0:, j1 + k0:j1 + k1].addmm_(panel[k0:], panel[k0:k1].T, alpha=-1)
    return 0


def _restore(A: torch.Tensor, diagonal: list[torch.Tensor]) -> None:
    """Undo a failed :func:`_cholesky_` of a symmetric matrix: its lower triangle from the blocks above the
    diagonal blocks (untouched), the diagonal blocks from ``diagonal`` (copies taken before)."""
    for (j0, j1), block in zip(_blocks(A.shape[0]), diagonal, strict=True):
        A[j1:, j0:j1] = A[j0:j1, j1:].T
        A[j0:j1, j0:j1] = block


def whitening(C: torch.Tensor, damping: tuple[float, ...] = DAMPING, *, overwrite: bool = False) -> Whitening:
    """A whitening factor of the second moment ``C``: Cholesky with growing damping, then eigh with
    clamped eigenvalues; identity for an all-zero ``C``. Always finite.

    ``overwrite``: a float64 ``C`` becomes the factor (the caller never uses it again, as the streamed path's
    moments): no n x n matrix beyond ``C`` itself. Otherwise one copy; the results are the same bits."""
    C = C.double()
    n = C.shape[0]
    scale = float(C.diagonal().mean()) if n else 0.0
    if not math.isfinite(scale) or scale <= 0:
        eye = torch.eye(n, dtype=C.dtype, device=C.device)
        return Whitening(eye, "identity", 0.0, eye)
    A = C if overwrite else torch.empty_like(C)
    _symmetrize(C, A)
    del C
    diagonal = [A[j0:j1, j0:j1].clone() for j0, j1 in _blocks(n)]  # to try again after a failed factorization
    for d in damping:
        A.diagonal().add_(d * scale)
        # A factor too ill-conditioned to invert accurately: damp more. (A failed factorization stops at a NaN
        # too, so an accepted factor is finite; its inverse's norm is 1 / sqrt of the damped C's least eigenvalue.)
        if _cholesky_(A) == 0 and float(A.diagonal().min()) > 1e-7 * math.sqrt(scale):
            return Whitening(A.tril_(), "cholesky", d)
        _restore(A, diagonal)
    e, Q = torch.linalg.eigh(A)
    del A
    floor = damping[-1] * scale
    root = e.clamp(min=0).add(floor).sqrt()
    return Whitening(Q * root, "eigh", damping[-1], (Q / root).T)


def whitened_decomposition(W: torch.Tensor, m: Moments, damping: tuple[float, ...] = DAMPING,
                           out_weight: torch.Tensor | None = None, *, overwrite: bool = False
                           ) -> tuple[Decomposition, dict[str, Any]]:
    """Factors of ``W`` (m x n) minimising output error on the calibration rows.

    Without sequential statistics: SVD of ``W S`` with ``S`` from ``X^T X``. With them (``m.hh``): the
    least-squares map ``W* = W (X^T X^) (X^^T X^)^-1`` whitened by ``X^^T X^``. ``info`` holds the
    whitening method, damping, and the irreducible and total output energy (for error estimates).

    ``out_weight`` (m positive values: a diagonal output-side Fisher, how much each output unit's error
    costs the model's loss) weights the output error per unit: the SVD is of ``diag(sqrt w) W S`` and the
    singular values then measure the weighted error, on one scale across layers. An ``m x m`` positive
    definite ``out_weight`` ``G`` (the output gradients' second moment, KFAC's output factor) weights it by
    ``G^1/2``: errors along output directions the loss is sensitive to together count together.

    ``overwrite``: the moments are used once (the streamed path): the whitened one (float64) becomes its
    factor in place and is released from ``m`` (no n x n matrix beyond it; the same results).
    """
    out_dtype = compute_dtype(W.dtype)
    seq = m.hh is not None
    # Moments and whitening are float64 (sums of many rows, ill-conditioned); the products with the weight and
    # the SVD run in the weight's compute dtype, as plain SVD does (float64 SVDs are about 5x slower on CPU).
    # The sequential map keeps float64: it multiplies by the inverse of an ill-conditioned moment.
    Wd = W.detach().to(torch.float64 if seq else out_dtype)
    with linalg_threads():  # dense factorizations: one thread unless the user chose (core.threads)
        root, root_inv = _output_root(out_weight, Wd.device)
        lift = (lambda M: M) if root is None else (lambda M: root.to(M.dtype) @ M) if root.dim() == 2 else \
            (lambda M: root[:, None].to(M.dtype) * M)
        total = _energy(lift(Wd), m.xx)  # ||W X||^2 of the original layer (weighted), before C is overwritten
        C = m.hh if seq else m.xx
        if overwrite:
            m.xx = m.hh = None
        wh = whitening(C, damping, overwrite=overwrite)
        del C
        # W* S = W C_xh C^-1 S = W C_xh S^-T, since C = S S^T.
        A = lift(wh.over(Wd @ m.xh, transpose=True) if seq else wh.times(Wd))
        # The factor in the factors' dtype, its float64 original freed before the SVD (the peak of a wide layer).
        right = wh.inverse if wh.inverse is not None else wh.S.to(out_dtype)
        triangular, method, ridge = wh.inverse is None, wh.method, wh.damping
        del wh
        U, S, Vh = torch.linalg.svd(A.to(out_dtype), full_matrices=False)
    S = S.double()
    floor = max(0.0, total - float(S.square().sum())) if seq else 0.0  # ||W X - W* X^||^2
    dec = Decomposition(U.to(out_dtype), S.to(out_dtype), Vh.to(out_dtype),
                        None if triangular else right.to(out_dtype),
                        left_inv=None if root_inv is None else root_inv.to(out_dtype),
                        right_tri=right if triangular else None)
    info = {"whitening": method, "damping": ridge, "output_energy": total, "floor": floor, "rows": m.rows}
    return dec, info


def _energy(W: torch.Tensor, C: torch.Tensor) -> float:
    """``trace(W C W^T)`` in ``W``'s dtype, a block of columns of ``C`` at a time (no copy of ``C``)."""
    return sum(float(((W @ C[:, j:j + CHOLESKY_BLOCK].to(W.dtype)) * W[:, j:j + CHOLESKY_BLOCK]).sum())
               for j in range(0, C.shape[1], CHOLESKY_BLOCK))


def _output_root(weight: torch.Tensor | None, device: torch.device
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(G^1/2, G^-1/2)`` of an output weighting: elementwise for a vector, by eigendecomposition for a
    symmetric positive definite matrix (float64: its small eigenvalues are inverted)."""
    if weight is None:
        return None, None
    G = weight.to(device, torch.float64)
    if G.dim() == 1:
        return G.sqrt(), G.rsqrt()
    lam, Q = torch.linalg.eigh((G + G.T) / 2)
    lam = lam.clamp(min=float(lam.max()) * 1e-12)
    return (Q * lam.sqrt()) @ Q.T, (Q * lam.rsqrt()) @ Q.T


def embedding_decomposition(E: torch.Tensor, m: Moments, uniform_share: float = UNIFORM_TOKEN_SHARE
                            ) -> tuple[Decomposition, dict[str, Any]]:
    """Factors of an embedding table ``E`` (tokens x dim) minimising the expected error of a looked-up
    row, over tokens drawn from the calibration frequencies mixed with ``uniform_share`` of uniform.

    With ``p`` those token probabilities, the SVD of ``diag(sqrt p) E`` gives the subspace; un-weighting
    the left factor makes every row's approximation its projection onto that subspace, so a token that
    calibration never saw keeps its best approximation in it rather than being dropped.
    """
    if not 0 < uniform_share <= 1:  # 0 would leave unseen tokens weightless: no way back to their rows
        raise CompressorError(f"uniform_share {uniform_share} is outside (0, 1]", "use e.g. 0.1")
    out_dtype = compute_dtype(E.dtype)
    counts = m.tokens.to(E.device)
    p = (1 - uniform_share) * counts / counts.sum().clamp(min=1) + uniform_share / len(counts)
    root = p.sqrt()
    with linalg_threads():
        U, S, Vh = torch.linalg.svd((root[:, None] * E.detach().double()).to(out_dtype), full_matrices=False)
    dec = Decomposition(U, S, Vh, left_inv=(1 / root).to(out_dtype))
    info = {"whitening": f"token frequency ({uniform_share:g} uniform share)",
            "output_energy": float(S.double().square().sum()), "floor": 0.0, "rows": m.rows}
    return dec, info


def held_out_errors(dec: Decomposition, C: torch.Tensor) -> torch.Tensor:
    """``e[r] = ||(W - W_r) X||^2`` for ``r = 0..len(S)``, over rows ``X`` whose second moment is ``C`` (rows the
    factors were not fit on), with ``W_r`` the rank-``r`` factors of the whitened decomposition ``dec``.

    ``W - W_r = sum_{i >= r} u_i s_i v_i^T S^-1`` with orthonormal ``u_i``, so ``e[r] = sum_{i >= r} s_i^2 d_i``,
    ``d_i = v_i^T S^-1 C S^-T v_i``: every rank's error from one product, no factors formed."""
    D = dec.to_input(dec.Vh.float())
    d = ((D @ C.float()) * D).sum(1).double()
    tail = (dec.S.double().square() * d).flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)])


def output_error(dec: Decomposition, info: dict[str, Any], rank: int) -> float:
    """Estimated relative output error ``||W X - W' X^|| / ||W X||`` of the layer at ``rank``."""
    if "output_energy" not in info or info["output_energy"] <= 0:
        return float("nan")
    tail = float(dec.S[rank:].double().square().sum())
    return math.sqrt(min(1.0, (info["floor"] + tail) / info["output_energy"]))


def accumulate(acc: Moments, module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Add one call of ``module`` on input ``x`` to its statistics ``acc``: token counts for an embedding,
    else ``X^T X`` of its input rows (padding left out by ``mask``, the batch's attention mask). Layers
    with many rows per batch (convs at high resolution) use a fixed random subset of ``ROWS_PER_FEATURE``
    rows per input feature, weighted up to the full count. Every calibrated path (in memory, or streamed
    block by block) collects its statistics through this one function."""
    h = handler_for(module)
    if h.statistics == "tokens":
        ids = x
        if mask is not None and tuple(ids.shape) == tuple(mask.shape):
            ids = ids[mask.to(torch.bool)]
        acc.add_tokens(ids, module.num_embeddings)
        return
    rows = h.input_rows(module, x, mask)
    if rows is not None:
        keep = ROWS_PER_FEATURE * rows.shape[1]
        if rows.shape[0] > keep:
            pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:keep]
            acc.add(rows[pick.to(rows.device)], weight=rows.shape[0] / keep)
        else:
            acc.add(rows)


def decompose(module: nn.Module, mom: Moments, damping: tuple[float, ...] = DAMPING,
              handler: LayerHandler | None = None, out_weight: torch.Tensor | None = None, *,
              overwrite: bool = False) -> tuple[Decomposition, dict[str, Any]]:
    """The data-aware factors of one layer from its statistics: token-weighted for an embedding, whitened
    for a layer the data reached, plain SVD for one it did not. ``handler``: the kind to factor it as
    (an alternative's), default the module's own; ``overwrite``: ``mom`` is not used again
    (:func:`whitened_decomposition`)."""
    h = handler if handler is not None else handler_for(module)
    if mom.tokens is not None:
        return embedding_decomposition(h.weight_matrix(module), mom)
    if mom.xx is None:
        return plain_decomposition(module)
    return whitened_decomposition(h.weight_matrix(module), mom, damping, out_weight, overwrite=overwrite)


def plain_decomposition(module: nn.Module) -> tuple[Decomposition, dict[str, Any]]:
    """The plain SVD of a layer the calibration data never reached (nothing to whiten by)."""
    plain = "none (not reached by the calibration data: plain SVD)"
    return svd(handler_for(module).weight_matrix(module)), {"whitening": plain}


def damping_from(damping: tuple[float, ...], ridge: float) -> tuple[float, ...]:
    """``damping``'s fallbacks from ``ridge`` on (``ridge`` first)."""
    return (ridge, *(d for d in damping if d > ridge))
