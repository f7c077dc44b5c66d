"""What a run can be told: :class:`Options`, in groups, each checked in Python when an ``Options`` is made.

    opts = Options(energy=0.95, variants=["int8"], keep_fp16=1, calibration="cal.pt")

Every group (:class:`PolicyOptions`, :class:`InputOptions`, :class:`ExportOptions`, :class:`EvalOptions`,
:class:`StreamOptions`, :class:`RunOptions`) is a dataclass with a ``validate()`` of its own values;
:class:`Options` inherits them all (``opts.energy``, flat, as before) and checks the combinations across
groups. A bad value or combination raises one :class:`OptionError` line, spelled for Python
(``eval_text=FILE``) and, by the command-line tool, for the command line (``--eval-text FILE``): the
command line only parses its flags into an ``Options``, so both refuse the same things in the same words.
What depends on the mode or the input (an analyze run exports nothing; an ONNX input has no tokenizer) is
checked by :func:`check_run`, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.analysis.int4 import INT4_ROUNDINGS
from compressor.analysis.stream import SVD_METHODS
from compressor.core.errors import CompressorError
from compressor.core.fileio import regular_file
from compressor.core.int4 import INT4_BLOCK_SIZE
from compressor.core.policies import across_layers, policy_from_options
from compressor.core.threads import check_threads
from compressor.export.onnx import DEFAULT_ATOL, DEFAULT_OPSET, FACTOR_STORAGE, VARIANTS
from compressor.formats.shards import DEFAULT_SHARD_BYTES

MODES = ("compress", "analyze", "apply", "export")
# --input-shape makes random example inputs: refuse shapes holding more elements than this (all inputs
# together, 2**27 float32 = 512 MiB) before allocating them.
MAX_INPUT_ELEMENTS = 2**27
# Streamed runs: one worker process per two cores (each SVD on one thread, the rest left for reading and
# writing); below two workers the layers run in the calling process, one after another.
DEFAULT_WORKERS = max(1, (os.cpu_count() or 1) // 2)
# Where a field's command-line flag is not --field-name.
FLAGS = {"outputs": "--output", "input_shapes": "--input-shape", "plan_path": "PLAN"}


def flag(name: str) -> str:
    """The command-line spelling of the option ``name``."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


_NAMED = re.compile(r"`(\w+)(?:=([^`]*))?`")


class OptionError(CompressorError):
    """A bad option or combination of options. ``problem`` and ``fix`` name options in backquotes,
    `` `eval_text` `` or `` `eval_text=FILE` ``: ``str(err)`` spells them for Python (``eval_text=FILE``),
    :meth:`for_cli` for the command line (``--eval-text FILE``; ``--no-eval-bos`` for ``eval_bos=False``)."""

    def __init__(self, problem: str, fix: str, *, cli_problem: str | None = None, cli_fix: str | None = None):
        super().__init__(_NAMED.sub(_python, problem), _NAMED.sub(_python, fix),
                         cli_fix=_NAMED.sub(_cli, cli_fix or fix))
        self.cli_problem = _NAMED.sub(_cli, cli_problem or problem)

    def for_cli(self) -> str:
        return f"{self.cli_problem}; {self.cli_fix}"


def _python(m: re.Match) -> str:
    return m[1] if m[2] is None else f"{m[1]}={m[2]}"


def _cli(m: re.Match) -> str:
    if m[2] == "False":  # a switch turned off: --no-eval-bos
        return "--no-" + flag(m[1])[2:]
    return flag(m[1]) if m[2] in (None, "True") else f"{flag(m[1])} {m[2]}"


def _whole(name: str, value: Any, low: int, example: int) -> None:
    """Refuse ``value`` unless it is a whole number >= ``low`` (None is checked by the caller)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise OptionError(f"`{name}` must be a whole number >= {low}, got {value!r}", f"pass e.g. `{name}={example}`")


def _changed(opts: Any, names: Sequence[str]) -> list[str]:
    """The options among ``names`` whose value differs from their default."""
    fields = {f.name: f for f in dataclasses.fields(opts)}
    return [n for n in names if _same(getattr(opts, n)) != _same(_default(fields[n]))]


def _same(value: Any) -> Any:
    """A list as the tuple it equals as an option (``variants=[]`` is the default ``()``)."""
    return tuple(value) if isinstance(value, list) else value


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass
class PolicyOptions:
    """How ranks are chosen: one policy (``energy``, ``rank``, ``rank_ratio`` or ``target``), for the
    layers ``include`` / ``exclude`` select; ``plan_path`` is the edited plan mode "apply" re-applies."""

    energy: float | None = None
    rank: int | None = None
    rank_ratio: float | None = None
    target: float | None = None
    rank_multiple: int = 1
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    plan_path: Path | None = None  # mode "apply"
    keep_batchnorm: bool = False  # do not fold BatchNorms into the convs before them (analyze's fold_batchnorm)
    pivoted: bool = False  # factored linear layers in the pivoted form, r (m + n - r) weights (analyze's pivoted)
    # Factor only layers measured faster than dense at the example input shape, and time every written
    # file against dense (report.latency). None: the command's default (off here, on in search).
    latency_aware: bool | None = None

    def policy(self) -> dict[str, Any]:
        """The policy given, as keywords (empty when none is)."""
        return {k: v for k, v in {"energy": self.energy, "rank": self.rank, "rank_ratio": self.rank_ratio,
                                  "target": self.target}.items() if v is not None}

    def validate(self) -> None:
        if len(self.policy()) > 1:
            given = ", ".join(f"`{k}`" for k in self.policy())
            raise OptionError(f"exactly one rank policy is needed, got {given}",
                              "pass one of `energy`, `rank`, `rank_ratio` or `target`")
        if self.policy():
            policy_from_options(**self.policy())  # its value: energy in (0, 1], a rank >= 1, ...
        _whole("rank_multiple", self.rank_multiple, 1, 8)


@dataclass
class InputOptions:
    """What the model is and what it is fed: loading, example inputs, calibration, the compared outputs."""

    trust_pickle: bool = False
    arch: str | None = None
    input_shapes: Sequence[str] = ()
    example_inputs: Path | None = None
    calibration: Path | None = None
    calibration_samples: int | None = None
    outputs: Sequence[str] = ()  # the outputs fidelity and sensitivity compare (empty: every float output)

    def validate(self) -> None:
        if self.calibration_samples is not None:
            if self.calibration is None:
                raise OptionError("`calibration_samples` limits the calibration inputs, but `calibration` is not "
                                  "given", "add `calibration=FILE`, or leave out `calibration_samples`")
            _whole("calibration_samples", self.calibration_samples, 1, 256)
        self.shapes()

    def shapes(self) -> list[tuple[int, ...]]:
        """The shapes of ``input_shapes``, refused when they would hold more than MAX_INPUT_ELEMENTS."""
        from compressor.data.readers import parse_input_shape

        shapes = [parse_input_shape(s) for s in self.input_shapes]
        total = sum(math.prod(s) for s in shapes)
        if total > MAX_INPUT_ELEMENTS:
            raise OptionError(f"input shapes {', '.join(self.input_shapes)} hold {total:,} elements, more than the "
                              f"{MAX_INPUT_ELEMENTS:,} random example inputs are allowed (about "
                              f"{MAX_INPUT_ELEMENTS * 4 // 2**20} MiB)",
                              "give the shape of one small batch, e.g. `input_shapes=1x3x224x224`")
        return shapes


@dataclass
class ExportOptions:
    """The ONNX files a run writes and validates beside model.onnx, and what goes with them."""

    atol: float = DEFAULT_ATOL
    opset: int = DEFAULT_OPSET
    variants: Sequence[str] = ()  # precisions written beside model.onnx, from export.onnx.VARIANTS
    keep_fp16: int = 0  # with int8: this many int8-sensitive layers stay fp16 (measured on calibration)
    int4_block_size: int = INT4_BLOCK_SIZE  # with int4: weights per scale / zero point
    int4_correction: str | None = None  # with int4: "rank=16", "energy=0.5" or "budget=0.05" (analysis.int4)
    int4_factors: str = FACTOR_STORAGE[0]  # with a correction: its factors stored "fp16" or "int8"
    int4_rounding: str = INT4_ROUNDINGS[0]  # with int4 and calibration: "gptq" or "nearest" (analysis.int4)
    # Causal LMs: also model_kv.onnx (past_key_values in, present out) and its variants, validated by greedy
    # generation against the torch model (compressor.export.kv_cache).
    kv_cache: bool = False
    edge: bool = False  # also write edge/: every ONNX file as .ort, its operators, a manifest (export.edge)
    plots: bool = False

    def validate(self) -> None:
        from compressor.analysis.int4 import parse_correction
        from compressor.export.onnx import check_factor_storage, check_int4_block_size, check_opset

        check_opset(self.opset)
        written = [v for v in VARIANTS if VARIANTS[v].write is not None]
        unknown = [v for v in self.variants if v not in written]
        if unknown:
            raise CompressorError(f"unknown export variant(s) {', '.join(map(repr, unknown))}",
                                  f"choose from {', '.join(written)}")
        given = _changed(self, ("int4_block_size", "int4_correction", "int4_factors", "int4_rounding"))
        if given and "int4" not in self.variants:
            raise CompressorError("an int4 block size, correction or factor storage is given, but the int4 file "
                                  "is not asked for", "add 'int4' to variants",
                                  cli_fix=f"add --int4 ({flag(given[0])} applies to it)")
        check_int4_block_size(self.int4_block_size)
        check_factor_storage(self.int4_factors)
        if self.int4_rounding not in INT4_ROUNDINGS:
            raise OptionError(f"unknown int4 rounding {self.int4_rounding!r}",
                              f"use one of {', '.join(INT4_ROUNDINGS)}")
        if self.int4_correction is not None:
            parse_correction(self.int4_correction)
        if self.keep_fp16 != 0:
            _whole("keep_fp16", self.keep_fp16, 0, 1)
            if "int8" not in self.variants:
                raise OptionError("`keep_fp16` chooses layers of the int8 file, but it is not asked for",
                                  "add 'int8' to variants", cli_fix="add --int8")
        for name in ("edge", "kv_cache", "plots"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"`{name}` must be True or False, got {getattr(self, name)!r}",
                                  f"pass `{name}` alone to turn it on")
        if not (isinstance(self.atol, int | float) and math.isfinite(self.atol) and self.atol >= 0):
            raise OptionError("atol must be a finite number >= 0 (the largest difference allowed between onnxruntime "
                              f"and torch outputs), got {self.atol!r}", "pass e.g. `atol=1e-3`")
        if self.edge and self.kv_cache:  # edge/ validates each file on the example inputs, a cache file takes others
            raise OptionError("`edge=True` does not convert key/value cache files yet",
                              "run `kv_cache` and `edge` separately")


@dataclass
class EvalOptions:
    """What the written models are measured on besides the example inputs: held-out inputs (fidelity), and a
    text (perplexity) cut into windows of ``eval_window`` positions (None: 2048 capped at the model's context)
    ``eval_stride`` text tokens apart (None: not overlapping), BOS first in each or not."""

    # Held-out inputs (tensors, or text for a model with a tokenizer) the fidelity is measured on, instead of
    # the two example inputs: a number that speaks for the data, not for two sentences.
    eval_inputs: Path | None = None
    eval_text: Path | None = None
    eval_window: int | None = None
    eval_stride: int | None = None
    eval_bos: bool = True
    eval_max_windows: int | None = None

    def validate(self) -> None:
        from compressor.data.perplexity import check_protocol

        if self.eval_text is None:
            settings = [f"`{n}`" for n in _changed(self, ("eval_window", "eval_stride", "eval_max_windows"))]
            settings += ["`eval_bos=False`"] if self.eval_bos is False else []
            if settings:
                raise OptionError(f"{', '.join(settings)}: only with `eval_text`", "add `eval_text=FILE`")
        check_protocol(self.eval_window, self.eval_stride, self.eval_bos, self.eval_max_windows, flags="eval-")


@dataclass
class StreamOptions:
    """Streamed runs (:mod:`compressor.jobs.stream`): checkpoints read tensor by tensor, resumable, parallel.
    Every setting but ``stream`` itself applies to streamed runs only."""

    stream: bool = False
    svd: str = "exact"  # or "randomized": the leading singular triplets only, checked per layer
    workers: int = DEFAULT_WORKERS
    ray: str | None = None  # "local", or the address of a Ray cluster
    restart: bool = False  # drop an unfinished streamed run's state instead of continuing it
    device: str = "cpu"  # where a streamed run's SVDs run ("cuda" for a GPU)
    max_rank: int | None = None  # no layer's rank above this (bounds the randomized SVD; --target needs it)
    shard_bytes: int = DEFAULT_SHARD_BYTES

    def validate(self) -> None:
        if not self.stream:
            only = _changed(self, ("ray", "restart", "max_rank", "svd", "workers", "device", "shard_bytes"))
            if only:
                raise OptionError(f"{', '.join(f'`{n}`' for n in only)}: only for streamed runs", "add `stream=True`")
        if self.svd not in SVD_METHODS:
            raise OptionError(f"svd must be one of {', '.join(SVD_METHODS)}, got {self.svd!r}",
                              "pass `svd=exact` or `svd=randomized`")
        if self.max_rank is not None:
            _whole("max_rank", self.max_rank, 1, 256)
        _whole("workers", self.workers, 1, 2)
        _whole("shard_bytes", self.shard_bytes, 1, DEFAULT_SHARD_BYTES)


@dataclass
class RunOptions:
    """How the run behaves: replacing an output, progress bars, threads, and the command recorded."""

    force: bool = False
    progress: bool | None = None
    command: str | None = None
    threads: int | None = None  # torch threads for the whole job; None: the tool chooses per operation

    def validate(self) -> None:
        check_threads(self.threads)


GROUPS = (PolicyOptions, InputOptions, ExportOptions, EvalOptions, StreamOptions, RunOptions)
# What a streamed run reads (the policy, calibration and the stream settings) and how it runs: anything else
# set is refused with stream=True instead of being ignored.
_STREAMED = {"energy", "rank", "rank_ratio", "target", "rank_multiple", "include", "exclude", "calibration",
             "calibration_samples", *(f.name for f in dataclasses.fields(StreamOptions)),
             *(f.name for f in dataclasses.fields(RunOptions))}


@dataclass
class Options(RunOptions, StreamOptions, EvalOptions, ExportOptions, InputOptions, PolicyOptions):
    """Everything a run can be told (the CLI maps its flags one to one onto these fields), checked when made:
    each group's ``validate()``, then the combinations across groups."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for group in GROUPS:
            group.validate(self)
        if self.keep_fp16 and self.calibration is None:
            raise OptionError("`keep_fp16` measures which layers int8 hurts on calibration inputs, but "
                              "`calibration` is not given", "add `calibration=FILE`")
        if self.pivoted and self.latency_aware:
            # export.latency times each layer's two-factor form against its dense one: not the pivoted form.
            raise OptionError("`latency_aware` measures each layer's two-factor form, not the pivoted one that "
                              "`pivoted` writes", "leave out one of `pivoted` and `latency_aware`")
        if self.stream:
            self._check_streamed()

    def _check_streamed(self) -> None:
        unused = [n for n in _changed(self, [f.name for f in dataclasses.fields(self)]) if n not in _STREAMED]
        if unused:
            named = [f"`{n}`" for n in unused if n != "variants"]
            python = named + ([f"`variants={list(self.variants)!r}`"] if "variants" in unused else [])
            cli = named + ([f"--{v}" for v in self.variants] if "variants" in unused else [])
            why = "cannot be used with `stream` (it writes the plan and the factored weights only)"
            raise OptionError(f"{', '.join(python)} {why}", "leave them out, or run without `stream`",
                              cli_problem=f"{', '.join(cli)} {why}")
        if self.svd == "randomized" and self.policy() and across_layers(policy_from_options(**self.policy())) \
                and self.max_rank is None:
            raise OptionError("the randomized SVD finds only the leading singular values, but `target` without a "
                              "rank bound compares every layer's whole spectrum",
                              "add `max_rank=N` (e.g. 256), or leave out `svd=randomized`")
        # The whitened SVDs need whole spectra and run in this process, block after block.
        whole = _changed(self, ("svd", "ray", "device")) if self.calibration is not None else []
        if whole:
            raise OptionError("a streamed run with calibration data computes whitened SVDs block by block in "
                              f"this process; `{whole[0]}` cannot be used with it", f"leave out `{whole[0]}`")


def options_from(options: Options | None, kwargs: Mapping[str, Any], **fixed: Any) -> Options:
    """The job's :class:`Options`: ``options`` or ``Options(**kwargs)``, never both (the keywords would be
    dropped), an unknown keyword named with the valid ones; ``fixed``: settings the job itself implies."""
    if options is not None:
        if kwargs:
            raise CompressorError(f"options were given both as options=Options(...) and as keywords "
                                  f"({', '.join(kwargs)})", "pass them one way: Options(..., "
                                  f"{', '.join(f'{k}=...' for k in kwargs)}), or keywords alone")
        return dataclasses.replace(options, **fixed) if any(getattr(options, k) != v for k, v in fixed.items()) \
            else options
    names = [f.name for f in dataclasses.fields(Options)]
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        named = [k + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(k, names, n=1))
                 for k in unknown]
        raise CompressorError(f"unknown option(s) {', '.join(named)}", f"the options are {', '.join(names)}")
    return Options(**{**kwargs, **fixed})


def check_run(opts: Options, mode: str, source: Path) -> None:
    """Refuse what ``mode`` or the input at ``source`` cannot do with ``opts``, before anything is loaded:
    the checks an ``Options`` cannot make alone (an analyze run exports nothing, an ONNX input has no
    tokenizer, apply needs its plan file)."""
    from compressor.formats.onnx_graph import is_onnx

    if mode not in MODES:
        raise CompressorError(f"mode {mode!r} is not one of {', '.join(MODES)}", f"pass mode={MODES[0]!r}")
    if opts.stream:
        raise CompressorError("a streamed run is compressor.jobs.stream.stream_compress's (it returns a StreamResult, "
                              "not a Report)", "call stream_compress with these options")
    if mode == "apply":
        check_plan_path(opts.plan_path)
    if mode in ("compress", "analyze") and not opts.policy():
        raise OptionError("exactly one rank policy is needed, got none",
                          "pass one of `energy`, `rank`, `rank_ratio` or `target`")
    onnx_input = is_onnx(source)
    if opts.kv_cache and (mode == "analyze" or onnx_input):
        raise OptionError("a key/value cache export needs the torch causal LM, and "
                          + ("analyze exports nothing" if mode == "analyze" else "the input is an ONNX file"),
                          "leave out `kv_cache`")
    if opts.pivoted and onnx_input:
        raise OptionError("the pivoted form is a torch layer, and an ONNX input is factored in its own graph "
                          "(two MatMuls per layer)", "leave out `pivoted`")
    if opts.eval_text is not None:
        check_eval_text(opts, mode, onnx_input)
    if opts.eval_inputs is not None and mode not in ("compress", "apply"):
        raise OptionError(f"held-out inputs measure the fidelity of a compressed model, and {mode} writes none",
                          "leave out `eval_inputs`")
    if opts.edge and mode == "analyze":
        raise OptionError("an edge folder holds the ONNX files a run writes, and analyze writes none",
                          "leave out `edge`, or run compress")


def check_eval_text(opts: Options, mode: str, onnx_input: bool) -> None:
    """Refuse an evaluation text a run cannot use, before the model loads: a mode that writes no model, an
    ONNX input (its perplexity is ``compress eval``'s), a file that is not text; shared by compress and search."""
    from compressor.data.perplexity import read_text

    if mode == "analyze":
        raise CompressorError("an evaluation text measures the models a run writes, and analyze writes none",
                              "leave out eval_text, or run compress", cli_fix="leave out --eval-text, or run compress")
    if onnx_input:
        raise CompressorError("an evaluation text needs the torch model and its tokenizer, and the input is an "
                              "ONNX file", "measure the ONNX files with compressor.jobs.perplexity",
                              cli_fix="measure the ONNX files with compress eval FILE.onnx --text FILE")
    read_text(opts.eval_text)


def check_plan_path(path: Path | None) -> None:
    """Refuse a plan path that is missing, a folder or not a regular file (mode "apply")."""
    if path is None:
        raise CompressorError("apply needs a plan file", "compress apply MODEL PLAN.json")
    path = Path(path)
    if path.is_dir():
        inside = path / "plan.json"
        raise CompressorError(f"the plan path '{path}' is a folder, not a plan file",
                              f"pass the plan file itself, e.g. compress apply MODEL {inside}" if inside.is_file()
                              else "pass the plan.json that compress or compress analyze wrote")
    regular_file(path, "plan file")  # missing, a FIFO, a device: one line each
