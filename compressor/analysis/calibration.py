"""Data-aware compression: the whole calibrated analysis of a model, from calibration inputs to each layer's
factors and rank.

    plan = compressor.analyze(model, target=0.4, calibration=batches)   # batches: tensors, tuples or dicts

Per factorizable layer, its input statistics are streamed through forward hooks (:mod:`compressor.analysis.
tracing`) and its factors whitened by them (:mod:`compressor.analysis.whitened`: the output error is what is
truncated, not the weights' energy). On top of that, this module:

* sequential correction: layers are refit in execution order on the inputs ``X^`` produced by the
  already-compressed layers before them, against the ORIGINAL outputs ``W X``: the best rank-r ``W'`` for
  ``||W X - W' X^||`` is the whitened truncation (by ``X^``) of the least-squares map
  ``W* = W (X^T X^)(X^^T X^)^-1``, so later layers absorb part of the earlier truncation error;
* sensitivity: each layer is truncated alone and the change of the model's output measured, which scales
  its whitened error curve, so a parameter ``target`` is spent where the model's output loses least. Probe
  factors are fit without a few held-out batches, and a layer's error curve is measured on those batches
  (:func:`compressor.analysis.whitened.held_out_errors`): in sample, a layer with fewer calibration rows than
  inputs (a CNN's classifier, its last 1x1 convs) reproduces the calibration outputs at almost any rank and
  looked free to truncate. Such data-starved layers also choose their ridge on the held-out batches
  (:data:`RIDGES`, :func:`compressor.analysis.held_out.held_out_ridge`);
* alternatives: a layer with another factorization (a conv's spatial one) takes it where it loses less;
* the ranks and factors finally kept are chosen on the held-out batches among a few candidates
  (:func:`compressor.analysis.held_out.choose_on_held_out`).

The calibration inputs come from :mod:`compressor.data.calibration` (files, text, token streams).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from compressor.analysis.held_out import HeldOutFits, choose_on_held_out, held_out_ridge, plain_output_error
from compressor.analysis.tracing import Calibrator
from compressor.analysis.whitened import (
    DAMPING,
    Moments,
    damping_from,
    decompose,
    output_error,
    whitened_decomposition,
)
from compressor.core.errors import CompressorError
from compressor.core.handlers import LayerHandler, handler_for, handler_for_kind, handler_of_kind
from compressor.core.policies import (
    LayerSpectrum,
    across_layers,
    allocate,
    operating_keep,
    operating_rank,
    prefer_alternative,
)
from compressor.core.rewrite import factor_module
from compressor.core.svd import Decomposition, max_saving_rank, svd
from compressor.data.calibration import describe
from compressor.data.inputs import Batch

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
ORIGINALS_BUDGET = 2 << 30  # bytes of original-model layer inputs kept to halve sequential passes
# A sequential refit is a least-squares fit of n weights per output: with fewer than this many calibration
# rows per input feature it fits the calibration set, not the layer (a CNN's classifier sees one row per
# image). Kinds whose handler says refit=False (convs) are never refit; see LayerHandler.refit.
REFIT_ROWS_PER_FEATURE = 4


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


def layer_handlers(modules: dict[str, nn.Module], variants: dict[str, str] | None = None
                   ) -> dict[str, LayerHandler]:
    """Each module's handler by name: the dispatched one, or the variant ``variants`` names for the layer
    (a stored form such as "linear-pivoted"; ``LayerHandler.variants``)."""
    variants = variants or {}
    out = {}
    for name, mod in modules.items():
        h = handler_for(mod) if name not in variants else handler_for_kind(mod, variants[name])
        if h is None:
            raise CompressorError(f"layer '{name}' cannot be factored as {variants[name]}",
                                  "leave it out of the variant (it applies to linear layers)")
        out[name] = h
    return out


def calibrated_analysis(model: nn.Module, modules: dict[str, nn.Module], batches: list[Batch], policy,
                        rank_multiple: int, fixed: dict[str, int | None], *, outputs: Sequence[str] | None = None,
                        sequential: bool = True,
                        sensitivity: bool = True, sensitivity_batches: int = 2,
                        damping: tuple[float, ...] = DAMPING, spatial: bool = True,
                        kinds: dict[str, str] | None = None, factors: dict[str, str] | None = None,
                        variants: dict[str, str] | None = None) -> Calibrated:
    """Whitened decompositions, output-error rank allocation and (optionally) sequential refits.

    ``spatial``: layers with an alternative factorization (a conv's spatial one) take it where its measured
    output error at the policy's operating point is lower; ``kinds`` (a re-derived plan's) fixes each
    layer's kind instead. With held-out batches (a ``target`` with ``sensitivity``), the ranks and each layer's
    factors are chosen on them (:func:`choose_on_held_out`); ``factors`` (a re-derived plan's: ``{layer:
    "whitened" or "plain"}``) fixes the factors instead. ``variants`` (``{layer: kind}``) gives layers another
    stored form of the same factors (:attr:`compressor.core.handlers.LayerHandler.variants`: the pivoted one)."""
    cal = Calibrator(model, modules, batches, outputs)
    handlers = layer_handlers(modules, variants)
    decs: dict[str, Decomposition] = {}
    infos: dict[str, dict[str, Any]] = {}
    # Sensitivity is measured on batches the probe factors were not fit on: measured in sample, a layer with
    # fewer calibration rows than inputs (a classifier sees one row per image) looks free to truncate.
    hold_out = sensitivity_batches if sensitivity and across_layers(policy) and \
        len(batches) > sensitivity_batches else 0
    moments, held = cal.moments(hold_out)
    # Data-starved layers choose their ridge on the held-out batches first, so each is decomposed once with it.
    ridges = _starved_ridges(modules, handlers, moments, held, policy, damping[0]) if held is not None else {}
    damp = {name: damping_from(damping, ridges.get(name, damping[0])) for name in modules}
    for name, mom in moments.items():
        decs[name], infos[name] = decompose(modules[name], mom, damp[name], handlers[name])
    spectra = {name: LayerSpectrum.from_singular_values(name, *handlers[name].weight_matrix(mod).shape,
                                                        decs[name].S, pivoted=handlers[name].pivoted)
               for name, mod in modules.items()}
    chosen = _alternatives(modules, moments, handlers, decs, infos, spectra, operating_keep(policy), damp,
                           spatial, kinds)
    shapes = {name: tuple(handlers[name].weight_matrix(mod).shape) for name, mod in modules.items()}
    spectra = list(spectra.values())
    # Factors fit without the held-out batches, shared by the probes of data-starved layers and the held-out choice.
    fits = HeldOutFits(modules, handlers, moments, held, damp) if held is not None else None

    scales: dict[str, float] = {}
    if sensitivity and across_layers(policy):
        scales = _sensitivities(cal, spectra, modules, handlers, decs, fits, policy, rank_multiple, fixed,
                                sensitivity_batches)
    ranks = allocate(policy, spectra, rank_multiple, fixed)
    # The data-aware ranks and factors are one candidate among the plain SVD's and a whitened global threshold's:
    # whichever loses least on the held-out batches is kept (per layer, the factors that lose least there).
    selection: dict[str, Any] = {}
    summary: dict[str, Any] | None = None
    if hold_out and factors is None:
        ranks, factors, selection, summary = choose_on_held_out(cal, modules, handlers, decs, moments, held, spectra,
                                                                ranks, policy, rank_multiple, fixed, fits, hold_out)
    cal.forget_references()  # the held-out batches' recorded activations are not needed by the refits below
    plain = {n for n, f in (factors or {}).items() if f == "plain" and moments[n].xx is not None}
    for name in plain:  # refit on every batch below only the whitened ones; these need no data
        decs[name] = svd(handlers[name].weight_matrix(modules[name]))
        infos[name] = {"whitening": "none (plain SVD chosen on held-out batches)", "rows": moments[name].rows}

    def compressed(name: str) -> bool:
        r = ranks.get(name)
        return r is not None and 1 <= r <= handlers[name].max_saving_rank(*shapes[name])

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
                                   damping_from(RIDGES, default))
            if ridge != default:
                out[name] = ridge
    return out


def _sensitivities(cal: Calibrator, spectra: list, modules: dict[str, nn.Module], handlers: dict, decs: dict,
                   fits: HeldOutFits | None, policy, rank_multiple: int, fixed: dict[str, int | None],
                   batches: int) -> dict[str, float]:
    """Each probed layer is truncated alone at the rank a uniform cut would give it, and how much the model's
    output moves (over the first :data:`PROBE_BATCHES` of the ``batches`` held-out batches) per unit of the
    layer's own output error scales its error curve (``spectra``'s losses, in place). Returns those scales.

    Only layers the allocation may cut are probed: one not probed yet counts as :data:`PROBE_MARGIN` times as
    sensitive as the least sensitive probed layer, and the allocation is repeated until it cuts no unprobed
    layer. While that is a lower bound of the unprobed layers' sensitivity, the ranks are those all probes
    would give. A data-starved layer's probe factors are fit without the probe batches and its curve is
    measured on them (``fits``, shared with the held-out choice): in sample it looked free to truncate."""
    layers = {sp.name: sp for sp in spectra if sp.name not in fixed}
    curves = {name: sp.loss for name, sp in layers.items()}  # unscaled; held-out once a starved layer is probed
    scales: dict[str, float] = {}
    measure = cal.prober(min(batches, PROBE_BATCHES))
    todo = [n for n, r in allocate(policy, spectra, rank_multiple, fixed).items() if n in layers and r is not None]
    while todo:
        probes = {}
        for name in todo:
            sp, h, mod, dec = layers[name], handlers[name], modules[name], decs[name]
            r = _probe_rank(sp.m, sp.n, policy.target)
            if fits is not None and _starved(fits.held[name], sp.n):  # fit without the probe batches, measured on them
                dec, curve = fits.whitened(name)
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
                and ranks[n] <= sp.max_saving_rank]
    return scales


def _alternatives(modules: dict[str, nn.Module], moments: dict[str, Moments], handlers: dict, decs: dict,
                  infos: dict, spectra: dict, keep: float | None, damping: dict[str, tuple[float, ...]], spatial: bool,
                  kinds: dict[str, str] | None) -> dict[str, str]:
    """``{layer: alternative kind}`` for the layers factored another way; ``handlers``, ``decs``, ``infos``
    and ``spectra`` are updated to it. An alternative's whitening may be approximate (the spatial one ignores
    correlations across kernel columns), so its loss curve is rescaled to the true output error at the
    operating rank, measured with the full second moment, before the two are compared."""
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
