"""The data heal trains on: batches in a seeded order per epoch, and the teacher run on them.

The batch order is a permutation seeded by ``(seed, epoch)``, so ``(epoch, index)`` is the whole data
position a checkpoint needs to resume exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.data.inputs import call, num_samples, primary_output, take, to_device


class Batches:
    """Batches of ``inputs`` (and ``targets``) in a seeded order per epoch.

    A tensor or dict of tensors is split into batches of ``batch_size`` samples; a list of batches is
    used as given (only their order is shuffled).
    """

    def __init__(self, inputs: Any, targets: Any, batch_size: int, seed: int, shuffle: bool):
        self.inputs, self.targets, self.seed, self.shuffle = inputs, targets, seed, shuffle
        self.listed = isinstance(inputs, list)
        if self.listed:
            self.n = len(inputs)
            if targets is not None and len(targets) != self.n:
                raise CompressorError(f"{self.n} input batches but {len(targets)} target batches",
                                      "pass one target batch per input batch")
            self.batch_size = 1
        else:
            self.n = num_samples(inputs)
            if targets is not None and len(targets) != self.n:
                raise CompressorError(f"{self.n} inputs but {len(targets)} targets",
                                      "pass one target per input sample")
            self.batch_size = batch_size
        if self.n == 0:
            raise CompressorError("the data is empty", "pass at least one sample")

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def first_targets(self) -> Any:
        return self.batch(0, 0)[1]

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        # A generator of its own: the global RNG (dropout) does not move the data order, and back.
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def batch(self, epoch: int, index: int) -> tuple[Any, Any]:
        idx = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        if self.listed:
            i = int(idx[0])
            return self.inputs[i], None if self.targets is None else self.targets[i]
        return take(self.inputs, idx), None if self.targets is None else take(self.targets, idx)

    def in_order(self) -> Iterator[tuple[Any, Any]]:
        for i in range(len(self)):
            yield self.batch(0, i)


def validation_batches(val: Any, supervised: bool, batch_size: int, seed: int) -> Batches | None:
    """The held-out data in a fixed order: ``(inputs, targets)`` when ``supervised``, else inputs alone
    (compared with the teacher). Larger batches than training's: nothing is kept for a backward pass."""
    if val is None:
        return None
    vx, vy = val if supervised and isinstance(val, (tuple, list)) and len(val) == 2 else (val, None)
    if supervised and vy is None:
        raise CompressorError("the validation data has no targets",
                              "pass val_data=(inputs, targets) (--val with inputs and targets) for "
                              "supervised healing")
    return Batches(vx, vy, max(batch_size, 256), seed, shuffle=False)


def run_teacher(teacher: nn.Module, inputs: Any, device: torch.device) -> torch.Tensor:
    """The teacher's output in eval mode (its own mode is left as it was)."""
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            return primary_output(call(teacher, to_device(inputs, next(teacher.parameters()).device))).to(device)
    finally:
        teacher.train(was_training)


def is_integer(t: Any) -> bool:
    """Whether ``t`` is a tensor of whole numbers (class labels, not target outputs)."""
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex()
