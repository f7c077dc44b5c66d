"""The plan: which layers to factor at which rank, and what that costs, as plain versioned JSON.

A plan is what ``analyze`` produces and ``rewrite`` consumes. A user may edit it: set a layer's
``rank`` to an integer to factor it at that rank, or to ``null`` to keep it dense, then re-apply it
(``compressor.rewrite(model, Plan.from_json(path))`` or ``compress apply MODEL plan.json``).
Everything else in a layer entry is information, refreshed by ``compressor.analyze(model, plan=plan)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compressor.core.errors import CompressorError, PlanError
from compressor.core.fileio import atomic_write_text
from compressor.core.statefile import read_json

PLAN_FORMAT = "compressor-plan"
PLAN_VERSION = 1
FACTORS = ("whitened", "plain")  # the factors a data-aware plan's layer may take (LayerPlan.selection)
MACS_UNIT = "multiply-adds per output position (token for linear/embedding, output pixel for conv)"


@dataclass
class LayerPlan:
    """One weight of the model: its shape, spectrum summary and the rank chosen for it.

    ``rank`` is what ``rewrite`` applies (None: left dense). ``policy_rank`` is what the policy asked
    for before the break-even check, so a reader sees why a layer stayed dense.
    """

    name: str
    kind: str  # "linear", "conv1d", "conv2d", "embedding", or the module's class name when unsupported
    shape: list[int]  # the weight's own shape
    matrix_shape: list[int]  # (m, n): the shape the SVD sees
    full_rank: int  # min(m, n)
    break_even_rank: float  # m*n/(m+n): factoring at this rank or above saves nothing
    rank: int | None  # applied rank, None when left dense
    policy_rank: int | None
    energy_kept: float
    rel_error: float  # ||W - W_r||_F / ||W||_F (of the whitened weight for data-aware methods)
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    factored: bool
    reason: str
    supported: bool = True  # False: never factorable (grouped conv, tied weight, ...), see reason
    estimated_output_error: float | None = None  # data-aware methods: relative output error estimate
    # Randomized SVD: method ("randomized", or "exact" after a failed check), rank, a-posteriori bound.
    # Left out of the JSON when None, so plans of the exact path read as before.
    svd: dict[str, Any] | None = None
    # Data-aware methods: the factors this layer takes ("whitened" or "plain"), the ranks' allocation and why,
    # as chosen on held-out calibration batches. Left out of the JSON when None (plans written before it load).
    selection: dict[str, Any] | None = None

    @property
    def m(self) -> int:
        return self.matrix_shape[0]

    @property
    def n(self) -> int:
        return self.matrix_shape[1]


@dataclass
class Plan:
    """A whole-model plan; ``layers`` lists every weight matrix found, factored or not."""

    policy: dict[str, Any]
    layers: list[LayerPlan]
    params_total_before: int  # every parameter of the model, once each
    method: str = "svd"
    calibration: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    # [conv name, BatchNorm name] pairs folded (core/fold.py) before factoring; rewrite folds them first.
    folded: list[list[str]] = field(default_factory=list)
    version: int = PLAN_VERSION
    # Decompositions computed by analyze, reused by rewrite while the weights are unchanged.
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ----------------------------------------------------------------------------------- queries
    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    def ranks(self) -> dict[str, int | None]:
        """``{layer name: rank or None}`` for every supported layer: the plan's editable content."""
        return {lp.name: lp.rank for lp in self.layers if lp.supported}

    @property
    def factored(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.rank is not None]

    def totals(self) -> dict[str, Any]:
        """Parameter and multiply-add totals; ``removed_fraction`` is of the factorizable weights."""
        # Factorizable parameters are the weight matrices of supported layers; biases cannot shrink.
        supported = [lp for lp in self.layers if lp.supported]
        fact_before = sum(lp.m * lp.n for lp in supported)
        # A factored layer's weights as analyze counted them for its kind (the pivoted form holds fewer).
        fact_after = sum(lp.params_after - (lp.params_before - lp.m * lp.n) for lp in supported)
        delta = sum(lp.params_before - lp.params_after for lp in self.layers)
        return {
            "params_before": self.params_total_before,
            "params_after": self.params_total_before - delta,
            "factorizable_params_before": fact_before,
            "factorizable_params_after": fact_after,
            "removed_fraction": (fact_before - fact_after) / fact_before if fact_before else 0.0,
            "macs_before": sum(lp.macs_before for lp in self.layers),
            "macs_after": sum(lp.macs_after for lp in self.layers),
            "macs_unit": MACS_UNIT,
            "layers_total": len(self.layers),
            "layers_supported": len(supported),
            "layers_factored": len(self.factored),
        }

    # -------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "method": self.method,
            "policy": self.policy,
            "totals": self.totals(),
            "calibration": self.calibration,
            "notes": self.notes,
            "folded": self.folded,
            "layers": [_entry_dict(lp) for lp in self.layers],
        }

    def to_json(self, path: str | Path) -> None:
        """Write the plan as indented JSON, atomically."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError("not a compressor plan (no \"format\": \"compressor-plan\")",
                            "pass a plan.json written by `compress analyze` or Plan.to_json")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {data.get('version')} is not supported (this is version "
                            f"{PLAN_VERSION})", "re-create the plan with this version of compressor")
        try:
            layers = [LayerPlan(**lp) for lp in data["layers"]]
            plan = cls(policy=data["policy"], layers=layers,
                       params_total_before=int(data["totals"]["params_before"]),
                       method=data.get("method", "svd"), calibration=data.get("calibration"),
                       notes=list(data.get("notes", [])), folded=[list(p) for p in data.get("folded", [])])
        except (KeyError, TypeError) as err:
            raise PlanError(f"plan is missing or has a malformed field ({err})",
                            "only edit the \"rank\" values of a plan written by compressor") from None
        seen: set[str] = set()
        for lp in plan.layers:
            if not isinstance(lp.name, str) or not isinstance(lp.shape, list) or \
                    not all(isinstance(d, int) and not isinstance(d, bool) for d in lp.shape) or \
                    not isinstance(lp.supported, bool):
                raise PlanError(f"plan layer {str(lp.name)[:60]!r} has a name, shape or \"supported\" of the wrong "
                                "type", "only edit the \"rank\" values of a plan written by compressor")
            if lp.name in seen:
                raise PlanError(f"the plan lists layer '{lp.name}' twice",
                                "keep one entry per layer (re-create the plan with compress analyze)")
            seen.add(lp.name)
            if lp.rank is not None and (not isinstance(lp.rank, int) or isinstance(lp.rank, bool)):
                raise PlanError(f"layer '{lp.name}': rank {lp.rank!r} is not an integer or null",
                                "set \"rank\" to a whole number or null")
            lp.factored = lp.rank is not None
            if lp.selection is not None and (not isinstance(lp.selection, dict) or
                                             lp.selection.get("factors") not in FACTORS):
                raise PlanError(f"layer '{lp.name}': \"selection\" must be an object with \"factors\" one of "
                                f"{', '.join(FACTORS)}",
                                "only edit the \"rank\" values of a plan written by compressor")
        return plan

    @classmethod
    def from_json(cls, path: str | Path) -> Plan:
        try:  # bounded (size, depth) and a regular file: a FIFO would block the read forever
            data = read_json(path, "plan file", "fix the JSON or re-create the plan", kind=None)
        except CompressorError as err:
            raise PlanError(err.problem, err.fix) from None
        return cls.from_dict(data)

    # ----------------------------------------------------------------------------------- display
    def table(self, only_supported: bool = True) -> str:
        """A fixed-width per-layer table for terminals and reports."""
        head = (f"{'layer':<48} {'shape':>13} {'rank':>6} {'full':>5} {'energy':>7} {'err':>6} "
                f"{'params':>19}  note")
        rows = [head, "-" * len(head)]
        for lp in self.layers:
            if only_supported and not lp.supported:
                continue
            shape = "x".join(str(s) for s in lp.matrix_shape)
            rank = str(lp.rank) if lp.rank is not None else "-"
            params = f"{lp.params_before:>8} -> {lp.params_after:<8}"
            note = "factored" if lp.factored else lp.reason
            energy = "" if math.isnan(lp.energy_kept) else f"{lp.energy_kept:.4f}"
            err = "" if math.isnan(lp.rel_error) else f"{lp.rel_error:.3f}"
            rows.append(f"{lp.name[-48:]:<48} {shape:>13} {rank:>6} {lp.full_rank:>5} {energy:>7} "
                        f"{err:>6} {params}  {note}")
        t = self.totals()
        rows.append(f"total parameters {t['params_before']:,} -> {t['params_after']:,} "
                    f"({t['params_after'] / max(t['params_before'], 1):.1%}); factorizable weights "
                    f"{t['removed_fraction']:.1%} removed; {t['layers_factored']} of "
                    f"{t['layers_supported']} layers factored")
        return "\n".join(rows)


def _entry_dict(lp: LayerPlan) -> dict[str, Any]:
    d = asdict(lp)
    for key in ("svd", "selection"):
        if d[key] is None:
            del d[key]
    return d
