"""What heal minimises and measures: the named losses, the hidden-state loss, the validation metrics.

Every loss takes ``(output, target, mask)``, the attention mask leaving padding out of the mean, so a loss
of one's own (``heal(..., loss_fn=...)``) plugs in where a named one does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from compressor.core.errors import CompressorError
from compressor.core.hooks import captured_outputs
from compressor.data.inputs import attention_mask, call, primary_output, to_device
from compressor.train.batches import Batches

LOSSES = ("mse", "kl", "ce", "cosine")


def masked_mean(per_item: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``per_item`` over the positions ``mask`` keeps (all of them without a fitting mask)."""
    if mask is None or mask.shape != per_item.shape:
        return per_item.mean()
    m = mask.to(per_item.dtype)
    return (per_item * m).sum() / m.sum().clamp(min=1)


def mse_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if out.dim() < 2:
        return F.mse_loss(out, target.to(out.dtype))
    return masked_mean((out - target.to(out.dtype)).pow(2).mean(-1), mask)


def ce_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def cosine_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return masked_mean(1 - F.cosine_similarity(out, target.to(out.dtype), dim=-1), mask)


def make_kl_loss(temperature: float) -> Callable:
    def kl_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """KL(teacher || student) of the softened class distributions, times T^2 (Hinton et al.)."""
        logp = F.log_softmax(out / temperature, -1)
        logq = F.log_softmax(target.to(out.dtype) / temperature, -1)
        per_item = (logq.exp() * (logq - logp)).sum(-1)
        return masked_mean(per_item, mask) * temperature ** 2
    return kl_loss


_LOSS_FNS: dict[str, Callable] = {"mse": mse_loss, "ce": ce_loss, "cosine": cosine_loss}


def loss_function(name: str, temperature: float) -> Callable:
    """The loss named ``name`` (one of :data:`LOSSES`); kl softens at ``temperature``."""
    return make_kl_loss(temperature) if name == "kl" else _LOSS_FNS[name]


# ------------------------------------------------------------------- distill="hidden": block outputs

@contextmanager
def block_outputs(net: nn.Module, names: Sequence[str]) -> Iterator[list[torch.Tensor]]:
    """A list that the forward passes run inside the ``with`` fill with the primary outputs of ``net``'s
    blocks ``names``, in call order; the hooks are removed on leaving (the teacher is the caller's)."""
    outputs: list[torch.Tensor] = []
    blocks = {n: net.get_submodule(n) for n in names}
    with captured_outputs(blocks, lambda _n, _a, out: outputs.append(primary_output(out))):
        yield outputs


def hidden_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over blocks of ``||h - h_teacher||^2 / ||h_teacher||^2`` (padding left out): each block's
    output error relative to its scale, so that no block dominates by the size of its activations."""
    if len(student) != len(teacher) or not student:
        raise CompressorError(f"the model's blocks ran {len(student)} times but the teacher's {len(teacher)}",
                              "pass distill='output' (--distill output) for models whose blocks differ")
    terms = [masked_mean((s - t.to(s.dtype)).pow(2).mean(-1), mask)
             / masked_mean(t.to(s.dtype).pow(2).mean(-1), mask).clamp(min=1e-12)
             for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()


# ------------------------------------------------------------------------------- validation metrics

@torch.no_grad()
def validation_metrics(model: nn.Module, loader: Batches, teacher_out: list[torch.Tensor] | None, loss_fn: Callable,
                       classes: bool, device: torch.device) -> dict[str, float]:
    """``val_loss`` on the held-out ``loader``, with ``val_accuracy`` for class labels (``classes``) or
    ``val_cosine`` against the teacher's outputs (``teacher_out``, one per batch)."""
    total = correct = cos = 0.0
    count = labels = 0
    for i, (inputs, tgt) in enumerate(loader.in_order()):
        inputs = to_device(inputs, device)
        tgt = teacher_out[i] if teacher_out is not None else to_device(tgt, device)
        out = primary_output(call(model, inputs))
        n = out.shape[0]
        total += float(loss_fn(out, tgt, attention_mask(inputs))) * n
        count += n
        if classes:
            correct += float((out.argmax(-1) == tgt).sum())
            labels += tgt.numel()
        elif teacher_out is not None:
            cos += float(masked_mean(F.cosine_similarity(out, tgt, dim=-1), attention_mask(inputs))) * n
    metrics = {"val_loss": total / count}
    if classes:
        metrics["val_accuracy"] = correct / labels
    elif teacher_out is not None:
        metrics["val_cosine"] = cos / count
    return metrics
