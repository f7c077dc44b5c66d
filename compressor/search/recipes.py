"""Recipes: the ways to compress a model that :func:`compressor.search.search.search` measures, and the
constraints (size, fidelity, latency) a chosen recipe must meet."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from compressor.core.errors import CompressorError
from compressor.export.onnx import VARIANTS

PRECISIONS = tuple(VARIANTS)  # the storage precisions a recipe can use (export.onnx.VARIANTS)
DEFAULT_PRECISIONS = tuple(name for name, v in VARIANTS.items() if v.searched)  # those a search tries by default
# The low-rank parameter targets a search tries unless told otherwise.
DEFAULT_TARGETS = (0.2, 0.4, 0.6)
# The low-rank corrections of dense int4 a search tries unless told otherwise (analysis.int4 rules).
DEFAULT_INT4_CORRECTIONS = ("rank=16", "budget=0.03")


# ------------------------------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class Recipe:
    """One way to compress a model; frozen, JSON round-trippable, with a stable cache :meth:`key`.

    ``target``: fraction of the factorizable parameters removed by low-rank factoring (None: dense).
    ``calibrated``: data-aware factors and ranks from calibration inputs. ``heal_steps``: distillation
    steps against the original model before export (0: none). ``exclude``: layer globs never factored.
    ``precision``: how the exported weights are stored (fp16: storage only; int8: onnxruntime dynamic
    quantization, per output channel, of every MatMul/Gemm/Gather weight, so both factors are int8).
    ``qat``: heal through simulated int8 (:func:`fake_int8`), so the factors learn to absorb the rounding
    that int8 export will do. ``keep_fp16`` (int8 only): that many layers stay fp16-stored, those whose
    int8 rounding moves the model's output most per parameter, measured on the calibration inputs
    (:func:`int8_sensitivity`); a dense recipe may keep layers too (mixed precision without low rank).
    ``int4_correction`` (int4 only): a low-rank correction of every Linear's 4-bit rounding error beside its
    MatMulNBits node, ``"rank=16"``, ``"energy=0.5"`` or ``"budget=0.03"`` (:func:`int4_correction`), with
    int8-stored factors; ``calibrated`` makes it data-aware (whitened by the calibration activations). A
    calibrated int4 recipe's weights are rounded by GPTQ on the calibration inputs
    (:func:`compressor.analysis.int4.gptq_int4`), the others' to nearest.
    """

    precision: str = "fp32"
    target: float | None = None
    calibrated: bool = False
    heal_steps: int = 0
    exclude: tuple[str, ...] = ()
    qat: bool = False
    keep_fp16: int = 0
    int4_correction: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CompressorError(f"recipe precision {self.precision!r} is not one of {PRECISIONS}",
                                  f"use one of {', '.join(PRECISIONS)}")
        if self.target is not None and not 0 < self.target < 1:
            raise CompressorError(f"recipe target {self.target} is outside (0, 1)",
                                  "give the fraction of factorizable parameters to remove, e.g. 0.4")
        if self.target is None and ((self.calibrated and not self.int4_correction) or self.heal_steps or
                                    self.exclude):
            raise CompressorError("a dense recipe cannot be calibrated (but for its int4 correction), healed or "
                                  "exclude layers", "give a low-rank target with those options")
        if self.int4_correction is not None:
            if self.precision != "int4":
                raise CompressorError(f"int4_correction applies to int4 recipes, not {self.precision}",
                                      "use precision='int4' with int4_correction")
            from compressor.analysis.int4 import parse_correction

            parse_correction(self.int4_correction)
        if isinstance(self.heal_steps, bool) or not isinstance(self.heal_steps, int) or self.heal_steps < 0:
            raise CompressorError(f"heal_steps must be a whole number >= 0, got {self.heal_steps!r}",
                                  "pass e.g. heal_steps=200", cli_fix="pass e.g. --heal-steps 200")
        if self.qat and not self.heal_steps:
            raise CompressorError("quantization-aware healing needs heal steps", "pass heal_steps > 0 with qat")
        if isinstance(self.keep_fp16, bool) or not isinstance(self.keep_fp16, int) or self.keep_fp16 < 0:
            raise CompressorError(f"keep_fp16 must be a whole number >= 0, got {self.keep_fp16!r}",
                                  "pass the number of layers to keep in fp16, e.g. keep_fp16=2",
                                  cli_fix="pass the number of layers to keep in fp16, e.g. --keep-fp16 2")
        if self.keep_fp16 and self.precision != "int8":
            raise CompressorError(f"keep_fp16 applies to int8 recipes, not {self.precision}",
                                  "use precision='int8' with keep_fp16")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def dense(self) -> bool:
        return self.target is None

    @property
    def name(self) -> str:
        """Short and readable: ``dense-int8``, ``lowrank0.4-cal-heal200-int8``, ``dense-int8-fp16x2``."""
        keep = f"fp16x{self.keep_fp16}" if self.keep_fp16 else ""
        precision = self.precision
        if self.int4_correction:  # "dense-int4+rank16-cal", "lowrank0.2-cal-int4+budget0.03"
            data_aware = "-cal" if self.calibrated and self.dense else ""
            precision += "+" + self.int4_correction.replace("=", "") + data_aware
        if self.dense:
            return "-".join(p for p in (f"dense-{precision}", keep) if p)
        parts = [f"lowrank{self.target:g}", "cal" if self.calibrated else "",
                 f"heal{self.heal_steps}" if self.heal_steps else "", "qat" if self.qat else "",
                 "x" + ",".join(self.exclude) if self.exclude else "", precision, keep]
        return "-".join(p for p in parts if p)

    def base(self) -> Recipe:
        """The same model stored as fp32: the ONNX export every precision of this recipe derives from."""
        return replace(self, precision="fp32", keep_fp16=0, int4_correction=None,
                       calibrated=self.calibrated and not self.dense)

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "exclude": list(self.exclude)}
        # Keys of recipes without the newer fields stay as they were.
        for newer in ("qat", "keep_fp16", "int4_correction"):
            if not d[newer]:
                del d[newer]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        return cls(**{**d, "exclude": tuple(d.get("exclude", ()))})

    def key(self) -> str:
        """A stable hash of the recipe's fields (not of its name, which is for people)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


REFERENCES = tuple(Recipe(p) for p in DEFAULT_PRECISIONS)


def default_recipes(targets: Sequence[float] = DEFAULT_TARGETS, *, calibrated: bool = False,
                    heal_steps: Sequence[int] = (0,), precisions: Sequence[str] = DEFAULT_PRECISIONS,
                    exclude: Sequence[str] = (), qat: bool = False, keep_fp16: Sequence[int] = (0,),
                    int4_corrections: Sequence[str] = DEFAULT_INT4_CORRECTIONS) -> list[Recipe]:
    """The dense references plus every low-rank ``target x heal_steps x precision`` combination, and with
    ``qat`` the quantization-aware healed int8 recipe of every target and nonzero heal_steps. Each nonzero
    ``keep_fp16`` adds that mixed-precision variant of every int8 recipe, dense int8 included. With int4
    among ``precisions``, each of ``int4_corrections`` adds dense int4 and every low-rank int4 recipe with
    that correction (data-aware when ``calibrated``): factoring removes bytes, the correction buys back the
    4-bit rounding error, and a tight ``--max-size`` (an eighth of fp32) needs both."""
    out = [*REFERENCES, *(Recipe(p) for p in precisions if Recipe(p) not in REFERENCES)]
    for t in targets:
        for h in heal_steps:
            out += [Recipe(p, t, calibrated, h, tuple(exclude)) for p in precisions]
            if qat and h:
                out.append(Recipe("int8", t, calibrated, h, tuple(exclude), qat=True))
    keeps = [k for k in keep_fp16 if k]
    out += [replace(r, keep_fp16=k) for k in keeps for r in out if r.precision == "int8"]
    if "int4" in precisions:
        int4 = [r for r in out if r.precision == "int4" and not r.qat]
        out += [replace(r, calibrated=calibrated, int4_correction=c)
                for c in int4_corrections for r in int4]
    return out


# -------------------------------------------------------------------------------------- constraints

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_TIME_UNITS = {"ms": 1.0, "s": 1e3, "us": 1e-3}


def parse_size(text: str | float) -> float:
    """``"15MB"`` -> 15e6 bytes; a bare number <= 1 (``"0.2"``) is a fraction of the fp32 export (returned
    as is); a bare number above 1 is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise CompressorError(f"cannot read the size {text!r}",
                              "write it like 15MB, 800KB, 1.2GB, or a fraction of the fp32 file like 0.2")
    value = float(m.group(1))
    return value if not unit and value <= 1 else value * _SIZE_UNITS[unit]


def parse_latency(text: str | float) -> float:
    """``"5ms"`` -> 5.0, ``"0.01s"`` -> 10.0, a bare number is milliseconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", str(text).lower())
    if m is None or m.group(2) not in (*_TIME_UNITS, "") or float(m.group(1)) <= 0:
        raise CompressorError(f"cannot read the latency {text!r}", "write it like 5ms or 0.01s")
    return float(m.group(1)) * _TIME_UNITS.get(m.group(2), 1.0)


@dataclass(frozen=True)
class Constraints:
    """``max_size`` in bytes, or (<= 1) a fraction of the dense fp32 export; ``min_fidelity`` in the
    evaluation's metric; ``max_latency_ms`` the median onnxruntime latency on the latency inputs;
    ``max_perplexity_ratio`` the file's perplexity on the evaluation text over the dense fp32 export's."""

    max_size: float | None = None
    min_fidelity: float | None = None
    max_latency_ms: float | None = None
    max_perplexity_ratio: float | None = None

    def __post_init__(self) -> None:
        examples = {"max_size": ("max_size=15e6", "--max-size 15MB"),
                    "min_fidelity": ("min_fidelity=0.95", "--min-fidelity 0.95"),
                    "max_latency_ms": ("max_latency_ms=5.0", "--max-latency 5ms"),
                    "max_perplexity_ratio": ("max_perplexity_ratio=1.1", "--max-perplexity-ratio 1.1")}
        for name, (api, cli) in examples.items():
            value = getattr(self, name)
            if value is None:
                continue
            positive = name != "min_fidelity"
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or (
                    positive and value <= 0):
                raise CompressorError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}",
                                      f"pass e.g. {api}", cli_fix=f"pass e.g. {cli}")

    def size_limit(self, fp32_bytes: int) -> float | None:
        if self.max_size is None:
            return None
        return self.max_size * fp32_bytes if self.max_size <= 1 else self.max_size

    def describe(self, fp32_bytes: int | None = None) -> str:
        parts = []
        if self.max_size is not None:
            limit = self.size_limit(fp32_bytes) if fp32_bytes else None
            parts.append(f"size <= {self.max_size:g} of fp32" + (f" ({limit / 1e6:.2f} MB)" if limit else "")
                         if self.max_size <= 1 else f"size <= {self.max_size / 1e6:.2f} MB")
        if self.min_fidelity is not None:
            parts.append(f"fidelity >= {self.min_fidelity:g}")
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        if self.max_perplexity_ratio is not None:
            parts.append(f"perplexity <= {self.max_perplexity_ratio:g}x dense fp32's")
        return ", ".join(parts) or "none"
