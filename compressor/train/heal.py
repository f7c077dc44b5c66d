"""Heal: a short low-rank fine-tune that wins back what truncation cost.

    result = compressor.heal(compressed, teacher=original, data=inputs)               # distillation
    result = compressor.heal(compressed, data=x, targets=y, val_data=(x_val, y_val))  # supervised
    config = compressor.HealConfig(train="lora", lr=5e-3, epochs=4)                   # the settings
    result = compressor.heal(compressed, config, data=x, targets=y)
    healed = result.model

Every setting (its default, help, range and choices) is a field of :class:`HealConfig`, which also
generates the ``compress heal`` options; the arguments of :func:`heal` are what the settings act on. The
settings left out take the defaults of the model's kind (:data:`KIND_DEFAULTS`: a transformer distils
block-wise then end-to-end with hidden states, a CNN on the cosine of its logits, a causal LM at a lower
learning rate), recipes measured on real models; ``HealResult.recipe`` says which kind and what it filled.

What trains is the factor matrices (``.down`` / ``.up`` of every factored layer) or, with
``train="lora"``, LoRA adapters on them that are merged back at the end, so the healed model has exactly
the compressed model's layers and size; ``layers`` (globs of layer names) restricts training to some of
them, e.g. a CNN's convs when its classifier, seeing one row per image, over-fits a few photos. A model
without factored layers can be given with ``train="lora"`` only: adapters then go on every layer a handler
adapts (plain LoRA fine-tuning).
Everything else is frozen and the model runs in eval mode
(dropout off, batch-norm statistics fixed): healing changes only the chosen weights. The input models
are never modified. With a validation set the best step by ``monitor`` is returned; when no step beats
the input on it, the input itself comes back (a copy, equal byte for byte) and ``HealResult.note`` says
so in one line: healing never returns a model worse on validation than the one it was given.

``method="blockwise"`` (or ``"both"``: blockwise, then end-to-end) first heals one block at a time (a
transformer layer, a CNN stage: :mod:`compressor.train.blockwise`), each learning the teacher's block on
the inputs the healed blocks before it give; it needs a teacher. ``distill="hidden"`` makes end-to-end
distillation match those blocks' outputs too (each layer's hidden states), not only the model's output.

Data is a tensor, a tuple of tensors (positional inputs) or a dict of named tensors (keyword inputs),
with samples along the first dimension, batched here; or a *list* of ready batches (each a tensor, a
tuple of positional inputs, or a dict of keyword inputs, with a list of target batches to match). The
batch order is a permutation seeded by ``(seed, epoch)``, so ``(epoch, index)`` is the whole data
position a checkpoint needs to resume exactly.

:func:`heal` is setup, loop, finish; the pieces, in the order a run uses them:
:mod:`~compressor.train.config` (the settings and the per-kind defaults), :mod:`~compressor.train.batches`
(the data), :mod:`~compressor.train.losses`, :mod:`~compressor.train.trainable` (what trains, the optimizer),
:mod:`~compressor.train.preflight` (the checks before anything is written), :mod:`~compressor.train.loop`
(the block-wise phase of :mod:`~compressor.train.block_phase`, then the end-to-end steps and checkpoints).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.train.adapter import Adapter
from compressor.train.batches import Batches, is_integer, validation_batches
from compressor.train.config import (
    KIND_DEFAULTS,
    LM_LR,
    LR,
    HealConfig,
    model_kind,
    setting_names,
    setting_types,
)
from compressor.train.decoder import LMLoss, is_causal_lm, text_tokens
from compressor.train.loop import Run, RunState, fingerprint, train
from compressor.train.lora import merge_lora
from compressor.train.losses import loss_function
from compressor.train.preflight import check_checkpoint_dir, check_method, check_teacher, preflight
from compressor.train.trainable import optimizer, schedule, set_training, simulate_quant, trainable

# The settings live in compressor.train.config; they are imported from here too (compressor.HealConfig,
# the CLI, the benchmarks, the tests), as the one place a caller of heal looks.
__all__ = ["KIND_DEFAULTS", "LM_LR", "LR", "HealConfig", "HealResult", "heal", "model_kind", "setting_names",
           "setting_types"]


@dataclass
class HealResult:
    """What :func:`heal` returns: the healed model, its metrics before and after, and how it got there."""

    model: nn.Module  # the healed model (a copy; LoRA merged: the same layers as the input)
    before: dict[str, float]  # metrics of the input model (step 0)
    after: dict[str, float]  # metrics of the returned model (the best step)
    best_step: int
    steps: int  # steps trained in total
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "metrics"} per evaluation
    resumed_from: int | None = None
    checkpoint_dir: Path | None = None
    seconds: float = 0.0
    config: HealConfig | None = None  # the settings used, defaults resolved (loss, monitor, mode)
    # train="lora": the trained adapters (best step) before they were merged, on the input model's layers
    # (``adapter.save(folder)`` writes them as PEFT does; ``adapter.apply(input_model)`` puts them back)
    adapter: Adapter | None = None
    note: str | None = None  # one line when the input came back unchanged (no step beat it)
    # method blockwise/both: per block {"block", "before", "after" (relative output error on the held-out
    # data), "best_step", "steps", "history"}
    blocks: list[dict[str, Any]] = field(default_factory=list)
    # the model's kind (a row of KIND_DEFAULTS) and the settings its defaults filled: {"kind", "filled"}
    recipe: dict[str, Any] = field(default_factory=dict)


def heal(model: nn.Module, config: HealConfig | None = None, *, data: Any, teacher: nn.Module | None = None,
         targets: Any = None, val_data: Any = None, loss_fn: Callable | None = None,
         checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool | None = None,
         **settings: Any) -> HealResult:
    """Fine-tune the factors of ``model`` (a copy) against ``targets`` or the ``teacher``'s outputs.

    ``config`` holds every setting (:class:`HealConfig`; default: its defaults); the arguments are what the
    settings act on. ``val_data`` is ``(inputs, targets)`` when supervised, or inputs alone for
    distillation (compared with the teacher). ``loss_fn(output, target, mask)`` replaces the named loss.
    ``checkpoint_dir`` with ``resume=True`` continues an interrupted run from its newest valid checkpoint
    and ends where the uninterrupted run would. For convenience, settings may also be passed by name
    (``heal(model, data=x, targets=y, lr=1e-2)``): they override those of ``config``.
    """
    start_time = time.perf_counter()
    if "val" in settings:  # the name before HealConfig
        val_data = settings.pop("val")
    if callable(settings.get("loss")):
        loss_fn = settings.pop("loss")
    unknown = sorted(set(settings) - set(setting_names()))
    if unknown:
        raise TypeError(f"heal() got unexpected keyword arguments {', '.join(map(repr, unknown))}")
    if config is not None and not isinstance(config, HealConfig):
        raise TypeError(f"config must be a HealConfig, not {type(config).__name__}")
    cfg = (config or HealConfig()).replace(**settings) if settings else copy.copy(config or HealConfig())
    run, recipe = _setup(model, cfg, data, teacher, targets, val_data, loss_fn, checkpoint_dir, resume)
    state = train(run, checkpoint_dir, resume, progress)
    return _finish(run, state, model, recipe, checkpoint_dir, start_time)


def _setup(model: nn.Module, cfg: HealConfig, data: Any, teacher: nn.Module | None, targets: Any, val: Any,
           loss_fn: Callable | None, checkpoint_dir: str | Path | None, resume: bool) -> tuple[Run, dict[str, Any]]:
    """Everything a run is fixed at before its first step: the settings resolved for the model's kind, the
    data, the loss, the model copy and the weights that train, all checked before anything is written.
    Returns the run and its recipe (``{"kind", "filled"}``)."""
    supervised = targets is not None
    # A causal language model distils (or learns the text) on its next-token distributions, chunk by chunk
    # through its output head (compressor.train.decoder): never a whole batch of logits.
    lm = not supervised and loss_fn is None and is_causal_lm(model)
    # The settings left unset come from the model's kind, once (a resumed run resolves them alike). A loss
    # function of one's own is not one of the objectives the kinds' recipes were measured with.
    kind = "default" if loss_fn is not None else model_kind(model, supervised)
    cfg, filled = cfg.resolved(kind)
    check_teacher(cfg, supervised, lm, teacher)
    check_checkpoint_dir(checkpoint_dir, resume)
    loader = Batches(data, targets, cfg.batch_size, cfg.seed, shuffle=True)
    val_loader = validation_batches(val, supervised, cfg.batch_size, cfg.seed)
    loss = _objective(cfg, loss_fn, loader, val_loader is not None, supervised, lm)
    loss_fn = loss if callable(loss) else loss_function(loss, cfg.temperature)

    # Seed everything before anything random (LoRA initialisation, dropout) happens.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(model)
    params = trainable(model, cfg)
    device = next(iter(params.values())).device
    vocabulary = text_tokens(data, *([] if val is None else [val])) if lm and cfg.kl_tokens == "text" else None
    lm_loss = LMLoss(model, teacher, loss, cfg.temperature, vocabulary=vocabulary) if lm else None
    simulate_quant(model, cfg)
    # Before anything is written: the model, the teacher, the targets and the loss fit together.
    set_training(model, False)
    preflight(model, teacher, loader, val_loader, loss, device, lm)
    check_method(cfg, teacher)
    # Block-wise alone trains no end-to-end step.
    total = 0 if cfg.method == "blockwise" else cfg.steps or (cfg.epochs or 1) * len(loader)
    every = min(cfg.every or len(loader), total)
    opt = optimizer(cfg, list(params.values()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg, total))
    run = Run(cfg, model, teacher, params, loader, val_loader, supervised, lm, loss, loss_fn, lm_loss, device,
              total, every, opt, sched, fingerprint(cfg, loss, total, len(loader), every))
    return run, {"kind": kind, "filled": filled}


def _objective(cfg: HealConfig, loss_fn: Callable | None, loader: Batches, validated: bool, supervised: bool,
               lm: bool) -> str | Callable:
    """The loss (the caller's function, or a name: ``cfg.loss`` or the default for the data) and, set on
    ``cfg`` (the run's own copy), the loss's name, the metric that picks the best step and its direction."""
    loss = loss_fn or cfg.loss
    if loss is None:
        # Decoders: KL to the teacher's next-token distributions, which teaches the whole distribution at
        # every position where ce teaches one token (and so over-fits a small text). Measured
        # (benchmarks/heal_gemma.py, 24 steps of 4 x 128 tokens of cal.txt, lr 1e-4): Gemma 3 270M at 20%
        # removed (data-aware) went from eval.txt perplexity 39.18 to 33.67 with kl, to 40.47 with ce (its
        # training loss fell to 2.47 nats); dense 24.01. SmolLM2-135M, plain SVD at half rank, lr 5e-4:
        # 4.45e6 -> 1242 with kl, 1295 with ce, 1324 with kl and distill hidden.
        loss = "kl" if lm else ("ce" if is_integer(loader.first_targets()) else "mse") if supervised else "mse"
    if isinstance(loss, str):
        cfg.loss = loss
    metrics = {"train_loss", *(("val_loss", "val_accuracy" if loss == "ce" else
                                "val_cosine" if not supervised else "val_loss") if validated else ())}
    if lm:
        metrics = {"train_loss", *(("val_loss", "val_nll") if validated else ())}
    cfg.monitor = cfg.monitor or ("val_accuracy" if validated and loss == "ce" and not lm else
                                  "val_loss" if validated else "train_loss")
    if cfg.monitor not in metrics:
        raise CompressorError(f"monitor={cfg.monitor!r} is not measured in this run",
                              f"pass monitor= (--monitor) one of {', '.join(sorted(metrics))}")
    cfg.mode = cfg.mode or ("max" if any(k in cfg.monitor for k in ("accuracy", "cosine")) else "min")
    return loss


def _finish(run: Run, state: RunState, compressed: nn.Module, recipe: dict[str, Any],
            checkpoint_dir: str | Path | None, start_time: float) -> HealResult:
    """The result: the best step's weights (LoRA merged, the quantization simulation removed, each
    parameter's ``requires_grad`` and the mode as on the input ``compressed``), or the input itself when no
    step beat it on the held-out data."""
    cfg, model, folder = run.cfg, run.model, Path(checkpoint_dir) if checkpoint_dir else None
    best = state.best or state.history[-1]
    if _at_least_as_good(state.before, best["metrics"], cfg):
        # Nothing trained beat the input on the held-out data: the input itself, not a rounding of it
        # (a merged zero adapter, a PiSSA split put back), is the answer.
        value = state.before[cfg.monitor]
        note = (f"no healing step beat the input on {cfg.monitor} ({value:.6g}): the input model is returned "
                "unchanged")
        model = copy.deepcopy(compressed)
        return HealResult(model, state.before, state.before, 0, state.step, state.history, state.resumed_from,
                          folder, time.perf_counter() - start_time, cfg, None, note, state.blocks, recipe)
    if state.best_weights:
        with torch.no_grad():
            for k, p in run.params.items():
                p.copy_(state.best_weights[k])
    adapter = None
    if cfg.train == "lora":
        # Its base is the model given here (compressed: the adapters sit on its factors), which has no path
        # of its own: not the original the config may name. heal_folder records the compressed folder.
        adapter = Adapter.from_model(model, base_model_name_or_path="")
        adapter.base_model_name_or_path = None
        merge_lora(model)
    for m in model.modules():
        m.__dict__.pop("forward", None)  # the quantization simulation
    for p, q in zip(model.parameters(), compressed.parameters(), strict=True):
        p.requires_grad_(q.requires_grad)
    model.train(compressed.training)
    return HealResult(model, state.before, best["metrics"], best["step"], state.step, state.history,
                      state.resumed_from, folder, time.perf_counter() - start_time, cfg, adapter, None,
                      state.blocks, recipe)


def _at_least_as_good(a: dict[str, float], b: dict[str, float], cfg: HealConfig) -> bool:
    """Whether metrics ``a`` are as good as ``b`` or better on the monitored metric (False when either
    lacks it: without held-out data there is nothing to compare the input with)."""
    x, y = a.get(cfg.monitor), b.get(cfg.monitor)
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
        return False
    return x <= y if cfg.mode == "min" else x >= y
