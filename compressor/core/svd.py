"""The linear algebra: weight matrices, their SVD, and the truncated factors.

Every supported weight is viewed as a matrix ``W`` of shape ``(m, n)`` by its layer handler
(:mod:`compressor.core.handlers`): ``nn.Linear`` as stored, a conv as ``(out, in * prod(kernel))``, an
embedding table as stored, transformers' ``Conv1D`` transposed.

A rank-``r`` factorization replaces ``m * n`` weights by ``r * (m + n)``; it saves parameters only when
``r < m * n / (m + n)`` (the break-even rank). The pivoted form (:func:`pivoted_factors`) stores the same
rank-``r`` matrix in ``r * (m + n - r)`` weights, and saves parameters at every rank below ``min(m, n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import scipy.linalg
import torch

from compressor.core.errors import CompressorError
from compressor.core.threads import linalg_threads


def break_even_rank(m: int, n: int, pivoted: bool = False) -> float:
    """``m * n / (m + n)``: at this rank or above, two factors hold at least as many weights as ``W``
    (``min(m, n)`` in the pivoted form)."""
    return float(min(m, n)) if pivoted else m * n / (m + n)


def max_saving_rank(m: int, n: int, pivoted: bool = False) -> int:
    """The largest rank whose factors hold strictly fewer weights than the ``m x n`` matrix (0 if none);
    ``pivoted``: in the pivoted form, whose every rank below ``min(m, n)`` saves."""
    return min(m, n) - 1 if pivoted else (m * n - 1) // (m + n)


def factored_params(m: int, n: int, rank: int, pivoted: bool = False) -> int:
    """Weights of a rank-``rank`` factorization of an ``m x n`` matrix: ``rank * (m + n)`` as two factors,
    ``rank * (m + n - rank)`` in the pivoted form (the degrees of freedom of a rank-``rank`` matrix)."""
    return rank * (m + n - rank) if pivoted else rank * (m + n)


def pivoted_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pivoted form of ``W' = up @ down`` (``(m, r)`` and ``(r, n)``): ``(rows, coefficients, positions)``
    with ``rows`` ``r`` rows of ``W'`` (``(r, n)``), ``coefficients`` the other ``m - r`` rows as combinations
    of those (``(m - r, r)``), and ``positions`` the row of ``W'`` each of ``cat([rows, coefficients @ rows])``
    is: ``W'[positions] = cat([rows, coefficients @ rows])``. The ``r`` rows are chosen by QR with column
    pivoting of ``up^T`` (Businger-Golub), which keeps the ``r x r`` block that is inverted well conditioned;
    a rank-deficient ``up`` is handled by the pseudo-inverse. Computed in float64, returned in ``up``'s dtype."""
    r = up.shape[1]
    u, d = up.detach().double().cpu(), down.detach().double().cpu()
    _q, _r, perm = scipy.linalg.qr(u.T.numpy(), mode="economic", pivoting=True)
    perm = torch.from_numpy(perm.copy())
    u1, u2 = u[perm[:r]], u[perm[r:]]
    coeffs, info = torch.linalg.solve_ex(u1.T, u2.T)  # C = u2 @ u1^-1, as the solve of u1^T C^T = u2^T
    coeffs = coeffs.T if int(info) == 0 and bool(torch.isfinite(coeffs).all()) else u2 @ torch.linalg.pinv(u1)
    out = {"dtype": up.dtype, "device": up.device}
    return (u1 @ d).to(**out), coeffs.to(**out), perm.to(up.device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """SVDs run in float32, or float64 for float64 weights: half precision is too coarse for them."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Decomposition:
    """``W = diag(left_inv) U diag(S) Vh @ right_inv``; ``left_inv`` and ``right_inv`` are None for a
    plain SVD of ``W`` (``right_tri``: ``right_inv`` given as the triangular ``R`` it inverts).

    Activation-aware methods decompose ``W @ R`` for an invertible ``R`` built from calibration data;
    then ``right_inv = R^-1`` maps the factors back, and the singular values measure output error.
    Embeddings weight their rows instead (``D W``, ``D`` diagonal from token frequencies):
    ``left_inv`` is the vector ``1 / diag(D)``. Output-side weightings do the same with a diagonal (a vector
    ``left_inv``) or a full matrix ``L`` (``left_inv = L^-1``, a matrix).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    right_inv: torch.Tensor | None = None
    left_inv: torch.Tensor | None = None
    # Set when ``S`` holds only the leading singular values (a randomized SVD): ``||W||_F**2``, the total
    # energy, and how the triplets were found and checked (recorded in the plan).
    total_energy: float | None = None
    check: dict | None = None
    # A lower-triangular ``R`` itself, instead of ``right_inv``: ``R^-1`` is applied by a triangular solve and
    # never formed (an n x n inverse is as large as ``R``, and only ``rank`` rows of ``Vh R^-1`` are needed).
    right_tri: torch.Tensor | None = None
    # Set by :meth:`truncated`: the largest rank ``factors`` can still give.
    kept_rank: int | None = None

    def truncated(self, rank: int) -> Decomposition:
        """This decomposition for ranks up to ``rank`` only: the leading ``rank`` triplets, ``Vh`` already mapped
        back to the input space (the ``n x n`` whitening factor dropped), ``S`` whole (the error curve). Why: a
        decoder's analysis keeps a decomposition per factored layer until the rewrite; whole float64 ones grew
        Gemma 3 270M's peak by 1.5 GB."""
        return Decomposition(self.U[:, :rank].clone(), self.S.clone(), self.to_input(self.Vh[:rank]).clone(),
                             left_inv=self.left_inv, total_energy=self.total_energy, check=self.check,
                             kept_rank=rank)

    def to_input(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ R^-1``: rows of the (whitened) right factor mapped back to the layer's own input space."""
        if self.right_tri is not None:
            return torch.linalg.solve_triangular(self.right_tri.to(rows.dtype), rows, upper=False, left=False)
        return rows if self.right_inv is None else rows @ self.right_inv.to(rows.dtype)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` of shapes ``(m, rank)`` and ``(rank, n)`` with ``up @ down`` the best rank-``rank``
        approximation. The singular values are split evenly (``sqrt(S)`` on each side), which keeps the
        two factors on the same scale: better for fine-tuning and for per-channel quantization."""
        if self.kept_rank is not None and rank > self.kept_rank:
            raise ValueError(f"rank {rank} asked of a decomposition truncated to rank {self.kept_rank}")
        root = self.S[:rank].sqrt()
        up = self.U[:, :rank] * root
        down = self.to_input(root[:, None] * self.Vh[:rank])
        if self.left_inv is not None:
            up = self.left_inv @ up if self.left_inv.dim() == 2 else self.left_inv[:, None] * up
        return up, down


def exact_svd_bytes(m: int, n: int, itemsize: int = 4) -> int:
    """Memory an exact thin SVD of an ``m x n`` matrix takes: the matrix, LAPACK's working copy, ``U``, ``S``
    and ``Vh`` (measured peaks of torch.linalg.svd are close to this)."""
    k = min(m, n)
    return itemsize * (2 * m * n + k * (m + n) + k)


def available_memory() -> int:
    """Bytes this process may still use: the system's available memory, or the address-space limit if lower."""
    import resource

    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:  # not Linux: no bound known from here
        pass
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return min(limits, default=2**63)


def check_svd_fits(name: str, m: int, n: int, itemsize: int = 4) -> None:
    """Refuse (one line) an exact SVD that cannot run, before its matrix is read: LAPACK's workspace (about
    ``4 k^2`` elements for gesdd, ``k = min(m, n)``) counted in 32-bit integers overflows past ``k`` of about
    23170 (torch then fails with an internal assert), and the memory it takes must be available."""
    k = min(m, n)
    if 4 * k * k + 4 * k + max(m, n) > 2**31 - 1:
        raise CompressorError(f"layer '{name}' ({m}x{n}) is too large for an exact SVD (LAPACK's 32-bit "
                              "workspace overflows past about 23170 on the shorter side)",
                              "pass svd='randomized' with max_rank=N, or exclude the layer",
                              cli_fix=f"pass --svd randomized --max-rank 256, or --exclude '{name}'")
    need, have = exact_svd_bytes(m, n, itemsize), available_memory()
    if need > have:
        raise CompressorError(f"layer '{name}' ({m}x{n}) needs about {need / 2**30:.1f} GiB for an exact SVD, more "
                              f"than the {have / 2**30:.1f} GiB available", "pass svd='randomized' with max_rank=N, "
                              "or exclude the layer", cli_fix=f"pass --svd randomized --max-rank 256, or --exclude "
                              f"'{name}'")


def svd(matrix: torch.Tensor) -> Decomposition:
    """Thin SVD of ``matrix`` on its own device, in float32 or better, with :func:`linalg_threads`."""
    a = matrix.detach().to(compute_dtype(matrix.dtype))
    with linalg_threads():
        U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    return Decomposition(U, S, Vh)


def energy_kept(S: torch.Tensor, rank: int, total: float | None = None) -> float:
    """Fraction of the total energy (``sum(S**2)``, or ``total`` = ``||W||_F**2`` when ``S`` holds only the
    leading values) held by the first ``rank`` singular values (1.0 for a zero matrix)."""
    sq = S.double().square()
    total = float(sq.sum()) if total is None else total
    if total == 0.0:
        return 1.0
    return float(sq[:rank].sum()) / total


def rank_for_energy(S: torch.Tensor, energy: float, total: float | None = None) -> int:
    """The smallest rank (at least 1) whose kept energy reaches ``energy`` of the total (``sum(S**2)``,
    or ``total`` when ``S`` holds only the leading values; then ``len(S)`` if they do not reach it)."""
    sq = S.double().square()
    total = float(sq.sum()) if total is None else total
    if total == 0.0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    # Tolerance for float round-off so that energy=1.0 does not demand more than the full rank.
    idx = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)))
    return min(idx + 1, len(S))


# ------------------------------------------------------------------------------- randomized SVD
# Defaults of the randomized path, measured in benchmarks/randomized_svd.py (results/randomized_svd.md). The
# bound is conservative: on MiniLM's weights it stays near 0.1 while the singular values are found within
# about 3% and the rank-k truncation error within 0.5% of the exact SVD's. NOTES: q = r + 10 with two
# iterations left the r-th singular value 9-12% off; hence more oversampling and four iterations.
RSVD_OVERSAMPLE = 0.25  # extra columns, as a fraction of the rank asked for (at least RSVD_MIN_OVERSAMPLE)
RSVD_MIN_OVERSAMPLE = 16
RSVD_POWER_ITERS = 4
RSVD_TOL = 0.15  # largest residual bound, relative to the k-th singular value, before the exact SVD is taken


FROBENIUS_BLOCK = 2**22  # elements summed in float64 at a time: a whole float64 copy of a 32000x4096 matrix is 1 GB


def frobenius_sq(matrix: torch.Tensor) -> float:
    """``||W||_F**2`` = ``sum(S**2)``: the total spectral energy, without an SVD; summed in float64 a block
    of rows at a time, so that it never holds a float64 copy of the whole matrix (the streamed runs' peak
    memory was set by that copy of the embedding)."""
    w = matrix.detach()
    rows = max(1, FROBENIUS_BLOCK // max(1, w.shape[-1]))
    return float(sum(block.double().square().sum() for block in w.split(rows)))


def randomized_svd(matrix: torch.Tensor, rank: int, *, seed: int = 0, oversample: int | None = None,
                   power_iters: int = RSVD_POWER_ITERS) -> Decomposition:
    """The leading ``rank`` singular triplets by a randomized range finder with power iterations
    (Halko, Martinsson, Tropp 2011, alg. 4.4), seeded so the result is the same on every run.

    ``check`` records the a-posteriori bound: for each triplet the residual ``||W v_i - s_i u_i||``
    (``W^T u_i = s_i v_i`` holds by construction), which bounds the distance from ``s_i`` to a true singular
    value; ``bound`` is the largest one relative to ``s_rank``. ``total_energy`` is ``||W||_F**2``, so the
    energy kept by the factors (and the relative error of ``W_rank``) is exact, not estimated.
    """
    a = matrix.detach().to(compute_dtype(matrix.dtype))
    m, n = a.shape
    k = min(rank, m, n)
    p = oversample if oversample is not None else max(RSVD_MIN_OVERSAMPLE, int(RSVD_OVERSAMPLE * k))
    width = min(k + p, m, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, dtype=a.dtype).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):  # re-orthonormalised each half step: plain powers lose the small values
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    u = q @ ub[:, :k]
    s, vh = s[:k], vh[:k]
    resid = torch.linalg.vector_norm(a @ vh.T - u * s, dim=0)
    floor = float(s[-1]) if k and float(s[-1]) > 0 else float("inf")
    bound = float(resid.max()) / floor if k else 0.0
    return Decomposition(u, s, vh, total_energy=frobenius_sq(a),
                         check={"method": "randomized", "rank": k, "oversample": width - k,
                                "power_iters": power_iters, "seed": seed, "bound": bound})


def leading_svd(matrix: torch.Tensor, rank: int, *, seed: int = 0, tol: float = RSVD_TOL) -> Decomposition:
    """:func:`randomized_svd` when its bound is at most ``tol``, else the exact SVD (``check`` says which
    and why). A rank above a third of the full rank goes straight to the exact SVD: the range finder
    would then cost about as much."""
    m, n = matrix.shape
    if 3 * rank > min(m, n):
        dec = svd(matrix)
        dec.check = {"method": "exact", "reason": "rank above a third of the full rank"}
        return dec
    dec = randomized_svd(matrix, rank, seed=seed)
    if dec.check["bound"] <= tol:
        return dec
    exact = svd(matrix)
    exact.check = {**dec.check, "method": "exact", "reason": f"randomized bound {dec.check['bound']:.3g} > {tol}"}
    return exact
