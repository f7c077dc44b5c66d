"""Rewrite: swap each layer the plan factors for its two-layer low-rank replacement.

    model = compressor.rewrite(model, plan)

The model is changed in place (and returned, for chaining). Replacements are built on the original
weight's device and dtype; biases move to the second factor. State-dict keys of a factored layer
``name`` become ``name.down.weight``, ``name.up.weight`` and ``name.up.bias``.
"""

from __future__ import annotations

from torch import nn

from compressor.core.errors import PlanError
from compressor.core.fold import apply_folds
from compressor.core.handlers import LayerHandler, handler_for, handler_for_kind, kinds, weight_fingerprint
from compressor.core.plan import Plan
from compressor.core.svd import Decomposition


def factor_module(module: nn.Module, rank: int, decomposition: Decomposition | None = None,
                  kind: str | None = None) -> nn.Module:
    """The low-rank replacement of ``module`` at ``rank`` (any rank up to full: no break-even check).

    ``decomposition`` is the SVD of the module's weight matrix (computed here when None); a data-aware
    decomposition (with ``right_inv``) gives factors that minimise output error instead. ``kind`` picks an
    alternative factorization (``"conv2d-spatial"``); None: the module's own kind.
    """
    return _handler(module, kind).factor(module, rank, decomposition)


def empty_factored(module: nn.Module, rank: int, kind: str | None = None) -> nn.Module:
    """The low-rank layer that replaces ``module`` at ``rank``, with freshly initialised factors (no SVD),
    on the module's device and dtype."""
    new = _handler(module, kind).empty_factored(module, rank)
    new.train(module.training)
    return new


def _handler(module: nn.Module, kind: str | None = None) -> LayerHandler:
    h = handler_for(module) if kind is None else handler_for_kind(module, kind)
    if h is None:
        what = type(module).__name__ + ("" if kind is None else f" as {kind}")
        raise PlanError(f"{what} cannot be factored",
                        f"factor layers of a registered kind ({', '.join(kinds())}) or register a handler")
    return h


def rewrite(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace every layer with a ``rank`` in ``plan`` by its factored form; returns ``model``.

    Raises :class:`PlanError` (and changes nothing) when the plan does not fit the model: an unknown
    layer, a shape mismatch, or a rank that would not save parameters. The BatchNorms in ``plan.folded``
    are folded into their convs first (exact in eval mode: rewrite a model meant for inference).
    """
    todo = []
    for lp, module in _check_plan(model, plan):
        cached = plan._cache.get(lp.name)
        dec = cached[0] if cached and cached[1] == weight_fingerprint(module) else None
        if dec is None and plan.method != "svd":
            # Plain SVD factors would silently lose what the calibration data bought.
            raise PlanError(f"the plan's '{plan.method}' factors of layer '{lp.name}' need its calibration "
                            "data (a plan read from JSON, or weights changed since analyze)",
                            "re-run compressor.analyze(model, plan=plan, calibration=...) before rewrite")
        if dec is not None and dec.kept_rank is not None and lp.rank > dec.kept_rank:
            # A decoder's calibrated analysis keeps each layer's factors only up to the rank it chose.
            raise PlanError(f"layer '{lp.name}' was analysed for ranks up to {dec.kept_rank} and the plan asks "
                            f"for {lp.rank}", "re-run compressor.analyze(model, plan=plan, calibration=...) with "
                            "the edited plan before rewrite")
        todo.append((lp, module, dec))
    apply_folds(model, plan.folded)  # checks every pair before changing anything
    for lp, module, dec in todo:  # every check passed: only now is the model changed
        _set_submodule(model, lp.name, factor_module(module, lp.rank, dec, lp.kind))
    return model


def build_factored(model: nn.Module, plan: Plan) -> nn.Module:
    """Swap in the plan's factored layers with uninitialised-by-SVD factors (no SVD is computed): the
    skeleton that saved factored weights load into. Changes nothing when the plan does not fit."""
    todo = _check_plan(model, plan)
    apply_folds(model, plan.folded, weights=False)
    for lp, module in todo:
        _set_submodule(model, lp.name, empty_factored(module, lp.rank, lp.kind))
    return model


def factored_table(plan: Plan) -> dict[str, dict]:
    """``{layer: {"kind", "rank", "shape"}}`` for every layer ``plan`` factors: all that
    :func:`build_from_table` needs to rebuild the factored skeleton (what a Hugging Face config carries)."""
    return {lp.name: {"kind": lp.kind, "rank": lp.rank, "shape": list(lp.shape)} for lp in plan.factored}


def build_from_table(model: nn.Module, table: dict[str, dict]) -> nn.Module:
    """:func:`build_factored` from a :func:`factored_table` instead of a whole plan; changes nothing when
    a layer is missing or has another shape."""
    todo = []
    for name, entry in table.items():
        try:
            module = model.get_submodule(name)
            kind, rank, shape = entry["kind"], entry["rank"], entry["shape"]
        except (AttributeError, KeyError, TypeError):
            raise PlanError(f"the factored layer '{name}' does not fit this model (or its entry is damaged)",
                            "load the folder with the model class it was written for") from None
        h = handler_for_kind(module, kind)
        if h is None or list(h.weight(module).shape) != list(shape) or not isinstance(rank, int) or rank < 1:
            raise PlanError(f"layer '{name}' is {type(module).__name__} in the model but a {kind} of shape {shape} "
                            "in the folder", "load the folder with the model class it was written for")
        todo.append((name, module, kind, rank))
    for name, module, kind, rank in todo:
        _set_submodule(model, name, empty_factored(module, rank, kind))
    return model


def _check_plan(model: nn.Module, plan: Plan) -> list[tuple]:
    """``(layer plan, module)`` for every layer the plan factors; raises PlanError if any does not fit."""
    todo = []
    for lp in plan.factored:
        try:
            module = model.get_submodule(lp.name)
        except AttributeError:
            raise PlanError(f"the plan factors layer '{lp.name}', which this model does not have",
                            "apply the plan to the model it was made for") from None
        h = handler_for_kind(module, lp.kind)
        if h is None or list(h.weight(module).shape) != list(lp.shape):
            got = list(h.weight(module).shape) if h is not None else type(module).__name__
            raise PlanError(f"layer '{lp.name}' is {got} in the model but {lp.shape} in the plan",
                            "apply the plan to the model it was made for")
        if not lp.supported:
            raise PlanError(f"layer '{lp.name}' cannot be factored: {lp.reason}",
                            "set its \"rank\" to null in the plan")
        m, n = lp.matrix_shape
        top = h.max_saving_rank(m, n)
        if not 1 <= lp.rank <= top:
            raise PlanError(f"layer '{lp.name}': rank {lp.rank} saves no parameters (must be 1..{top} "
                            f"for a {m}x{n} matrix)", f"set its \"rank\" below {top + 1} or to null")
        todo.append((lp, module))
    return todo


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
