"""Choices made on held-out calibration batches, which the factors compared were not fit on.

In sample, whitened factors always beat a plain SVD and a layer with fewer calibration rows than inputs (a CNN's
classifier, its last 1x1 convs) reproduces its calibration outputs at almost any rank; on batches the factors did
not see, neither holds. Two choices are made there: the ranks and factors of the whole model among a few
candidates (:func:`choose_on_held_out`), and a data-starved layer's ridge (:func:`held_out_ridge`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compressor.analysis.tracing import Calibrator
from compressor.analysis.whitened import (
    DAMPING,
    Moments,
    damping_from,
    held_out_errors,
    whitened_decomposition,
)
from compressor.core.handlers import handler_for
from compressor.core.policies import LayerSpectrum, allocate, energy_threshold_budget
from compressor.core.rewrite import factor_module
from compressor.core.svd import Decomposition, max_saving_rank, svd
from compressor.core.threads import linalg_threads

# The candidates choose_on_held_out compares: (ranks, factors). Ranks: the data-aware allocation (output error x
# measured sensitivity); one whitened energy threshold for every layer (the fraction of its whitened spectrum's
# energy each keeps, chosen to meet the budget: the cut spread over all layers); the whitened (absolute output)
# energy lost per parameter saved, allocated globally; or the plain SVD's relative spectral energy. Factors: whitened
# for every layer, plain SVD for every layer, or per layer the one with the lower held-out output error at its rank.
# Listed in order of preference on a tie.
CANDIDATES = (("data-aware", "whitened"), ("data-aware", "per layer"), ("whitened threshold", "whitened"),
              ("whitened threshold", "per layer"), ("whitened global", "whitened"), ("whitened global", "per layer"),
              ("plain", "plain"), ("plain", "per layer"))


class HeldOutFits:
    """Per layer the data reached, its whitened factors fit without the held-out batches and their held-out error
    curve (:func:`held_out_errors`), each computed once when first asked: the sensitivity probes of data-starved
    layers and :func:`choose_on_held_out` use the same ones (before, each fit them again: a whitened SVD per layer,
    a fifth of MobileNetV2's calibrated analysis). ``handlers``: each layer's kind (an alternative's factors are fit
    on its own moments, :meth:`LayerHandler.moments`); it is read when a layer is first asked for."""

    def __init__(self, modules: dict[str, nn.Module], handlers: dict, moments: dict[str, Moments],
                 held: dict[str, Moments], damp: dict[str, tuple[float, ...]]) -> None:
        self.modules, self.handlers, self.moments, self.held, self.damp = modules, handlers, moments, held, damp
        self._done: dict[str, tuple[Decomposition, torch.Tensor, torch.Tensor]] = {}

    def _fit(self, name: str) -> tuple[Decomposition, torch.Tensor, torch.Tensor]:
        if name not in self._done:
            h, mod, fit = self.handlers[name], self.modules[name], self.held[name]
            xx_fit, xx_out = fit.xx, self.moments[name].xx - fit.xx
            if h.kind != handler_for(mod).kind:  # an alternative kind's own moments (LayerHandler.moments)
                xx_fit, xx_out = h.moments(mod, xx_fit), h.moments(mod, xx_out)
            dec, _ = whitened_decomposition(h.weight_matrix(mod), Moments(xx_fit, rows=fit.rows), self.damp[name])
            self._done[name] = dec, held_out_errors(dec, xx_out), xx_out
        return self._done[name]

    def whitened(self, name: str) -> tuple[Decomposition, torch.Tensor]:
        """The layer's whitened factors fit without the held-out batches, and their held-out error curve."""
        dec, curve, _ = self._fit(name)
        return dec, curve

    def held_out_moment(self, name: str) -> torch.Tensor:
        """The second moment of the layer's input on the held-out batches (in its kind's layout)."""
        return self._fit(name)[2]


def plain_output_error(dec: Decomposition, C: torch.Tensor, rank: int) -> float:
    """Relative output error ``||(W - W_r) X|| / ||W X||`` of any factors ``dec`` at ``rank`` over rows with second
    moment ``C`` (:func:`held_out_errors`), for factors whose singular values do not measure it (a plain SVD's)."""
    curve = held_out_errors(dec, C)
    return math.sqrt(float(curve[rank]) / float(curve[0])) if float(curve[0]) > 0 else float("nan")


def _allocations(decs: dict[str, Decomposition], plain_decs: dict[str, Decomposition],
                 shapes: dict[str, tuple[int, int]], pivoted: dict[str, bool], ranks: dict, policy,
                 rank_multiple: int, fixed: dict[str, int | None]) -> dict[str, dict]:
    """The ranks of each allocation :data:`CANDIDATES` names, by its name (``ranks``: the data-aware one)."""

    def absolute(name: str) -> LayerSpectrum:
        sq = decs[name].S.detach().double().cpu().square()
        tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])
        return LayerSpectrum(name, *shapes[name], decs[name].S.detach().cpu(), tail, pivoted=pivoted[name])

    whitened = [LayerSpectrum.from_singular_values(n, *shapes[n], decs[n].S, pivoted=pivoted[n]) for n in shapes]
    return {
        "data-aware": ranks,
        "whitened threshold": {**fixed, **(energy_threshold_budget(whitened, policy.target, rank_multiple, fixed)
                                           or {})},
        "whitened global": allocate(policy, [absolute(n) for n in shapes], rank_multiple, fixed),
        "plain": allocate(policy, [LayerSpectrum.from_singular_values(n, *shapes[n], plain_decs[n].S,
                                                                      pivoted=pivoted[n]) for n in shapes],
                          rank_multiple, fixed),
    }


def choose_on_held_out(cal: Calibrator, modules: dict[str, nn.Module], handlers: dict, decs: dict[str, Decomposition],
                       moments: dict[str, Moments], held: dict[str, Moments], spectra: list, ranks: dict,
                       policy, rank_multiple: int, fixed: dict[str, int | None], fits: HeldOutFits,
                       hold_out: int) -> tuple[dict, dict[str, str], dict[str, dict[str, Any]], dict[str, Any]]:
    """The :data:`CANDIDATES` (ranks, factors) whose compressed model changes the outputs least on the first
    ``hold_out`` calibration batches; returns its ranks, each layer's factors (``"whitened"`` or ``"plain"``),
    why, per layer, and a summary for ``plan.calibration``.

    Every candidate's whitened factors are fit without the held-out batches (``fits``; ``held``: the moments of
    the others), so a layer that data cannot pin down (a classifier seeing one row per image) is judged on data it
    did not fit: in sample, whitened factors always beat the plain SVD. The plain SVD and the whitened global
    threshold are candidates, so on the held-out batches the result is never worse than either at the same budget.
    The caller refits the chosen whitened factors on every batch (the ranks and factor kinds stay)."""
    shapes = {sp.name: (sp.m, sp.n) for sp in spectra}
    pivoted = {sp.name: sp.pivoted for sp in spectra}
    plain_decs = {n: svd(handlers[n].weight_matrix(mod)) for n, mod in modules.items()}
    # The layers the data reached (whitened; not embeddings) and, computed only for the layers some candidate cuts,
    # their whitened factors fit without the held-out batches and both factors' held-out error curves.
    reached = {n for n in modules if moments[n].xx is not None and held[n].xx is not None}
    curves: dict[str, dict[str, torch.Tensor]] = {}

    def fit_dec(name: str) -> Decomposition:
        dec, curve = fits.whitened(name)
        if name not in curves:
            curves[name] = {"whitened": curve, "plain": held_out_errors(plain_decs[name], fits.held_out_moment(name))}
        return dec

    allocations = _allocations(decs, plain_decs, shapes, pivoted, ranks, policy, rank_multiple, fixed)

    def cut(r: int | None, name: str) -> bool:
        return r is not None and 1 <= r <= max_saving_rank(*shapes[name], pivoted[name])

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
                dec, _ = whitened_decomposition(W, Moments(fit), damping_from(DAMPING, ridge))
                err = float(held_out_errors(dec, out)[rank])
            if best is not None and err >= best[1]:
                break
            best = ridge, err
    return best[0]
