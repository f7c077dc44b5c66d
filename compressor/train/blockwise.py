"""Block-wise distillation: each block of a compressed model learns to reproduce the original block.

A *block* is a repeated unit of the model that holds trainable weights: a child of a ``ModuleList``
(``encoder.layer.3`` of a Hugging Face transformer, ``layers.0`` of a Llama), or, in a model without
one, a child of the first module whose children split the trainable weights (the stages or layers of
a ``Sequential`` CNN). :func:`find_blocks` finds them; glob ``patterns`` name them instead.

Blocks are healed in order. Block ``i``'s inputs are those the *student* feeds it, after blocks
``0..i-1`` were healed, and its target is the *teacher's* block ``i`` on those same inputs. Inputs from
the student, not from the teacher's own previous block, because the student's block will see the
student's stream at inference: it learns the teacher's function where it is used, and the errors left by
earlier blocks are not compounded by a block trained on a distribution it never meets. Only block
``i``'s trainable weights move, against a cache of its inputs and targets (one pass of the model
prefix, no gradients through the rest), which is cheap in memory and time. The block's weights
with the lowest held-out output error (the start included) are kept, so no block gets worse on the
selection data.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.hooks import StopForward, captured_inputs, captured_outputs, stop_after, stop_before
from compressor.core.layers import LOW_RANK_TYPES
from compressor.data.inputs import attention_mask, call, primary_output, relative_change


def find_blocks(model: nn.Module, trainable: Sequence[str], patterns: Sequence[str] | None = None) -> list[str]:
    """The names of ``model``'s blocks that hold some of the ``trainable`` parameter names, in model
    order; the outermost where blocks nest. ``patterns`` (globs such as ``"encoder.layer.*"``) name
    them instead of the automatic rule (children of a ``ModuleList``, else the first split)."""
    def holds(name: str) -> bool:
        return any(p.startswith(name + ".") for p in trainable)

    modules = [name for name, _ in model.named_modules() if name]
    if patterns:
        found = [n for n in modules if any(fnmatch.fnmatchcase(n, p) for p in patterns) and holds(n)]
        if not found:
            raise CompressorError(f"no module matching {', '.join(patterns)} holds weights to train",
                                  "pass block patterns naming modules with factored layers, e.g. "
                                  "'encoder.layer.*', or leave them out")
    else:
        found = [f"{name}.{child}" for name, m in model.named_modules() if isinstance(m, nn.ModuleList)
                 for child, _ in m.named_children() if holds(f"{name}.{child}" if name else child)]
        found = [n.lstrip(".") for n in found]
        if not found:
            found = _first_split(model, holds)
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def _first_split(model: nn.Module, holds: Callable[[str], bool]) -> list[str]:
    """Children of the first module (from the root down) with more than one child holding weights; a
    factored layer is a block of its own (its factors are not: the teacher has no such modules)."""
    prefix, node = "", model
    while True:
        kids = [(f"{prefix}{name}", m) for name, m in node.named_children() if holds(f"{prefix}{name}")]
        if len(kids) == 1 and not isinstance(kids[0][1], LOW_RANK_TYPES) and any(True for _ in kids[0][1].children()):
            name, node = kids[0]
            prefix = name + "."
            continue
        return [name for name, _ in kids]


@dataclass
class BlockData:
    """One batch as a block sees it: its call arguments, the teacher block's output on them, and the
    padding mask of the model inputs (or None)."""

    args: tuple
    kwargs: dict[str, Any]
    target: torch.Tensor
    mask: torch.Tensor | None


@torch.no_grad()
def capture(student: nn.Module, teacher: nn.Module, name: str, batches: Sequence[Any]) -> list[BlockData]:
    """Block ``name``'s inputs in ``student`` on each of ``batches`` (model inputs) and the teacher's
    block ``name`` output on them. Only the model up to the block runs."""
    block, original = student.get_submodule(name), teacher.get_submodule(name)
    seen: list[tuple[tuple, dict]] = []
    out = []
    # The rest of the model need not run.
    with captured_inputs({name: block}, lambda _n, args, kwargs: seen.append((args, kwargs)), with_kwargs=True), \
            stop_before(block):
        for batch in batches:
            try:
                call(student, batch)
            except StopForward:
                pass
            else:
                raise CompressorError(f"block {name} does not run in the model's forward pass",
                                      "pass block patterns naming modules the forward pass calls")
            args, kwargs = seen.pop()
            out.append(BlockData(args, kwargs, primary_output(original(*args, **kwargs)), attention_mask(batch)))
    return out


@dataclass
class BlockCalls:
    """How each block was called on each batch, from one pass of the model: ``chained[i]``: block ``i``'s
    first argument was block ``i - 1``'s output (and nothing else of that output fed it); then
    ``rest[i][b]`` is its call on batch ``b`` without that argument (empty for the other blocks)."""

    chained: list[bool]
    rest: list[list[tuple[tuple, dict[str, Any]]]]


@torch.no_grad()
def record_calls(student: nn.Module, names: Sequence[str], batches: Sequence[Any]) -> BlockCalls:
    """One pass of ``student`` over ``batches`` recording how each named block is called, so that a
    chained block's inputs can be carried from the block before it (:func:`carry`) instead of running
    the model prefix again for every block (which costs a number of block passes quadratic in the blocks).
    The hidden states of chained blocks are not kept: memory stays that of one block's inputs. The pass ends
    after the last block (a decoder's head would compute a vocabulary of logits per token for nothing)."""
    blocks = [student.get_submodule(n) for n in names]
    calls: list[list[tuple[tuple, dict, Any]]] = [[] for _ in names]

    def record(i: int, args: tuple, kwargs: dict, output: Any) -> None:
        calls[i].append((args, kwargs, output))

    chained = [False] + [True] * (len(names) - 1)
    rest: list[list[tuple[tuple, dict]]] = [[] for _ in names]
    with captured_outputs(dict(enumerate(blocks)), record, with_kwargs=True), stop_after(blocks[-1]):
        for batch in batches:
            for c in calls:
                c.clear()
            with suppress(StopForward):
                call(student, batch)
            # A block run other than once per pass (shared, skipped) is captured the slow way, as is the next.
            once = [len(c) == 1 for c in calls]
            for i in range(1, len(names)):
                chained[i] = chained[i] and once[i - 1] and once[i] and _feeds(calls[i - 1][0][2], *calls[i][0][:2])
            for i, c in enumerate(calls):
                if chained[i]:
                    rest[i].append((c[0][0][1:], c[0][1]))
    # Only what a carried block needs (its hidden states come from the block before it); the others are
    # captured by running the model prefix when their turn comes.
    return BlockCalls(chained, [r if chained[i] else [] for i, r in enumerate(rest)])


def _feeds(output: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a block's first argument is the previous block's primary output, and no other argument
    is any part of that output (then the block's inputs follow from the previous block's alone)."""
    first = primary_output(output)
    if not args or args[0] is not first:
        return False
    parts = output if isinstance(output, (tuple, list)) else (output,)
    produced = {id(t) for t in parts if isinstance(t, torch.Tensor)}
    others = [*args[1:], *kwargs.values()]
    return not any(id(t) in produced for t in others if isinstance(t, torch.Tensor))


@torch.no_grad()
def carry(previous: nn.Module, data: Sequence[BlockData], teacher_block: nn.Module,
          rest: Sequence[tuple[tuple, dict[str, Any]]]) -> list[BlockData]:
    """The next (chained) block's data: its first argument is ``previous`` (the healed block before it)
    on that block's inputs, the rest as recorded (:func:`record_calls`), its target ``teacher_block``
    on those inputs."""
    out = []
    for d, (args, kwargs) in zip(data, rest, strict=True):
        args = (primary_output(previous(*d.args, **d.kwargs)), *args)
        out.append(BlockData(args, kwargs, primary_output(teacher_block(*args, **kwargs)), d.mask))
    return out


@torch.no_grad()
def block_error(block: nn.Module, data: Sequence[BlockData]) -> float:
    """``||block(x) - target||^2 / ||target||^2`` over ``data`` (padding left out)."""
    return relative_change((primary_output(block(*d.args, **d.kwargs)), d.target, d.mask) for d in data)


def train_block(block: nn.Module, params: dict[str, nn.Parameter], train: Sequence[BlockData],
                select: Sequence[BlockData], loss_fn: Callable, optimizer: torch.optim.Optimizer,
                factor: Callable[[int], float], steps: int, seed: int, grad_clip: float | None,
                evaluations: int = 4) -> dict[str, Any]:
    """Train ``params`` (the block's trainable weights) for ``steps`` so that ``block`` reproduces the
    targets of ``train``; keep the weights with the lowest :func:`block_error` on ``select`` among the
    start and ``evaluations`` evenly spaced steps. Returns ``{"before", "after", "best_step", "steps",
    "history"}`` (errors on ``select``)."""
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    every = max(1, math.ceil(steps / evaluations))
    history = [{"step": 0, "error": block_error(block, select)}]
    best, best_weights = history[0], {k: p.detach().clone() for k, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for step in range(1, steps + 1):
        if not order:
            order = torch.randperm(len(train), generator=generator).tolist()
        d = train[order.pop()]
        value = loss_fn(primary_output(block(*d.args, **d.kwargs)), d.target, d.mask)
        if not torch.isfinite(value):
            raise CompressorError(f"the block loss became {value.item()} at step {step}",
                                  "lower the block learning rate (block_lr= or --block-lr)")
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(list(params.values()), grad_clip)
        optimizer.step()
        sched.step()
        if step % every == 0 or step == steps:
            history.append({"step": step, "error": block_error(block, select)})
            if history[-1]["error"] < best["error"]:
                best, best_weights = history[-1], {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(best_weights[k])
    return {"before": history[0]["error"], "after": best["error"], "best_step": best["step"], "steps": steps,
            "history": history}
