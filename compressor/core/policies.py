"""Rank policies: a config dataclass per policy and a registry from config type to rank allocator.

An allocator receives one :class:`LayerSpectrum` per factorizable layer and returns the rank it asks
for each (None: leave dense). The break-even check (a factorization that would not save parameters is
never applied) is done afterwards by ``analyze``, the same way for every policy.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import ClassVar

import torch

from compressor.core.errors import CompressorError
from compressor.core.svd import factored_params, max_saving_rank, rank_for_energy


def _fraction(name: str, value: object, hint: str, *, closed: bool = True) -> float:
    """``value`` as a float in (0, 1] (``closed``) or (0, 1), else the one-line error every entry point gives."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0 and (
        value <= 1 if closed else value < 1)
    if not ok:
        what = "(0, 1]" if closed else "(0, 1), the fraction of parameters to remove"
        raise CompressorError(f"{name} must be in {what}, got {value}", f"pass a fraction such as {hint}")
    return float(value)  # type: ignore[arg-type]


# Each policy checks its own value when it is made, so the Python API (``analyze(model, TargetPolicy(0.3))``)
# refuses what the CLI refuses, with the same line.

@dataclass(frozen=True)
class EnergyPolicy:
    """Per layer, the smallest rank keeping ``energy`` of the sum of squared singular values."""

    # What the analysis needs to know of a policy (read with the functions below, never by type checks):
    # whether it spends one budget across layers (all spectra first), and whether a rank depends on its
    # layer's spectrum at all (a fixed rank is known before any SVD).
    across_layers: ClassVar[bool] = False
    spectral: ClassVar[bool] = True
    energy: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "energy", _fraction("energy", self.energy, "0.95"))


@dataclass(frozen=True)
class RankPolicy:
    """The same rank for every layer (capped at each layer's full rank)."""

    spectral: ClassVar[bool] = False
    rank: int

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise CompressorError(f"rank must be a whole number >= 1, got {self.rank}", "pass e.g. rank=64",
                                  cli_fix="pass e.g. --rank 64")


@dataclass(frozen=True)
class RankRatioPolicy:
    """A fraction of each layer's full rank, rounded up."""

    spectral: ClassVar[bool] = False
    rank_ratio: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank_ratio", _fraction("rank_ratio", self.rank_ratio, "0.25"))


@dataclass(frozen=True)
class TargetPolicy:
    """Remove ``target`` of the factorizable parameters, spending the cuts where they lose least.

    Ranks are allocated across layers by the smallest loss (relative spectral energy, or the measured
    output error with calibration data) per parameter saved, not by one ratio everywhere.
    """

    across_layers: ClassVar[bool] = True
    target: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", _fraction("target", self.target, "0.5", closed=False))


Policy = EnergyPolicy | RankPolicy | RankRatioPolicy | TargetPolicy
BUILT_IN = ("energy", "rank", "rank_ratio", "target")
# The name of each policy (a built-in one's is also its keyword, energy=0.95, and its plan-JSON key), filled
# by register_policy.
POLICIES: dict[str, type] = {}


@dataclass
class LayerSpectrum:
    """What an allocator knows of a layer: its matrix shape and a loss for each candidate rank.

    ``loss[r]`` (for ``r`` in ``0..full_rank``) is the cost of keeping rank ``r``: by default the
    relative spectral energy discarded, ``sum(S[r:]**2) / sum(S**2)``.
    """

    name: str
    m: int
    n: int
    S: torch.Tensor
    loss: torch.Tensor
    total: float | None = None  # ||W||_F**2 when S holds only the leading values (randomized SVD)
    pivoted: bool = False  # factored in the pivoted form: r (m + n - r) weights at rank r

    def params(self, rank: int) -> int:
        """Weights of the layer factored at ``rank``."""
        return factored_params(self.m, self.n, rank, self.pivoted)

    @property
    def max_saving_rank(self) -> int:
        return max_saving_rank(self.m, self.n, self.pivoted)

    @property
    def full_rank(self) -> int:
        return min(self.m, self.n)

    @property
    def top_rank(self) -> int:
        """The largest rank whose loss is known: ``len(S)`` for a partial spectrum (leading values, or a
        spectrum cut at a rank bound), else the full rank. Allocators never go above it."""
        return len(self.S) if self.total is not None else self.full_rank

    @classmethod
    def from_singular_values(cls, name: str, m: int, n: int, S: torch.Tensor,
                             total: float | None = None, pivoted: bool = False) -> LayerSpectrum:
        """``total`` (``||W||_F**2``) when ``S`` holds only the leading values: ``loss`` then covers ranks
        ``0..len(S)``."""
        sq = S.detach().double().cpu().square()
        if total is None:
            tail = torch.cat([torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0]), sq.new_zeros(1)])
            denom = float(sq.sum())
        else:
            tail = (total - torch.cat([sq.new_zeros(1), torch.cumsum(sq, 0)])).clamp(min=0)
            denom = total
        loss = tail / denom if denom > 0 else torch.zeros_like(tail)
        return cls(name, m, n, S.detach().cpu(), loss, total, pivoted)


def policy_from_options(energy: float | None = None, rank: int | None = None,
                        rank_ratio: float | None = None, target: float | None = None) -> Policy:
    """Build exactly one policy from keyword options, with a clear error for bad values."""
    given = {k: v for k, v in {"energy": energy, "rank": rank, "rank_ratio": rank_ratio,
                               "target": target}.items() if v is not None}
    if len(given) != 1:
        names = ", ".join(given) if given else "none"
        raise CompressorError(f"exactly one rank policy is needed, got {names}",
                              "pass one of energy=, rank=, rank_ratio= or target=",
                              cli_fix="pass one of --energy, --rank, --rank-ratio or --target")
    (key, value), = given.items()
    return POLICIES[key](value)


def across_layers(policy: Policy) -> bool:
    """Whether ``policy`` spends one budget across layers: ranks come only once every spectrum is known."""
    return bool(getattr(policy, "across_layers", False))


def spectral(policy: Policy) -> bool:
    """Whether a layer's rank under ``policy`` depends on its spectrum (False: known before any SVD)."""
    return bool(getattr(policy, "spectral", True))


def policy_to_dict(policy: Policy) -> dict:
    """The plan's JSON of ``policy``: ``{"target": 0.3}`` for a built-in one, ``{"policy": NAME, **fields}``
    for one registered with :func:`register_policy`."""
    fields = asdict(policy)
    name = next((k for k, t in POLICIES.items() if t is type(policy)), type(policy).__name__)
    return fields if list(fields) == [name] and name in BUILT_IN else {"policy": name, **fields}


def policy_from_dict(data: dict) -> Policy:
    """The policy :func:`policy_to_dict` wrote (``data`` may hold other plan settings beside it)."""
    name = data.get("policy")
    if name is None:
        return policy_from_options(**{k: data[k] for k in BUILT_IN if data.get(k) is not None})
    cls = POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise CompressorError(f"the plan's policy {name!r} is not registered",
                              "register it with compressor.register_policy before loading the plan")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def operating_keep(policy: Policy) -> float | None:
    """The fraction of a layer's parameters a policy roughly keeps, where two ways of factoring the layer are
    compared (:func:`prefer_alternative`): ``1 - target``. None for the other policies, which set ranks,
    not parameters: a rank means different sizes in different layouts, so they keep the layer's own kind."""
    target = getattr(policy, "target", None)
    return None if target is None else 1 - target


def operating_rank(sp: LayerSpectrum, keep: float) -> int:
    """The rank at which ``sp``'s factors hold about ``keep`` of the layer's parameters (at least 1, at
    most the largest saving rank)."""
    return max(1, min(sp.max_saving_rank, int(keep * sp.m * sp.n / (sp.m + sp.n))))


def prefer_alternative(base: LayerSpectrum, alt: LayerSpectrum, keep: float) -> bool:
    """Whether ``alt`` (another factorization of the same weights, e.g. a conv's spatial one) loses less than
    ``base`` at the same parameter count, ``keep`` of the layer's. Both losses must be in the same units
    (relative energy of the weight, or relative output error)."""
    return float(alt.loss[operating_rank(alt, keep)]) < float(base.loss[operating_rank(base, keep)])


def round_up(rank: int, multiple: int, cap: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple``, never above ``cap``."""
    return min(cap, -(-rank // multiple) * multiple)


# -------------------------------------------------------------------------------------- allocators
Allocator = Callable[[Policy, list[LayerSpectrum], int, dict[str, int | None]], dict[str, int | None]]
ALLOCATORS: dict[type, Allocator] = {}


def register_policy(policy_type: type, name: str | None = None) -> Callable[[Allocator], Allocator]:
    """Make ``policy_type`` (a frozen dataclass, its values checked in ``__post_init__``) a rank policy
    ``analyze``, plans and the jobs accept, the decorated function its allocator:

        @dataclass(frozen=True)
        class HalfRankPolicy:
            across_layers: ClassVar[bool] = False  # one budget across layers (all spectra first)?
            spectral: ClassVar[bool] = False        # does a rank depend on its layer's spectrum?
            at_most: int

        @compressor.register_policy(HalfRankPolicy)
        def _(policy, layers, rank_multiple, fixed):  # layers: one LayerSpectrum per layer
            return {lp.name: min(policy.at_most, lp.top_rank // 2) for lp in layers if lp.name not in fixed}

    ``name`` (default: the class name) is how a plan's JSON names it: ``{"policy": name, **fields}``."""
    name = name or policy_type.__name__
    if not is_dataclass(policy_type):
        raise CompressorError(f"{policy_type.__name__} is not a dataclass", "make the policy a @dataclass(frozen=True)")
    if POLICIES.get(name, policy_type) is not policy_type:
        raise CompressorError(f"a policy named {name!r} is registered already ({POLICIES[name].__name__})",
                              "pass register_policy another name=")

    def deco(fn: Allocator) -> Allocator:
        POLICIES[name] = policy_type
        ALLOCATORS[policy_type] = fn
        return fn
    return deco


def allocate(policy: Policy, layers: list[LayerSpectrum], rank_multiple: int = 1,
             fixed: dict[str, int | None] | None = None) -> dict[str, int | None]:
    """Ranks for ``layers`` under ``policy``; layers named in ``fixed`` keep the rank given there."""
    fixed = fixed or {}
    try:
        allocator = ALLOCATORS[type(policy)]
    except KeyError:
        raise CompressorError(f"no allocator for policy {type(policy).__name__}",
                              "use one of " + ", ".join(t.__name__ for t in ALLOCATORS)) from None
    ranks = allocator(policy, layers, rank_multiple, fixed)
    ranks.update(fixed)
    return ranks


def _free(layers: list[LayerSpectrum], fixed: dict[str, int | None]) -> list[LayerSpectrum]:
    return [lp for lp in layers if lp.name not in fixed]


@register_policy(EnergyPolicy, "energy")
def _energy(policy: EnergyPolicy, layers, k, fixed):
    return {lp.name: round_up(rank_for_energy(lp.S, policy.energy, lp.total), k, lp.top_rank)
            for lp in _free(layers, fixed)}


@register_policy(RankPolicy, "rank")
def _rank(policy: RankPolicy, layers, k, fixed):
    return {lp.name: round_up(min(policy.rank, lp.top_rank), k, lp.top_rank)
            for lp in _free(layers, fixed)}


@register_policy(RankRatioPolicy, "rank_ratio")
def _ratio(policy: RankRatioPolicy, layers, k, fixed):
    return {lp.name: round_up(min(lp.top_rank, max(1, math.ceil(policy.rank_ratio * lp.full_rank))), k, lp.top_rank)
            for lp in _free(layers, fixed)}


@register_policy(TargetPolicy, "target")
def _target(policy: TargetPolicy, layers, k, fixed):
    return allocate_budget(layers, policy.target, k, fixed)


def _valid_ranks(lp: LayerSpectrum, k: int) -> list[int]:
    """Ranks that save parameters, are multiples of ``k`` and at most ``lp.top_rank``, largest first."""
    top = min(lp.max_saving_rank, lp.top_rank)
    return list(range(top - top % k, 0, -k))


def allocate_budget(layers: list[LayerSpectrum], target: float, k: int,
                    fixed: dict[str, int | None]) -> dict[str, int | None]:
    """Greedy allocation of a global parameter budget by the smallest loss per parameter saved.

    Each layer's options are "dense" and each saving rank (a multiple of ``k``). We walk the lower
    convex hull of every layer's (parameters, loss) curve: its segments have increasing slopes, so
    taking all layers' segments in order of slope is the optimal trade-off of the Lagrangian
    relaxation. The last segment is then cut short at the largest rank that reaches the target, so
    the result overshoots by at most one rank step of one layer.
    """
    # Fixed layers (user overrides) count towards the budget but are not moved.
    total = sum(lp.m * lp.n for lp in layers)
    need = target * total
    for lp in layers:
        r = fixed.get(lp.name)
        if r is not None and r <= lp.max_saving_rank:
            need -= lp.m * lp.n - lp.params(r)
    layers = _free(layers, fixed)
    ranks: dict[str, int | None] = {lp.name: None for lp in layers}
    if need <= 0:
        return ranks
    options = {lp.name: _valid_ranks(lp, k) for lp in layers}
    most = sum(lp.m * lp.n - lp.params(opts[-1]) for lp in layers
               for opts in [options[lp.name]] if opts)
    if most < need:
        raise CompressorError(
            f"target {target:.3f} cannot be reached: at most {(most + target * total - need) / total:.3f} "
            "of the factorizable parameters can be removed (every layer at its smallest rank"
            + (f", a multiple of {k}" if k > 1 else "") + ")",
            "lower the target, or allow more layers (include/exclude)",
            cli_fix="lower --target, or allow more layers (--include/--exclude)")

    heap: list[tuple[float, int, str, int, int]] = []  # (slope, tiebreak, name, from_params, to_rank)
    by_name = {lp.name: lp for lp in layers}
    counter = 0
    for lp in layers:
        for slope, start, end_rank in _hull_segments(lp, options[lp.name]):
            heapq.heappush(heap, (slope, counter, lp.name, start, end_rank))
            counter += 1
    saved = 0.0
    current = {lp.name: lp.m * lp.n for lp in layers}  # parameters now held by each layer
    while saved < need and heap:
        _slope, _, name, _start, end_rank = heapq.heappop(heap)
        lp = by_name[name]
        end_params = lp.params(end_rank)
        gain = current[name] - end_params
        if saved + gain >= need:
            # Cut this segment short: the largest valid rank on it that reaches the target.
            for r in options[name]:
                p = lp.params(r)
                if r >= end_rank and p < current[name] and saved + current[name] - p >= need:
                    end_rank, end_params = r, p
                    break
            gain = current[name] - end_params
        saved += gain
        current[name] = end_params
        ranks[name] = end_rank
    return ranks


def _hull_segments(lp: LayerSpectrum, options: list[int]) -> list[tuple[float, int, int]]:
    """Segments ``(slope, start_params, end_rank)`` of the lower convex hull of (params, loss) points,
    walked from dense towards the smallest rank; slopes are loss added per parameter removed."""
    pts = [(lp.m * lp.n, 0.0, None)] + [(lp.params(r), float(lp.loss[r]), r) for r in options]
    hull: list[tuple[int, float, int | None]] = []
    for p in pts:  # params decreasing; keep slopes increasing (Andrew's monotone chain)
        while len(hull) >= 2:
            (p0, l0, _), (p1, l1, _) = hull[-2], hull[-1]
            if (l1 - l0) * (p0 - p[0]) >= (p[1] - l0) * (p0 - p1):
                hull.pop()
            else:
                break
        hull.append(p)
    segs = []
    for (p0, l0, _), (p1, l1, r1) in itertools.pairwise(hull):
        segs.append(((l1 - l0) / (p0 - p1), p0, r1))
    return segs


def energy_threshold_budget(layers: list[LayerSpectrum], target: float, k: int,
                            fixed: dict[str, int | None]) -> dict[str, int | None] | None:
    """Ranks from one energy threshold for every layer (each keeps the smallest rank holding that fraction of
    its spectrum's energy), the threshold the highest that removes ``target`` of the parameters (bisection).
    Unlike :func:`allocate_budget`, which spends the budget where energy per parameter is cheapest, this spreads
    the cut over every layer. None when no threshold reaches the target."""
    total = sum(lp.m * lp.n for lp in layers)
    need = target * total - sum(lp.m * lp.n - lp.params(r) for lp in layers
                                for r in [fixed.get(lp.name)] if r is not None and r <= lp.max_saving_rank)
    free = _free(layers, fixed)

    def ranks_at(energy: float) -> tuple[dict[str, int | None], float]:
        ranks: dict[str, int | None] = {}
        saved = 0.0
        for lp in free:
            r = round_up(rank_for_energy(lp.S, energy, lp.total), k, lp.top_rank)
            ranks[lp.name] = r if r <= lp.max_saving_rank else None
            saved += lp.m * lp.n - lp.params(r) if ranks[lp.name] is not None else 0
        return ranks, saved

    low, high = 0.0, 1.0  # ranks_at(low) reaches the target (checked), ranks_at(high) keeps everything
    if ranks_at(low)[1] < need:
        return None
    for _ in range(40):
        mid = (low + high) / 2
        if ranks_at(mid)[1] >= need:
            low = mid
        else:
            high = mid
    return ranks_at(low)[0]
