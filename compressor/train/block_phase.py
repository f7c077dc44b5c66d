"""The block-wise phase of heal (``method="blockwise"`` or ``"both"``): :mod:`compressor.train.blockwise`'s
per-block training, run over the blocks in order with heal's settings, checkpoints and resume.

Kept apart from :mod:`compressor.train.blockwise`, which knows blocks and tensors only: this is where the
:class:`HealConfig`, the checkpoint folder and the data batches meet it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.data.inputs import to_device
from compressor.train.batches import Batches
from compressor.train.blockwise import capture, carry, find_blocks, record_calls, train_block
from compressor.train.checkpoint import CheckpointManager
from compressor.train.config import HealConfig
from compressor.train.decoder import is_causal_lm, uncached
from compressor.train.losses import mse_loss
from compressor.train.trainable import optimizer, schedule

BLOCKS_DIR = "blocks"  # the block-wise phase's checkpoints, inside the checkpoint folder


def blocks_of(model: nn.Module, params: dict[str, nn.Parameter], cfg: HealConfig) -> list[str]:
    """The blocks of ``model`` (``cfg.blocks`` globs, or found) that hold some of the trained ``params``."""
    return find_blocks(model, list(params), [p.strip() for p in cfg.blocks.split(",")] if cfg.blocks else None)


def heal_blocks(model: nn.Module, teacher: nn.Module, params: dict[str, nn.Parameter], cfg: HealConfig,
                loader: Batches, val_loader: Batches | None, device: torch.device,
                folder: Path | None, resume: bool, fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    """The block-wise phase on ``model`` in place: each block's ``params`` trained for ``cfg.block_steps``
    to match the teacher's block, the best by held-out block error kept (by training block error without
    held-out data). After each block a checkpoint in ``folder`` holds the weights so far; a resumed run
    loads the newest and redoes the block after it, which, seeded by its index, ends as the uninterrupted
    run did. Returns one summary per block."""
    names = blocks_of(model, params, cfg)
    # A decoder's blocks must not be handed a key/value cache (each block runs many times on its inputs).
    prepare = uncached if is_causal_lm(model) else (lambda b: b)
    train_batches = [prepare(to_device(b, device)) for b, _ in loader.in_order()]
    select_batches = train_batches if val_loader is None else [prepare(to_device(b, device))
                                                               for b, _ in val_loader.in_order()]
    manager, done = None, []
    if folder is not None:
        manager = CheckpointManager(folder, keep_last=1, monitor="blocks_done", mode="max")
        done = _resumed(manager, names, params, fingerprint) if resume else []
    lr = cfg.block_lr or cfg.lr
    first = len(done)
    calls = record_calls(model, names, train_batches) if first < len(names) - 1 else None
    val_calls = record_calls(model, names, select_batches) if calls and val_loader is not None else calls
    train = select = []
    for i, name in enumerate(names[first:], start=first):
        block = model.get_submodule(name)
        own = {k: p for k, p in params.items() if k.startswith(name + ".")}
        if i > first and calls.chained[i]:
            # The healed block before feeds this one: its inputs follow from that block's, one block pass.
            previous, original = model.get_submodule(names[i - 1]), teacher.get_submodule(name)
            train, select = (carry(previous, train, original, calls.rest[i]),
                             carry(previous, select, original, val_calls.rest[i]) if val_loader is not None
                             else None)
        else:
            train = capture(model, teacher, name, train_batches)
            select = None if val_loader is None else capture(model, teacher, name, select_batches)
        select = train if select is None else select
        # Seeded by the block's index: a block redone after a crash trains exactly as it did.
        torch.manual_seed(cfg.seed * 1_000 + i)
        # Masked MSE whatever the end-to-end loss: a block's output is features, not classes.
        info = train_block(block, own, train, select, mse_loss, optimizer(cfg.replace(lr=lr), list(own.values())),
                           schedule(cfg, cfg.block_steps), cfg.block_steps, cfg.seed * 1_000 + i, cfg.grad_clip)
        done.append({"block": name, **info})
        if manager is not None:
            metrics = {"blocks_done": len(done), "block_error_before": info["before"],
                       "block_error_after": info["after"]}
            tensors = {f"param.{k}": p for k, p in params.items()}
            manager.save(len(done), tensors, {"config": fingerprint, "block_names": names, "blocks": done},
                         metrics)
    return done


def _resumed(manager: CheckpointManager, names: list[str], params: dict[str, nn.Parameter],
             fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    """The blocks finished by the run whose newest checkpoint ``manager`` holds, their weights loaded into
    ``params``; none without a checkpoint. A checkpoint of other options or another model is refused."""
    newest = manager.newest_valid()
    if newest is None:
        return []
    tensors, state = manager.load(newest)
    blocks = state.get("blocks")
    # Each finished block is recorded as {"block": name, before/after errors} (see heal_blocks).
    if not isinstance(state.get("config"), dict) or not isinstance(blocks, list) \
            or not all(isinstance(b, dict) and b.get("block") in names for b in blocks):
        raise CompressorError(f"checkpoint {newest} is malformed: its config or finished blocks are not "
                              "what this version writes", f"delete {newest} (or resume from another run's "
                              "folder)")
    changed = [k for k, v in fingerprint.items() if state["config"].get(k) != v]
    if changed or state.get("block_names") != names:
        raise CompressorError(f"the block checkpoint was written with other options: "
                              f"{', '.join(changed) or 'blocks'}",
                              "resume with the options of the original run")
    if set(tensors) != {f"param.{k}" for k in params} or \
            any(tensors[f"param.{k}"].shape != p.shape for k, p in params.items() if f"param.{k}" in tensors):
        raise CompressorError(f"checkpoint {newest} does not hold the weights this model trains",
                              "resume with the same model and options, or delete that folder")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
    return state["blocks"]
