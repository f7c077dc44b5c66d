"""The settings of :func:`compressor.train.heal.heal`: :class:`HealConfig` and the per-kind defaults.

One place holds each setting's default, help, range and choices (a :class:`HealConfig` field), because the
``compress heal`` options, the checks of a Python caller's values and ``heal.json`` are all read from it.
:data:`KIND_DEFAULTS` holds the recipes measured per kind of model; :func:`model_kind` picks the row, and
:meth:`HealConfig.resolved` fills the unset settings from it once per run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from torch import nn

from compressor.analysis.blocks import block_list
from compressor.core.errors import CompressorError
from compressor.train.decoder import is_causal_lm

LR, LM_LR = 1e-3, 1e-4  # the general and the causal-LM peak learning rates

# The settings a kind of model heals with when they are not given: an explicit setting always wins. Each row
# is a recipe measured on a real model (its result files named); "default" fills what a row leaves out.
# :meth:`HealConfig.resolved` applies it once per run, and heal.json records the kind and what it filled.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    # Supervised healing and models of no kind below (the tests' small models; the digits CNN healed best
    # end-to-end at lr 2e-3).
    "default": {"lr": LR, "method": "end-to-end", "distill": "output", "block_steps": 100, "kl_tokens": "all"},
    # Causal language models distil next-token distributions (loss kl, chosen in heal): Gemma 3 270M's
    # compressed factors moved too far from the teacher at lr 5e-4 (benchmarks/heal_gemma.py).
    "causal-lm": {"lr": LM_LR, "kl_tokens": "text"},
    # Transformers distilled (all-MiniLM-L6-v2, 40% of the encoder removed, data-aware start): the default
    # row returned the input unchanged; block-wise then end-to-end with hidden states reached held-out
    # sentence cosine 0.9661 in 400 end-to-end steps and 0.9691 in 650 (heal_blockwise_40_goal2/3.md), and
    # this row 0.9658 in 396 CPU seconds of `compress heal` (heal_defaults_minilm_40.md).
    "transformer": {"lr": 3e-4, "method": "both", "distill": "hidden", "block_steps": 150, "steps": 500},
    # CNNs distilled (MobileNetV2, 40% removed, few photos): the cosine of the logits at lr 3e-4 healed the
    # held-out photos where KL at T=2 left them flat or lower (heal_cnn_mixed*.md, heal_cnn.md).
    "cnn": {"lr": 3e-4, "loss": "cosine"},
}


def _by_kind(name: str, otherwise: str | None = None) -> str:
    """The ``[default: ...]`` of a setting :data:`KIND_DEFAULTS` fills, for its help (``otherwise``: what
    stands for it where no row gives it)."""
    def text(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    names = {"causal-lm": "a causal LM", "transformer": "a transformer distilled", "cnn": "a CNN distilled"}
    kinds = [f"{text(row[name])} for {names.get(kind, kind)}" for kind, row in KIND_DEFAULTS.items()
             if kind != "default" and name in row]
    general = text(KIND_DEFAULTS["default"][name]) if name in KIND_DEFAULTS["default"] else otherwise
    return f"[default: {'; '.join([*kinds, f'{general} otherwise'])}]"


def _setting(default: Any, help: str, **checks: Any) -> Any:
    """A :class:`HealConfig` field: its default, its help (also the ``compress heal --help`` text) and
    its range (``min``: smallest value allowed, ``above``: the value must be larger, ``below``: smaller)."""
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class HealConfig:
    """Every setting of :func:`heal`: one place for its default, its help, its range and its choices.

    The ``compress heal`` options are generated from these fields (``lora_rank`` is ``--lora-rank``), each
    checkpoint records the settings a resumed run must share, and ``heal.json`` records all of them
    (:meth:`to_dict`). A bad value raises :class:`CompressorError` when the config is made. A setting left
    None that :data:`KIND_DEFAULTS` names is filled by the kind of model healed (:func:`model_kind`,
    :meth:`resolved`), so that a plain ``compress heal DIR --data ... --val ...`` runs the measured recipe.
    """

    train: Literal["factors", "lora", "all"] = _setting(
        "factors", "Train the factor matrices, or LoRA adapters on them merged back at the end (on a model that was "
                    "never compressed: on every adaptable layer), or the factors and the weights of every layer left "
                    "dense (linear and conv layers; embeddings and norms stay fixed): the same size, more to adapt.")
    layers: str | None = _setting(
        None, "Comma-separated globs naming the factored layers whose weights train, e.g. 'features.*' (on a model "
              "that was never compressed with --train lora: the layers that get adapters; with --train all: any "
              "linear or conv layer); the others stay fixed [default: all].")
    lora_rank: int = _setting(8, "Rank of the LoRA adapters (with --train lora).", min=1)
    lora_alpha: float = _setting(16.0, "LoRA scale: the adapter update is multiplied by alpha / rank.", above=0)
    lora_dropout: float = _setting(0.0, "Dropout on the LoRA adapters' input, in [0, 1).", min=0, below=1)
    lora_init: Literal["zero", "pissa"] = _setting(
        "zero", "LoRA start: zero (the adapter adds nothing) or pissa (the adapter holds each weight's top "
                "singular directions, the frozen base the rest); a saved pissa adapter is a rank-2r LoRA on "
                "the original weights.")
    loss: Literal["mse", "kl", "ce", "cosine"] | None = _setting(
        None, "Loss [default: ce for class labels, kl for a causal language model, cosine for a CNN distilled, mse "
              "otherwise]; kl and "
              "cosine compare with a teacher's outputs; on a causal language model kl is computed on the "
              "next-token distributions, and ce is the next-token loss of the text itself (no teacher needed).")
    temperature: float = _setting(1.0, "Softening temperature for --loss kl.", above=0)
    kl_tokens: Literal["all", "text"] | None = _setting(
        None, "A causal language model's kl training steps compare next-token distributions over all the vocabulary, "
              "or over the distinct tokens of the training and validation text only (each renormalised; the output "
              "head is then that much smaller; validation always uses all) "
              f"{_by_kind('kl_tokens')}.")
    optimizer: Literal["adamw", "adam", "sgd"] = _setting("adamw", "Optimizer (sgd uses momentum 0.9).")
    lr: float | None = _setting(None, f"Peak learning rate {_by_kind('lr')}.", above=0)
    weight_decay: float = _setting(0.0, "Weight decay of the optimizer.", min=0)
    schedule: Literal["cosine", "constant"] = _setting(
        "cosine", "Learning-rate schedule after the linear warm-up.")
    warmup_steps: int = _setting(0, "Steps of linear learning-rate warm-up.", min=0)
    batch_size: int = _setting(32, "Samples per step (a list of ready batches is used as given).", min=1)
    steps: int | None = _setting(None, f"Train this many steps {_by_kind('steps', '--epochs passes over the data')}.",
                                 min=1)
    epochs: int | None = _setting(None, "Train this many passes over the data [default: 1].", min=1)
    method: Literal["end-to-end", "blockwise", "both"] | None = _setting(
        None, "end-to-end: distil (or fit) the whole model's output; blockwise: each block (a transformer layer, a "
              "CNN stage) learns the teacher's block on the inputs the healed blocks before it give, one block at "
              f"a time; both: blockwise, then end-to-end {_by_kind('method')}.")
    block_steps: int | None = _setting(
        None, f"Steps per block of the block-wise phase (batches of --batch-size) {_by_kind('block_steps')}.", min=1)
    block_lr: float | None = _setting(None, "Peak learning rate of the block-wise phase [default: --lr].",
                                      above=0)
    blocks: str | None = _setting(
        None, "Comma-separated globs naming the blocks, e.g. 'encoder.layer.*' [default: the children of a "
              "ModuleList holding trained weights, else the first module whose children split them].")
    quant: Literal["int8", "int4"] | None = _setting(
        None, "Heal through simulated quantization: every layer the int8 (onnxruntime dynamic: weights per "
              "output channel, inputs per tensor) or int4 (MatMulNBits, blocks of 128) export quantizes "
              "computes as that file will, with straight-through gradients, so the healed factors are "
              "chosen for the rounded model, and validation (the best step, never worse) measures it.")
    distill: Literal["output", "hidden"] | None = _setting(
        None, "What end-to-end distillation matches: the model's output, or also every block's output (the blocks "
              "of --method blockwise: each transformer layer's hidden states, each CNN stage), adding the mean "
              f"over blocks of ||h - h_teacher||^2 / ||h_teacher||^2 to the loss {_by_kind('distill')}.")
    seq_len: int = _setting(
        256, "Tokens per training sequence when a causal language model heals on a text file (read as one token "
             "stream cut into sequences, each starting with the tokenizer's BOS if it adds one).", min=2)
    seed: int = _setting(0, "Seed of the data order, initialisation and dropout.", min=0)
    grad_clip: float | None = _setting(1.0, "Largest gradient norm; 0 turns clipping off.", min=0)
    every: int | None = _setting(
        None, "Validate (and checkpoint) every N steps [default: once per epoch].", min=1)
    keep_last: int = _setting(3, "Checkpoints to keep (the best is kept too).", min=1)
    monitor: str | None = _setting(
        None, "Metric that picks the best step: train_loss, val_loss, val_accuracy (class labels) or "
              "val_cosine (distillation) [default: val_accuracy, else val_loss, else train_loss].")
    mode: Literal["min", "max"] | None = _setting(
        None, "Whether a lower or higher --monitor is better [default: max for accuracy and cosine].")

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _checked(f, getattr(self, f.name)))

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values (``from_dict(to_dict())`` gives the same config)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HealConfig:
        """The config of ``values`` (e.g. a ``heal.json``'s ``config``); unknown names are refused."""
        if not isinstance(values, dict):
            raise CompressorError(f"a heal config is a JSON object of settings, not {type(values).__name__}",
                                  f"pass e.g. {{\"lr\": 0.001}} with names among {', '.join(setting_names())}")
        unknown = sorted(set(values) - set(setting_names()))
        if unknown:
            raise CompressorError(f"unknown heal setting {', '.join(map(repr, unknown))}",
                                  f"use names among {', '.join(setting_names())}")
        return cls(**values)

    def replace(self, **changes: Any) -> HealConfig:
        """A copy with ``changes`` (validated like a new config)."""
        return self.from_dict({**self.to_dict(), **changes})

    def resolved(self, kind: str) -> tuple[HealConfig, dict[str, Any]]:
        """A copy whose unset settings take ``kind``'s defaults (:data:`KIND_DEFAULTS`, over its "default"
        row), and the settings so filled. A given setting is never replaced, and ``epochs`` given counts as
        the length of the run (a row's ``steps`` then does not apply)."""
        if kind not in KIND_DEFAULTS:
            raise CompressorError(f"unknown model kind {kind!r}", f"pass one of {', '.join(KIND_DEFAULTS)}")
        recipe = {**KIND_DEFAULTS["default"], **KIND_DEFAULTS[kind]}
        filled = {name: value for name, value in recipe.items() if getattr(self, name) is None
                  and not (name == "steps" and self.epochs is not None)}
        return self.replace(**filled), filled


def model_kind(model: nn.Module, supervised: bool = False) -> str:
    """The row of :data:`KIND_DEFAULTS` that heals ``model``: "causal-lm" (a decoder with an output head),
    "transformer" (another Hugging Face model with attention heads and a list of blocks, distilled), "cnn" (a
    model with 2-D convolutions, distilled), else "default". Supervised healing (``supervised``: targets given) is
    "default" whatever the model: the transformer and CNN recipes are distillation recipes."""
    if supervised:
        return "default"
    if is_causal_lm(model):
        return "causal-lm"
    config = getattr(model, "config", None)
    # Attention heads: a Hugging Face ResNet or ConvNeXt has a config and a list of stages too, and is a CNN.
    if getattr(config, "num_attention_heads", None) and not getattr(config, "is_encoder_decoder", False) \
            and block_list(model) is not None:
        return "transformer"
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return "cnn"
    return "default"


def setting_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(HealConfig))


def setting_types() -> dict[str, tuple[type, tuple[str, ...] | None, bool]]:
    """``name -> (type, choices or None, None allowed)`` of every :class:`HealConfig` field, read from its
    annotation (``Literal[...]`` gives the choices)."""
    hints = get_type_hints(HealConfig)
    out = {}
    for name in setting_names():
        args = get_args(hints[name]) if get_origin(hints[name]) in (UnionType, Union) else (hints[name],)
        optional = type(None) in args
        (kind,) = [a for a in args if a is not type(None)]
        choices = get_args(kind) if get_origin(kind) is Literal else None
        out[name] = (str if choices else kind, choices, optional)
    return out


def _checked(f: Any, value: Any) -> Any:
    """``value`` of the field ``f`` checked (and an int given for a float made a float)."""
    kind, choices, optional = setting_types()[f.name]
    flag, example = "--" + f.name.replace("_", "-"), f.default if f.default is not None else 10
    fix = f"pass {f.name}= (--{f.name.replace('_', '-')}) e.g. {example}"
    if value is None:
        if optional:
            return None
        raise CompressorError(f"{f.name} must be set, got None", fix)
    if choices is not None:
        if value not in choices:
            raise CompressorError(f"{f.name}={value!r} is not one of {', '.join(choices)}",
                                  f"pass {f.name}= ({flag}) one of {', '.join(choices)}")
        return value
    if kind is str:
        if not isinstance(value, str) or not value:
            raise CompressorError(f"{f.name} must be a name, got {value!r}", fix)
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not (number and float(value).is_integer() and math.isfinite(value)):
        raise CompressorError(f"{f.name} must be a whole number, got {value!r}", fix)
    if kind is float and not (number and math.isfinite(value)):
        raise CompressorError(f"{f.name} must be a finite number, got {value!r}", fix)
    value = kind(value)
    low, above, below = f.metadata.get("min"), f.metadata.get("above"), f.metadata.get("below")
    if (low is not None and value < low) or (above is not None and value <= above) or (
            below is not None and value >= below):
        want = " and ".join(w for w in (low is not None and f">= {low}", above is not None and f"> {above}",
                                        below is not None and f"< {below}") if w)
        raise CompressorError(f"{f.name} must be {want}, got {value!r}", fix)
    return value
