"""Export to ONNX and prove the file computes what the torch model computes.

    path = export_onnx(model, example_inputs, "out/model.onnx")
    problems = check_factored_graph(path, plan)           # [] when every factored layer stayed two factors
    v = validate_onnx(path, model, example_inputs)       # onnx.checker + onnxruntime vs torch
    print(format_validation(v))
    export_fp16(path, "out/model.fp16.onnx"); export_int8(path, "out/model.int8.onnx")
    export_int8(path, "out/model.mixed.onnx", keep_fp16=["encoder.layer.0.output.dense"])  # that one fp16

``example_inputs`` is a tensor, a tuple of tensors (positional arguments) or a dict of named tensors
(keyword arguments, e.g. ``input_ids`` and ``attention_mask`` of a Hugging Face model). Dimension 0 of
every input and output is the batch axis, dynamic in the exported graph.

This module is the exporter loop, the validation and the registry of variants (:data:`VARIANTS`); the variant
writers are :mod:`compressor.export.fp16`, :mod:`compressor.export.int8` (dynamic and static QDQ) and
:mod:`compressor.export.int4`, the graph checks :mod:`compressor.export.graph`, the file helpers
:mod:`compressor.export.onnx_files`. The names above stay importable from here: the job, CLI and search
stages import the export stage from this module (the imports ``X as X`` below are those re-exports).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_files
from compressor.core.int4 import INT4_BLOCK_SIZE
from compressor.data.inputs import (
    attention_mask,
    call,
    eval_mode,
    flatten,
    map_tensors,
    model_device,
    named_outputs,
    real_tokens,
    to_device,
    unpadded,
)
from compressor.export.fp16 import export_fp16
from compressor.export.graph import check_factored_graph as check_factored_graph
from compressor.export.int4 import FACTOR_STORAGE as FACTOR_STORAGE
from compressor.export.int4 import INT4_ACCURACY_LEVEL as INT4_ACCURACY_LEVEL
from compressor.export.int4 import check_factor_storage as check_factor_storage
from compressor.export.int4 import check_int4_block_size as check_int4_block_size
from compressor.export.int4 import export_int4
from compressor.export.int8 import export_int8, export_qdq
from compressor.export.int8 import qdq_choice as qdq_choice
from compressor.export.measure import file_size
from compressor.export.onnx_files import EXTERNAL_DATA_BYTES, first_line, onnx_outputs, onnx_session, quiet
from compressor.formats.onnx_graph import feeds
from compressor.formats.runtime import PROVIDERS, session

# Variants are approximations: they are judged by the worst per-sample cosine of their outputs to the
# torch model's, not by an absolute difference. Measured on all-MiniLM-L6-v2 (last_hidden_state, 8
# sentences x 64 tokens): fp16 0.9999995, int8 0.967 (dense) and 0.981 (40%-factored). The thresholds
# leave a margin and catch a broken variant; how much fidelity a variant costs is for benchmarks to say.
FP16_MIN_COSINE = 0.999
# An fp32 export must match torch to this absolute difference. Measured: MiniLM 2.4e-6, the digits CNN
# 1.3e-5, a 2-layer GPT-2's logits 3e-7; 1e-3 leaves room for deeper models' float summation order.
DEFAULT_ATOL = 1e-3
INT8_MIN_COSINE = 0.9
# Measured on all-MiniLM-L6-v2 (last_hidden_state, 2 sentences x 16 tokens): 4-bit weights, blocks of 128,
# 0.893; of 32, 0.962. The floor catches a broken file, not a coarse one.
INT4_MIN_COSINE = 0.8
# The opset exports use unless told otherwise, and the lowest one the exporters honour (below it the
# dynamo exporter's version converter fails and the file silently keeps its own opset, 18); the highest
# is the onnx package's newest (onnx.defs.onnx_opset_version()).
DEFAULT_OPSET = 18
MIN_OPSET = 14


class _Exportable(nn.Module):
    """Calls the model with positional tensors and returns its outputs as a flat tuple of tensors."""

    def __init__(self, model: nn.Module, names: list[str], as_dict: bool):
        super().__init__()
        self.model, self.names, self.as_dict = model, names, as_dict

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = dict(zip(self.names, tensors, strict=True)) if self.as_dict else tensors
        return tuple(t for _, t in named_outputs(call(self.model, args)))


def torch_outputs(model: nn.Module, example_inputs: Any) -> list[tuple[str, np.ndarray]]:
    """The model's outputs on ``example_inputs`` (eval mode, no grad) as named float64 arrays."""
    flatten(example_inputs)  # checks the inputs
    with eval_mode(model), torch.no_grad():
        out = call(model, to_device(example_inputs, model_device(model)))
    return [(k, v.detach().cpu().double().numpy()) for k, v in named_outputs(out)]


# ---------------------------------------------------------------------------------------- export


def onnx_ready(model: nn.Module, inputs: Any) -> tuple[nn.Module, Any, str | None]:
    """The model and inputs to export and validate: themselves, or float32 copies when the model holds
    bfloat16 tensors, with a note saying so.

    Why: onnxruntime's CPU kernels have no bfloat16 MatMul, Gemm or Conv, so a bfloat16 graph cannot be
    loaded where the file is validated (nor on most edge runtimes). Widening bfloat16 to float32 is exact;
    the fp16 variant then halves the file again.
    """
    if not any(t.dtype == torch.bfloat16 for t in (*model.parameters(), *model.buffers())):
        return model, inputs, None
    widened = map_tensors(inputs, lambda t: t.float() if t.dtype == torch.bfloat16 else t)
    return (copy.deepcopy(model).float(), widened,
            "bfloat16 weights are exported as float32 (exact; onnxruntime has no bfloat16 CPU kernels) and "
            "validated against the float32 copy; the fp16 variant halves the file")


def check_opset(opset: int) -> int:
    """``opset`` if the exporters and onnxruntime support it, else :class:`CompressorError` giving the range."""
    import onnx.defs

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        between = f"between {MIN_OPSET} and {newest}, or leave it out for {DEFAULT_OPSET}"
        raise CompressorError(f"ONNX opset {opset!r} is not supported (the exporters honour {MIN_OPSET} to "
                              f"{newest})", f"pass opset {between}", cli_fix=f"pass --opset {between}")
    return opset


EXPORTERS = {"auto": ("dynamo", "legacy"), "dynamo": ("dynamo",), "legacy": ("legacy",)}


def export_in_turn(path: Path, exporter: str, write: Callable[[str, Path], None]) -> list[str]:
    """Try the exporters ``exporter`` names, in order, until one works: ``write(how, target)`` writes the file
    at ``target`` in a temporary folder, published as ``path`` (with its external data) when it returns.
    Returns ``[]`` on success (warning when dynamo failed first), else each exporter's failure, for the caller
    to word; a CompressorError from ``write`` passes through."""
    errors: list[str] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    for how in EXPORTERS[exporter]:
        try:
            with atomic_files(path) as tmpdir, quiet():
                write(how, tmpdir / path.name)
            if errors:
                warnings.warn(f"the dynamo exporter failed ({errors[0]}); exported with the legacy "
                              "TorchScript exporter instead", stacklevel=3)
            return []
        except CompressorError:
            raise
        except Exception as err:  # any exporter failure is reported with its cause
            errors.append(f"{how}: {type(err).__name__}: {first_line(err)}")
    return errors


def export_onnx(model: nn.Module, example_inputs: Any, path: str | Path, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
                exporter: str = "auto") -> Path:
    """Export ``model`` to ONNX at ``path`` (atomically) and return the path.

    Inputs are named after the dict keys (or ``input``/``input_i``), outputs after the model's output
    fields (``last_hidden_state`` for a Hugging Face encoder) or ``output``/``output_i``.
    ``dynamic_axes`` names more dynamic input axes beyond the batch, e.g. for a text model
    ``{"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}`` (same name: same size).
    ``exporter``: "dynamo", "legacy" or "auto" (dynamo, then legacy if dynamo cannot capture the model).
    """
    # Why dynamo first: torch.export captures the whole program and refuses (loudly) what it cannot
    # capture, while the legacy TorchScript tracer silently bakes Python-level branches on tensor
    # values into the graph (it warns "might cause the trace to be incorrect" on MiniLM) and is
    # deprecated. The legacy exporter stays as a fallback because it copes with models torch.export
    # rejects (data-dependent control flow); validate_onnx then checks that what it traced is right.
    # Neither can multiply a factored layer back into one matrix: constant folding only evaluates nodes
    # whose inputs are all constants, and each factor multiplies an activation (x @ down^T, then @ up^T),
    # never the other factor. check_factored_graph verifies this on every export.
    if exporter not in EXPORTERS:
        raise CompressorError(f"unknown exporter '{exporter}'", "use 'auto', 'dynamo' or 'legacy'")
    check_opset(opset)
    path = Path(path)
    names, tensors = flatten(example_inputs)
    as_dict = isinstance(example_inputs, Mapping)
    device = model_device(model)
    tensors = [t.to(device) for t in tensors]
    if dynamic_batch and any(t.shape[0] != tensors[0].shape[0] for t in tensors):
        raise CompressorError("example inputs disagree on the batch size (dimension 0)",
                              "give every input the same leading batch dimension")
    if dynamic_batch and tensors[0].shape[0] == 1:
        # torch.export specializes a dimension of size 1 to a constant: export with a batch of 2.
        tensors = [torch.cat([t, t]) for t in tensors]
    try:
        with eval_mode(model), torch.no_grad():
            out = call(model, dict(zip(names, tensors, strict=True)) if as_dict else tensors)
            out_names = [k for k, _ in named_outputs(out)]
    except Exception as err:
        raise CompressorError(f"{type(model).__name__} fails on the example inputs ({type(err).__name__}: "
                              f"{first_line(err)})", "give example inputs of the shape and dtype the model "
                              "expects (e.g. --input-shape)") from None
    if not out_names:
        raise CompressorError(f"{type(model).__name__} returns no tensor", "export a model whose forward() "
                              "returns a tensor, a tuple or a dict of tensors")
    out_names = _unique(out_names, taken=set(names))
    axes = _input_axes(names, tensors, dynamic_batch, dynamic_axes or {})
    wrapper = _Exportable(model, names, as_dict)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def write(how: str, target: Path) -> None:
        with eval_mode(model):
            _export_with(how, wrapper, tuple(tensors), target, names, out_names, opset, axes, dynamic_batch,
                         weight_bytes > EXTERNAL_DATA_BYTES)

    errors = export_in_turn(path, exporter, write)
    if not errors:
        return path
    raise CompressorError(f"ONNX export of {type(model).__name__} failed ({'; '.join(errors)})",
                          "check that the example inputs match the model's forward() (shapes, dtypes), or "
                          "make the unsupported operation traceable (see the message)")


def _input_axes(names: list[str], tensors: list[torch.Tensor], dynamic_batch: bool,
                extra: Mapping[str, Mapping[int, str]]) -> list[dict[int, str]]:
    """The named dynamic axes of each input, checked against the example tensors."""
    unknown = sorted(set(extra) - set(names))
    if unknown:
        raise CompressorError(f"dynamic_axes names inputs the model does not take: {', '.join(unknown)}",
                              f"use input names among {', '.join(names)}")
    out = []
    for name, t in zip(names, tensors, strict=True):
        axes = {0: "batch"} if dynamic_batch else {}
        for axis, dim in extra.get(name, {}).items():
            if not 0 < axis < t.dim() or t.shape[axis] < 2:
                raise CompressorError(f"dynamic axis {axis} of input '{name}' (shape {list(t.shape)}) is not "
                                      "a non-batch axis of size 2 or more",
                                      "name an existing axis and give an example with at least 2 along it")
            axes[axis] = dim
        out.append(axes)
    return out


# Node metadata the dynamo exporter records for debugging, which a shipped file should not carry: the Python
# stack of every node (paths of the user's source files; with the rest, 0.43 of the 0.57 MB of metadata in an
# int4 all-MiniLM-L6-v2 of 13 MB). ``pkg.torch.onnx.name_scopes`` stays: it names the module of each node
# (formats.onnx_graph.module_name reads it), and so does the class hierarchy.
TRACE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "namespace")


def strip_trace_metadata(model: Any) -> None:
    """Drop :data:`TRACE_METADATA` from every node of an ``onnx_ir`` model (graph and functions)."""
    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in graph.all_nodes():
            for key in TRACE_METADATA:
                node.metadata_props.pop(key, None)


def _export_with(how: str, wrapper: nn.Module, args: tuple, target: Path, names: list[str],
                 out_names: list[str], opset: int, axes: list[dict[int, str]], dynamic_batch: bool,
                 external: bool) -> None:
    common = dict(input_names=names, output_names=out_names, opset_version=opset, verbose=False)
    if how == "dynamo":
        dims = {d: torch.export.Dim(d) for a in axes for d in a.values()}  # one Dim per name: shared size
        shapes = tuple({i: dims[d] for i, d in a.items()} or None for a in axes)
        program = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=(shapes,),
                                    external_data=external, optimize=True, **common)
        strip_trace_metadata(program.model)
        program.save(str(target), external_data=external)
    else:
        out_axes = {n: {0: "batch"} for n in out_names} if dynamic_batch else {}
        torch.onnx.export(wrapper, args, str(target), dynamo=False,
                          dynamic_axes={**dict(zip(names, axes, strict=True)), **out_axes},
                          do_constant_folding=True, **common)
    import onnx  # the saved file must at least parse before it replaces anything

    onnx.load(str(target), load_external_data=False)


def _unique(names: list[str], taken: set[str]) -> list[str]:
    out = []
    for n in names:
        candidate, i = n, 1
        while candidate in taken:
            candidate, i = f"{n}_{i}", i + 1
        taken.add(candidate)
        out.append(candidate)
    return out



# ------------------------------------------------------------------------------------- validation


@dataclass
class Validation:
    """The result of running an ONNX file against the torch model it came from."""

    path: str
    size_bytes: int
    max_abs_diff: float  # over every output element, every batch size tried
    cosine: float  # the worst per-sample cosine similarity of an output to the torch output
    atol: float | None  # passed requires max_abs_diff <= atol (None: not checked)
    min_cosine: float | None  # passed requires cosine >= min_cosine (None: not checked)
    passed: bool
    providers: list[str]
    batch_sizes: list[int]
    variant: str = "fp32"
    problems: list[str] = field(default_factory=list)
    # Token positions left out of the comparison, over every batch tried: padding (attention_mask 0) of
    # outputs with a sequence axis, whose values are not defined (compressor.data.inputs.real_tokens).
    padding_ignored: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("max_abs_diff", "cosine"):  # JSON has no inf/nan
            d[k] = d[k] if math.isfinite(d[k]) else None
        return d


def _batch_variant(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    # One more sample than the example (its first row again): a different batch size on the same data.
    return [torch.cat([t, t[:1]]) for t in tensors]


def validate_onnx(onnx_path: str | Path, model: nn.Module | str | Path, example_inputs: Any, *,
                  atol: float | None = DEFAULT_ATOL,
                  min_cosine: float | None = None, variant: str = "fp32", batch_variant: bool = True) -> Validation:
    """Check ``onnx_path`` with ``onnx.checker`` (an ``.ort`` file: onnxruntime's loader only) and run it
    in onnxruntime (CPU) on ``example_inputs`` and on a batch one larger (which proves the dynamic batch
    axis; ``batch_variant=False``: not tried),
    comparing every output with ``model``: a torch model, or the path of an ONNX file run in onnxruntime.

    Passes when the checker and the runs succeed, ``max_abs_diff <= atol`` and ``cosine >= min_cosine``
    (each criterion only when given). Outputs with a sequence axis are compared at real tokens only: the
    positions whose ``attention_mask`` is 0 are left out (:func:`compressor.data.inputs.real_tokens`).
    Failures are returned (``passed=False``, ``problems``), not raised.
    """
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise CompressorError(f"ONNX file '{path}' does not exist", "export the model first")
    names, tensors = flatten(example_inputs)
    as_dict = isinstance(example_inputs, Mapping)
    v = Validation(str(path), file_size(path), math.inf, math.nan, atol, min_cosine, False, list(PROVIDERS),
                   [], variant)
    try:
        if path.suffix != ".ort":  # an ORT format file (compressor.export.edge) is onnxruntime's alone to check
            onnx.checker.check_model(str(path))  # by path: works past protobuf's 2 GB limit
    except Exception as err:  # onnx raises several types; all mean "invalid model"
        v.problems.append(f"onnx.checker: {first_line(err)}")
        return v
    try:
        sess = session(path)
    except Exception as err:
        v.problems.append(f"onnxruntime cannot load the model: {first_line(err)}")
        return v
    diffs, cosines = [], []
    reference = None if isinstance(model, nn.Module) else onnx_session(model)
    for batch in (tensors, _batch_variant(tensors)) if batch_variant else (tensors,):
        inputs = dict(zip(names, batch, strict=True)) if as_dict else tuple(batch)
        feed_all = {n: t.detach().cpu().numpy() for n, t in zip(names, batch, strict=True)}
        if isinstance(model, nn.Module):
            expected = torch_outputs(model, inputs)
            feed = {i.name: feed_all[i.name] for i in sess.get_inputs()}
        else:  # an ONNX reference: its outputs in onnxruntime, inputs matched to graph inputs by name
            expected = [(k, np.asarray(v, dtype=np.float64)) for k, v in onnx_outputs(reference, inputs)]
            feed = feeds(sess, inputs)
        try:
            got = sess.run(None, feed)
        except Exception as err:
            v.problems.append(f"onnxruntime failed at batch {len(batch[0])}: {first_line(err)}")
            return v
        v.batch_sizes.append(int(batch[0].shape[0]))
        if len(got) != len(expected):
            v.problems.append(f"the ONNX model has {len(got)} outputs, the torch model {len(expected)}")
            return v
        mask = attention_mask(inputs) if as_dict else None
        ignored = 0
        for (name, want), have in zip(expected, got, strict=True):
            have = np.asarray(have, dtype=np.float64)
            if have.shape != want.shape:
                v.problems.append(f"output '{name}' has shape {have.shape}, expected {want.shape}")
                return v
            if real_tokens(want.shape, mask) is not None:  # an output with a sequence axis: padding left out
                ignored = int((mask == 0).sum())
                have, want = unpadded(have, mask), unpadded(want, mask)
            diffs.append(float(np.max(np.abs(have - want))) if want.size else 0.0)
            cosines.append(_worst_cosine(have, want))
        v.padding_ignored += ignored
    v.max_abs_diff, v.cosine = max(diffs), min(cosines)
    if not math.isfinite(v.max_abs_diff):
        v.problems.append("the ONNX model produced NaN or Inf")
    if atol is not None and not v.max_abs_diff <= atol:
        v.problems.append(f"max abs difference {v.max_abs_diff:.3g} exceeds atol {atol:g}")
    if min_cosine is not None and not v.cosine >= min_cosine:
        v.problems.append(f"cosine {v.cosine:.6f} is below {min_cosine}")
    v.passed = not v.problems
    return v


def _worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Minimum over samples (dimension 0) of the cosine similarity of the flattened outputs."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-300))
    return float(np.min(cos)) if cos.size else 1.0


def format_validation(v: Validation) -> str:
    """A pass/fail block for the terminal."""
    rules = []
    if v.atol is not None:
        rules.append(f"max |onnx - torch| <= {v.atol:g}")
    if v.min_cosine is not None:
        rules.append(f"cosine >= {v.min_cosine:g}")
    lines = [
        f"ONNX validation ({v.variant}): {'PASSED' if v.passed else 'FAILED'}",
        f"  file          {v.path} ({v.size_bytes / 1e6:.2f} MB)",
        f"  max abs diff  {v.max_abs_diff:.3g}",
        f"  cosine        {v.cosine:.6f} (worst sample)",
        f"  criterion     {' and '.join(rules) or 'runs'}",
        f"  checked on    onnx.checker + onnxruntime {', '.join(v.providers)}, batch sizes "
        f"{', '.join(map(str, v.batch_sizes)) or '-'}",
    ]
    if v.padding_ignored:
        lines.append(f"  compared at   real tokens only: {v.padding_ignored} padding positions (attention_mask 0) "
                     "left out")
    lines += [f"  problem       {p}" for p in v.problems]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """A storage precision of an exported model: how it is written from the fp32 export, how its
    validation judges it, and what a weight costs in it (for size estimates). A new precision is one
    entry in :data:`VARIANTS`: ``compress --NAME``, the search's precisions and their checks follow."""

    name: str
    write: Callable[..., Path] | None  # (fp32 file, destination) -> destination; None: fp32 itself
    min_cosine: float | None  # validation floor for approximated weights (None: held to atol instead)
    bytes_per_param: float
    help: str
    # write also takes calibration=[batch, ...]: model inputs it measures activations on (static int8)
    calibrated: bool = False
    searched: bool = True  # tried by compressor.search unless its precisions say otherwise


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("fp32", None, None, 4.0, "the exported model itself"),
    Variant("fp16", export_fp16, FP16_MIN_COSINE, 2.0, "weights stored as float16"),
    Variant("int8", export_int8, INT8_MIN_COSINE, 1.0, "dynamic int8, onnxruntime quantize_dynamic"),
    Variant("qdq", export_qdq, INT8_MIN_COSINE, 1.0, "static int8 (QDQ), activation ranges calibrated on "
            "--calibration (else the example inputs); fast for convolutions", calibrated=True,
            # Not searched by default: choosing it runs onnxruntime over the calibration inputs five times.
            searched=False),
    # 4 bits, plus per block of INT4_BLOCK_SIZE weights a float32 scale and a 4-bit zero point.
    Variant("int4", export_int4, INT4_MIN_COSINE, 0.5 + 4.5 / INT4_BLOCK_SIZE,
            "4-bit weights (onnxruntime MatMulNBits), embeddings too; convolutions stay fp32"),
)}


def validation_keys() -> tuple[str, ...]:
    """The keys a run's validations go under (its exports, ``report.json``, ``Report.validations``): ``onnx``
    for the fp32 export, then every written variant of :data:`VARIANTS` in its order. Read at call time, so
    a variant registered later is validated and reported like the others."""
    return ("onnx", *(name for name, v in VARIANTS.items() if v.write is not None))


def write_variant(name: str, src: str | Path, dst: str | Path, *, calibration: Any = None) -> Path:
    """Write the variant ``name`` of :data:`VARIANTS` from the fp32 file ``src`` to ``dst``; a calibrated
    variant measures its activations on ``calibration`` (a batch of model inputs or a list of them)."""
    v = VARIANTS[name]
    if v.calibrated:
        return v.write(Path(src), Path(dst), calibration=calibration)
    return v.write(Path(src), Path(dst))
