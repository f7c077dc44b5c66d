"""LoRA adapters as files others can load: the two files PEFT writes and reads.

    adapter = Adapter.from_model(model)              # the LoRA wrappers apply_lora put in (trained)
    adapter.save("my-adapter/")                      # adapter_config.json + adapter_model.safetensors
    wrappers = load_adapter(other_model, "my-adapter/")   # a compressor or a PEFT adapter, applied
    merge_lora(other_model)                          # or keep the wrappers

The folder is what ``peft.PeftModel.save_pretrained`` writes, so for a Hugging Face base
``peft.PeftModel.from_pretrained(base, folder)`` loads it and computes what compressor's adapted model
computes; peft is never imported here. Keys are ``base_model.model.<module>.lora_A.weight`` and
``.lora_B.weight`` (``lora_embedding_A`` / ``lora_embedding_B`` for embeddings, stored as PEFT stores
them), ``<module>`` being the name in ``model.named_modules()`` (for a plain torch model, compressor's
names: the same files, which peft also reads onto that model with a custom config).

In memory every layer is held in compressor's convention, whatever its kind: the handler's weight matrix
``W`` (m, n) with ``y = W x``, and ``delta W = (alpha / r) * B @ A`` with ``A`` (r, n), ``B`` (m, r).

A PiSSA-initialised model (``apply_lora(..., init="pissa")``) has residual base weights, on which its
adapter alone means nothing. Compressor therefore writes it as peft's "convert PiSSA to LoRA" does: the
change to the *original* weights, ``scale * (B @ A - B0 @ A0)``, as a plain LoRA of rank ``2r`` (alpha
doubled, ``init_lora_weights: true``), which compressor and peft apply to the untouched model; the weights
file's safetensors header then records ``lora_init: "pissa, converted to lora on the original weights"``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_folder, file_in_folder
from compressor.core.handlers import handler_for
from compressor.core.layers import LoRAConv, LoRAEmbedding, LoRALayer, LoRAMatrix
from compressor.core.statefile import read_json
from compressor.train.lora import set_submodule

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# The layout of a layer's tensors in the file: PEFT's Linear/Conv1D, Conv*d and Embedding layers.
LAYOUTS = ("matrix", "conv", "embedding")


@dataclass
class AdapterLayer:
    """One adapted layer: ``delta W = (alpha / rank) * B @ A`` over the handler's ``(m, n)`` matrix."""

    A: torch.Tensor  # (rank, n)
    B: torch.Tensor  # (m, rank)
    alpha: float
    layout: str  # one of LAYOUTS
    kernel: tuple[int, ...] = ()  # conv: the base weight's shape after the output channels (in, *k)
    transposed: bool = False  # transformers' Conv1D (PEFT: fan_in_fan_out)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_matrix(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's tensors under PEFT's names (after ``<module>.``)."""
        a, b = self.A.detach(), self.B.detach()
        if self.layout == "embedding":
            return {"lora_embedding_A": b.T.contiguous(), "lora_embedding_B": a.T.contiguous()}
        if self.layout == "conv":
            a = a.reshape(self.rank, *self.kernel)
            b = b.reshape(b.shape[0], self.rank, *([1] * (len(self.kernel) - 1)))
        return {"lora_A.weight": a.contiguous(), "lora_B.weight": b.contiguous()}

    @classmethod
    def from_peft(cls, name: str, tensors: dict[str, torch.Tensor], alpha: float) -> AdapterLayer:
        if set(tensors) == {"lora_embedding_A", "lora_embedding_B"}:
            a, b = tensors["lora_embedding_A"], tensors["lora_embedding_B"]  # (r, num), (dim, r)
            _check_rank(name, a.shape[0], b.shape[-1], a.dim() == b.dim() == 2)
            return cls(b.T.contiguous(), a.T.contiguous(), alpha, "embedding")
        if set(tensors) != {"lora_A.weight", "lora_B.weight"}:
            raise CompressorError(f"the adapter's layer '{name}' holds {', '.join(sorted(tensors))}, not a LoRA "
                                  "A and B", "pass an adapter of plain LoRA layers (no DoRA, no bias, no "
                                  "modules_to_save)")
        a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        _check_rank(name, a.shape[0], b.shape[1] if b.dim() >= 2 else -1, a.dim() == b.dim() >= 2)
        if a.dim() > 2:
            return cls(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), alpha, "conv", tuple(a.shape[1:]))
        return cls(a, b, alpha, "matrix")


def _check_rank(name: str, ra: int, rb: int, ok: bool) -> None:
    if not ok or ra != rb:
        raise CompressorError(f"the adapter's layer '{name}' has A and B of mismatched shapes",
                              "pass an adapter written by compressor or peft")


@dataclass
class Adapter:
    """LoRA adapters by module name, and what PEFT's config records beside them."""

    layers: dict[str, AdapterLayer]
    base_model_name_or_path: str | None = None
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # other config entries, written as given
    # Every module name of the base model, where known: target_modules is then written as a list when
    # PEFT's suffix matching selects exactly the adapted layers (else as one exact regular expression).
    module_names: list[str] | None = field(default=None, repr=False)
    # Written into the weights file's safetensors header beside {"format": "pt"} (peft ignores it).
    metadata: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------------------ from a model
    @classmethod
    def from_model(cls, model: nn.Module, base_model_name_or_path: str | None = None) -> Adapter:
        """The adapters of every LoRA wrapper in ``model`` (copied: later training does not change them)."""
        layers, dropouts, pissa = {}, set(), False
        for name, mod in model.named_modules():
            if not isinstance(mod, LoRALayer):
                continue
            transposed = isinstance(mod, LoRAMatrix) and mod.transposed
            layout = "embedding" if isinstance(mod, LoRAEmbedding) else "conv" if isinstance(mod, LoRAConv) \
                else "matrix"
            kernel = tuple(mod.base.weight.shape[1:]) if layout == "conv" else ()
            A, B, alpha = mod.lora_A.detach().clone(), mod.lora_B.detach().clone(), float(mod.alpha)
            if mod.init_A is not None:
                # PiSSA: the base holds W - scale * B0 @ A0, so the change to the original weight is
                # scale * (B @ A - B0 @ A0) = scale * [B, -B0] @ [A; A0]: a LoRA of rank 2r, alpha doubled
                # to keep the scale (peft's "convert PiSSA to LoRA"), which applies to the untouched model.
                A = torch.cat([A, mod.init_A.reshape(A.shape)])
                B = torch.cat([B, -mod.init_B.reshape(B.shape)], dim=1)
                alpha, pissa = 2 * alpha, True
            layers[name] = AdapterLayer(A, B, alpha, layout, kernel, transposed)
            drop = mod.lora_dropout
            dropouts.add(float(drop.p) if isinstance(drop, nn.Dropout) else 0.0)
        if not layers:
            raise CompressorError("the model has no LoRA adapters to save",
                                  "apply them first (compressor.train.lora.apply_lora) and train them")
        if base_model_name_or_path is None:
            base_model_name_or_path = _name_or_path(model)
        # The base model's names: the wrappers' own children (base, lora_dropout) are not in it.
        names = [n for n, _ in model.named_modules() if not any(n.startswith(w + ".") for w in layers)]
        metadata = {"lora_init": "pissa, converted to lora on the original weights"} if pissa else {}
        return cls(layers, base_model_name_or_path, max(dropouts), module_names=names, metadata=metadata)

    # ------------------------------------------------------------------------------ onto a model
    def apply(self, model: nn.Module) -> dict[str, LoRALayer]:
        """Wrap each adapted layer of ``model`` in place with its LoRA wrapper holding these weights.
        Every layer is checked (it exists, its kind takes this layout, the shapes fit) before any is
        wrapped. Returns ``{name: wrapper}``."""
        modules = dict(model.named_modules())
        plans = []
        for name, layer in self.layers.items():
            mod = modules.get(name)
            if mod is None:
                raise CompressorError(f"the adapter adapts '{name}', which the model does not have",
                                      "apply the adapter to the model it was made for")
            if isinstance(mod, LoRALayer):
                raise CompressorError(f"'{name}' already carries a LoRA adapter",
                                      "merge it first (merge_lora) or start from the plain model")
            h = handler_for(mod)
            want = {"embedding": "embedding", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv"}.get(
                getattr(h, "kind", None), "matrix")
            m, n = h.weight_matrix(mod).shape if h is not None else (None, None)
            if h is None or want != layer.layout or (m, n) != (layer.B.shape[0], layer.A.shape[1]):
                raise CompressorError(f"the adapter's layer '{name}' ({layer.layout}, "
                                      f"{layer.B.shape[0]}x{layer.A.shape[1]}) does not fit the model's "
                                      f"{type(mod).__name__}" + (f" ({m}x{n})" if m is not None else ""),
                                      "apply the adapter to the model it was made for")
            plans.append((name, mod, h))
        wrapped = {}
        for name, mod, h in plans:
            layer = self.layers[name]
            w = h.lora(mod, layer.rank, layer.alpha, self.dropout)
            with torch.no_grad():
                w.lora_A.copy_(layer.A.reshape(w.lora_A.shape))
                w.lora_B.copy_(layer.B.reshape(w.lora_B.shape))
            w.train(mod.training)
            set_submodule(model, name, w)
            wrapped[name] = w
        return wrapped

    # ------------------------------------------------------------------------------------- files
    def config(self) -> dict[str, Any]:
        """``adapter_config.json`` as PEFT writes it: the most common rank and alpha as ``r`` and
        ``lora_alpha``, the others in ``rank_pattern`` / ``alpha_pattern`` (keys that match one layer)."""
        names = list(self.layers)
        r = Counter(lay.rank for lay in self.layers.values()).most_common(1)[0][0]
        alpha = Counter(lay.alpha for lay in self.layers.values()).most_common(1)[0][0]
        rank_pattern = {_pattern_key(n, names): lay.rank for n, lay in self.layers.items() if lay.rank != r}
        alpha_pattern = {_pattern_key(n, names): _number(lay.alpha) for n, lay in self.layers.items()
                         if lay.alpha != alpha}
        return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": self.base_model_name_or_path,
                "revision": None, "inference_mode": True, "r": r, "lora_alpha": _number(alpha),
                "lora_dropout": self.dropout, "target_modules": _target_modules(names, self.module_names),
                "fan_in_fan_out": any(lay.transposed for lay in self.layers.values()), "bias": "none",
                "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": rank_pattern,
                "alpha_pattern": alpha_pattern, **self.extra}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{PEFT_PREFIX}{name}.{key}": t.to("cpu") for name, lay in self.layers.items()
                for key, t in lay.peft_tensors().items()}

    def save(self, folder: str | Path, force: bool = False) -> Path:
        """Write the two files into the folder ``folder`` atomically (refused if it exists, unless
        ``force``); returns its path."""
        folder = Path(folder)
        with atomic_folder(folder, force=force) as tmp:
            self.write_into(tmp)
        return folder

    def write_into(self, folder: Path) -> None:
        """Write the two files into an existing folder (a caller's temporary one)."""
        from safetensors.torch import save_file

        save_file(self.tensors(), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt", **self.metadata})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(self.config(), indent=2) + "\n")

    def num_bytes(self) -> int:
        """Bytes of the adapter's tensors (what the weights file holds, less its header)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @classmethod
    def load(cls, folder: str | Path) -> Adapter:
        """Read an adapter folder written by compressor or by ``peft`` (LoRA, safetensors)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        if not folder.is_dir():
            raise CompressorError(f"adapter '{folder}' is not a folder",
                                  f"pass the folder holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
        config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        if not (weights.exists() or weights.is_symlink()):
            pickled = " (adapter_model.bin is a pickle and is not read: save it with safe_serialization)" \
                if (folder / "adapter_model.bin").exists() else ""
            raise CompressorError(f"adapter '{folder}' has no {ADAPTER_WEIGHTS}{pickled}",
                                  "pass a folder written by compressor or by peft's save_pretrained")
        # Both files: regular files inside the folder (a FIFO would block the read, a link to /dev/zero
        # never end, a link elsewhere read a file the user did not hand over).
        weights = file_in_folder(folder, weights, "adapter weights")
        config = read_json(file_in_folder(folder, config_path, "adapter config"), "adapter config",
                           "pass a folder written by compressor or by peft's save_pretrained")
        if config.get("peft_type") != "LORA":
            raise CompressorError(f"adapter '{folder}' is not a LoRA adapter (peft_type {config.get('peft_type')!r})",
                                  "pass a LoRA adapter (peft_type LORA)")
        problem = _config_problem(config)
        if problem:
            raise CompressorError(f"adapter config '{config_path}' {problem}",
                                  "pass a folder written by compressor or by peft's save_pretrained")
        for key, off in (("use_dora", False), ("modules_to_save", None)):
            if config.get(key) not in (off, None, False, []):
                raise CompressorError(f"adapter '{folder}' uses {key}, which compressor does not apply",
                                      "pass a plain LoRA adapter")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise CompressorError(f"adapter weights '{weights}' cannot be read ({str(err).splitlines()[0]})",
                                  "pass an intact adapter folder") from None
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", name)
            if m is None:
                raise CompressorError(f"adapter weights '{weights}' hold '{key}', which is no LoRA A or B",
                                      "pass a plain LoRA adapter (no bias, no modules_to_save)")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise CompressorError(f"adapter weights '{weights}' hold '{key}', which is not finite numbers "
                                      "(NaN, infinity or not floating point)", "pass an intact, trained adapter")
            grouped.setdefault(m[1], {})[m[2]] = t
        rslora = bool(config.get("use_rslora"))
        layers = {}
        for name, group in grouped.items():
            if not _targeted(config.get("target_modules"), name):
                raise CompressorError(f"the adapter's layer '{name}' is not among its target_modules "
                                      f"({json.dumps(config.get('target_modules'))[:80]}), so peft would not load it",
                                      "pass an adapter whose config names the layers its weights hold")
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
            layer = AdapterLayer.from_peft(name, group, alpha)
            want = int(_pattern_value(config.get("rank_pattern") or {}, name, config.get("r", layer.rank)))
            if want != layer.rank:
                raise CompressorError(f"the adapter's layer '{name}' has rank {layer.rank} but its config says "
                                      f"{want}", "pass an adapter whose config matches its weights")
            if rslora:  # scale alpha / sqrt(r) is alpha' / r with alpha' = alpha * sqrt(r)
                layer.alpha = alpha * math.sqrt(layer.rank)
            layers[name] = layer
        if not layers:
            raise CompressorError(f"adapter '{folder}' holds no LoRA weights", "pass a trained adapter")
        return cls(layers, config.get("base_model_name_or_path"), float(config.get("lora_dropout") or 0.0))


def _config_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with the fields of ``adapter_config.json`` that compressor reads, or None."""
    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    def rank(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if "r" in config and not rank(config["r"]):
        return f"has r {config['r']!r}, not a whole number >= 1"
    if "lora_alpha" in config and not (number(config["lora_alpha"]) and config["lora_alpha"] != 0):
        return f"has lora_alpha {config['lora_alpha']!r}, not a finite non-zero number"
    for key, ok, want in (("rank_pattern", rank, "whole numbers >= 1"),
                          ("alpha_pattern", number, "finite numbers")):
        pattern = config.get(key)
        if pattern is not None and not (isinstance(pattern, dict) and all(ok(v) for v in pattern.values())):
            return f"has a {key} that is not an object of layer patterns to {want}"
    dropout = config.get("lora_dropout")
    if dropout is not None and not (number(dropout) and 0 <= dropout < 1):
        return f"has lora_dropout {dropout!r}, not a number in [0, 1)"
    targets = config.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        return "has target_modules that are neither a list of names nor one regular expression"
    if not isinstance(config.get("use_rslora", False), bool):
        return "has a use_rslora that is not true or false"
    return None


def _targeted(targets: str | list[str] | None, name: str) -> bool:
    """Whether PEFT's ``target_modules`` select the module ``name``: a list entry equal to it or ending it
    after a dot, or one regular expression matching the whole name (None: not recorded, taken as all)."""
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, name) is not None
        except re.error:
            return False
    return any(name == t or name.endswith("." + t) for t in targets)


def check_finite(model: nn.Module, names: list[str]) -> None:
    """Refuse (one line) when a merged layer of ``model`` holds NaN or infinity: an adapter's scale can
    overflow float32 (``lora_alpha`` 1e308) even where each of its numbers is finite."""
    for name in names:
        if not all(bool(torch.isfinite(p).all()) for p in model.get_submodule(name).parameters()):
            raise CompressorError(f"merging the adapter gives non-finite weights in '{name}' (its scale "
                                  "lora_alpha / r or its weights overflow)", "pass an adapter with a sensible "
                                  "lora_alpha and finite weights")


def load_adapter(model: nn.Module, folder: str | Path) -> dict[str, LoRALayer]:
    """Apply the adapter in ``folder`` (compressor's or PEFT's) to ``model`` in place; returns the
    wrappers by name (``merge_lora(model)`` then folds them into the weights)."""
    return Adapter.load(folder).apply(model)


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None,
                 force: bool = False) -> Path:
    """Write the LoRA wrappers of ``model`` as a PEFT adapter folder; returns its path."""
    return Adapter.from_model(model, base_model_name_or_path).save(folder, force=force)


# ------------------------------------------------------------------------------------- names


def _name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    value = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return value if isinstance(value, str) and value else None


def _peft_matches(key: str, name: str) -> bool:
    """Whether PEFT's ``rank_pattern`` / ``alpha_pattern`` key ``key`` selects the module ``name``."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _pattern_key(name: str, names: list[str]) -> str:
    """A pattern key selecting ``name`` and no other adapted layer: the name itself where that is
    unambiguous, else the name escaped and anchored."""
    if all(not _peft_matches(name, other) for other in names if other != name) and _peft_matches(name, name):
        return name
    return "^" + re.escape(name)


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    if name in patterns:
        return patterns[name]
    for key, value in patterns.items():
        if _peft_matches(key, name):
            return value
    return default


def _target_modules(names: list[str], modules: list[str] | None) -> list[str] | str:
    """PEFT's ``target_modules``: the module names as a list, as PEFT writes them, where PEFT's matching
    (a list entry matches a name equal to it or ending in ``.entry``) selects exactly these modules of the
    model; else (or when the model's module names are unknown) one regular expression PEFT matches against
    the whole name."""
    chosen = set(names)
    if modules is not None and all(
            (m in chosen) == any(m == t or m.endswith("." + t) for t in names) for m in modules):
        return sorted(names)
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


# ---------------------------------------------------------------------------------- extraction


@dataclass
class ExtractedLayer:
    """What :func:`extract_adapter` kept of one layer's change ``delta = tuned - base`` (Frobenius norms)."""

    layer: str
    kind: str
    shape: tuple[int, int]  # the handler's (m, n) weight matrix
    rank: int
    full_rank: int  # singular values of delta above zero (numerically)
    energy_kept: float  # sum of the kept squared singular values / all of them
    delta_norm: float
    abs_error: float  # ||delta - B @ A||: the discarded singular values' root sum of squares (Eckart-Young)
    rel_error: float  # abs_error / delta_norm


def check_extract_options(energy: float | None, rank: int | None) -> None:
    """Exactly one of ``energy`` in (0, 1] and ``rank`` >= 1, or a one-line error."""
    if (energy is None) == (rank is None):
        raise CompressorError("extract needs exactly one of energy and rank", "pass energy=0.9 or rank=8",
                              cli_fix="pass --energy 0.9 or --rank 8")
    if energy is not None and not (0 < energy <= 1):
        raise CompressorError(f"energy must be in (0, 1], got {energy}", "pass e.g. energy=0.9",
                              cli_fix="pass e.g. --energy 0.9")
    if rank is not None and rank < 1:
        raise CompressorError(f"rank must be >= 1, got {rank}", "pass e.g. rank=8", cli_fix="pass e.g. --rank 8")


def extract_adapter(base: nn.Module, tuned: nn.Module, *, energy: float | None = None, rank: int | None = None,
                    base_model_name_or_path: str | None = None
                    ) -> tuple[Adapter, list[ExtractedLayer], dict[str, float]]:
    """The LoRA adapter that best explains ``tuned`` as ``base`` plus low-rank updates.

    Per adaptable layer (every handler's layer kind, its weight seen through the handler's
    ``weight_matrix``, so convolutions and transformers' Conv1D work), the truncated SVD of
    ``tuned - base`` at the rank keeping ``energy`` of the change's squared singular values, or at
    ``rank``: by Eckart-Young no adapter of that rank leaves a smaller error. Unchanged layers get none.
    Returns the adapter (alpha = rank, so its scale is 1), one row per adapted layer, and the relative
    change of every other tensor that changed (biases, norms: an adapter does not carry them).
    """
    check_extract_options(energy, rank)
    tuned_modules = dict(tuned.named_modules())
    base_names = {n for n, _ in base.named_modules()}
    layers: dict[str, AdapterLayer] = {}
    rows: list[ExtractedLayer] = []
    covered, seen = set(), set()
    for name, mod in base.named_modules():
        h = handler_for(mod)
        if h is None or h.dense_reason(mod) is not None:
            continue
        covered.add(f"{name}.weight" if name else "weight")
        if id(h.weight(mod)) in seen:
            continue  # a tied weight, adapted through the first module holding it
        seen.add(id(h.weight(mod)))
        other = tuned_modules.get(name)
        if other is None or handler_for(other) is not h:
            raise CompressorError(f"the base model has the {h.kind} layer '{name}' but the tuned model has "
                                  f"{'none' if other is None else type(other).__name__} there",
                                  "compare two checkpoints of the same architecture")
        w0, w1 = h.weight_matrix(mod), h.weight_matrix(other)
        if w0.shape != w1.shape:
            raise CompressorError(f"layer '{name}' is {list(w0.shape)} in the base but {list(w1.shape)} tuned",
                                  "compare two checkpoints of the same architecture")
        dtype = torch.float64
        delta = w1.detach().to(dtype) - w0.detach().to(device=w1.device, dtype=dtype)
        norm = float(torch.linalg.matrix_norm(delta))
        if norm == 0:
            continue
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        power = sv.pow(2)
        cum = torch.cumsum(power, 0) / power.sum()
        # energy: the fewest singular values whose squares reach that fraction of the total
        r = rank if energy is None else int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=dtype))) + 1
        r = max(1, min(r, sv.numel()))
        out_dtype = h.weight(mod).dtype
        transposed = h.kind == "hf-conv1d"
        layout = {"embedding": "embedding", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv"}.get(h.kind, "matrix")
        kernel = tuple(h.weight(mod).shape[1:]) if layout == "conv" else ()
        layers[name] = AdapterLayer(vh[:r].to(out_dtype).contiguous(), (u[:, :r] * sv[:r]).to(out_dtype).contiguous(),
                                    float(r), layout, kernel, transposed)
        err = float(power[r:].sum().sqrt())
        tol = float(sv[0]) * max(delta.shape) * torch.finfo(dtype).eps
        rows.append(ExtractedLayer(name, h.kind, tuple(delta.shape), r, int((sv > tol).sum()), float(cum[r - 1]),
                                   norm, err, err / norm))
    extra = [n for n, m in tuned.named_modules() if handler_for(m) is not None and n not in base_names]
    if extra:  # layers the adapter could never carry: not the same architecture
        raise CompressorError(f"the tuned model has {len(extra)} layer(s) the base model lacks "
                              f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})",
                              "compare two checkpoints of the same architecture")
    if not layers:
        raise CompressorError("the two models have the same weights in every adaptable layer",
                              "pass the fine-tuned model as TUNED and the model it was tuned from as BASE")
    others = {}
    tuned_state = tuned.state_dict()
    for key, t0 in base.state_dict().items():
        t1 = tuned_state.get(key)
        if key in covered or t1 is None or not t0.is_floating_point() or t0.shape != t1.shape:
            continue
        diff = float((t1.double() - t0.double()).norm())
        if diff > 0:
            others[key] = diff / max(float(t0.double().norm()), 1e-30)
    names = [n for n, _ in base.named_modules()]
    adapter = Adapter(layers, base_model_name_or_path or _name_or_path(base), module_names=names)
    return adapter, rows, others
