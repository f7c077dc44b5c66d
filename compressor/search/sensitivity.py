"""Simulated int8 (as onnxruntime's dynamic int8 computes) and per-layer int8 sensitivity."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def fake_int8(model: nn.Module) -> nn.Module:
    """Make every ``nn.Linear`` of ``model`` (in place) compute as onnxruntime's dynamic int8 does: weights
    rounded per output channel (symmetric int8 in [-127, 127], scale max|w| / 127) and inputs per tensor
    (uint8, asymmetric range including 0, as DynamicQuantizeLinear), with straight-through gradients.
    Undo with :func:`remove_fake_int8`. Attention's activation-by-activation products stay float, as in
    the export. Matches onnxruntime's int8 outputs to float rounding (tests/test_recipes.py)."""
    for mod in model.modules():
        if type(mod) is nn.Linear:
            mod.forward = _fake_int8_linear.__get__(mod)
    return model


def int8_sensitivity(model: nn.Module, batches: Any, limit: int = 2) -> dict[str, float]:
    """How much int8 rounding of each layer alone moves ``model``'s first output: relative squared change
    ``||Y' - Y||^2 / ||Y||^2`` over the first ``limit`` batches, with the layer computing as the int8
    export will (:func:`fake_int8`). Layers are the model's ``nn.Linear`` modules, the two factors of a
    factored linear layer counting as one (they are kept or quantized together); a factored embedding's
    ``.up`` is a layer of its own (its big lookup table is never worth keeping)."""
    from compressor.core.layers import LowRankLinear
    from compressor.data.calibration import as_batches, first_tensor, relative_change, run_model

    units: dict[str, list[nn.Linear]] = {}
    inside = set()
    for name, mod in model.named_modules():  # parents come before their children
        if isinstance(mod, LowRankLinear):
            units[name] = [mod.down, mod.up]
            inside.update((id(mod.down), id(mod.up)))
        elif type(mod) is nn.Linear and id(mod) not in inside:
            units[name] = [mod]
    data = as_batches(batches)[:limit]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            refs = [first_tensor(run_model(model, b)) for b in data]
            out = {}
            for name, mods in units.items():
                for m in mods:
                    m.forward = _fake_int8_linear.__get__(m)
                try:
                    out[name] = relative_change(model, data, refs)
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


def _fake_int8_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    scale = w.detach().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    wq = w + ((w / scale).round().clamp(-127, 127) * scale - w).detach()
    lo, hi = x.detach().min().clamp(max=0), x.detach().max().clamp(min=0)
    s = ((hi - lo) / 255).clamp(min=1e-12)
    zp = (-lo / s).round().clamp(0, 255)
    xq = x + ((((x / s).round() + zp).clamp(0, 255) - zp) * s - x).detach()
    return nn.functional.linear(xq, wq, self.bias)
