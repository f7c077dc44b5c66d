"""Heal: a short low-rank fine-tune that wins back what truncation cost.

    result = compressor.heal(compressed, teacher=original, data=inputs)          # distillation
    result = compressor.heal(compressed, data=x, targets=y, val=(x_val, y_val))  # supervised
    healed = result.model

What trains is the factor matrices (``.down`` / ``.up`` of every factored layer) or, with
``train="lora"``, LoRA adapters on them that are merged back at the end, so the healed model has exactly
the compressed model's layers and size. Everything else is frozen and the model runs in eval mode
(dropout off, batch-norm statistics fixed): healing changes only the chosen weights. The input models
are never modified. With a validation set the best step by ``monitor`` is returned (the starting point
included, so healing never returns a model worse on validation than the one it was given).

Data is a tensor, a tuple of tensors (positional inputs) or a dict of named tensors (keyword inputs),
with samples along the first dimension, batched here; or a *list* of ready batches (each a tensor, a
tuple of positional inputs, or a dict of keyword inputs, with a list of target batches to match). The
batch order is a permutation seeded by ``(seed, epoch)``, so ``(epoch, index)`` is the whole data
position a checkpoint needs to resume exactly.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from compressor.core.errors import CompressorError
from compressor.core.layers import LOW_RANK_TYPES
from compressor.data.inputs import attention_mask, call, num_samples, primary_output, take, to_device
from compressor.train.checkpoint import CheckpointManager, pack_training_state, unpack_training_state
from compressor.train.lora import LoRALayer, apply_lora, lora_parameters, merge_lora

LOSSES = ("mse", "kl", "ce", "cosine")
# Hyper-parameters a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = ("train", "lora_rank", "lora_alpha", "lora_dropout", "loss", "temperature", "optimizer", "lr",
                "weight_decay", "schedule", "warmup_steps", "batch_size", "seed", "grad_clip", "every",
                "monitor", "mode", "total_steps", "batches_per_epoch")


@dataclass
class HealConfig:
    """Every option of :func:`heal` that shapes the training (recorded in each checkpoint)."""

    train: str = "factors"  # "factors" or "lora"
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    loss: str | None = None  # None: "ce" for integer targets, else "mse"; "kl"/"cosine" for distillation
    temperature: float = 1.0  # for "kl"
    optimizer: str = "adamw"  # "adamw", "adam" or "sgd" (momentum 0.9)
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"  # or "constant"; both after `warmup_steps` of linear warm-up
    warmup_steps: int = 0
    batch_size: int = 32
    steps: int | None = None  # default: `epochs` (default 1) passes over the data
    epochs: int | None = None
    seed: int = 0
    grad_clip: float | None = 1.0  # max gradient norm; None or 0 disables
    every: int | None = None  # evaluate (and checkpoint) every N steps; default once per epoch
    keep_last: int = 3
    monitor: str | None = None  # default: val_accuracy (class labels), val_loss (val), else train_loss
    mode: str | None = None  # "min"/"max"; default "max" for accuracy/cosine metrics

    def validate(self) -> None:
        choices = {"train": ("factors", "lora"), "optimizer": ("adamw", "adam", "sgd"),
                   "schedule": ("cosine", "constant"), "mode": ("min", "max", None)}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise CompressorError(f"{key}={getattr(self, key)!r} is not one of {allowed}",
                                      f"pass {key}= one of {', '.join(map(str, allowed))}")
        if self.loss is not None and self.loss not in LOSSES:
            raise CompressorError(f"loss={self.loss!r} is not one of {LOSSES}", "or pass a callable")
        for key in ("lora_rank", "batch_size", "steps", "epochs", "every", "keep_last"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise CompressorError(f"{key} must be a whole number >= 1, got {v!r}", f"pass e.g. {key}=10")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CompressorError(f"lr must be a positive number, got {self.lr}", "pass e.g. lr=1e-3")
        if not 0 <= self.lora_dropout < 1:
            raise CompressorError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}", "pass e.g. 0.1")


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


def heal(compressed: nn.Module, *, teacher: nn.Module | None = None, data: Any, targets: Any = None,
         val: Any = None, loss: str | Callable | None = None, train: str = "factors", lora_rank: int = 8,
         lora_alpha: float = 16, lora_dropout: float = 0.0, temperature: float = 1.0,
         optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0, schedule: str = "cosine",
         warmup_steps: int = 0, batch_size: int = 32, steps: int | None = None, epochs: int | None = None,
         seed: int = 0, grad_clip: float | None = 1.0, checkpoint_dir: str | Path | None = None,
         every: int | None = None, keep_last: int = 3, monitor: str | None = None, mode: str | None = None,
         resume: bool = False, progress: bool | None = None) -> HealResult:
    """Fine-tune the factors of ``compressed`` (a copy) against ``targets`` or the ``teacher``'s outputs.

    ``val`` is ``(inputs, targets)`` when supervised, or inputs alone for distillation (compared with the
    teacher). See :class:`HealConfig` for the options; ``checkpoint_dir`` with ``resume=True`` continues
    an interrupted run from its newest valid checkpoint and ends where the uninterrupted run would.
    """
    start_time = time.perf_counter()
    cfg = HealConfig(train, lora_rank, lora_alpha, lora_dropout, loss if isinstance(loss, str) else None,
                     temperature, optimizer, lr, weight_decay, schedule, warmup_steps, batch_size, steps,
                     epochs, seed, grad_clip, every, keep_last, monitor, mode)
    cfg.validate()
    supervised = targets is not None
    if not supervised and teacher is None:
        raise CompressorError("heal needs targets (supervised) or a teacher (distillation)",
                              "pass targets=labels, or teacher=the uncompressed model")
    loader = Batches(data, targets, batch_size, seed, shuffle=True)
    val_loader = None
    if val is not None:
        vx, vy = val if supervised else (val, None)
        if supervised and vy is None:
            raise CompressorError("val has no targets", "pass val=(inputs, targets) for supervised healing")
        val_loader = Batches(vx, vy, max(batch_size, 256), seed, shuffle=False)
    if loss is None:
        loss = ("ce" if _is_integer(loader.first_targets()) else "mse") if supervised else "mse"
    loss_fn = loss if callable(loss) else make_kl_loss(temperature) if loss == "kl" else _LOSS_FNS[loss]
    cfg.monitor = monitor or ("val_accuracy" if val_loader and loss == "ce" else
                              "val_loss" if val_loader else "train_loss")
    cfg.mode = mode or ("max" if any(k in cfg.monitor for k in ("accuracy", "cosine")) else "min")

    # Seed everything before anything random (LoRA initialisation, dropout) happens.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = copy.deepcopy(compressed)
    params = _trainable(model, cfg)
    device = next(iter(params.values())).device
    total = cfg.steps or (cfg.epochs or 1) * len(loader)
    every_n = min(cfg.every or len(loader), total)
    opt = _optimizer(cfg, list(params.values()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    fingerprint = {**{k: v for k, v in asdict(cfg).items() if k in _RESUME_KEYS},
                   "loss": loss if isinstance(loss, str) else getattr(loss, "__name__", "callable"),
                   "total_steps": total, "batches_per_epoch": len(loader), "every": every_n}

    val_targets = None
    if val_loader is not None and not supervised:
        val_targets = [_run(teacher, b, device) for b, _ in val_loader.in_order()]

    def evaluate(train_loss: float | None) -> dict[str, float]:
        metrics = {} if train_loss is None else {"train_loss": train_loss}
        if val_loader is not None:
            _set_training(model, False)
            metrics.update(_evaluate(model, val_loader, val_targets, loss_fn, loss == "ce", device))
            _set_training(model, True)
        return metrics

    manager = None
    step = epoch = index = 0
    history: list[dict[str, Any]] = []
    resumed_from = None
    best: dict[str, Any] | None = None
    best_weights: dict[str, torch.Tensor] = {}
    _set_training(model, True)
    if checkpoint_dir is not None:
        manager = CheckpointManager(Path(checkpoint_dir), cfg.keep_last, cfg.monitor, cfg.mode)
        existing = manager.newest_valid() if resume else None
        if not resume and any(Path(checkpoint_dir).glob("step-*")):
            raise CompressorError(f"{checkpoint_dir} already holds checkpoints",
                                  "pass resume=True (--resume) to continue that run, or use an empty folder")
        if existing is not None:
            tensors, state = manager.load(existing)
            changed = [k for k, v in fingerprint.items() if state["config"].get(k) != v]
            if changed:
                raise CompressorError(f"the checkpoint was written with other options: {', '.join(changed)}",
                                      "resume with the options of the original run")
            unpack_training_state(tensors, state, params, opt, sched)
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
    before = history[0]["metrics"]

    from tqdm.auto import tqdm
    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=total, initial=step, desc=f"heal ({cfg.train})", unit="step", disable=not show,
               leave=False)
    running, seen = 0.0, 0
    while step < total:
        if index >= len(loader):
            epoch, index = epoch + 1, 0
        inputs, tgt = loader.batch(epoch, index)
        index += 1
        inputs = to_device(inputs, device)
        if supervised:
            tgt = to_device(tgt, device)
        else:
            with torch.no_grad():
                tgt = _run(teacher, inputs, device)
        value = loss_fn(primary_output(call(model, inputs)), tgt, attention_mask(inputs))
        if not torch.isfinite(value):
            raise CompressorError(f"the loss became {value.item()} at step {step + 1}",
                                  f"lower the learning rate (now lr={cfg.lr})")
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

    if best_weights:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(best_weights[k])
    if cfg.train == "lora":
        merge_lora(model)
    for p, q in zip(model.parameters(), compressed.parameters(), strict=True):
        p.requires_grad_(q.requires_grad)
    model.train(compressed.training)
    best = best or history[-1]
    return HealResult(model, before, best["metrics"], best["step"], step, history, resumed_from,
                      Path(checkpoint_dir) if checkpoint_dir else None, time.perf_counter() - start_time)


# ----------------------------------------------------------------------------------- what trains

def _trainable(model: nn.Module, cfg: HealConfig) -> dict[str, nn.Parameter]:
    factored = {name for name, m in model.named_modules() if isinstance(m, LOW_RANK_TYPES)}
    if not factored:
        raise CompressorError("the model has no factored layers to heal",
                              "compress it first: compressor.rewrite(model, compressor.analyze(model, ...))")
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.train == "lora":
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                   filter_fn=lambda name, _: name.rpartition(".")[0] in factored
                   and name.rpartition(".")[2] in ("down", "up"))
        params = lora_parameters(model)
    else:
        params = {f"{name}.{part}.weight": model.get_submodule(f"{name}.{part}").weight
                  for name in sorted(factored) for part in ("down", "up")}
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
