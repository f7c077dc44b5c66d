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
"""

from __future__ import annotations

import copy
import fnmatch
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from compressor.core.errors import CompressorError
from compressor.core.handlers import simulate_quantization
from compressor.core.layers import LOW_RANK_TYPES
from compressor.data.inputs import attention_mask, call, num_samples, primary_output, take, to_device
from compressor.train.adapter import Adapter
from compressor.train.checkpoint import (
    PREFIX,
    CheckpointManager,
    check_training_state,
    pack_training_state,
    unpack_training_state,
)
from compressor.train.config import (
    KIND_DEFAULTS,
    LM_LR,
    LR,
    HealConfig,
    model_kind,
    setting_names,
    setting_types,
)
from compressor.train.decoder import LMLoss, head_inputs, is_causal_lm, uncached
from compressor.train.decoder import evaluate as lm_evaluate
from compressor.train.decoder import preflight as lm_preflight
from compressor.train.lora import LoRALayer, apply_lora, lora_parameters, merge_lora

LOSSES = ("mse", "kl", "ce", "cosine")
# Hyper-parameters a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = ("train", "layers", "lora_rank", "lora_alpha", "lora_dropout", "lora_init", "loss", "temperature",
                "optimizer", "lr", "weight_decay", "schedule", "warmup_steps", "batch_size", "seed", "grad_clip",
                "every", "monitor", "mode", "total_steps", "batches_per_epoch", "method", "block_steps", "block_lr",
                "blocks", "quant", "distill")

# What a checkpoint written before a setting existed ran with.
_OLD_DEFAULTS = {"layers": None, "lora_init": "zero", "method": "end-to-end", "block_steps": 100, "block_lr": None,
                 "blocks": None, "quant": None, "distill": "output"}
BLOCKS_DIR = "blocks"  # the block-wise phase's checkpoints, inside the checkpoint folder

# The settings live in compressor.train.config; they are imported from here too (compressor.HealConfig,
# the CLI, the benchmarks, the tests), as the one place a caller of heal looks.
__all__ = ["KIND_DEFAULTS", "LM_LR", "LR", "HealConfig", "HealResult", "heal", "model_kind", "setting_names",
           "setting_types"]




@dataclass
class HealResult:
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
    val = val_data
    supervised = targets is not None
    # A causal language model distils (or learns the text) on its next-token distributions, chunk by chunk
    # through its output head (compressor.train.decoder): never a whole batch of logits.
    lm = not supervised and loss_fn is None and is_causal_lm(model)
    # The settings left unset come from the model's kind, once (a resumed run resolves them alike). A loss
    # function of one's own is not one of the objectives the kinds' recipes were measured with.
    kind = "default" if loss_fn is not None else model_kind(model, supervised)
    cfg, filled = cfg.resolved(kind)
    recipe = {"kind": kind, "filled": filled}
    if not supervised and teacher is None and not (lm and cfg.loss == "ce"):
        if lm:
            raise CompressorError(f"loss {cfg.loss or 'kl'} distils a causal language model from a teacher, and "
                                  "no teacher was given", "pass teacher= (the uncompressed model), or loss='ce' "
                                  "to learn the text's next tokens", cli_fix="pass --teacher, or --loss ce")
        raise CompressorError("heal needs targets (supervised) or a teacher (distillation)",
                              "pass targets=labels, or teacher=the uncompressed model")
    if resume and checkpoint_dir is None:
        raise CompressorError("resume needs the folder of the run to continue",
                              "pass checkpoint_dir= (--checkpoint-dir) with resume (--resume)")
    if checkpoint_dir is not None:
        _check_checkpoint_dir(Path(checkpoint_dir), resume)
    loader = Batches(data, targets, cfg.batch_size, cfg.seed, shuffle=True)
    val_loader = None
    if val is not None:
        vx, vy = val if supervised and isinstance(val, (tuple, list)) and len(val) == 2 else (val, None)
        if supervised and vy is None:
            raise CompressorError("the validation data has no targets",
                                  "pass val_data=(inputs, targets) (--val with inputs and targets) for "
                                  "supervised healing")
        val_loader = Batches(vx, vy, max(cfg.batch_size, 256), cfg.seed, shuffle=False)
    loss = loss_fn or cfg.loss
    if loss is None:
        # Decoders: KL to the teacher's next-token distributions, which teaches the whole distribution at
        # every position where ce teaches one token (and so over-fits a small text). Measured
        # (benchmarks/heal_gemma.py, 24 steps of 4 x 128 tokens of cal.txt, lr 1e-4): Gemma 3 270M at 20%
        # removed (data-aware) went from eval.txt perplexity 39.18 to 33.67 with kl, to 40.47 with ce (its
        # training loss fell to 2.47 nats); dense 24.01. SmolLM2-135M, plain SVD at half rank, lr 5e-4:
        # 4.45e6 -> 1242 with kl, 1295 with ce, 1324 with kl and distill hidden.
        loss = "kl" if lm else ("ce" if _is_integer(loader.first_targets()) else "mse") if supervised else "mse"
    if isinstance(loss, str):
        cfg.loss = loss
    loss_fn = loss if callable(loss) else make_kl_loss(cfg.temperature) if loss == "kl" else _LOSS_FNS[loss]
    metrics = {"train_loss", *(("val_loss", "val_accuracy" if loss == "ce" else
                                "val_cosine" if not supervised else "val_loss") if val_loader else ())}
    if lm:
        metrics = {"train_loss", *(("val_loss", "val_nll") if val_loader else ())}
    cfg.monitor = cfg.monitor or ("val_accuracy" if val_loader and loss == "ce" and not lm else
                                  "val_loss" if val_loader else "train_loss")
    if cfg.monitor not in metrics:
        raise CompressorError(f"monitor={cfg.monitor!r} is not measured in this run",
                              f"pass monitor= (--monitor) one of {', '.join(sorted(metrics))}")
    cfg.mode = cfg.mode or ("max" if any(k in cfg.monitor for k in ("accuracy", "cosine")) else "min")
    seed = cfg.seed

    # Seed everything before anything random (LoRA initialisation, dropout) happens.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    compressed, model = model, copy.deepcopy(model)
    params = _trainable(model, cfg)
    device = next(iter(params.values())).device
    lm_loss = LMLoss(model, teacher, loss, cfg.temperature) if lm else None
    if cfg.quant:
        if cfg.train == "lora":
            raise CompressorError(f"quant={cfg.quant} simulates the rounding of the weights the file stores, "
                                  "but LoRA adapters sit beside them until merged",
                                  "pass train='factors' (--train factors) with quant (--quant)")
        for m in model.modules():
            simulate_quantization(m, cfg.quant)
    # Before anything is written: the model, the teacher, the targets and the loss fit together.
    _set_training(model, False)
    if lm:
        for data_name, batches in (("training", loader), ("validation", val_loader)):
            if batches is not None:
                lm_preflight(model, teacher if loss == "kl" else None, to_device(batches.batch(0, 0)[0], device),
                             data_name)
    else:
        _preflight(model, teacher, loader, val_loader, loss, device)
    if cfg.method != "end-to-end" and teacher is None:
        raise CompressorError(f"method={cfg.method} distils each block from the teacher's, and no teacher "
                              "was given", "pass teacher= (the uncompressed model), or method='end-to-end'",
                              cli_fix="pass --data without targets and --teacher, or --method end-to-end")
    if cfg.distill == "hidden" and teacher is None:
        raise CompressorError("distill=hidden matches the teacher's hidden states, and no teacher was given",
                              "pass teacher= (the uncompressed model), or distill='output'",
                              cli_fix="pass --data without targets and --teacher, or --distill output")
    # Block-wise alone trains no end-to-end step.
    total = 0 if cfg.method == "blockwise" else cfg.steps or (cfg.epochs or 1) * len(loader)
    every_n = min(cfg.every or len(loader), total)
    opt = _optimizer(cfg, list(params.values()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    fingerprint = {**{k: v for k, v in asdict(cfg).items() if k in _RESUME_KEYS},
                   "loss": loss if isinstance(loss, str) else getattr(loss, "__name__", "callable"),
                   "total_steps": total, "batches_per_epoch": len(loader), "every": every_n}

    val_targets = val_batches = None
    if val_loader is not None and lm:
        # The teacher's final hidden states, not its logits (a vocabulary per position).
        val_batches = [to_device(b, device) for b, _ in val_loader.in_order()]
        if loss == "kl":
            with torch.no_grad():
                val_targets = [head_inputs(teacher, b) for b in val_batches]
    elif val_loader is not None and not supervised:
        val_targets = [_run(teacher, b, device) for b, _ in val_loader.in_order()]

    def evaluate(train_loss: float | None) -> dict[str, float]:
        metrics = {} if train_loss is None else {"train_loss": train_loss}
        if val_loader is not None:
            _set_training(model, False)
            metrics.update(lm_evaluate(model, val_batches, val_targets, lm_loss) if lm else
                           _evaluate(model, val_loader, val_targets, loss_fn, loss == "ce", device))
            _set_training(model, True)
        return metrics

    # What the input scores: the bar every returned model must beat, or the input comes back.
    input_metrics = evaluate(None) if cfg.method != "end-to-end" else None
    blocks: list[dict[str, Any]] = []
    if cfg.method != "end-to-end":
        blocks = _heal_blocks(model, teacher, params, cfg, loader, val_loader, device,
                              None if checkpoint_dir is None else Path(checkpoint_dir) / BLOCKS_DIR, resume,
                              fingerprint)
    manager = None
    step = epoch = index = 0
    history: list[dict[str, Any]] = []
    resumed_from = None
    best: dict[str, Any] | None = None
    best_weights: dict[str, torch.Tensor] = {}
    _set_training(model, True)
    if checkpoint_dir is not None:
        try:
            manager = CheckpointManager(Path(checkpoint_dir), cfg.keep_last, cfg.monitor, cfg.mode)
        except OSError as err:
            raise CompressorError(f"cannot make the checkpoint folder {checkpoint_dir} ({err.strerror})",
                                  "pass --checkpoint-dir a writable folder") from None
        existing = manager.newest_valid() if resume else None
        if existing is not None:
            tensors, state = manager.load(existing)
            check_training_state(tensors, state, existing)
            changed = [k for k, v in fingerprint.items() if state["config"].get(k, _OLD_DEFAULTS.get(k)) != v]
            if changed:
                raise CompressorError(f"the checkpoint was written with other options: {', '.join(changed)}",
                                      "resume with the options of the original run")
            try:
                unpack_training_state(tensors, state, params, opt, sched)
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
                raise CompressorError(f"checkpoint {existing} is malformed: its training state cannot be "
                                      f"restored ({_first_line(err)})",
                                      f"delete {existing} (or resume from another run's folder)") from None
            step, (epoch, index) = state["step"], state["data_position"]
            history, resumed_from = manager.history, step
            best = manager.best()
            if best is not None:
                saved = manager.load_tensors(manager.best_path()) if best["step"] != step else tensors
                best_weights = {k: saved[f"param.{k}"] for k in params} if saved else {}

    def record(metrics: dict[str, float]) -> None:
        nonlocal best, best_weights
        history.append({"step": step, "metrics": metrics})
        value = metrics.get(cfg.monitor)
        if value is not None and math.isfinite(value) and (
                best is None or (value < best["metrics"][cfg.monitor] if cfg.mode == "min"
                                 else value > best["metrics"][cfg.monitor])):
            best = history[-1]
            best_weights = {k: p.detach().clone() for k, p in params.items()}
        if manager is not None:
            extra = {"config": fingerprint, "step": step, "data_position": [epoch, index]}
            tensors, state = pack_training_state(params, opt, sched, extra)
            manager.save(step, tensors, state, metrics)

    if resumed_from is None:
        record(evaluate(None))
    before = input_metrics or history[0]["metrics"]

    from tqdm.auto import tqdm
    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=total, initial=step, desc=f"heal ({cfg.train})", unit="step", disable=not show,
               leave=False)
    running, seen = 0.0, 0
    # distill="hidden": the blocks whose outputs are matched, those the block-wise phase heals.
    hidden_blocks = _find_blocks(model, params, cfg) if cfg.distill == "hidden" and step < total else []
    # A causal LM's outputs are compared as the final hidden states its head reads (teacher: None for ce).
    teach = (lambda b: head_inputs(teacher, b) if loss == "kl" else None) if lm else (
        lambda b: _run(teacher, b, device))
    while step < total:
        if index >= len(loader):
            epoch, index = epoch + 1, 0
        inputs, tgt = loader.batch(epoch, index)
        index += 1
        inputs = to_device(inputs, device)
        if supervised:
            tgt = to_device(tgt, device)
        elif hidden_blocks:
            with torch.no_grad(), _block_outputs(teacher, hidden_blocks) as teacher_hidden:
                tgt = teach(inputs)
        else:
            with torch.no_grad():
                tgt = teach(inputs)
        with _block_outputs(model, hidden_blocks) as student_hidden:
            out = head_inputs(model, inputs) if lm else primary_output(call(model, inputs))
        value = lm_loss(out, tgt, inputs) if lm else loss_fn(out, tgt, attention_mask(inputs))
        if hidden_blocks:
            value = value + hidden_loss(student_hidden, teacher_hidden, attention_mask(inputs))
        if not torch.isfinite(value):
            raise CompressorError(f"the loss became {value.item()} at step {step + 1}",
                                  f"lower the learning rate (lr= or --lr, now {cfg.lr:g})")
        opt.zero_grad(set_to_none=True)
        value.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        running, seen = running + value.item(), seen + 1
        bar.update(1)
        if step % every_n == 0 or step == total:
            record(evaluate(running / seen))
            running, seen = 0.0, 0
            bar.set_postfix({k: f"{v:.4g}" for k, v in history[-1]["metrics"].items()})
    bar.close()

    best = best or history[-1]
    if _at_least_as_good(before, best["metrics"], cfg):
        # Nothing trained beat the input on the held-out data: the input itself, not a rounding of it
        # (a merged zero adapter, a PiSSA split put back), is the answer.
        value = before[cfg.monitor]
        note = (f"no healing step beat the input on {cfg.monitor} ({value:.6g}): the input model is returned "
                "unchanged")
        model = copy.deepcopy(compressed)
        return HealResult(model, before, before, 0, step, history, resumed_from,
                          Path(checkpoint_dir) if checkpoint_dir else None, time.perf_counter() - start_time,
                          cfg, None, note, blocks, recipe)
    if best_weights:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(best_weights[k])
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
    return HealResult(model, before, best["metrics"], best["step"], step, history, resumed_from,
                      Path(checkpoint_dir) if checkpoint_dir else None, time.perf_counter() - start_time, cfg,
                      adapter, None, blocks, recipe)


def _at_least_as_good(a: dict[str, float], b: dict[str, float], cfg: HealConfig) -> bool:
    """Whether metrics ``a`` are as good as ``b`` or better on the monitored metric (False when either
    lacks it: without held-out data there is nothing to compare the input with)."""
    x, y = a.get(cfg.monitor), b.get(cfg.monitor)
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
        return False
    return x <= y if cfg.mode == "min" else x >= y


def _find_blocks(model: nn.Module, params: dict[str, nn.Parameter], cfg: HealConfig) -> list[str]:
    """The blocks of ``model`` (``cfg.blocks`` globs, or found) that hold some of the trained ``params``."""
    from compressor.train.blockwise import find_blocks

    return find_blocks(model, list(params), [p.strip() for p in cfg.blocks.split(",")] if cfg.blocks else None)


@contextmanager
def _block_outputs(net: nn.Module, names: Sequence[str]) -> Iterator[list[torch.Tensor]]:
    """A list that the forward passes run inside the ``with`` fill with the primary outputs of ``net``'s
    blocks ``names``, in call order; the hooks are removed on leaving (the teacher is the caller's)."""
    outputs: list[torch.Tensor] = []
    handles = [net.get_submodule(n).register_forward_hook(lambda _m, _a, out: outputs.append(primary_output(out)))
               for n in names]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def hidden_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over blocks of ``||h - h_teacher||^2 / ||h_teacher||^2`` (padding left out): each block's
    output error relative to its scale, so that no block dominates by the size of its activations."""
    if len(student) != len(teacher) or not student:
        raise CompressorError(f"the model's blocks ran {len(student)} times but the teacher's {len(teacher)}",
                              "pass distill='output' (--distill output) for models whose blocks differ")
    terms = [_masked_mean((s - t.to(s.dtype)).pow(2).mean(-1), mask)
             / _masked_mean(t.to(s.dtype).pow(2).mean(-1), mask).clamp(min=1e-12)
             for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()


def _heal_blocks(model: nn.Module, teacher: nn.Module, params: dict[str, nn.Parameter], cfg: HealConfig,
                 loader: Batches, val_loader: Batches | None, device: torch.device,
                 folder: Path | None, resume: bool, fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    """The block-wise phase (see :mod:`compressor.train.blockwise`) on ``model`` in place: each block's
    ``params`` trained for ``cfg.block_steps`` to match the teacher's block, the best by held-out block
    error kept (by training block error without held-out data). After each block a checkpoint in
    ``folder`` holds the weights so far; a resumed run loads the newest and redoes the block after it,
    which, seeded by its index, ends as the uninterrupted run did. Returns one summary per block."""
    from compressor.train.blockwise import capture, carry, record_calls, train_block

    names = _find_blocks(model, params, cfg)
    # A decoder's blocks must not be handed a key/value cache (each block runs many times on its inputs).
    prepare = uncached if is_causal_lm(model) else (lambda b: b)
    train_batches = [prepare(to_device(b, device)) for b, _ in loader.in_order()]
    select_batches = train_batches if val_loader is None else [prepare(to_device(b, device))
                                                               for b, _ in val_loader.in_order()]
    manager, done = None, []
    if folder is not None:
        manager = CheckpointManager(folder, keep_last=1, monitor="blocks_done", mode="max")
        newest = manager.newest_valid() if resume else None
        if newest is not None:
            tensors, state = manager.load(newest)
            blocks = state.get("blocks")
            # Each finished block is recorded as {"block": name, before/after errors} (see done.append below).
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
            done = state["blocks"]
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
        info = train_block(block, own, train, select, mse_loss, _optimizer(cfg.replace(lr=lr), list(own.values())),
                           _schedule(cfg, cfg.block_steps), cfg.block_steps, cfg.seed * 1_000 + i, cfg.grad_clip)
        done.append({"block": name, **info})
        if manager is not None:
            metrics = {"blocks_done": len(done), "block_error_before": info["before"],
                       "block_error_after": info["after"]}
            tensors = {f"param.{k}": p for k, p in params.items()}
            manager.save(len(done), tensors, {"config": fingerprint, "block_names": names, "blocks": done},
                         metrics)
    return done


def _check_checkpoint_dir(path: Path, resume: bool) -> None:
    """Refuse a checkpoint folder that cannot be one before anything is trained or written."""
    if path.is_symlink() and not path.is_dir():
        raise CompressorError(f"checkpoint folder {path} is a broken or looping symlink",
                              "pass --checkpoint-dir a real folder")
    if path.exists() and not path.is_dir():
        raise CompressorError(f"checkpoint folder {path} is a file",
                              "pass --checkpoint-dir a folder (a new one, or that of the run to resume)")
    if not resume and path.is_dir() and (any(path.glob(f"{PREFIX}*")) or any(path.glob(f"{BLOCKS_DIR}/{PREFIX}*"))):
        raise CompressorError(f"{path} already holds checkpoints",
                              "pass resume=True (--resume) to continue that run, or use an empty folder")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _forward(what: str, net: nn.Module, inputs: Any, device: torch.device, data: str) -> torch.Tensor:
    """``net``'s training output on ``inputs`` (no gradients, no randomness), or a one-line error."""
    try:
        with torch.no_grad():
            if what == "teacher":
                return _run(net, inputs, device)
            return primary_output(call(net, to_device(inputs, device)))
    except CompressorError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as err:
        raise CompressorError(f"the {what} cannot run on the {data} inputs ({_first_line(err)})",
                              f"pass {data} inputs shaped and typed as the {what} expects") from None


def _preflight(model: nn.Module, teacher: nn.Module | None, loader: Batches, val_loader: Batches | None,
               loss: str | Callable, device: torch.device) -> None:
    """Run the model (and the teacher) on the first batch of the training and validation data and check
    that their outputs and the targets fit the loss: a bad file fails here, before anything is written."""
    for data, batches in (("training", loader), ("validation", val_loader)):
        if batches is None:
            continue
        for what, values in (("inputs", batches.inputs), ("targets", batches.targets)):
            if not all(torch.isfinite(t).all() for t in _floating(values)):
                raise CompressorError(f"the {data} {what} hold NaN or infinite values",
                                      f"remove or fix those samples of the {data} data")
        inputs, tgt = batches.batch(0, 0)
        out = _forward("model", model, inputs, device, data)
        if tgt is None:
            t = _forward("teacher", teacher, inputs, device, data)
            if t.shape != out.shape:
                raise CompressorError(f"the teacher's outputs are {list(t.shape)} but the model's are "
                                      f"{list(out.shape)}: it is not the model this one was compressed from",
                                      "pass the original model as the teacher (--teacher)")
            continue
        if callable(loss):
            continue
        if not isinstance(tgt, torch.Tensor):
            raise CompressorError(f"the {data} targets are a {type(tgt).__name__}, not a tensor",
                                  "pass targets as one tensor (or a list of tensors, one per batch)")
        labels = _is_integer(tgt)
        if loss == "ce":
            if not labels:
                raise CompressorError(f"loss ce needs class labels (whole numbers), but the {data} targets "
                                      f"are {str(tgt.dtype).replace('torch.', '')}",
                                      "pass integer labels, or loss= (--loss) mse or cosine for target outputs")
            if out.dim() < 2 or tgt.shape != out.shape[:-1]:
                raise CompressorError(f"the {data} labels are shaped {list(tgt.shape)} but the model's outputs "
                                      f"are {list(out.shape)} (one label per output row expected)",
                                      "pass one class label per sample")
            low, high, classes = *_label_range(batches.targets), out.shape[-1]
            if low < 0 or high >= classes:
                raise CompressorError(f"the {data} labels go from {low} to {high}, but the model has "
                                      f"{classes} classes", f"pass labels in 0..{classes - 1}")
        elif labels and loss in ("kl", "cosine"):
            raise CompressorError(f"loss {loss} compares with target outputs, but the {data} targets are "
                                  "class labels", "pass loss= (--loss) ce, or leave it out")
        elif tgt.shape != out.shape:
            raise CompressorError(f"the {data} targets are shaped {list(tgt.shape)} but the model's outputs "
                                  f"are {list(out.shape)}", f"pass targets shaped like the outputs for loss {loss}")


def _floating(x: Any) -> list[torch.Tensor]:
    """The floating-point tensors in ``x`` (a tensor, or a dict, tuple or list of them, nested)."""
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _floating(v)]
    return []


def _label_range(targets: Any) -> tuple[int, int]:
    parts = targets if isinstance(targets, list) else [targets]
    parts = [t for t in parts if isinstance(t, torch.Tensor) and t.numel()]
    return (min(int(t.min()) for t in parts), max(int(t.max()) for t in parts)) if parts else (0, 0)


# ----------------------------------------------------------------------------------- what trains

def _trainable(model: nn.Module, cfg: HealConfig) -> dict[str, nn.Parameter]:
    factored = {name for name, m in model.named_modules() if isinstance(m, LOW_RANK_TYPES)}
    if not factored and cfg.train != "lora":
        raise CompressorError("the model has no factored layers to heal",
                              "compress it first: compressor.rewrite(model, compressor.analyze(model, ...)), "
                              "or fine-tune it with train='lora'", cli_fix="compress it first, or fine-tune it "
                              "with --train lora")
    patterns = [p.strip() for p in cfg.layers.split(",")] if cfg.layers else None

    def chosen(name: str) -> bool:
        return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)

    if patterns and factored and not any(map(chosen, factored)):
        raise CompressorError(f"layers={cfg.layers!r} names none of the factored layers",
                              f"pass globs matching some of {', '.join(sorted(factored)[:6])}",
                              cli_fix=f"pass --layers globs matching some of {', '.join(sorted(factored)[:6])}")
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.train == "lora":
        # A compressed model: adapters on its factors. A plain one: on every layer a handler adapts, so
        # heal with train="lora" is also the fine-tuning command.
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, init=cfg.lora_init,
                   filter_fn=(lambda name, _: chosen(name)) if not factored else
                   lambda name, _: name.rpartition(".")[0] in factored and chosen(name.rpartition(".")[0])
                   and name.rpartition(".")[2] in ("down", "up"))
        params = lora_parameters(model)
        if not params:
            raise CompressorError(f"layers={cfg.layers!r} names none of the layers that take adapters",
                                  "pass globs naming some of the model's linear or conv layers",
                                  cli_fix="pass --layers globs naming some of the model's linear or conv layers")
    else:
        params = {f"{name}.{part}.weight": model.get_submodule(f"{name}.{part}").weight
                  for name in sorted(factored) if chosen(name) for part in ("down", "up")}
    for p in params.values():
        p.requires_grad_(True)
    return params


def _set_training(model: nn.Module, training: bool) -> None:
    """Eval mode for the whole model; LoRA dropout follows ``training``."""
    model.eval()
    for m in model.modules():
        if isinstance(m, LoRALayer):
            m.lora_dropout.train(training)


def _optimizer(cfg: HealConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _schedule(cfg: HealConfig, total: int) -> Callable[[int], float]:
    warm, cosine = cfg.warmup_steps, cfg.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if not cosine:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return factor


# ------------------------------------------------------------------------------------------- data

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

    def in_order(self):
        for i in range(len(self)):
            yield self.batch(0, i)


def _run(teacher: nn.Module, inputs: Any, device: torch.device) -> torch.Tensor:
    """The teacher's output in eval mode (its own mode is left as it was)."""
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            return primary_output(call(teacher, to_device(inputs, next(teacher.parameters()).device))).to(device)
    finally:
        teacher.train(was_training)


def _is_integer(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex()


# ----------------------------------------------------------------------------------------- losses

def _masked_mean(per_item: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or mask.shape != per_item.shape:
        return per_item.mean()
    m = mask.to(per_item.dtype)
    return (per_item * m).sum() / m.sum().clamp(min=1)


def mse_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if out.dim() < 2:
        return F.mse_loss(out, target.to(out.dtype))
    return _masked_mean((out - target.to(out.dtype)).pow(2).mean(-1), mask)


def ce_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def cosine_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return _masked_mean(1 - F.cosine_similarity(out, target.to(out.dtype), dim=-1), mask)


def make_kl_loss(temperature: float) -> Callable:
    def kl_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """KL(teacher || student) of the softened class distributions, times T^2 (Hinton et al.)."""
        logp = F.log_softmax(out / temperature, -1)
        logq = F.log_softmax(target.to(out.dtype) / temperature, -1)
        per_item = (logq.exp() * (logq - logp)).sum(-1)
        return _masked_mean(per_item, mask) * temperature ** 2
    return kl_loss


_LOSS_FNS: dict[str, Callable] = {"mse": mse_loss, "ce": ce_loss, "cosine": cosine_loss}


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Batches, teacher_out: list[torch.Tensor] | None, loss_fn: Callable,
              classes: bool, device: torch.device) -> dict[str, float]:
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
            cos += float(_masked_mean(F.cosine_similarity(out, tgt, dim=-1), attention_mask(inputs))) * n
    metrics = {"val_loss": total / count}
    if classes:
        metrics["val_accuracy"] = correct / labels
    elif teacher_out is not None:
        metrics["val_cosine"] = cos / count
    return metrics
