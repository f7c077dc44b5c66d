"""BatchNorm folding: ``bn(conv(x))`` computed by one conv, exactly, in eval mode.

In eval mode a BatchNorm is the per-channel affine map ``y = s * (z - mean) + beta`` with
``s = gamma / sqrt(var + eps)``, so after a conv ``z = W x + b`` it is the conv ``W' = s W``,
``b' = s (b - mean) + beta``. Factoring the folded ``W'`` weighs each output channel by what the network
actually passes on (a channel the BN scales by 10 matters 10x more), and the factored model has one
layer fewer per pair. The BN is replaced by ``nn.Identity`` in place.

Which BN follows which conv is a property of the forward, not of the module tree: it is found by
:func:`compressor.analysis.batchnorm.conv_bn_pairs` and recorded in the plan (``plan.folded``), so
``rewrite`` and ``load`` repeat exactly the same folds.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.core.errors import PlanError

_BN_FOR_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn`` can be folded into ``conv``: matching dims and channels, running statistics kept
    (without them eval mode normalises by batch statistics, which no fixed weight computes)."""
    want = next((b for c, b in _BN_FOR_CONV.items() if type(conv) is c), None)
    return (want is not None and type(bn) is want and bn.track_running_stats and bn.running_mean is not None
            and bn.num_features == conv.out_channels)


@torch.no_grad()
def fold_into(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, bn: nn.Module) -> None:
    """Fold ``bn``'s eval-mode affine map into ``conv``'s weight and bias, in place (the conv gains a bias
    if it had none). ``bn`` itself is left unchanged: the caller replaces it by ``nn.Identity``."""
    w = conv.weight
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = (bias - bn.running_mean.double()) * scale
    if bn.bias is not None:
        new_bias = new_bias + bn.bias.double()
    w.copy_((w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(w.dtype), requires_grad=w.requires_grad)
    else:
        conv.bias.copy_(new_bias.to(w.dtype))


def apply_folds(model: nn.Module, pairs: list[list[str]], *, weights: bool = True) -> nn.Module:
    """Fold each ``[conv name, bn name]`` of ``pairs`` and put ``nn.Identity`` in the BN's place; returns
    ``model``. ``weights`` False only reshapes (a conv bias of zeros, the BN removed): the skeleton that
    saved folded weights load into. Raises PlanError, changing nothing, when a pair does not fit."""
    found = []
    for conv_name, bn_name in pairs:
        try:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        except AttributeError:
            raise PlanError(f"the plan folds BatchNorm '{bn_name}' into conv '{conv_name}', which this model "
                            "does not have", "apply the plan to the model it was made for") from None
        if not foldable(conv, bn):
            raise PlanError(f"'{bn_name}' ({type(bn).__name__}) cannot be folded into '{conv_name}' "
                            f"({type(conv).__name__})", "apply the plan to the model it was made for")
        found.append((conv, bn, bn_name))
    for conv, bn, bn_name in found:
        if weights:
            fold_into(conv, bn)
        elif conv.bias is None:
            w = conv.weight
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=w.device, dtype=w.dtype))
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return model
