"""Checks heal makes before anything trains or is written: the folder, the teacher, the data and the loss.

A bad file or a missing teacher fails here in one line naming the problem and the fix, not minutes into
training with a traceback and half a checkpoint folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.data.inputs import call, primary_output, to_device
from compressor.train.batches import Batches, is_integer, run_teacher
from compressor.train.block_phase import BLOCKS_DIR
from compressor.train.checkpoint import PREFIX
from compressor.train.config import HealConfig
from compressor.train.decoder import preflight as lm_preflight


def check_teacher(cfg: HealConfig, supervised: bool, lm: bool, teacher: nn.Module | None) -> None:
    """Distillation needs a teacher: refuse a run with neither targets nor one (a causal LM may learn its
    text's next tokens, loss ce, alone)."""
    if not supervised and teacher is None and not (lm and cfg.loss == "ce"):
        if lm:
            raise CompressorError(f"loss {cfg.loss or 'kl'} distils a causal language model from a teacher, and "
                                  "no teacher was given", "pass teacher= (the uncompressed model), or loss='ce' "
                                  "to learn the text's next tokens", cli_fix="pass --teacher, or --loss ce")
        raise CompressorError("heal needs targets (supervised) or a teacher (distillation)",
                              "pass targets=labels, or teacher=the uncompressed model")


def check_method(cfg: HealConfig, teacher: nn.Module | None) -> None:
    """Block-wise healing and hidden-state distillation both match the teacher's blocks."""
    if cfg.method != "end-to-end" and teacher is None:
        raise CompressorError(f"method={cfg.method} distils each block from the teacher's, and no teacher "
                              "was given", "pass teacher= (the uncompressed model), or method='end-to-end'",
                              cli_fix="pass --data without targets and --teacher, or --method end-to-end")
    if cfg.distill == "hidden" and teacher is None:
        raise CompressorError("distill=hidden matches the teacher's hidden states, and no teacher was given",
                              "pass teacher= (the uncompressed model), or distill='output'",
                              cli_fix="pass --data without targets and --teacher, or --distill output")


def check_checkpoint_dir(checkpoint_dir: str | Path | None, resume: bool) -> None:
    """Refuse a checkpoint folder that cannot be one (or a resume without one) before anything is trained
    or written."""
    if resume and checkpoint_dir is None:
        raise CompressorError("resume needs the folder of the run to continue",
                              "pass checkpoint_dir= (--checkpoint-dir) with resume (--resume)")
    if checkpoint_dir is None:
        return
    path = Path(checkpoint_dir)
    if path.is_symlink() and not path.is_dir():
        raise CompressorError(f"checkpoint folder {path} is a broken or looping symlink",
                              "pass --checkpoint-dir a real folder")
    if path.exists() and not path.is_dir():
        raise CompressorError(f"checkpoint folder {path} is a file",
                              "pass --checkpoint-dir a folder (a new one, or that of the run to resume)")
    if not resume and path.is_dir() and (any(path.glob(f"{PREFIX}*")) or any(path.glob(f"{BLOCKS_DIR}/{PREFIX}*"))):
        raise CompressorError(f"{path} already holds checkpoints",
                              "pass resume=True (--resume) to continue that run, or use an empty folder")


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none), for a one-line error."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def preflight(model: nn.Module, teacher: nn.Module | None, loader: Batches, val_loader: Batches | None,
              loss: str | Callable, device: torch.device, lm: bool) -> None:
    """Run the model (and the teacher) on the first batch of the training and validation data and check
    that their outputs and the targets fit the loss: a bad file fails here, before anything is written.
    A causal LM is checked by :func:`compressor.train.decoder.preflight` (through its output head)."""
    for data, batches in (("training", loader), ("validation", val_loader)):
        if batches is None:
            continue
        if lm:
            lm_preflight(model, teacher if loss == "kl" else None, to_device(batches.batch(0, 0)[0], device), data)
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
        if not callable(loss):
            _check_targets(tgt, out, loss, data, batches)


def _check_targets(tgt: Any, out: torch.Tensor, loss: str, data: str, batches: Batches) -> None:
    """The targets of the first ``data`` batch fit the model's outputs ``out`` for the named ``loss``."""
    if not isinstance(tgt, torch.Tensor):
        raise CompressorError(f"the {data} targets are a {type(tgt).__name__}, not a tensor",
                              "pass targets as one tensor (or a list of tensors, one per batch)")
    labels = is_integer(tgt)
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


def _forward(what: str, net: nn.Module, inputs: Any, device: torch.device, data: str) -> torch.Tensor:
    """``net``'s training output on ``inputs`` (no gradients, no randomness), or a one-line error."""
    try:
        with torch.no_grad():
            if what == "teacher":
                return run_teacher(net, inputs, device)
            return primary_output(call(net, to_device(inputs, device)))
    except CompressorError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as err:
        raise CompressorError(f"the {what} cannot run on the {data} inputs ({first_line(err)})",
                              f"pass {data} inputs shaped and typed as the {what} expects") from None


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
