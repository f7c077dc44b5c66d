"""Simulated int8 (as onnxruntime's dynamic int8 computes) and per-layer int8 sensitivity.

Which layers the int8 export quantizes, and how, is each layer kind's business: its handler's
``int8_forward`` (:mod:`compressor.core.handlers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compressor.core.handlers import handler_for, simulate_quantization
from compressor.core.layers import LOW_RANK_TYPES
from compressor.data.inputs import as_batches, attention_mask, call, relative_change


def fake_int8(model: nn.Module) -> nn.Module:
    """Make every layer of ``model`` that the int8 export quantizes (in place) compute as onnxruntime's
    dynamic int8 does (its handler's ``int8_forward``: weights rounded per output channel, inputs per
    tensor), with straight-through gradients. Undo with :func:`remove_fake_int8`. Attention's
    activation-by-activation products stay float, as in the export. Matches onnxruntime's int8 outputs
    to float rounding (tests/test_recipes.py)."""
    for mod in model.modules():
        _simulate_int8(mod)
    return model


def int8_sensitivity(model: nn.Module, batches: Any, limit: int = 2, outputs: Sequence[str] = ()
                     ) -> dict[str, float]:
    """How much int8 rounding of each layer alone moves ``model``'s compared outputs (relative squared
    change, :func:`compressor.data.inputs.relative_change`) over the first ``limit`` batches, with the
    layer computing as the int8 export will (:func:`fake_int8`). Layers are those whose handler simulates
    int8; the two factors of a factored layer count as one (they are kept or quantized together)."""
    units: dict[str, list[nn.Module]] = {}
    inside = set()
    for name, mod in model.named_modules():  # parents come before their children
        if isinstance(mod, LOW_RANK_TYPES):
            units[name] = [mod.down, mod.up]
            inside.update((id(mod.down), id(mod.up)))
        elif id(mod) not in inside and (h := handler_for(mod)) is not None and h.simulates_int8():
            units[name] = [mod]
    data = as_batches(batches)[:limit]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            refs = [call(model, b) for b in data]
            out = {}
            for name, mods in units.items():
                for m in mods:
                    _simulate_int8(m)
                try:
                    out[name] = relative_change(((call(model, b), r, attention_mask(b))
                                                 for b, r in zip(data, refs, strict=True)), outputs or None)
                finally:
                    for m in mods:
                        m.__dict__.pop("forward", None)
    finally:
        model.train(was_training)
    return out


def most_sensitive(sensitivity: dict[str, float], model: nn.Module, k: int) -> list[str]:
    """The ``k`` layers whose int8 rounding costs most output change per weight: keeping those in fp16
    buys the most fidelity per byte (fp16 storage costs one byte per weight more than int8)."""
    modules = dict(model.named_modules())
    size = {n: sum(p.numel() for p in modules[n].parameters()) for n in sensitivity}
    return sorted(sensitivity, key=lambda n: (-sensitivity[n] / max(size[n], 1), n))[:k]


def remove_fake_int8(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        mod.__dict__.pop("forward", None)
    return model


def _simulate_int8(mod: nn.Module) -> None:
    simulate_quantization(mod, "int8")
