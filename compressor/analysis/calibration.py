"""Data-aware compression: calibration inputs, activation-aware (whitened) factors, sequential correction
and output-error rank budgets.

    plan = compressor.analyze(model, target=0.4, calibration=batches)   # batches: tensors, tuples or dicts

What is computed, per factorizable layer, from forward hooks (activations are streamed, never stored):

* the input second moment ``C = X^T X`` (rows of ``X`` are tokens / conv patches; padding tokens are left
  out when a batch is a dict with an ``attention_mask``);
* a whitening ``S`` with ``C + damping = S S^T`` (Cholesky; growing damping, then an eigen-decomposition
  with clamped eigenvalues when ``C`` is singular or not positive definite, e.g. dead or duplicated
  features); then ``||(W - W') X|| = ||(W - W') S||``, so the truncated SVD of ``W S`` mapped back by
  ``S^-1`` is the rank-r ``W'`` with the least output error (SVD-LLM);
* sequential correction: layers are refit in execution order on the inputs ``X^`` produced by the
  already-compressed layers before them, against the ORIGINAL outputs ``W X``: the best rank-r ``W'`` for
  ``||W X - W' X^||`` is the whitened truncation (by ``X^``) of the least-squares map
  ``W* = W (X^T X^)(X^^T X^)^-1``, so later layers absorb part of the earlier truncation error;
* sensitivity: each layer is truncated alone and the change of the model's output measured, which scales
  its whitened error curve, so a parameter ``target`` is spent where the model's output loses least. Probe
  factors are fit without a few held-out batches, and a layer's error curve is measured on those batches
  (:func:`held_out_errors`): in sample, a layer with fewer calibration rows than inputs (a CNN's classifier,
  its last 1x1 convs) reproduces the calibration outputs at almost any rank and looked free to truncate. Such
  data-starved layers also choose their ridge on the held-out batches (:data:`RIDGES`).

Embeddings take token ids, whose "second moment" is a token count. Their rows are weighted by how
often text uses each token (calibration frequencies mixed with a uniform share, since held-out text
uses tokens calibration never saw): the SVD of the weighted table picks the rank-r subspace, and every
row, rare ones included, is projected onto it (:func:`embedding_decomposition`). A plain SVD spends
rank on the thousands of tokens real text hardly uses.

The calibration inputs come from :mod:`compressor.data.calibration` (files, text, token streams).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.handlers import LayerHandler, handler_for
from compressor.core.svd import Decomposition, compute_dtype, max_saving_rank, svd
from compressor.core.threads import linalg_threads
from compressor.data.calibration import describe
from compressor.data.inputs import (
    Batch,
    attention_mask,
    call,
    relative_change,
    to_device,
)

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
# A layer fit on fewer calibration rows than this per input feature (a CNN's classifier sees one row per image,
# its last 1x1 convs a few per image) chooses its ridge, relative like DAMPING, from RIDGES by its output error on
# the held-out batches. Measured (160 px, 36 photos, target 0.4): MobileNetV2's classifier and last conv chose 1.0,
# its late 1x1 convs 0.1, and held-out logit cosine rose from 0.802 (DAMPING's 1% everywhere) to 0.844. Choosing
# for every layer instead changed no result on MobileNetV2 or EfficientNet-Lite0 and costs an SVD per candidate.
# 32, not 4: MobileNetV2's late 1x1 convs see 11-16 rows per feature from a few hundred images, too few to fit
# whitened factors that hold on other photos, and at 4 their curves were measured in sample. 40% removed, 160 px,
# calibrated on 72 views of 9 photos, judged on 72 views of 9 others (with choose_on_held_out in both): top-1
# agreement 0.125, logit cosine 0.729 at 4; 0.333, 0.824 at 32 (plain SVD 0.208, 0.785). Without the held-out
# choice (benchmarks/cnn_starved_check.py, 128 px): logit cosine 0.7645 at 4, 0.8289 at 32.
STARVED_ROWS_PER_FEATURE = 32
RIDGES = (1e-2, 1e-1, 1.0, 10.0)
# Layers not probed yet count as this fraction of the least sensitive probed layer's sensitivity (a lower bound:
# the allocation then cuts them at least as much as their true sensitivity would, and probes them if it does).
# MobileNetV2 and EfficientNet-Lite0 at 160 px (targets 0.4, 0.5): 20-25 of 36 layers probed, the same held-out
# logit cosine (+-0.002) as probing all; their sensitivities span 0.08 to 25.
PROBE_MARGIN = 0.25
# Batches a probe runs on (the first held-out ones). Measured at 160 px, targets 0.2-0.5: one batch of 8 photos
# instead of two gave the same held-out quality (logit cosine within +-0.005) at half the probe time.
PROBE_BATCHES = 1
ORIGINALS_BUDGET = 2 << 30
# A sequential refit is a least-squares fit of n weights per output: with fewer than this many calibration
# rows per input feature it fits the calibration set, not the layer (a CNN's classifier sees one row per
# image). Kinds whose handler says refit=False (convs) are never refit; see LayerHandler.refit.
REFIT_ROWS_PER_FEATURE = 4  # bytes of original-model layer inputs kept to halve sequential passes
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


def calibration_info(batches: list[Batch], infos: dict[str, dict[str, Any]], *, sequential: bool, refit: int,
                     hold_out: int, scales: dict[str, float], damping: tuple[float, ...],
                     spatial_layers: Sequence[str], ridges: dict[str, float] | None = None) -> dict[str, Any]:
    """What ``plan.calibration`` records of a calibrated analysis (the same fields on every path).
    ``ridges``: the ridge each data-starved layer chose on held-out batches (none without them)."""
    fallbacks = sorted(n for n, i in infos.items() if i.get("whitening") in ("eigh", "identity"))
    return {**describe(batches), "sequential": sequential, "layers_refit_sequentially": refit,
            "sensitivity_held_out_batches": hold_out,
            "allocation": "output-error x measured sensitivity" if scales else "whitened spectrum",
            "damping": list(damping), "whitening_fallbacks": fallbacks,
            "token_weighted_embeddings": sorted(n for n, i in infos.items()
                                                if i.get("whitening", "").startswith("token frequency")),
            "sensitivity": {n: round(s, 6) for n, s in scales.items()}, "ridges": dict(ridges or {}),
            "spatial_layers": sorted(spatial_layers)}


# -------------------------------------------------------------------------------------------- hooks


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the inputs needed are captured."""


@contextmanager
def _hooks(modules: dict[str, nn.Module], pre=None, post=None) -> Iterator[None]:
    handles = []
    try:
        for name, mod in modules.items():
            if pre is not None:
                handles.append(mod.register_forward_pre_hook(lambda _m, args, n=name: pre(n, args)))
            if post is not None:
                handles.append(mod.register_forward_hook(lambda _m, args, out, n=name: post(n, args, out)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in modes.items():
            m.train(t)


def _forward(model: nn.Module, batch: Batch) -> Any:
    try:
        return call(model, batch)
    except _Stop:
        return None


@dataclass
class Calibrator:
    """Runs calibration passes over one model with hooks; the model's weights are never changed."""

    model: nn.Module
    modules: dict[str, nn.Module]  # factorizable layers, by name
    batches: list[Batch]
    outputs: Sequence[str] | None = None  # the outputs sensitivity compares (None: every float output)
    device: torch.device = field(init=False)
    _traced: tuple[list[list[str]], bool] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        p = next(iter(self.model.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.batches = [to_device(b, self.device) for b in self.batches]

    @property
    def order(self) -> list[list[str]]:
        """Groups of layers reading the same input, in call order."""
        return self._trace()[0]

    @property
    def repeated(self) -> bool:
        """Whether a layer is called more than once per forward."""
        return self._trace()[1]

    def _trace(self) -> tuple[list[list[str]], bool]:
        # One forward, run only when asked: an analysis without sequential refits (a CNN's) never needs it.
        if self._traced is not None:
            return self._traced
        seen: list[tuple[str, int]] = []
        alive = []  # inputs held during the trace, so that no two share a (freed and reused) address

        def pre(name, args):
            x = args[0] if args else None
            alive.append(x)
            seen.append((name, x.data_ptr() if isinstance(x, torch.Tensor) else id(x)))

        with _eval(self.model), _hooks(self.modules, pre=pre):
            call(self.model, self.batches[0])
        names = [n for n, _ in seen]
        repeated = len(names) != len(set(names))
        groups: list[list[str]] = []
        key_of: dict[int, int] = {}
        for name, key in seen:
            if any(name in g for g in groups):
                continue
            if key in key_of:
                groups[key_of[key]].append(name)
            else:
                key_of[key] = len(groups)
                groups.append([name])
        never = [n for n in self.modules if not any(n in g for g in groups)]
        self._traced = (groups + [[n] for n in never], repeated)
        return self._traced

    def _rows(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        mod = self.modules[name]
        return handler_for(mod).input_rows(mod, x, mask)

    def moments(self, hold_out: int = 0) -> tuple[dict[str, Moments], dict[str, Moments] | None]:
        """``X^T X`` of every layer's input on the unchanged model, in one pass over the data; and, with
        ``hold_out``, the same without the first ``hold_out`` batches (None without).

        Layers with many rows per batch (convs at high resolution) use a fixed random subset of
        ``ROWS_PER_FEATURE`` rows per input feature, weighted up to the full count: neighbouring positions
        are nearly duplicates, and the products of all of them dominated calibration time."""
        acc = {name: Moments() for name in self.modules}
        held = None
        mask = None

        def pre(name, args):
            accumulate(acc[name], self.modules[name], args[0], mask)

        order = self.batches[hold_out:] + self.batches[:hold_out]  # the held-out batches last
        with _eval(self.model), _hooks(self.modules, pre=pre):
            for i, b in enumerate(order):
                if hold_out and i == len(order) - hold_out:
                    held = {n: m.copy() for n, m in acc.items()}
                mask = attention_mask(b)
                call(self.model, b)
        return acc, held

    def original_inputs(self, budget_bytes: int) -> dict[str, list[torch.Tensor | None]] | None:
        """Every layer group's input rows on the original model, per batch (one pass), or None when
        they would take more than ``budget_bytes``: then each sequential step recomputes them."""
        firsts = {g[0]: g for g in self.order}
        need = 0

        def size(name, args):
            nonlocal need
            rows = self._rows(name, args[0], mask)
            need += 0 if rows is None else rows.numel() * 4

        store: dict[str, list[torch.Tensor | None]] = {n: [] for n in firsts}

        def keep(name, args):
            rows = self._rows(name, args[0], mask)
            store[name].append(None if rows is None else rows.float())

        mods = {n: self.modules[n] for n in firsts}
        with _eval(self.model), _hooks(mods, pre=size):
            mask = attention_mask(self.batches[0])
            call(self.model, self.batches[0])
        if self.repeated or need * len(self.batches) > budget_bytes:
            return None
        with _eval(self.model), _hooks(mods, pre=keep):
            for b in self.batches:
                mask = attention_mask(b)
                call(self.model, b)
        return store

    def paired_moments(self, group: list[str], replaced: dict[str, nn.Module],
                       originals: dict[str, list[torch.Tensor | None]] | None = None) -> dict[str, Moments]:
        """Moments of ``group``'s input on the original model (X) paired with the model whose layers in
        ``replaced`` run compressed (X^), batch by batch. The members of a group read the same input."""
        acc = {name: Moments() for name in group}
        captured: dict[str, torch.Tensor] = {}
        mods = {n: self.modules[n] for n in group}
        first = group[0]

        def capture(name, args):
            captured[name] = args[0]
            if name == first and not self.repeated:
                raise _Stop

        def swap(name, args, out):
            return replaced[name](args[0])

        with _eval(self.model):
            for i, b in enumerate(self.batches):
                mask = attention_mask(b)
                if originals is None:
                    with _hooks(mods, pre=capture):
                        _forward(self.model, b)
                    x = self._rows(first, captured[first], mask)
                else:
                    x = originals[first][i]
                with _hooks({n: self.modules[n] for n in replaced}, post=swap), _hooks(mods, pre=capture):
                    _forward(self.model, b)
                h = self._rows(first, captured[first], mask)
                if x is not None:
                    for name in group:
                        acc[name].add(x, h)
        return acc

    def joint_errors(self, candidates: dict[str, dict[str, nn.Module]], limit: int) -> dict[str, float]:
        """Relative change of the model's compared outputs when all of a candidate's layers are replaced at once
        (``{candidate: {layer: replacement}}``), over the first ``limit`` calibration batches."""
        batches = self.batches[:limit]
        out: dict[str, float] = {}
        names = sorted({n for replaced in candidates.values() for n in replaced})
        with _eval(self.model):
            # As in prober: what finishes before a candidate's first replaced layer is replayed, not recomputed.
            prefix = self.model if isinstance(self.model, Replay) else \
                _Prefix(self.model, batches[0], [self.modules[n] for n in names])
            with prefix.recording():
                refs = [call(self.model, b) for b in batches]
            order = {n: i for i, n in enumerate(n for g in self.order for n in g)}
            for key, replaced in candidates.items():
                def swap(name, args, _out, replaced=replaced):
                    return replaced[name](args[0])
                first = self.modules[min(replaced, key=order.__getitem__)] if replaced else None
                results = []
                for i, (b, ref) in enumerate(zip(batches, refs, strict=True)):
                    replay = prefix.replaying(first, i) if first is not None else nullcontext()
                    with replay, _hooks({n: self.modules[n] for n in replaced}, post=swap):
                        results.append((call(self.model, b), ref, attention_mask(b)))
                out[key] = relative_change(results, self.outputs)
        return out

    def output_errors(self, replacements: dict[str, nn.Module], limit: int) -> dict[str, float]:
        """Relative change of the model's compared outputs (:func:`compressor.data.inputs.relative_change`)
        when each layer alone is replaced, over the first ``limit`` calibration batches."""
        return self.prober(list(replacements), limit)(replacements)

    def prober(self, names: Sequence[str], limit: int) -> Callable[[dict[str, nn.Module]], dict[str, float]]:
        """:meth:`output_errors` for any of the layers ``names``, as often as asked, after one reference pass.

        Everything the model computes before a probed layer is the same as in the reference pass, so the
        modules that finish before it return their reference outputs instead of running again: each probe
        pays only for the part of the model from its layer on (about half the probe time on MobileNetV2)."""
        batches = self.batches[:limit]
        with _eval(self.model):
            # A model that can start a pass at a layer (an ONNX graph: its onnxruntime segments are no modules
            # to replay) does so; other models replay their modules' outputs.
            prefix = self.model if isinstance(self.model, Replay) else \
                _Prefix(self.model, batches[0], [self.modules[n] for n in names])
            with prefix.recording():
                refs = [call(self.model, b) for b in batches]

        def measure(replacements: dict[str, nn.Module]) -> dict[str, float]:
            out: dict[str, float] = {}
            with _eval(self.model):
                for name, new in replacements.items():
                    results = []
                    for i, (b, ref) in enumerate(zip(batches, refs, strict=True)):
                        with prefix.replaying(self.modules[name], i), \
                                _hooks({name: self.modules[name]}, post=lambda _n, args, _o, new=new: new(args[0])):
                            results.append((call(self.model, b), ref, attention_mask(b)))
                    out[name] = relative_change(results, self.outputs)
            return out
        return measure


@runtime_checkable
class Replay(Protocol):
    """A model that itself replays the part of a forward pass before a layer (as :class:`_Prefix` does for
    torch modules): the k-th forward run in one ``recording()`` is batch k for ``replaying(layer, k)``, in which
    a forward on that batch computes what a full one would, running only from ``layer`` on."""

    def recording(self) -> AbstractContextManager[None]: ...

    def replaying(self, layer: nn.Module, batch: int) -> AbstractContextManager[None]: ...


class _Prefix:
    """Reference outputs of the modules that can stand in for re-running a model's prefix.

    A module qualifies when it is called once per forward, returns a tensor and has no ``forward`` of its
    own instance; for a layer, the outermost qualifying modules that finish before the layer starts (in the
    traced call order) are replayed from their reference outputs. Models that call a module more than once
    per forward are run in full (the call order would not say which call precedes which). Only the modules
    some probed layer replays are recorded, not every activation of the model."""

    def __init__(self, model: nn.Module, batch: Batch, layers: Sequence[nn.Module]) -> None:
        self.children = {m: list(m.children()) for m in model.modules()}
        self.root = model
        span: dict[nn.Module, list[int]] = {}
        tensor_out: set[nn.Module] = set()
        clock = 0
        calls: dict[nn.Module, int] = {}

        def pre(mod, _args):
            nonlocal clock
            calls[mod] = calls.get(mod, 0) + 1
            span[mod] = [clock, -1]
            clock += 1

        def post(mod, _args, out):
            nonlocal clock
            span[mod][1] = clock
            clock += 1
            if isinstance(out, torch.Tensor):
                tensor_out.add(mod)

        handles = [h for m in self.children for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
        try:
            call(model, batch)
        finally:
            for h in handles:
                h.remove()
        self.span = span
        self.usable = {m for m in tensor_out if calls[m] == 1 and "forward" not in m.__dict__} \
            if all(c == 1 for c in calls.values()) else set()
        self.before = {layer: self._before(layer) for layer in layers}
        self.cache: dict[nn.Module, list[torch.Tensor]] = {m: [] for ms in self.before.values() for m in ms}

    def _before(self, layer: nn.Module) -> list[nn.Module]:
        """The outermost usable modules that finish before ``layer`` starts."""
        if layer not in self.span or not self.usable:
            return []
        start, found, stack = self.span[layer][0], [], [self.root]
        while stack:
            m = stack.pop()
            if m in self.usable and m is not self.root and self.span[m][1] < start:
                found.append(m)
            elif m not in self.span or self.span[m][0] < start:  # started before the layer, or a container
                stack.extend(self.children[m])                    # never called itself (a ModuleList): look inside
        return found

    @contextmanager
    def recording(self) -> Iterator[None]:
        # Cloned: a later in-place op (an in-place ReLU, ``x += ...``) may change the returned tensor.
        handles = [m.register_forward_hook(lambda mod, _a, out: self.cache[mod].append(out.clone()))
                   for m in self.cache]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replaying(self, layer: nn.Module, batch: int) -> Iterator[None]:
        skipped = self.before[layer]
        for m in skipped:  # an instance attribute shadows the class's forward; a clone, as when recording
            m.forward = lambda *_a, _m=m, **_k: self.cache[_m][batch].clone()
        try:
            yield
        finally:
            for m in skipped:
                del m.forward


def plain_decomposition(module: nn.Module) -> tuple[Decomposition, dict[str, Any]]:
    plain = "none (not reached by the calibration data: plain SVD)"
    return svd(handler_for(module).weight_matrix(module)), {"whitening": plain}


# ------------------------------------------------------------------------------------ the whole pass


@dataclass
class Calibrated:
    """What ``analyze`` needs from a calibrated analysis."""

    decompositions: dict[str, Decomposition]
    spectra: list  # LayerSpectrum per layer, loss = (sensitivity-scaled) output error curve
    ranks: dict[str, int | None]
    errors: dict[str, float]  # estimated relative output error of each factored layer
    info: dict[str, Any]  # for plan.calibration
    kinds: dict[str, str] = field(default_factory=dict)  # layers factored by an alternative kind
    # Per factored layer the data reached: the factors it takes ("whitened" or "plain") and why (LayerPlan.selection).
    selection: dict[str, dict[str, Any]] = field(default_factory=dict)


def calibrated_analysis(model: nn.Module, modules: dict[str, nn.Module], batches: list[Batch], policy,
                        rank_multiple: int, fixed: dict[str, int | None], *, outputs: Sequence[str] | None = None,
                        sequential: bool = True,
                        sensitivity: bool = True, sensitivity_batches: int = 2,
                        damping: tuple[float, ...] = DAMPING, spatial: bool = True,
                        kinds: dict[str, str] | None = None, factors: dict[str, str] | None = None) -> Calibrated:
    """Whitened decompositions, output-error rank allocation and (optionally) sequential refits.

    ``spatial``: layers with an alternative factorization (a conv's spatial one) take it where its measured
    output error at the policy's operating point is lower; ``kinds`` (a re-derived plan's) fixes each
    layer's kind instead. With held-out batches (a ``target`` with ``sensitivity``), the ranks and each layer's
    factors are chosen on them (:func:`choose_on_held_out`); ``factors`` (a re-derived plan's: ``{layer:
    "whitened" or "plain"}``) fixes the factors instead."""
    from compressor.core.policies import LayerSpectrum, across_layers, allocate, operating_keep
    from compressor.core.rewrite import factor_module

    cal = Calibrator(model, modules, batches, outputs)
    handlers = {name: handler_for(mod) for name, mod in modules.items()}
    decs: dict[str, Decomposition] = {}
    infos: dict[str, dict[str, Any]] = {}
    # Sensitivity is measured on batches the probe factors were not fit on: measured in sample, a layer with
    # fewer calibration rows than inputs (a classifier sees one row per image) looks free to truncate.
    hold_out = sensitivity_batches if sensitivity and across_layers(policy) and \
        len(batches) > sensitivity_batches else 0
    moments, held = cal.moments(hold_out)
    # Data-starved layers choose their ridge on the held-out batches first, so each is decomposed once with it.
    ridges = _starved_ridges(modules, handlers, moments, held, policy, damping[0]) if held is not None else {}
    damp = {name: _from(damping, ridges.get(name, damping[0])) for name in modules}
    for name, mom in moments.items():
        decs[name], infos[name] = decompose(modules[name], mom, damp[name], handlers[name])
    spectra = {name: LayerSpectrum.from_singular_values(name, *handlers[name].weight_matrix(mod).shape,
                                                        decs[name].S) for name, mod in modules.items()}
    chosen = _alternatives(modules, moments, handlers, decs, infos, spectra, operating_keep(policy), damp,
                           spatial, kinds)
    shapes = {name: tuple(handlers[name].weight_matrix(mod).shape) for name, mod in modules.items()}
    spectra = list(spectra.values())

    scales: dict[str, float] = {}
    if sensitivity and across_layers(policy):
        scales = _sensitivities(cal, spectra, modules, handlers, decs, moments, held, policy, rank_multiple, fixed,
                                damp, sensitivity_batches)
    ranks = allocate(policy, spectra, rank_multiple, fixed)
    # The data-aware ranks and factors are one candidate among the plain SVD's and a whitened global threshold's:
    # whichever loses least on the held-out batches is kept (per layer, the factors that lose least there).
    selection: dict[str, Any] = {}
    summary: dict[str, Any] | None = None
    if hold_out and factors is None:
        ranks, factors, selection, summary = choose_on_held_out(cal, modules, handlers, decs, moments, held, spectra,
                                                                ranks, policy, rank_multiple, fixed, damp, hold_out)
    plain = {n for n, f in (factors or {}).items() if f == "plain" and moments[n].xx is not None}
    for name in plain:  # refit on every batch below only the whitened ones; these need no data
        decs[name] = svd(handlers[name].weight_matrix(modules[name]))
        infos[name] = {"whitening": "none (plain SVD chosen on held-out batches)", "rows": moments[name].rows}

    def compressed(name: str) -> bool:
        r = ranks.get(name)
        return r is not None and 1 <= r <= max_saving_rank(*shapes[name])

    # Only whitened layers are refit: embeddings and layers the data never reached keep theirs. When no layer
    # qualifies (a CNN: convs are never refit and its classifier sees too few rows), the passes that collect
    # the original and compressed models' inputs are skipped.
    refittable = {n for n in modules if compressed(n) and infos[n].get("whitening") in ("cholesky", "eigh", "identity")
                  and handlers[n].refit and moments[n].rows >= REFIT_ROWS_PER_FEATURE * shapes[n][1]}
    refit = 0
    if sequential and refittable:
        originals = cal.original_inputs(ORIGINALS_BUDGET)
        replaced: dict[str, nn.Module] = {}
        for group in cal.order:
            todo = [n for n in group if n in refittable]
            if todo and replaced:
                paired = cal.paired_moments(group, replaced, originals)
                for name in todo:
                    h, mod, p = handlers[name], modules[name], paired[name]
                    if name in chosen:  # the alternative's own moments (see LayerHandler.moments)
                        p = Moments(h.moments(mod, p.xx), h.moments(mod, p.hh), h.moments(mod, p.xh), p.rows)
                    decs[name], infos[name] = whitened_decomposition(h.weight_matrix(mod), p, damp[name])
                    refit += 1
            for name in group:
                if compressed(name):
                    replaced[name] = factor_module(modules[name], ranks[name], decs[name], handlers[name].kind)
    errors = {n: output_error(decs[n], infos[n], ranks[n]) if n not in plain else
              plain_output_error(decs[n], moments[n].xx if n not in chosen else
                                 handlers[n].moments(modules[n], moments[n].xx), ranks[n])
              for n in modules if compressed(n)}
    info = calibration_info(batches, infos, sequential=sequential, refit=refit, hold_out=hold_out, scales=scales,
                            damping=damping, spatial_layers=chosen, ridges=ridges)
    if summary is not None:
        info["selection"] = summary
    elif factors is not None:
        info["selection"] = {"chosen": "as the plan records it (re-derived)"}
    layer_choice = {n: {"factors": (factors or {}).get(n, "whitened"), **selection.get(n, {})}
                    for n in modules if compressed(n) and moments[n].xx is not None}
    return Calibrated(decs, spectra, ranks, errors, info, chosen, layer_choice)


# ------------------------------------------------------------------------ choosing on held-out batches

# The candidates choose_on_held_out compares: (ranks, factors). Ranks: the data-aware allocation (output error x
# measured sensitivity); one whitened energy threshold for every layer (the fraction of its whitened spectrum's
# energy each keeps, chosen to meet the budget: the cut spread over all layers); the whitened (absolute output)
# energy lost per parameter saved, allocated globally; or the plain SVD's relative spectral energy. Factors: whitened
# for every layer, plain SVD for every layer, or per layer the one with the lower held-out output error at its rank.
# Listed in order of preference on a tie.
CANDIDATES = (("data-aware", "whitened"), ("data-aware", "per layer"), ("whitened threshold", "whitened"),
              ("whitened threshold", "per layer"), ("whitened global", "whitened"), ("whitened global", "per layer"),
              ("plain", "plain"), ("plain", "per layer"))


def plain_output_error(dec: Decomposition, C: torch.Tensor, rank: int) -> float:
    """Relative output error ``||(W - W_r) X|| / ||W X||`` of any factors ``dec`` at ``rank`` over rows with second
    moment ``C`` (:func:`held_out_errors`), for factors whose singular values do not measure it (a plain SVD's)."""
    curve = held_out_errors(dec, C)
    return math.sqrt(float(curve[rank]) / float(curve[0])) if float(curve[0]) > 0 else float("nan")


def choose_on_held_out(cal: Calibrator, modules: dict[str, nn.Module], handlers: dict, decs: dict[str, Decomposition],
                       moments: dict[str, Moments], held: dict[str, Moments], spectra: list, ranks: dict,
                       policy, rank_multiple: int, fixed: dict[str, int | None], damp: dict[str, tuple[float, ...]],
                       hold_out: int) -> tuple[dict, dict[str, str], dict[str, dict[str, Any]], dict[str, Any]]:
    """The :data:`CANDIDATES` (ranks, factors) whose compressed model changes the outputs least on the first
    ``hold_out`` calibration batches; returns its ranks, each layer's factors (``"whitened"`` or ``"plain"``),
    why, per layer, and a summary for ``plan.calibration``.

    Every candidate's whitened factors are fit without the held-out batches (``held``: the moments of the others),
    so a layer that data cannot pin down (a classifier seeing one row per image) is judged on data it did not fit:
    in sample, whitened factors always beat the plain SVD. The plain SVD and the whitened global threshold are
    candidates, so on the held-out batches the result is never worse than either at the same budget. The caller
    refits the chosen whitened factors on every batch (the ranks and factor kinds stay)."""
    from compressor.core.policies import LayerSpectrum, allocate, energy_threshold_budget
    from compressor.core.rewrite import factor_module

    shapes = {sp.name: (sp.m, sp.n) for sp in spectra}
    plain_decs = {n: svd(handlers[n].weight_matrix(mod)) for n, mod in modules.items()}
    # The layers the data reached (whitened; not embeddings) and, computed only for the layers some candidate cuts,
    # their whitened factors fit without the held-out batches and both factors' held-out error curves.
    reached = {n for n in modules if moments[n].xx is not None and held[n].xx is not None}
    fit_decs: dict[str, Decomposition] = {}
    curves: dict[str, dict[str, torch.Tensor]] = {}

    def fit_dec(name: str) -> Decomposition:
        if name not in fit_decs:
            h, mod, fit = handlers[name], modules[name], held[name]
            xx_fit, xx_out = fit.xx, moments[name].xx - fit.xx
            if h.kind != handler_for(mod).kind:  # an alternative kind's own moments (LayerHandler.moments)
                xx_fit, xx_out = h.moments(mod, xx_fit), h.moments(mod, xx_out)
            fit_decs[name], _ = whitened_decomposition(h.weight_matrix(mod), Moments(xx_fit, rows=fit.rows),
                                                       damp[name])
            curves[name] = {f: held_out_errors(d, xx_out) for f, d in (("whitened", fit_decs[name]),
                                                                        ("plain", plain_decs[name]))}
        return fit_decs[name]

    def absolute(name: str) -> LayerSpectrum:
        sq = decs[name].S.detach().double().cpu().square()
        tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])
        return LayerSpectrum(name, *shapes[name], decs[name].S.detach().cpu(), tail)

    whitened = [LayerSpectrum.from_singular_values(n, *shapes[n], decs[n].S) for n in shapes]
    allocations = {
        "data-aware": ranks,
        "whitened threshold": {**fixed, **(energy_threshold_budget(whitened, policy.target, rank_multiple, fixed)
                                           or {})},
        "whitened global": allocate(policy, [absolute(n) for n in shapes], rank_multiple, fixed),
        "plain": allocate(policy, [LayerSpectrum.from_singular_values(n, *shapes[n], plain_decs[n].S) for n in shapes],
                          rank_multiple, fixed),
    }

    def cut(r: int | None, name: str) -> bool:
        return r is not None and 1 <= r <= max_saving_rank(*shapes[name])

    def errors_at(name: str, r: int) -> dict[str, float]:  # relative held-out output error of both factors
        fit_dec(name)
        return {f: math.sqrt(float(c[r]) / float(c[0])) if float(c[0]) > 0 else float("nan")
                for f, c in curves[name].items()}

    def factors_of(alloc: dict, mode: str) -> dict[str, str]:
        out = {}
        for name, r in alloc.items():
            if name in reached and cut(r, name):
                e = errors_at(name, r)
                out[name] = mode if mode != "per layer" else ("plain" if e["plain"] < e["whitened"] else "whitened")
        return out

    built: dict[tuple[str, int, str], nn.Module] = {}

    def replacement(name: str, r: int, f: str) -> nn.Module:
        if (name, r, f) not in built:
            dec = plain_decs[name] if f == "plain" else fit_dec(name) if name in reached else decs[name]
            built[name, r, f] = factor_module(modules[name], r, dec, handlers[name].kind)
        return built[name, r, f]

    candidates, seen, same, listed = {}, {}, {}, []
    for alloc_name, mode in CANDIDATES:
        alloc = allocations[alloc_name]
        if not any(cut(r, n) for n, r in alloc.items()):  # a threshold that cannot meet the budget
            continue
        fs = factors_of(alloc, mode)
        key = f"{alloc_name} ranks, {mode} factors"
        listed.append(key)
        content = (tuple(sorted((n, r) for n, r in alloc.items() if cut(r, n))), tuple(sorted(fs.items())))
        if content in seen:  # the same model as an earlier candidate: measured once, reported under both
            same[key] = seen[content]
            continue
        seen[content] = key
        candidates[key] = (alloc_name, fs, {n: replacement(n, r, fs.get(n, "whitened")) for n, r in alloc.items()
                                            if cut(r, n)})
    if not candidates:  # the budget is met without cutting any layer the allocations move (overrides)
        return ranks, {}, {}, {"chosen": "none: no candidate cuts a layer"}
    measured = cal.joint_errors({k: c[2] for k, c in candidates.items()}, hold_out)
    best = min(measured, key=measured.get)  # the first listed of equal ones
    alloc_name, fs, _ = candidates[best]
    why = {}
    for name, f in fs.items():
        r = allocations[alloc_name][name]
        e = errors_at(name, r)
        per_layer = f"; at rank {r} its {f} factors lose less there" if best.endswith("per layer factors") else ""
        why[name] = {"ranks": alloc_name, "held_out_error": {k: round(v, 6) for k, v in e.items()},
                     "why": f"candidate '{best}' changed the outputs least on the held-out batches{per_layer}"}
    summary = {"held_out_batches": hold_out, "fit_batches": len(cal.batches) - hold_out,
               "how": f"every candidate's factors fit on calibration batches {hold_out + 1}..{len(cal.batches)}, "
                      f"compared by the relative change of the model's outputs on batches 1..{hold_out}; the chosen "
                      "ranks and factor kinds are then refit on every batch",
               "candidates": {k: round(measured[same.get(k, k)], 6) for k in listed}, "chosen": best}
    return allocations[alloc_name], fs, why, summary


def _probe_rank(m: int, n: int, target: float) -> int:
    """The rank a uniform cut of ``target`` of the parameters gives an ``m x n`` layer (at least 1, saving)."""
    return max(1, min(max_saving_rank(m, n), int((1 - target) * m * n / (m + n))))


def _starved(fit: Moments, n: int) -> bool:
    return fit.xx is not None and fit.rows < STARVED_ROWS_PER_FEATURE * n


def _starved_ridges(modules: dict[str, nn.Module], handlers: dict, moments: dict[str, Moments],
                    held: dict[str, Moments], policy, default: float) -> dict[str, float]:
    """``{layer: ridge}`` for the data-starved layers whose held-out error chose a ridge other than ``default``
    (:func:`held_out_ridge` at the probe rank, the factors fit without the held-out batches)."""
    out = {}
    for name, mod in modules.items():
        W = handlers[name].weight_matrix(mod)
        m, n = W.shape
        if _starved(held[name], n):
            fit = held[name].xx
            ridge = held_out_ridge(W, fit, moments[name].xx - fit, _probe_rank(m, n, policy.target),
                                   _from(RIDGES, default))
            if ridge != default:
                out[name] = ridge
    return out


def _sensitivities(cal: Calibrator, spectra: list, modules: dict[str, nn.Module], handlers: dict, decs: dict,
                   moments: dict[str, Moments], held: dict[str, Moments] | None, policy, rank_multiple: int,
                   fixed: dict[str, int | None], damp: dict[str, tuple[float, ...]], batches: int) -> dict[str, float]:
    """Each probed layer is truncated alone at the rank a uniform cut would give it, and how much the model's
    output moves (over the first :data:`PROBE_BATCHES` of the ``batches`` held-out batches) per unit of the
    layer's own output error scales its error curve (``spectra``'s losses, in place). Returns those scales.

    Only layers the allocation may cut are probed: one not probed yet counts as :data:`PROBE_MARGIN` times as
    sensitive as the least sensitive probed layer, and the allocation is repeated until it cuts no unprobed
    layer. While that is a lower bound of the unprobed layers' sensitivity, the ranks are those all probes
    would give. A data-starved layer's probe factors are fit without the probe batches and its curve is
    measured on them (:func:`held_out_errors`): in sample it looked free to truncate."""
    from compressor.core.policies import allocate
    from compressor.core.rewrite import factor_module

    layers = {sp.name: sp for sp in spectra if sp.name not in fixed}
    curves = {name: sp.loss for name, sp in layers.items()}  # unscaled; held-out once a starved layer is probed
    scales: dict[str, float] = {}
    measure = cal.prober(list(layers), min(batches, PROBE_BATCHES))
    todo = [n for n, r in allocate(policy, spectra, rank_multiple, fixed).items() if n in layers and r is not None]
    while todo:
        probes = {}
        for name in todo:
            sp, h, mod, dec = layers[name], handlers[name], modules[name], decs[name]
            r = _probe_rank(sp.m, sp.n, policy.target)
            if held is not None and _starved(held[name], sp.n):  # fit without the probe batches, measured on them
                fit = held[name]
                xx_fit, xx_out = fit.xx, moments[name].xx - fit.xx
                if h.kind != handler_for(mod).kind:  # an alternative kind's own moments (LayerHandler.moments)
                    xx_fit, xx_out = h.moments(mod, xx_fit), h.moments(mod, xx_out)
                dec, _ = whitened_decomposition(h.weight_matrix(mod), Moments(xx_fit, rows=fit.rows), damp[name])
                curve = held_out_errors(dec, xx_out)
                curves[name] = curve / max(float(curve[0]), 1e-300)
            probes[name] = (r, factor_module(mod, r, dec, h.kind))
        moved = measure({n: new for n, (_, new) in probes.items()})
        for name, (r, _) in probes.items():
            # Scaled so the curve passes through the measured point (a floor: a curve that is ~0 there must not
            # make the layer look free).
            scales[name] = moved[name] / max(float(curves[name][r]), 1e-12)
        floor = min(scales.values()) * PROBE_MARGIN
        for name, sp in layers.items():
            sp.loss = curves[name] * scales.get(name, floor)
        ranks = allocate(policy, spectra, rank_multiple, fixed)
        todo = [n for n, sp in layers.items() if n not in scales and ranks.get(n) is not None
                and ranks[n] <= max_saving_rank(sp.m, sp.n)]
    return scales


def _from(damping: tuple[float, ...], ridge: float) -> tuple[float, ...]:
    """``damping``'s fallbacks from ``ridge`` on (``ridge`` first)."""
    return (ridge, *(d for d in damping if d > ridge))


def held_out_ridge(W: torch.Tensor, fit: torch.Tensor, out: torch.Tensor, rank: int, ridges: Sequence[float]
                   ) -> float:
    """Of ``ridges`` (increasing, relative to the mean diagonal of ``fit``), the one whose rank-``rank`` whitened
    factors of ``W``, fit on rows with second moment ``fit``, lose least on rows with second moment ``out``
    (the search stops once the error rises).

    In output space: those factors are ``W_r = U_r U_r^T W`` with ``U`` the eigenvectors of ``W (C + d I) W^T``
    (the left singular vectors of ``W S``), so the held-out error is ``sum_{i > r} u_i^T W C_out W^T u_i``: one
    m x m eigendecomposition per ridge, no Cholesky and no SVD. Wide layers only (m <= n, a classifier, 1x1
    convs that narrow); a tall one takes a whitened decomposition per ridge, which its small n makes cheap."""
    m, n = W.shape
    scale = float(fit.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0:
        return ridges[0]
    best: tuple[float, float] | None = None
    with linalg_threads():
        Wf = W.detach().float()
        if m <= n:
            G, G2, H = Wf @ fit.float() @ Wf.T, Wf @ Wf.T, Wf @ out.float() @ Wf.T
        for ridge in ridges:
            if m <= n:
                dropped = torch.linalg.eigh(G + ridge * scale * G2).eigenvectors[:, :m - rank]  # ascending
                err = float((dropped.T @ H * dropped.T).sum())
            else:
                dec, _ = whitened_decomposition(W, Moments(fit), _from(DAMPING, ridge))
                err = float(held_out_errors(dec, out)[rank])
            if best is not None and err >= best[1]:
                break
            best = ridge, err
    return best[0]


def _alternatives(modules: dict[str, nn.Module], moments: dict[str, Moments], handlers: dict, decs: dict,
                  infos: dict, spectra: dict, keep: float | None, damping: dict[str, tuple[float, ...]], spatial: bool,
                  kinds: dict[str, str] | None) -> dict[str, str]:
    """``{layer: alternative kind}`` for the layers factored another way; ``handlers``, ``decs``, ``infos``
    and ``spectra`` are updated to it. An alternative's whitening may be approximate (the spatial one ignores
    correlations across kernel columns), so its loss curve is rescaled to the true output error at the
    operating rank, measured with the full second moment, before the two are compared."""
    from compressor.core.handlers import handler_of_kind
    from compressor.core.policies import LayerSpectrum, operating_rank, prefer_alternative

    chosen = {}
    for name, mod in modules.items():
        mom, base = moments[name], handlers[name]
        if mom.xx is None:
            continue
        wanted = kinds.get(name) if kinds is not None else None
        options = ([wanted] if wanted not in (None, base.kind) else []) if kinds is not None else \
            (base.alternatives if spatial and keep is not None else ())
        for kind in options:
            alt = handler_of_kind(kind)
            if not alt.accepts(mod):
                continue
            A = alt.weight_matrix(mod)
            dec, info = whitened_decomposition(A, Moments(alt.moments(mod, mom.xx), rows=mom.rows), damping[name])
            sp = LayerSpectrum.from_singular_values(name, *A.shape, dec.S)
            r = operating_rank(sp, keep if keep is not None else 0.5)  # None: a plan's kind, only rescaled
            up, down = dec.factors(r)
            W = base.weight_matrix(mod).detach().double()
            delta = W - alt.kernel((up @ down).double(), mod.weight.shape).reshape(W.shape)
            true = float((delta @ mom.xx * delta).sum()) / max(float((W @ mom.xx * W).sum()), 1e-300)
            approx = float(sp.loss[r])
            sp.loss = sp.loss * (true / approx) if approx > 0 else sp.loss
            if kinds is not None or prefer_alternative(spectra[name], sp, keep):
                handlers[name], decs[name], infos[name], spectra[name] = alt, dec, info, sp
                chosen[name] = kind
    return chosen
