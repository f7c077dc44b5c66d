"""Which BatchNorm reads which conv's output: found by running the model once, then checked by folding.

A forward hook records the tensor each conv returns; a BatchNorm whose input IS one of those tensors
follows that conv. Hooks cannot see whether something else also reads the conv's raw output (a skip
connection taken before the BN), where folding would change that other reader; so the folds are applied
to a copy and the copy's outputs compared with the model's: any pair that changes them is dropped.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from compressor.core.fold import apply_folds, foldable
from compressor.core.hooks import captured_inputs, captured_outputs
from compressor.data.inputs import Batch, call, compared_outputs, eval_mode, take

# Largest relative change of any output a fold may cause: folding is exact up to float rounding (about
# 1e-7 relative per layer in float32), a reader of the raw conv output changes it by far more.
FOLD_TOLERANCE = 1e-4


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, batch: Batch, convs: set[str] | None = None) -> list[list[str]]:
    """``[conv name, bn name]`` for every BatchNorm that directly follows a conv on ``batch`` (in eval mode)
    and can be folded into it without changing the model's outputs. ``convs`` limits the convs
    considered (None: all). The model is not changed."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return []  # no forward pass for nothing to find (an ONNX graph's BatchNorms are no modules)
    batch = take(batch, slice(0, 2))
    produced: dict[int, str] = {}
    pairs: list[list[str]] = []
    alive: list[torch.Tensor] = []  # outputs held so that no id is reused during the pass
    conv_mods = {n: m for n, m in model.named_modules()
                 if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and (convs is None or n in convs)}
    bn_mods = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    def post(name, _args, out):
        alive.append(out)
        produced[id(out)] = name

    def pre(name, args):
        conv = produced.get(id(args[0])) if args else None
        if conv is not None and foldable(model.get_submodule(conv), bn_mods[name]):
            pairs.append([conv, name])

    with captured_outputs(conv_mods, post), captured_inputs(bn_mods, pre), eval_mode(model):
        call(model, batch)
    # A conv or BN called twice in one forward (shared modules) appears twice: fold neither.
    convs_seen = [c for c, _ in pairs]
    bns_seen = [b for _, b in pairs]
    pairs = [p for p in pairs if convs_seen.count(p[0]) == 1 and bns_seen.count(p[1]) == 1]
    return [p for p in pairs if _exact(model, [p], batch)] if pairs and not _exact(model, pairs, batch) else pairs


def _exact(model: nn.Module, pairs: list[list[str]], batch: Batch) -> bool:
    folded = apply_folds(copy.deepcopy(model), pairs)
    with eval_mode(model), eval_mode(folded):
        return _close(call(model, batch), call(folded, batch))


def _close(ref: Any, new: Any) -> bool:
    for (_, a), (_, b) in zip(compared_outputs(ref), compared_outputs(new), strict=True):
        scale = float(a.double().norm())
        if float((a.double() - b.double()).norm()) > FOLD_TOLERANCE * max(scale, 1e-12):
            return False
    return True
