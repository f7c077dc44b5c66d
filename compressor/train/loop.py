"""The training of a heal run, once it is set up: the block-wise phase, then the end-to-end steps.

:func:`train` runs on a :class:`Run` (what the setup in :mod:`compressor.train.heal` fixed) and returns a
:class:`RunState`: where it stopped, every evaluation, and the best step's weights. Each evaluation is a
checkpoint when a folder is given; a resumed run loads the newest, and since the data order is seeded by
``(seed, epoch)`` and the random state is saved with it, it ends where the uninterrupted run would.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.data.inputs import attention_mask, call, primary_output, to_device
from compressor.train.batches import Batches, run_teacher
from compressor.train.block_phase import BLOCKS_DIR, blocks_of, heal_blocks
from compressor.train.checkpoint import (
    CheckpointManager,
    check_training_state,
    pack_training_state,
    unpack_training_state,
)
from compressor.train.config import HealConfig
from compressor.train.decoder import LMLoss, head_inputs
from compressor.train.decoder import evaluate as lm_evaluate
from compressor.train.losses import block_outputs, hidden_loss, validation_metrics
from compressor.train.preflight import first_line
from compressor.train.trainable import set_training

# Hyper-parameters a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = ("train", "layers", "lora_rank", "lora_alpha", "lora_dropout", "lora_init", "loss", "temperature",
                "optimizer", "lr", "weight_decay", "schedule", "warmup_steps", "batch_size", "seed", "grad_clip",
                "every", "monitor", "mode", "total_steps", "batches_per_epoch", "method", "block_steps", "block_lr",
                "blocks", "quant", "distill")

# What a checkpoint written before a setting existed ran with.
_OLD_DEFAULTS = {"layers": None, "lora_init": "zero", "method": "end-to-end", "block_steps": 100, "block_lr": None,
                 "blocks": None, "quant": None, "distill": "output"}


def fingerprint(cfg: HealConfig, loss: str | Callable, total: int, batches_per_epoch: int,
                every: int) -> dict[str, Any]:
    """The settings a checkpoint records and a resumed run must match (:data:`_RESUME_KEYS`)."""
    return {**{k: v for k, v in asdict(cfg).items() if k in _RESUME_KEYS},
            "loss": loss if isinstance(loss, str) else getattr(loss, "__name__", "callable"),
            "total_steps": total, "batches_per_epoch": batches_per_epoch, "every": every}


@dataclass
class Run:
    """What a heal run is fixed at its start: the settings resolved, the model copy that trains and its
    trained weights, the data, the loss, the optimizer and the length."""

    cfg: HealConfig  # loss, monitor and mode resolved
    model: nn.Module  # the copy that trains (the input is never modified)
    teacher: nn.Module | None
    params: dict[str, nn.Parameter]  # the weights that train, by name
    loader: Batches
    val_loader: Batches | None
    supervised: bool  # targets given (else distillation from the teacher)
    lm: bool  # a causal LM healed on its next-token distributions through lm_loss
    loss: str | Callable  # the loss's name, or the caller's function
    loss_fn: Callable  # (output, target, mask) -> loss
    lm_loss: LMLoss | None
    device: torch.device
    total: int  # end-to-end steps (0: block-wise alone)
    every: int  # steps between evaluations (and checkpoints)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    fingerprint: dict[str, Any]


@dataclass
class RunState:
    """Where a run is (its step and data position), what it measured, and the best step so far."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "metrics"} per evaluation
    resumed_from: int | None = None
    best: dict[str, Any] | None = None  # the entry of history with the best monitored metric
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    manager: CheckpointManager | None = None
    before: dict[str, float] = field(default_factory=dict)  # what the input model scored
    blocks: list[dict[str, Any]] = field(default_factory=list)  # the block-wise phase's summaries


def train(run: Run, checkpoint_dir: str | Path | None, resume: bool, progress: bool | None) -> RunState:
    """The block-wise phase (``method`` blockwise or both), then the end-to-end steps, on ``run.model``."""
    cfg = run.cfg
    evaluate = _evaluator(run)
    # What the input scores: the bar every returned model must beat, or the input comes back.
    input_metrics = evaluate(None) if cfg.method != "end-to-end" else None
    blocks: list[dict[str, Any]] = []
    if cfg.method != "end-to-end":
        blocks = heal_blocks(run.model, run.teacher, run.params, cfg, run.loader, run.val_loader, run.device,
                             None if checkpoint_dir is None else Path(checkpoint_dir) / BLOCKS_DIR, resume,
                             run.fingerprint)
    set_training(run.model, True)
    state = _start(run, checkpoint_dir, resume)
    if state.resumed_from is None:
        _record(run, state, evaluate(None))
    state.before, state.blocks = input_metrics or state.history[0]["metrics"], blocks
    _steps(run, state, evaluate, progress)
    return state


def _evaluator(run: Run) -> Callable[[float | None], dict[str, float]]:
    """``evaluate(train_loss)``: the metrics of the model now (the held-out ones when there is held-out
    data). The teacher's held-out outputs are computed once, here."""
    val_targets = val_batches = None
    if run.val_loader is not None and run.lm:
        # The teacher's final hidden states, not its logits (a vocabulary per position).
        val_batches = [to_device(b, run.device) for b, _ in run.val_loader.in_order()]
        if run.loss == "kl":
            with torch.no_grad():
                val_targets = [head_inputs(run.teacher, b) for b in val_batches]
    elif run.val_loader is not None and not run.supervised:
        val_targets = [run_teacher(run.teacher, b, run.device) for b, _ in run.val_loader.in_order()]

    def evaluate_now(train_loss: float | None) -> dict[str, float]:
        metrics = {} if train_loss is None else {"train_loss": train_loss}
        if run.val_loader is not None:
            set_training(run.model, False)
            metrics.update(lm_evaluate(run.model, val_batches, val_targets, run.lm_loss) if run.lm else
                           validation_metrics(run.model, run.val_loader, val_targets, run.loss_fn, run.loss == "ce",
                                              run.device))
            set_training(run.model, True)
        return metrics
    return evaluate_now


def _start(run: Run, checkpoint_dir: str | Path | None, resume: bool) -> RunState:
    """A fresh state, or with ``resume`` that of the newest valid checkpoint in ``checkpoint_dir`` (its
    weights, optimizer, schedule and random state restored; other options refused)."""
    cfg, state = run.cfg, RunState()
    if checkpoint_dir is None:
        return state
    try:
        state.manager = CheckpointManager(Path(checkpoint_dir), cfg.keep_last, cfg.monitor, cfg.mode)
    except OSError as err:
        raise CompressorError(f"cannot make the checkpoint folder {checkpoint_dir} ({err.strerror})",
                              "pass --checkpoint-dir a writable folder") from None
    manager = state.manager
    existing = manager.newest_valid() if resume else None
    if existing is None:
        return state
    tensors, saved = manager.load(existing)
    check_training_state(tensors, saved, existing)
    changed = [k for k, v in run.fingerprint.items() if saved["config"].get(k, _OLD_DEFAULTS.get(k)) != v]
    if changed:
        raise CompressorError(f"the checkpoint was written with other options: {', '.join(changed)}",
                              "resume with the options of the original run")
    try:
        unpack_training_state(tensors, saved, run.params, run.opt, run.sched)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise CompressorError(f"checkpoint {existing} is malformed: its training state cannot be "
                              f"restored ({first_line(err)})",
                              f"delete {existing} (or resume from another run's folder)") from None
    state.step, (state.epoch, state.index) = saved["step"], saved["data_position"]
    state.history, state.resumed_from = manager.history, state.step
    state.best = manager.best()
    if state.best is not None:
        best = manager.load_tensors(manager.best_path()) if state.best["step"] != state.step else tensors
        state.best_weights = {k: best[f"param.{k}"] for k in run.params} if best else {}
    return state


def _record(run: Run, state: RunState, metrics: dict[str, float]) -> None:
    """Add an evaluation to the history, keep the weights if it is the best yet, and checkpoint."""
    cfg = run.cfg
    state.history.append({"step": state.step, "metrics": metrics})
    value = metrics.get(cfg.monitor)
    if value is not None and math.isfinite(value) and (
            state.best is None or (value < state.best["metrics"][cfg.monitor] if cfg.mode == "min"
                                   else value > state.best["metrics"][cfg.monitor])):
        state.best = state.history[-1]
        state.best_weights = {k: p.detach().clone() for k, p in run.params.items()}
    if state.manager is not None:
        extra = {"config": run.fingerprint, "step": state.step, "data_position": [state.epoch, state.index]}
        tensors, saved = pack_training_state(run.params, run.opt, run.sched, extra)
        state.manager.save(state.step, tensors, saved, metrics)


def _steps(run: Run, state: RunState, evaluate: Callable[[float | None], dict[str, float]],
           progress: bool | None) -> None:
    """The end-to-end steps from ``state.step`` to ``run.total``, evaluating every ``run.every``."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=run.total, initial=state.step, desc=f"heal ({cfg.train})", unit="step", disable=not show,
               leave=False)
    running, seen = 0.0, 0
    # distill="hidden": the blocks whose outputs are matched, those the block-wise phase heals.
    hidden = blocks_of(run.model, run.params, cfg) if cfg.distill == "hidden" and state.step < run.total else []
    while state.step < run.total:
        if state.index >= len(run.loader):
            state.epoch, state.index = state.epoch + 1, 0
        inputs, tgt = run.loader.batch(state.epoch, state.index)
        state.index += 1
        value = _loss(run, to_device(inputs, run.device), tgt, hidden)
        if not torch.isfinite(value):
            raise CompressorError(f"the loss became {value.item()} at step {state.step + 1}",
                                  f"lower the learning rate (lr= or --lr, now {cfg.lr:g})")
        run.opt.zero_grad(set_to_none=True)
        value.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(list(run.params.values()), cfg.grad_clip)
        run.opt.step()
        run.sched.step()
        state.step += 1
        running, seen = running + value.item(), seen + 1
        bar.update(1)
        if state.step % run.every == 0 or state.step == run.total:
            _record(run, state, evaluate(running / seen))
            running, seen = 0.0, 0
            bar.set_postfix({k: f"{v:.4g}" for k, v in state.history[-1]["metrics"].items()})
    bar.close()


def _loss(run: Run, inputs: Any, tgt: Any, hidden: list[str]) -> torch.Tensor:
    """The loss of one batch: the model's output against the targets or the teacher's (a causal LM's as the
    final hidden states its head reads), plus with ``hidden`` blocks the hidden-state loss."""
    if hidden:  # the teacher's blocks run whatever the output loss compares against (targets or teacher)
        with torch.no_grad(), block_outputs(run.teacher, hidden) as teacher_hidden:
            taught = _teach(run, inputs, whole=run.supervised)
        tgt = to_device(tgt, run.device) if run.supervised else taught
    elif run.supervised:
        tgt = to_device(tgt, run.device)
    else:
        with torch.no_grad():
            tgt = _teach(run, inputs)
    with block_outputs(run.model, hidden) as student_hidden:
        out = head_inputs(run.model, inputs) if run.lm else primary_output(call(run.model, inputs))
    value = run.lm_loss(out, tgt, inputs) if run.lm else run.loss_fn(out, tgt, attention_mask(inputs))
    if hidden:
        value = value + hidden_loss(student_hidden, teacher_hidden, attention_mask(inputs))
    return value


def _teach(run: Run, inputs: Any, whole: bool = False) -> torch.Tensor | None:
    """The teacher's side of the loss (for a causal LM with loss ce: none, the text is the target; ``whole``:
    the teacher runs anyway, for its blocks' outputs)."""
    if run.lm:
        return head_inputs(run.teacher, inputs) if run.loss == "kl" or whole else None
    return run_teacher(run.teacher, inputs, run.device)
