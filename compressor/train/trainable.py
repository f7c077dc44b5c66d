"""What heal trains and how: the chosen weights, their mode, the optimizer and the schedule.

What trains is the factor matrices (``.down`` / ``.up`` of every factored layer), with ``train="lora"``
LoRA adapters on them, or with ``train="all"`` the factors and the weights of every layer left dense; everything
else is frozen and the model runs in eval mode
(dropout off, batch-norm statistics fixed), so healing changes only the chosen weights.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.handlers import handler_for, simulate_quantization
from compressor.core.layers import LOW_RANK_TYPES
from compressor.train.config import HealConfig
from compressor.train.lora import LoRALayer, apply_lora, lora_parameters


def trainable(model: nn.Module, cfg: HealConfig) -> dict[str, nn.Parameter]:
    """The weights of ``model`` that train (factors, LoRA adapters put on here, or with ``train="all"`` the
    factors and the dense layers' weights), by name; all others frozen. ``cfg.layers`` globs restrict them to
    some layers."""
    factored = {name for name, m in model.named_modules() if isinstance(m, LOW_RANK_TYPES)}
    if not factored and cfg.train == "factors":
        raise CompressorError("the model has no factored layers to heal",
                              "compress it first: compressor.rewrite(model, compressor.analyze(model, ...)), "
                              "or fine-tune it with train='lora' or train='all'", cli_fix="compress it first, or "
                              "fine-tune it with --train lora or --train all")
    patterns = [p.strip() for p in cfg.layers.split(",")] if cfg.layers else None

    def chosen(name: str) -> bool:
        return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)

    if patterns and factored and cfg.train != "all" and not any(map(chosen, factored)):
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
        if cfg.train == "all":
            params.update(dense_weights(model, factored, chosen))
        if not params:
            raise CompressorError(f"layers={cfg.layers!r} names none of the model's linear or conv layers",
                                  "pass globs naming some of them",
                                  cli_fix="pass --layers globs naming some of the model's linear or conv layers")
    for p in params.values():
        p.requires_grad_(True)
    return params


def dense_weights(model: nn.Module, factored: set[str], chosen: Callable[[str], bool]) -> dict[str, nn.Parameter]:
    """The weights of the layers left dense that ``train="all"`` trains beside the factors: every layer a
    handler factors (linear, conv) outside the factored ones. Embeddings stay fixed, and so does a layer whose
    weight is an embedding's (a tied output head): its rows are the vocabulary, most of them never in the
    text healed on, and Adam's state for them would be the size of the model."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = {}
    for name, mod in model.named_modules():
        h = handler_for(mod)
        if (h is None or isinstance(mod, (nn.Embedding, *LOW_RANK_TYPES)) or not chosen(name)
                or any(name.startswith(f"{f}.") for f in factored)):
            continue
        weight = h.weight(mod)
        if isinstance(weight, nn.Parameter) and id(weight) not in embedded:
            out[f"{name}.weight"] = weight
    return out


def set_training(model: nn.Module, training: bool) -> None:
    """Eval mode for the whole model; LoRA dropout follows ``training``."""
    model.eval()
    for m in model.modules():
        if isinstance(m, LoRALayer):
            m.lora_dropout.train(training)


def optimizer(cfg: HealConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params`` at the peak ``cfg.lr`` (the schedule scales it)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def schedule(cfg: HealConfig, total: int) -> Callable[[int], float]:
    """The learning-rate factor of each step of a ``total``-step run: linear warm-up, then cosine or flat."""
    warm, cosine = cfg.warmup_steps, cfg.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if not cosine:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return factor


def simulate_quant(model: nn.Module, cfg: HealConfig) -> None:
    """With ``cfg.quant``: every layer the export quantizes computes as that file will (straight-through
    gradients), so the healed factors are chosen for the rounded model."""
    if not cfg.quant:
        return
    if cfg.train == "lora":
        raise CompressorError(f"quant={cfg.quant} simulates the rounding of the weights the file stores, "
                              "but LoRA adapters sit beside them until merged",
                              "pass train='factors' (--train factors) with quant (--quant)")
    for m in model.modules():
        simulate_quantization(m, cfg.quant)
