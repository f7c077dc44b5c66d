"""Analyze: find every weight matrix, take its SVD once, choose ranks by a policy, and build a Plan.

    plan = compressor.analyze(model, energy=0.95)     # or rank=64, rank_ratio=0.25, target=0.5
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.analysis.batchnorm import conv_bn_pairs
from compressor.analysis.calibration import calibrated_analysis
from compressor.analysis.decoder import FISHER, decoder_analysis, is_decoder
from compressor.core.errors import CompressorError, PlanError
from compressor.core.fold import apply_folds
from compressor.core.handlers import LayerHandler, handler_for, handler_of_kind, kinds, weight_fingerprint
from compressor.core.layers import LOW_RANK_TYPES, LoRALayer
from compressor.core.plan import LayerPlan, Plan
from compressor.core.policies import (
    ALLOCATORS,
    LayerSpectrum,
    Policy,
    allocate,
    operating_keep,
    policy_from_dict,
    policy_from_options,
    policy_to_dict,
    prefer_alternative,
)
from compressor.core.svd import Decomposition, break_even_rank, energy_kept, svd
from compressor.core.threads import LINALG_THREADS, thread_budget, torch_threads
from compressor.data.inputs import as_batches

PROGRESS_MIN_LAYERS = 16  # below this, a progress bar is noise
UNTIES = "factoring would untie it"  # why a weight shared by several modules (a tied LM head) stays dense
_WRAPPERS = (*LOW_RANK_TYPES, LoRALayer)  # modules compressor put in: their parts are not layers to factor


@dataclass
class Candidate:
    """A module found in the model: factorizable (``skip is None``) or not, and why. ``handler`` is
    None for a module that owns a weight matrix but whose kind no handler knows."""

    name: str
    module: nn.Module
    kind: str
    skip: str | None = None
    handler: LayerHandler | None = None

    def weight_matrix(self) -> torch.Tensor:
        return self.handler.weight_matrix(self.module)


def find_layers(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()
                ) -> list[Candidate]:
    """Every module that owns a weight matrix (2-D or more), with the reason it cannot be factored.

    Patterns are shell-style globs over module names (``"encoder.*.attention.*"``).
    """
    # Who refers to each parameter and module: tied weights and modules registered twice are found by
    # identity, since two names for one tensor would be untied by replacing one of them.
    owners: dict[int, list[str]] = {}
    names_of: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(mod), []).append(name)
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    functional_parents = {f"{name}.{child}" if name else child
                          for name, mod in model.named_modules()
                          if isinstance(mod, nn.MultiheadAttention)
                          for child, _ in mod.named_children()}

    found: list[Candidate] = []
    for name, mod in model.named_modules():
        if isinstance(mod, _WRAPPERS) or _inside(model, name, _WRAPPERS):
            continue  # already factored or adapted: its parts are not factored again
        h = handler_for(mod)
        if h is None:
            if _owns_matrix(mod):
                found.append(Candidate(name, mod, type(mod).__name__, _unsupported_reason(mod)))
            continue
        weight = h.weight(mod)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        c = Candidate(name, mod, h.kind, handler=h)
        if name in functional_parents:
            c.skip = "its parent nn.MultiheadAttention reads this weight directly, not through forward()"
        elif len(names_of[id(mod)]) > 1:
            c.skip = "module registered under several names: " + ", ".join(names_of[id(mod)])
        elif len(owners.get(id(weight), [])) > 1:
            others = [o for o in owners[id(weight)] if o != name]
            c.skip = f"weight shared with {', '.join(repr(o) for o in others)} (tied); {UNTIES}"
        elif (reason := h.dense_reason(mod)) is not None:
            c.skip = reason
        elif not weight.is_floating_point():
            c.skip = f"weight dtype {weight.dtype} is not floating point"
        elif include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            c.skip = "not matched by include patterns"
        else:
            for pat in exclude:
                if fnmatch.fnmatchcase(name, pat):
                    c.skip = f"excluded by pattern '{pat}'"
                    break
        found.append(c)
    return found


def check_patterns(include: Sequence[str], exclude: Sequence[str], layer_names: Sequence[str]) -> None:
    """Refuse an include or exclude glob that matches no layer: a typo would otherwise factor the wrong
    layers (or none) without a word. The error names the closest layer names."""
    for option, patterns in (("include", include), ("exclude", exclude)):
        for pat in patterns:
            if any(fnmatch.fnmatchcase(n, pat) for n in layer_names):
                continue
            below = [n for n in layer_names if n.startswith(f"{pat}.")]
            close = ([f"{pat}.*"] if below else []) + difflib.get_close_matches(pat, layer_names, n=3, cutoff=0.4)
            close = close or list(layer_names[:3])
            regex = any(ch in pat for ch in "\\^$+(){}|")
            how = "patterns are shell globs (* ? [..]), not regular expressions; " if regex else ""
            if not close:
                raise CompressorError(f"{option} pattern '{pat}' matches no layer: the model has no weight "
                                      "matrix to factor", f"leave out {option}")
            shown = ", ".join(repr(n) for n in close)
            raise CompressorError(f"{option} pattern '{pat}' matches no layer of the model",
                                  f"{how}the closest layer names are {shown}; pass e.g. {option}=[{close[0]!r}] "
                                  "(compress analyze MODEL lists every layer)",
                                  cli_fix=f"{how}the closest layer names are {shown}; pass e.g. "
                                          f"--{option} '{close[0]}' (compress analyze MODEL lists every layer)")


def _owns_matrix(mod: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in mod.parameters(recurse=False))


def _unsupported_reason(mod: nn.Module) -> str:
    if isinstance(mod, nn.MultiheadAttention):
        return "nn.MultiheadAttention computes with its projection weights directly (functional)"
    if "Transpose" in type(mod).__name__:
        return f"{type(mod).__name__} is not supported (its weight maps outputs to inputs)"
    return (f"{type(mod).__name__} is not a supported layer type (registered: {', '.join(kinds())}; "
            "add one with compressor.register_handler)")


def _inside(model: nn.Module, name: str, types: tuple[type, ...]) -> bool:
    """Whether a module above ``name`` is one of ``types``."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), types) for i in range(1, len(parts)))


def unique_param_count(model: nn.Module) -> int:
    """Parameters of the model, each tensor counted once (tied weights are one tensor)."""
    return sum(p.numel() for p in model.parameters())


def decompose_layers(found: Iterable[Candidate], progress: bool | None = None
                     ) -> dict[str, Decomposition]:
    """The SVD of every factorizable layer's weight, each computed once, on the weight's device."""
    todo = [c for c in found if c.skip is None]
    show = progress if progress is not None else (len(todo) >= PROGRESS_MIN_LAYERS and sys.stderr.isatty())
    iterator: Iterable[Candidate] = todo
    if show:
        from tqdm.auto import tqdm
        iterator = tqdm(todo, desc="SVD", unit="layer", leave=False)
    out: dict[str, Decomposition] = {}
    for c in iterator:
        w = c.weight_matrix()
        if not torch.isfinite(w).all():
            raise CompressorError(f"layer '{c.name}' has NaN or Inf values in its weight",
                                  f"repair the weights, or leave the layer out with exclude=['{c.name}']",
                                  cli_fix=f"repair the weights, or leave the layer out with --exclude '{c.name}'")
        out[c.name] = svd(w)
    return out


def analyze(model: nn.Module, policy: Policy | None = None, *, energy: float | None = None,
            rank: int | None = None, rank_ratio: float | None = None, target: float | None = None,
            rank_multiple: int = 1, include: Sequence[str] = (), exclude: Sequence[str] = (),
            overrides: dict[str, int | None] | None = None, plan: Plan | None = None,
            progress: bool | None = None, calibration: Any = None, outputs: Sequence[str] | None = None,
            sequential: bool = True, sensitivity: bool = True, fold_batchnorm: bool = True,
            example_inputs: Any = None, spatial: bool = True, threads: int | None = None,
            weighting: str | None = FISHER, pivoted: bool = False) -> Plan:
    """Analyze every weight of ``model`` and choose a rank per layer; the model is not changed.

    Exactly one policy, as an object (``analyze(model, TargetPolicy(0.3))``; any type with a registered
    allocator, :func:`compressor.core.policies.register`) or a keyword: ``energy`` (fraction of spectral
    energy kept per layer), ``rank`` (fixed), ``rank_ratio`` (fraction of each layer's full rank) or
    ``target`` (fraction of the factorizable parameters to remove, allocated across layers). ``overrides``
    maps layer names to ranks (None: keep dense) that win over the policy. Passing an edited ``plan``
    re-derives its statistics with its own policy and ranks (used to re-apply a plan a person edited).

    ``calibration`` (model inputs: a tensor, tuple or mapping of tensors such as a tokenizer's output, or
    a list of them) makes the analysis data-aware (see :mod:`compressor.analysis.calibration`): factors
    minimise each layer's output error, ``energy`` is of the whitened spectrum, ``target`` is spent by
    measured output error (with ``sensitivity``, over the model's ``outputs``: every floating output by
    default), and ``sequential`` refits each layer on the inputs of the compressed layers before it.

    ``fold_batchnorm``: a BatchNorm that directly follows a factorizable conv is folded into it first (exact
    in eval mode; see :mod:`compressor.core.fold`), so the factors approximate what the network computes;
    the pairs are found by running the model on the first calibration batch or on ``example_inputs`` (with
    neither, nothing is folded) and recorded in ``plan.folded``, which ``rewrite`` applies. False keeps them.

    ``spatial``: with a ``target``, a ``kh x kw`` conv (both > 1) may be factored as a ``kh x 1`` then
    ``1 x kw`` conv (kind "conv2d-spatial") instead of the channel decomposition, chosen per layer where it
    loses less (weight or output error) at ``1 - target`` of its parameters.

    A causal language model (:func:`compressor.analysis.decoder.is_decoder`) is calibrated block by block
    (:mod:`compressor.analysis.decoder`); its layer errors are weighted by ``weighting`` (``"fisher"``: the
    diagonal output-side Fisher; None: each layer's relative output error alike).

    ``pivoted``: every linear layer factored is stored in the pivoted form (kind "linear-pivoted",
    :class:`compressor.core.layers.PivotedLowRankLinear`): a rank-``r`` layer holds ``r (m + n - r)`` weights
    instead of ``r (m + n)``, so every rank below ``min(m, n)`` saves and a target keeps more of each spectrum.

    ``threads``: torch threads for all of it (restored afterwards); by default (None) the weight-only work
    (every SVD, and the whole analysis without calibration) runs on one thread, which stays fast on a busy
    machine, while calibration forward passes keep the caller's setting (:mod:`compressor.core.threads`).
    """
    weights_only = threads is None and calibration is None
    with thread_budget(threads), torch_threads(LINALG_THREADS if weights_only else None):
        chosen = _one_policy(policy, energy, rank, rank_ratio, target, plan)
        return _analyze(model, chosen, rank_multiple, include, exclude, overrides, plan, progress, calibration,
                        outputs, sequential, sensitivity, fold_batchnorm, example_inputs, spatial, weighting, pivoted)


def _one_policy(policy: Policy | None, energy: float | None, rank: int | None, rank_ratio: float | None,
                target: float | None, plan: Plan | None) -> Policy | None:
    """The policy of an ``analyze`` call: the object, or one built from the keywords (None: the plan's)."""
    keywords = any(v is not None for v in (energy, rank, rank_ratio, target))
    if policy is None:
        return None if plan is not None and not keywords else policy_from_options(energy, rank, rank_ratio, target)
    if keywords:
        raise CompressorError("a policy object and a policy keyword were both given",
                              "pass one: analyze(model, TargetPolicy(0.3)) or analyze(model, target=0.3)")
    if type(policy) not in ALLOCATORS:
        raise CompressorError(f"{policy!r} is not a rank policy",
                              f"pass one of {', '.join(t.__name__ for t in ALLOCATORS)}, or register an "
                              "allocator for its type (compressor.register_policy)")
    return policy


def _analyze(model: nn.Module, policy: Policy | None, rank_multiple: int, include: Sequence[str],
             exclude: Sequence[str], overrides: dict[str, int | None] | None, plan: Plan | None,
             progress: bool | None, calibration: Any, outputs: Sequence[str] | None, sequential: bool,
             sensitivity: bool, fold_batchnorm: bool, example_inputs: Any, spatial: bool,
             weighting: str | None, pivoted: bool) -> Plan:
    if plan is not None:
        if plan.method != "svd" and calibration is None:
            # Re-deriving a data-aware plan by plain SVD would keep its ranks but silently lose its quality.
            raise CompressorError(f"the plan was made with the data-aware method '{plan.method}', whose factors "
                                  "need its calibration data",
                                  "pass the same calibration=...", cli_fix="pass the same --calibration FILE")
        pol = plan.policy
        include, exclude = pol.get("include", []), pol.get("exclude", [])
        rank_multiple = pol.get("rank_multiple", 1)
        policy = policy_from_dict(pol)
        overrides = {**plan.ranks(), **(overrides or {})}
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise CompressorError(f"rank_multiple must be a whole number >= 1, got {rank_multiple}",
                              "pass e.g. rank_multiple=8", cli_fix="pass e.g. --rank-multiple 8")
    include, exclude = list(include), list(exclude)

    original = model
    found = find_layers(model, include, exclude)
    if plan is not None:
        check_plan_fits(plan, found)
    if plan is None:
        check_patterns(include, exclude, [c.name for c in found])
    folded = _folds(model, found, plan, fold_batchnorm, calibration, example_inputs)
    if folded:  # analyze the folded network on a copy: the model itself is not changed
        model = apply_folds(copy.deepcopy(model), folded)
        found = find_layers(model, include, exclude)
    names = {c.name for c in found if c.skip is None}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {c.name for c in found})
    if unknown:
        raise CompressorError(f"overrides name layers the model does not have: {', '.join(unknown[:5])}",
                              "use layer names from the plan (compress analyze MODEL)")
    fixed = {k: v for k, v in overrides.items() if k in names}
    # A re-derived plan keeps each layer's factorization; otherwise analyze may choose an alternative.
    forced = {lp.name: lp.kind for lp in plan.layers if lp.supported} if plan is not None else None
    # ... and the factors it chose on held-out batches (plans without the record: whitened, as they were made).
    factors = {lp.name: lp.selection["factors"] if lp.selection else "whitened" for lp in plan.layers
               if lp.supported} if plan is not None else None
    variants = _variants(found, forced, pivoted)
    errors: dict[str, float] = {}
    selection: dict[str, dict[str, Any]] = {}
    method, calib_info = "svd", None
    if calibration is not None and names:
        modules = {c.name: c.module for c in found if c.skip is None}
        if is_decoder(model):  # block by block: never the logits of every calibration token (analysis.decoder)
            cal = decoder_analysis(model, modules, as_batches(calibration), policy, rank_multiple, fixed,
                                   sequential=sequential, weighting=weighting, progress=progress, outputs=outputs,
                                   variants=variants)
        else:
            cal = calibrated_analysis(model, modules, as_batches(calibration), policy, rank_multiple, fixed,
                                      outputs=outputs, sequential=sequential, sensitivity=sensitivity,
                                      spatial=spatial, kinds=forced, factors=factors, variants=variants)
        decs, ranks, errors, calib_info = cal.decompositions, cal.ranks, cal.errors, cal.info
        selection = cal.selection
        chosen = cal.kinds
        method = "whitened-svd+sequential" if sequential else "whitened-svd"
    else:
        decs = decompose_layers(found, progress)
        spectra = {c.name: LayerSpectrum.from_singular_values(c.name, *c.weight_matrix().shape, decs[c.name].S,
                                                              pivoted=c.handler.pivoted)
                   for c in found if c.skip is None}
        chosen = _alternatives(found, decs, spectra, operating_keep(policy), spatial, forced)
        ranks = allocate(policy, list(spectra.values()), rank_multiple, fixed)
    for c in found:
        if c.name in chosen:
            c.kind, c.handler = chosen[c.name], handler_of_kind(chosen[c.name])

    layers = [layer_plan(c, decs.get(c.name), ranks.get(c.name), c.name in overrides)
              for c in found]
    for lp in layers:
        if lp.factored and lp.name in errors:
            lp.estimated_output_error = errors[lp.name]
        if lp.factored and lp.name in selection:
            lp.selection = selection[lp.name]
    result = Plan(policy={**policy_to_dict(policy), "rank_multiple": rank_multiple,
                          "include": include, "exclude": exclude},
                  layers=layers, params_total_before=unique_param_count(model), method=method,
                  calibration=calib_info)
    result.folded = folded
    if folded:
        result.notes.append(f"{len(folded)} BatchNorm layers folded into the convs before them (exact in eval "
                            "mode); parameter counts are of the folded model")
    result.notes += tied_notes(found, result.params_total_before)
    if not names:
        result.notes.append("no layer of this model can be factored")
    if "target" in result.policy:
        got = result.totals()["removed_fraction"]
        if abs(got - policy.target) > 0.01:
            result.notes.append(f"removed {got:.3f} of the factorizable parameters against the target "
                                f"{policy.target:.3f}: the rank steps of these layers are too coarse")
    for name, dec in decs.items():  # keyed by the unfolded model's weights: rewrite checks them before folding
        result._cache[name] = (dec, weight_fingerprint(original.get_submodule(name)))
    return result


def tied_notes(found: Sequence[Candidate], params_total: int) -> list[str]:
    """One note per weight that several modules share (an LM head tied to the input embedding): left dense
    on purpose, and how much of the model it is, since a policy's share of "factorizable" leaves it out."""
    groups: dict[int, list[Candidate]] = {}
    for c in found:
        if c.handler is not None and c.skip is not None and c.skip.endswith(UNTIES):
            groups.setdefault(id(c.handler.weight(c.module)), []).append(c)
    notes = []
    for group in groups.values():
        w = group[0].handler.weight(group[0].module)
        names = " and ".join(repr(c.name) for c in group)
        notes.append(f"tied weight {'x'.join(map(str, w.shape))} of {names} ({w.numel():,} parameters, "
                     f"{w.numel() / max(params_total, 1):.1%} of the model) left dense deliberately: {UNTIES} "
                     "(two copies)")
    return notes


def _variants(found: list[Candidate], forced: dict[str, str] | None, pivoted: bool) -> dict[str, str]:
    """``{layer: kind}`` of the layers stored in another form of their factors (a handler's variant): with
    ``pivoted``, every layer whose kind has a pivoted variant; a re-derived plan's (``forced``) keep theirs.
    The candidates are switched to it, so every path below counts their parameters as that form."""
    chosen = {}
    for c in found:
        if c.skip is not None:
            continue
        wanted = [k for k in c.handler.variants if handler_of_kind(k).pivoted] if pivoted and forced is None \
            else [k for k in c.handler.variants if forced is not None and forced.get(c.name) == k]
        if wanted and handler_of_kind(wanted[0]).accepts(c.module):
            c.kind, c.handler = wanted[0], handler_of_kind(wanted[0])
            chosen[c.name] = wanted[0]
    return chosen


def _alternatives(found: list[Candidate], decs: dict[str, Decomposition], spectra: dict[str, LayerSpectrum],
                  keep: float | None, spatial: bool, forced: dict[str, str] | None) -> dict[str, str]:
    """``{layer: alternative kind}`` for the layers factored another way (plain SVD); ``decs`` and ``spectra``
    are updated to it. The relative Frobenius error is the same norm for every layout of one kernel, so the
    two spectra compare directly."""
    chosen = {}
    for c in found:
        if c.skip is not None:
            continue
        wanted = forced.get(c.name) if forced is not None else None
        options = ([wanted] if wanted not in (None, c.kind) else []) if forced is not None else \
            (c.handler.alternatives if spatial and keep is not None else ())
        for kind in options:
            alt = handler_of_kind(kind)
            if not alt.accepts(c.module):
                continue
            dec = svd(alt.weight_matrix(c.module))
            sp = LayerSpectrum.from_singular_values(c.name, *alt.weight_matrix(c.module).shape, dec.S)
            if forced is not None or prefer_alternative(spectra[c.name], sp, keep):
                decs[c.name], spectra[c.name], chosen[c.name] = dec, sp, kind
    return chosen


def _folds(model: nn.Module, found: list[Candidate], plan: Plan | None, fold: bool, calibration: Any,
           example_inputs: Any) -> list[list[str]]:
    """The ``[conv, bn]`` pairs to fold: an edited plan's own, or those found on the first input."""
    if plan is not None:
        return [list(p) for p in plan.folded]
    probe = calibration if calibration is not None else example_inputs
    if not fold or probe is None:
        return []
    convs = {c.name for c in found if c.skip is None and c.kind.startswith("conv")}
    return conv_bn_pairs(model, as_batches(probe)[0], convs) if convs else []



def check_plan_fits(plan: Plan, found: list[Candidate]) -> None:
    """Refuse (:class:`PlanError`) a plan that does not describe this model: no layers at all (it would be
    re-derived silently), a layer of another shape, or a rank on a layer that cannot be factored."""
    fix = "apply the plan to the model it was made for, or re-create it with compress analyze"
    if not plan.layers and found:
        raise PlanError(f"the plan lists no layers, but the model has {len(found)}", fix)
    by_name = {c.name: c for c in found}
    for lp in plan.layers:
        c = by_name.get(lp.name)
        if c is None:
            continue  # named in the refusal of unknown layers below
        shape = list(_weight(c).shape)
        if shape != list(lp.shape):
            raise PlanError(f"layer '{lp.name}' is {shape} in the model but {lp.shape} in the plan", fix)
        if lp.rank is not None and (not lp.supported or c.skip is not None):
            raise PlanError(f"layer '{lp.name}' has rank {lp.rank} in the plan but cannot be factored "
                            f"({c.skip or lp.reason or 'unsupported'})", "set its \"rank\" to null in the plan")


def _weight(c: Candidate) -> torch.Tensor:
    """The candidate's weight as the plan records its shape (the matrix of an unsupported module)."""
    if c.handler is not None:
        return c.handler.weight(c.module)
    # unsupported modules may keep their matrix under another name (MultiheadAttention.in_proj_weight)
    return next(p for p in c.module.parameters(recurse=False) if p.dim() >= 2)


def layer_plan(c: Candidate, dec: Decomposition | None, policy_rank: int | None,
               overridden: bool) -> LayerPlan:
    """The plan entry of one candidate from its decomposition (None: not factorizable; only ``S``,
    ``total_energy`` and ``check`` are read) and the rank the policy asked for."""
    lp = _entry(c, dec, policy_rank, overridden)
    if dec is not None and dec.check is not None:
        lp.svd = dec.check  # how a partial spectrum was found, and its a-posteriori bound
    return lp


def _entry(c: Candidate, dec: Decomposition | None, policy_rank: int | None, overridden: bool) -> LayerPlan:
    w = _weight(c)
    if c.handler is not None:
        m, n = c.weight_matrix().shape
        dense_macs = c.handler.macs(m, n)
    else:
        m, n = (w.shape[0], w[0].numel())
        dense_macs = m * n
    bias = getattr(c.module, "bias", None)
    nbias = bias.numel() if isinstance(bias, torch.Tensor) else 0
    nan = float("nan")
    pivoted = c.handler is not None and c.handler.pivoted
    base = dict(name=c.name, kind=c.kind, shape=list(w.shape), matrix_shape=[m, n],
                full_rank=min(m, n), break_even_rank=round(break_even_rank(m, n, pivoted), 3),
                params_before=m * n + nbias, params_after=m * n + nbias,
                macs_before=dense_macs, macs_after=dense_macs)
    if dec is None:  # not factorizable
        return LayerPlan(**base, rank=None, policy_rank=None, energy_kept=nan, rel_error=nan,
                         factored=False, reason=c.skip or "", supported=False)
    who = "override" if overridden else "policy"
    if policy_rank is None:
        return LayerPlan(**base, rank=None, policy_rank=None, energy_kept=1.0, rel_error=0.0,
                         factored=False, reason=f"kept dense by {who}")
    if policy_rank > min(m, n) or policy_rank < 1:
        raise CompressorError(f"layer '{c.name}': rank {policy_rank} is outside 1..{min(m, n)}",
                              "choose a rank between 1 and the layer's full rank")
    kept = energy_kept(dec.S, policy_rank, dec.total_energy)
    err = max(0.0, 1.0 - kept) ** 0.5
    if policy_rank > c.handler.max_saving_rank(m, n):
        return LayerPlan(**base, rank=None, policy_rank=policy_rank, energy_kept=kept, rel_error=err,
                         factored=False,
                         reason=f"{who} rank {policy_rank} saves no parameters (at most rank "
                                f"{c.handler.max_saving_rank(m, n)} saves)")
    r = policy_rank
    base.update(params_after=c.handler.params(m, n, r) + nbias, macs_after=c.handler.macs(m, n, r))
    return LayerPlan(**base, rank=r, policy_rank=r, energy_kept=kept, rel_error=err, factored=True,
                     reason=f"rank {r} by {who}")
