"""How close a compressed model stays to the original, and what the run says when it does not: the fidelity
of its outputs, the layers that cost most alone, the warnings in the report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compressor.core.plan import Plan
from compressor.data.inputs import attention_mask, batches_fidelity, call, cosine_fidelity, eval_mode
from compressor.jobs.options import Options

# Below this mean cosine to the original (on the example inputs) a compressed model's outputs are plainly
# different, and the run says so (report.warnings, a `warning:` line, a LowFidelityWarning).
LOW_FIDELITY_COSINE = 0.9


# How many of the layers that hurt most alone that warning names.
WORST_LAYERS_SHOWN = 3



class LowFidelityWarning(UserWarning):
    """The compressed model's outputs are far from the original's (see LOW_FIDELITY_COSINE)."""


def low_fidelity_warning(cosine: float, original: nn.Module, compressed: nn.Module, plan: Plan, inputs,
                         opts: Options, measured_on: str = "the example inputs") -> dict[str, Any]:
    """What to tell the user when fidelity is poor: how poor (``measured_on``: what it was measured on), the
    layers whose factoring alone costs most (measured on ``inputs``: each factored layer swapped alone into
    the original), and what would help. ``message`` spells the fixes for Python, ``cli`` for the command line."""
    damage = layer_damage(original, compressed, [lp.name for lp in plan.factored], inputs, opts.outputs)
    worst = sorted(damage, key=damage.get)[:WORST_LAYERS_SHOWN]
    shown = ", ".join(f"{n} (cosine {damage[n]:.3f} alone)" for n in worst)
    problem = (f"the compressed model keeps cosine {cosine:.3f} to the original on {measured_on}, below "
               f"{LOW_FIDELITY_COSINE}: its outputs are plainly different; the factored layers that cost most "
               f"alone are {shown}")
    data_aware = "" if plan.method != "svd" else " data-aware factors ({}),"
    api = (f"{problem}; try{data_aware.format('calibration=...')} leaving the worst layers dense "
           f"(exclude={worst!r}), or a milder policy")
    cli = (f"{problem}; try{data_aware.format('--calibration FILE')} leaving the worst layers dense "
           f"({' '.join(f'--exclude {n!r}' for n in worst)}), or a milder policy")
    return {"kind": "low_fidelity", "cosine": cosine, "threshold": LOW_FIDELITY_COSINE,
            "worst_layers": {n: damage[n] for n in worst}, "message": api, "cli": cli}


@torch.no_grad()
def layer_damage(original: nn.Module, compressed: nn.Module, names: Sequence[str], inputs,
                 outputs: Sequence[str] = ()) -> dict[str, float]:
    """For each named layer: the mean cosine of ``original``'s compared outputs with only that layer
    replaced by ``compressed``'s version of it, to ``original``'s own (``original`` is restored after each)."""
    with eval_mode(original):
        ref = call(original, inputs)
        out = {}
        for name in names:
            parent_name, _, leaf = name.rpartition(".")
            parent = original.get_submodule(parent_name)
            dense = getattr(parent, leaf)
            setattr(parent, leaf, compressed.get_submodule(name))
            try:
                out[name] = cosine_fidelity(ref, call(original, inputs), outputs or None,
                                            attention_mask(inputs))["cosine_mean"]
            finally:
                setattr(parent, leaf, dense)
    return out


@torch.no_grad()
def output_fidelity(reference: nn.Module, model: nn.Module, batches: Sequence[Any],
                    outputs: Sequence[str] = ()) -> dict[str, Any]:
    """How close ``model``'s compared outputs are to ``reference``'s on ``batches`` of inputs: per-sample
    cosine (mean and worst) and relative error (:func:`compressor.data.inputs.batches_fidelity`), and which
    outputs were compared (``compared``)."""
    with eval_mode(reference), eval_mode(model):
        result: dict[str, Any] = batches_fidelity(((call(reference, b), call(model, b), attention_mask(b))
                                                   for b in batches), outputs or None)
    result["compared"] = ", ".join(outputs) if outputs else "every floating-point output"
    return result

