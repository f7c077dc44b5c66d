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
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_files
from compressor.core.handlers import INT4_BLOCK_SIZE, INT4_SYMMETRIC, handler_of_kind
from compressor.core.plan import Plan
from compressor.data.inputs import (
    as_batches,
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
from compressor.export.measure import file_size
from compressor.formats.onnx_graph import feeds, module_name
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
# Above this many bytes of weights an ONNX protobuf (2 GB limit) cannot hold them: write external data.
EXTERNAL_DATA_BYTES = 1_800_000_000

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


def onnx_session(path: str | Path):
    """An onnxruntime CPU session of the ONNX file ``path``."""
    try:
        return session(path)
    except Exception as err:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
        raise CompressorError(f"onnxruntime cannot load '{path}' ({_first_line(err)})",
                              "check the model in onnxruntime first") from None


def onnx_outputs(model: Any, inputs: Any) -> list[tuple[str, np.ndarray]]:
    """The outputs of ``model`` (an ONNX file's path, or a session of one) in onnxruntime on ``inputs``,
    named; inputs are matched to the graph's inputs by name (a mapping) or position."""
    sess = onnx_session(model) if isinstance(model, str | Path) else model
    names = [o.name for o in sess.get_outputs()]
    return list(zip(names, sess.run(names, feeds(sess, inputs)), strict=True))


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
            errors.append(f"{how}: {type(err).__name__}: {_first_line(err)}")
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
                              f"{_first_line(err)})", "give example inputs of the shape and dtype the model "
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


def _export_with(how: str, wrapper: nn.Module, args: tuple, target: Path, names: list[str],
                 out_names: list[str], opset: int, axes: list[dict[int, str]], dynamic_batch: bool,
                 external: bool) -> None:
    common = dict(input_names=names, output_names=out_names, opset_version=opset, verbose=False)
    if how == "dynamo":
        dims = {d: torch.export.Dim(d) for a in axes for d in a.values()}  # one Dim per name: shared size
        shapes = tuple({i: dims[d] for i, d in a.items()} or None for a in axes)
        program = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=(shapes,),
                                    external_data=external, optimize=True, **common)
        program.save(str(target), external_data=external)
    else:
        out_axes = {n: {0: "batch"} for n in out_names} if dynamic_batch else {}
        torch.onnx.export(wrapper, args, str(target), dynamo=False,
                          dynamic_axes={**dict(zip(names, axes, strict=True)), **out_axes},
                          do_constant_folding=True, **common)
    import onnx  # the saved file must at least parse before it replaces anything

    onnx.load(str(target), load_external_data=False)


@contextmanager
def quiet():
    """Silence exporter chatter (progress lines, deprecation and tracer warnings, optimizer logs)."""
    # The root logger too: onnxruntime.quantization logs its advice there.
    names = ("", "torch.onnx", "onnxscript", "torch.export", "torch._dynamo")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _unique(names: list[str], taken: set[str]) -> list[str]:
    out = []
    for n in names:
        candidate, i = n, 1
        while candidate in taken:
            candidate, i = f"{n}_{i}", i + 1
        taken.add(candidate)
        out.append(candidate)
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


# -------------------------------------------------------------------------------- graph structure

# Nodes that multiply by (or look up in) a weight, and nodes a weight may pass through on its way there
# (pre-transposed, cast from fp16, dequantized from int8).
_WEIGHT_OPS = {"MatMul", "Gemm", "Conv", "Gather", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
               "QLinearMatMul", "QLinearConv", "FusedMatMul", "MatMulNBits",
               "GatherBlockQuantized"}
_PASS_OPS = {"Transpose", "Cast", "DequantizeLinear", "Reshape", "Identity", "Squeeze", "Unsqueeze"}


def _load_graph(onnx_path_or_model: Any):
    import onnx

    if isinstance(onnx_path_or_model, onnx.ModelProto):
        return onnx_path_or_model
    path = Path(onnx_path_or_model)
    if not path.is_file():
        raise CompressorError(f"ONNX file '{path}' does not exist", "export the model first")
    return onnx.load(str(path), load_external_data=False)  # shapes only: no weights read


def weight_shapes(onnx_path_or_model: Any) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every constant (initializer or Constant node) of 2 or more dimensions that
    feeds, directly or through Transpose/Cast/DequantizeLinear/..., a MatMul/Gemm/Conv/Gather node."""
    model = _load_graph(onnx_path_or_model)
    graph = model.graph
    consts = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = tuple(attr.t.dims)
    used = {name for name, _, _ in _weight_uses(graph, consts)}
    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.input[1] in consts:
            # Stored packed as (N, blocks, bytes per block): the weight it multiplies by is (K, N).
            attrs = {a.name: a.i for a in node.attribute}
            consts[node.input[1]] = (attrs["K"], attrs["N"])
        bits = next((a.i for a in node.attribute if a.name == "bits"), None)
        if node.op_type == "GatherBlockQuantized" and bits and node.input[0] in consts:
            # A uint8 table packs 8 // bits values a byte along its last axis (_pack_gather_nibbles).
            *rows, packed = consts[node.input[0]]
            consts[node.input[0]] = (*rows, packed * (8 // bits))
    return {n: s for n, s in consts.items() if len(s) >= 2 and n in used}


def _weight_uses(graph, names):
    """``(name, weight node, nodes passed through)`` for each of the tensors ``names`` that feeds a
    MatMul/Gemm/Conv/Gather/... node, directly or through Transpose/Cast/DequantizeLinear/..."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def walk(name: str, path: tuple, depth: int = 0):
        for node in consumers.get(name, []):
            if node.op_type in _WEIGHT_OPS:
                yield node, path
            elif node.op_type in _PASS_OPS and depth < 4:
                yield from walk(node.output[0], (*path, node), depth + 1)

    for name in names:
        for node, path in walk(name, ()):
            yield name, node, path


def _key(shape) -> tuple[int, ...]:
    # A 2-D weight may be stored transposed (MatMul wants (in, out), Gemm keeps (out, in)).
    shape = tuple(int(d) for d in shape)
    return tuple(sorted(shape)) if len(shape) == 2 else shape


def _factor_shapes(lp) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the (down, up) factor weights of a factored layer, from its kind's handler."""
    return handler_of_kind(lp.kind).factor_shapes(lp.shape, lp.rank)


def check_factored_graph(onnx_path_or_model: Any, plan: Plan) -> list[str]:
    """Problems (empty when fine) with the factored layers of ``plan`` in an exported graph: each must
    appear as its two factor weights feeding MatMul/Gemm/Conv/Gather nodes, and no dense ``m x n``
    weight may be left for it (by name, or one more dense-shaped weight than the plan's dense layers
    of that shape explain)."""
    shapes = weight_shapes(onnx_path_or_model)
    have = Counter(_key(s) for s in shapes.values())
    factored = plan.factored
    need = Counter(_key(s) for lp in factored for s in _factor_shapes(lp))
    dense_ok = Counter(_key(lp.shape) for lp in plan.layers if lp.rank is None)
    problems = []
    left = have.copy()
    for lp in factored:
        for what, shape in zip(("down", "up"), _factor_shapes(lp), strict=True):
            if left[_key(shape)] > 0:
                left[_key(shape)] -= 1
            else:
                problems.append(f"layer '{lp.name}': no {'x'.join(map(str, shape))} {what} factor weight "
                                "feeds a MatMul/Gemm/Conv/Gather node")
        named = [n for n in shapes if n == f"{lp.name}.weight" or n.endswith(f".{lp.name}.weight")]
        if named:
            problems.append(f"layer '{lp.name}': its dense weight '{named[0]}' is in the graph")
    for key in sorted({_key(lp.shape) for lp in factored}):
        extra = have[key] - dense_ok[key] - need[key]
        if extra > 0:
            names = [lp.name for lp in factored if _key(lp.shape) == key]
            problems.append(f"{extra} dense {'x'.join(map(str, key))} weight(s) more than the plan's dense "
                            f"layers explain: the factors of {', '.join(names[:3])}"
                            f"{' ...' if len(names) > 3 else ''} were multiplied back together")
    return problems


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
        v.problems.append(f"onnx.checker: {_first_line(err)}")
        return v
    try:
        sess = session(path)
    except Exception as err:
        v.problems.append(f"onnxruntime cannot load the model: {_first_line(err)}")
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
            v.problems.append(f"onnxruntime failed at batch {len(batch[0])}: {_first_line(err)}")
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


# --------------------------------------------------------------------------------------- variants


def export_fp16(src_onnx: str | Path, dst: str | Path) -> Path:
    """A copy of ``src_onnx`` with every float32 weight stored as float16 and cast back to float32 where
    it is used; inputs, outputs and arithmetic stay float32. Written atomically; returns ``dst``."""
    # Why fp16 storage only, measured on all-MiniLM-L6-v2 with onnxruntime 1.32 CPU: a full-fp16 graph
    # is no smaller (45.57 vs 45.59 MB), is less accurate (max diff 0.0099 vs 0.0051) and is not fp16
    # compute: the CPU provider lacks fp16 kernels for most of its nodes and inserts 76 Cast nodes to
    # run them in fp32. With fp16 storage, onnxruntime constant-folds each weight's Cast at load (no Cast
    # is left in its optimized graph), so the model runs like the fp32 one, with fp16-rounded weights,
    # from a file half the size, and float inputs/outputs stay float32 for the caller.
    # Weights beyond fp16's range (|w| > 65504) stay fp32.
    import onnx

    model = _load_full(Path(src_onnx))
    _store_fp16(model.graph)
    return _save_atomic(model, Path(dst), onnx)


def _store_fp16(graph, only: set[str] | None = None) -> None:
    """Store the float32 initializers of ``graph`` (those named in ``only``, or all) as float16, each with
    a Cast back to float32 under its old name, so every consumer is unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    keep, casts = [], []
    for init in graph.initializer:
        wanted = init.data_type == TensorProto.FLOAT and (only is None or init.name in only)
        arr = numpy_helper.to_array(init) if wanted else None
        if arr is None or arr.size < 2 or not np.all(np.abs(arr) <= np.finfo(np.float16).max):
            keep.append(init)
            continue
        half = numpy_helper.from_array(arr.astype(np.float16), f"{init.name}__fp16")
        keep.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=f"{init.name}__cast_fp32"))
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    nodes = [*casts, *graph.node]  # casts first: the graph stays topologically sorted
    graph.ClearField("node")
    graph.node.extend(nodes)


def export_int8(src_onnx: str | Path, dst: str | Path, *, keep_fp16: Sequence[str] = ()) -> Path:
    """onnxruntime dynamic quantization of ``src_onnx``: int8 weights (per output channel), activations
    quantized at run time. Written atomically; returns ``dst``.

    ``keep_fp16`` names torch modules (``"encoder.layer.0.output.dense"``; a factored layer's name means
    both its ``.down`` and ``.up``) left out of quantization: their weights are stored as float16 and
    cast back to float32 like ``export_fp16`` does, one byte more per parameter than int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src_onnx), Path(dst)
    if not src.is_file():
        raise CompressorError(f"ONNX file '{src}' does not exist", "export the model first")
    names = [keep_fp16] if isinstance(keep_fp16, str) else list(keep_fp16)
    exclude = _kept_nodes(_load_graph(src).graph, names, src) if names else None
    big = file_size(src) > EXTERNAL_DATA_BYTES
    try:
        with atomic_files(dst) as tmpdir:
            with quiet():
                quantize_dynamic(src, tmpdir / dst.name, weight_type=QuantType.QInt8, per_channel=True,
                                 use_external_data_format=big, nodes_to_exclude=exclude)
            if exclude:
                import onnx

                model = onnx.load(str(tmpdir / dst.name))
                # The kept nodes' weights, found again in the quantized graph: quantize_dynamic rewrites
                # each Gemm into MatMul (+ Add) named after it, on a transposed copy of the weight.
                inits = [t.name for t in model.graph.initializer]
                kept = {init for init, node, _ in _weight_uses(model.graph, inits) if node.name in exclude}
                _store_fp16(model.graph, kept)
                for f in list(tmpdir.iterdir()):
                    f.unlink()
                _save_onnx(model, tmpdir / dst.name, onnx)
    except Exception as err:
        raise CompressorError(f"int8 quantization of '{src}' failed ({type(err).__name__}: "
                              f"{_first_line(err)})", "export without --int8, or report the model") from err
    return dst


# ----------------------------------------------------------------------------- static int8 (QDQ)

# How export_qdq calibrates activation ranges; each is measured and the most faithful kept. onnxruntime's
# "entropy" method is left out: on MobileNetV2 (benchmarks/results/edge_mobilenetv2.md) one entropy export
# took 193 s against 327 s for all five of export_qdq's attempts, and kept fewer top-1 classes (0.689 vs 0.700).
QDQ_METHODS = ("minmax", "percentile")
QDQ_METADATA = "compressor.qdq"  # the ONNX metadata key that records how a QDQ file was chosen
# Ops whose constant weight export_qdq may leave float (the first and last of them in the graph).
_QDQ_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Candidates closer than this in mean cosine count as equally faithful: fewer float layers win.
QDQ_TIE = 1e-4


def export_qdq(src_onnx: str | Path, dst: str | Path, *, calibration: Any,
               methods: Sequence[str] = QDQ_METHODS) -> Path:
    """Static int8 of ``src_onnx`` in QDQ form (onnxruntime ``quantize_static``): weights int8 per output
    channel, activations uint8 with ranges calibrated on ``calibration`` (a batch of model inputs or a list
    of them: a tensor, a tuple or a dict each, as the fp32 file takes them). Written atomically; returns ``dst``.

    Chosen by measurement, the mean per-sample cosine of every output to ``src_onnx``'s on the calibration
    batches: first the calibration method among ``methods`` ("minmax", with a moving average over batches,
    or "percentile"), then whether the first and/or last weight layer (Conv/Gemm/MatMul, in graph order:
    the stem and the classifier, where int8 often costs most) stay float. What was tried and chosen is in
    the file's metadata (:func:`qdq_choice`)."""
    # Why static QDQ beside dynamic int8: dynamic quantization has no integer convolution kernel path worth
    # having (9.1x the fp32 latency on MobileNetV2, against 0.52x for this), while QDQ pairs around Conv are
    # fused by onnxruntime into integer QLinearConv and are what edge runtimes (XNNPACK, NNAPI, QNN) take.
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src, dst = Path(src_onnx), Path(dst)
    if not src.is_file():
        raise CompressorError(f"ONNX file '{src}' does not exist", "export the model first")
    unknown = [m for m in methods if m not in QDQ_METHODS]
    if unknown or not methods:
        raise CompressorError(f"unknown calibration method(s) {unknown or list(methods)}",
                              f"use some of {', '.join(QDQ_METHODS)}")
    if calibration is None:
        raise CompressorError("static int8 needs calibration inputs, and none were given",
                              "pass calibration batches (real inputs the model will see)")
    reference = onnx_session(src)
    batches = [feeds(reference, b) for b in as_batches(calibration, "static int8 calibration")]
    expected = [reference.run(None, b) for b in batches]
    graph = _load_graph(src).graph
    constants = {t.name for t in graph.initializer}
    weighted = [n for n in graph.node if n.op_type in _QDQ_WEIGHT_OPS and n.name and len(n.input) > 1
                and n.input[1] in constants]
    big = file_size(src) > EXTERNAL_DATA_BYTES
    tried: list[dict[str, Any]] = []

    def attempt(method: str, keep: tuple[str, ...], folder: Path) -> dict[str, Any]:
        path = folder / f"candidate{len(tried)}.onnx"
        with quiet():
            quantize_static(src, path, _Batches(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=_calibrate_method(method), nodes_to_exclude=list(keep),
                            use_external_data_format=big,
                            extra_options={"CalibMovingAverage": True} if method == "minmax" else {})
        session = onnx_session(path)
        got = [session.run(None, b) for b in batches]
        cosine = float(np.mean([_mean_cosine(g, w) for outs, wants in zip(got, expected, strict=True)
                                for g, w in zip(outs, wants, strict=True)]))
        tried.append({"method": method, "float_layers": [_layer_of(graph, n) for n in keep],
                      "cosine": round(cosine, 6), "path": path})
        return tried[-1]

    try:
        with tempfile.TemporaryDirectory(prefix="compressor-qdq-") as tmp:
            folder = Path(tmp)
            best = max((attempt(m, (), folder) for m in methods), key=lambda c: c["cosine"])
            ends = [n.name for n in weighted[:1]] + [n.name for n in weighted[-1:] if n is not weighted[0]]
            keeps = [(e,) for e in ends] + ([tuple(ends)] if len(ends) == 2 else [])
            for keep in keeps:
                c = attempt(best["method"], keep, folder)
                if c["cosine"] > best["cosine"] + QDQ_TIE:
                    best = c
            model = onnx.load(str(best["path"]))
            choice = {"chosen": {k: best[k] for k in ("method", "float_layers", "cosine")},
                      "tried": [{k: c[k] for k in ("method", "float_layers", "cosine")} for c in tried],
                      "calibration_batches": len(batches),
                      "calibration_samples": int(sum(next(iter(b.values())).shape[0] for b in batches)),
                      "criterion": "mean per-sample cosine of the outputs to the fp32 file on the calibration "
                                   "inputs", "weights": "int8, per output channel", "activations": "uint8"}
            onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                                QDQ_METADATA: json.dumps(choice)})
            with atomic_files(dst) as out:
                _save_onnx(model, out / dst.name, onnx)
    except CompressorError:
        raise
    except Exception as err:
        raise CompressorError(f"static int8 quantization of '{src}' failed ({type(err).__name__}: "
                              f"{_first_line(err)})", "export without --qdq, or report the model") from err
    return dst


def qdq_choice(path: str | Path) -> dict[str, Any] | None:
    """What :func:`export_qdq` tried and chose for the file ``path`` (None for other files)."""
    for prop in _load_graph(path).metadata_props:
        if prop.key == QDQ_METADATA:
            return json.loads(prop.value)
    return None


class _Batches:
    """onnxruntime's CalibrationDataReader over a list of feeds: ``get_next`` until None, then ``rewind``."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.batches, self.i = batches, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.i += 1
        return self.batches[self.i - 1] if self.i <= len(self.batches) else None

    def rewind(self) -> None:
        self.i = 0


def _calibrate_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[name]


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples (dimension 0) of the cosine similarity of the flattened outputs."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = np.where((na == 0) & (nb == 0), 1.0, np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-300))
    return float(np.mean(cos)) if cos.size else 1.0


def _layer_of(graph, node_name: str) -> str:
    """The torch module whose weight a node multiplies by (``features.0.0``), else the node's own name."""
    node = next(n for n in graph.node if n.name == node_name)
    # The weight's own name first: a conv with a BatchNorm folded in is scoped under the BatchNorm.
    weight = node.input[1]
    module = weight.removesuffix(".weight") if weight.endswith(".weight") else module_name(weight, node)
    return module.removeprefix("model.") if module else node_name


# ------------------------------------------------------------------------------------------- int4


FACTOR_STORAGE = ("fp16", "int8")  # how export_int4 stores correction factors; the first is the default
# MatMulNBits' accuracy_level: the precision its inputs are multiplied in. 0 (unset) dequantizes the 4-bit
# weights to float32 and multiplies in float32; 4 quantizes each input row to int8 per block and uses
# the CPU's int8 dot-product kernels. Measured on all-MiniLM-L6-v2 as .ort files, batch 1, 1 thread,
# onnxruntime 1.32 (benchmarks/results/edge_minilm.md): on a 29-token sentence level 4 ran at 0.71-0.86x
# level 0's latency (every block size, with and without a correction); padded to 64 tokens, 0.89-1.04x;
# held-out sentence cosine moved by at most 0.00062.
INT4_ACCURACY_LEVEL = 4
INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # unset, fp32, fp16, bf16, int8 (onnxruntime's MatMulNBits docs)


def check_factor_storage(factors: str) -> str:
    """``factors`` if it is one of :data:`FACTOR_STORAGE`, else :class:`CompressorError`."""
    if factors not in FACTOR_STORAGE:
        raise CompressorError(f"unknown int4 correction factor storage {factors!r}",
                              f"use one of {', '.join(FACTOR_STORAGE)}")
    return factors


def check_int4_block_size(block_size: int) -> int:
    """``block_size`` if onnxruntime's 4-bit kernels take it (a power of two, at least 16), else
    :class:`CompressorError`."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or \
            block_size & (block_size - 1):
        raise CompressorError(f"int4 block size {block_size!r} is not a power of two >= 16 (MatMulNBits and "
                              "GatherBlockQuantized need one)", "pass e.g. block_size=32 or 128",
                              cli_fix="pass e.g. --int4-block-size 32")
    return block_size


def check_int4_accuracy_level(level: int) -> int:
    """``level`` if it is a MatMulNBits accuracy_level (:data:`INT4_ACCURACY_LEVELS`), else
    :class:`CompressorError`."""
    if isinstance(level, bool) or level not in INT4_ACCURACY_LEVELS:
        raise CompressorError(f"int4 accuracy level {level!r} is not one of {INT4_ACCURACY_LEVELS}",
                              f"pass accuracy_level={INT4_ACCURACY_LEVEL} (int8 compute) or 0 (float32)")
    return level


def export_int4(src_onnx: str | Path, dst: str | Path, *, block_size: int = INT4_BLOCK_SIZE,
                corrections: Mapping[str, tuple[Any, Any]] | None = None, factors: str = "fp16",
                accuracy_level: int = INT4_ACCURACY_LEVEL) -> Path:
    """onnxruntime's 4-bit weight-only quantization of ``src_onnx`` (MatMulNBitsQuantizer, asymmetric,
    blocks of ``block_size`` weights along the input dimension): every MatMul/Gemm by a constant weight
    becomes a MatMulNBits node, every embedding lookup a GatherBlockQuantized node; convolutions and the
    rest stay float32. Written atomically; returns ``dst``.

    ``corrections`` maps torch module names (``"encoder.layer.0.output.dense"``) to ``(up, down)`` of
    shapes ``(out, r)`` and ``(r, in)``: beside that layer's MatMulNBits node the graph then computes
    ``x @ down^T @ up^T`` with two small MatMuls and adds it to its output, so the layer computes
    ``x (deq(Q(W)) + up down)^T``. ``factors``: how those MatMuls store their weights, "fp16" (cast back
    to float32 at load) or "int8" (onnxruntime dynamic int8: per-channel weights, inputs quantized at run
    time, half the bytes of fp16 and a little more error). ``accuracy_level``: the MatMulNBits attribute
    (:data:`INT4_ACCURACY_LEVEL`). Embedding tables are stored as 4-bit values packed two to a uint8
    (:func:`_pack_gather_nibbles`), the layout onnxruntime's ``.ort`` format can hold."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    check_int4_block_size(block_size)
    check_factor_storage(factors)
    check_int4_accuracy_level(accuracy_level)
    src, dst = Path(src_onnx), Path(dst)
    model = _load_full(src)
    graph = model.graph
    _gemms_to_matmuls(graph)
    modules = _matmul_modules(graph)  # MatMul node name -> torch module name, before the quantizer drops it
    corrections = dict(corrections or {})
    unknown = sorted(set(corrections) - set(modules.values()))
    if unknown:
        some = ", ".join(sorted(set(modules.values()))[:3])
        raise CompressorError(f"int4 corrections name layers with no MatMul in '{src}': {', '.join(unknown[:3])}",
                              f"name torch Linear modules as in model.named_modules(), e.g. {some}")
    try:
        with quiet():
            q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=INT4_SYMMETRIC,
                                     accuracy_level=accuracy_level or None,
                                     op_types_to_quantize=("MatMul", "Gather"))
            q.process()
    except Exception as err:
        raise CompressorError(f"int4 quantization of '{src}' failed ({type(err).__name__}: {_first_line(err)})",
                              "export without --int4, or report the model") from err
    model = q.model.model
    _pack_gather_nibbles(model.graph)
    by_module = {modules[n.name.removesuffix("_Q4")]: n for n in model.graph.node
                 if n.op_type == "MatMulNBits" and n.name.removesuffix("_Q4") in modules}
    missing = sorted(set(corrections) - set(by_module))
    if missing:
        raise CompressorError(f"onnxruntime left layer(s) {', '.join(missing[:3])} of '{src}' unquantized, so "
                              "there is no MatMulNBits node to correct", "leave those layers out of the correction")
    weights = _add_corrections(model.graph, {by_module[m].name: corrections[m] for m in sorted(corrections)})
    if factors == "fp16" or not weights:
        _store_fp16(model.graph, weights)
        return _save_atomic(model, dst, onnx)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    with atomic_files(dst) as tmpdir:
        _save_onnx(model, tmpdir / "fp32_factors.onnx", onnx)
        with quiet():
            quantize_dynamic(tmpdir / "fp32_factors.onnx", tmpdir / dst.name, weight_type=QuantType.QInt8,
                             per_channel=True, nodes_to_quantize=nodes)
        for f in tmpdir.glob("fp32_factors.onnx*"):
            f.unlink()
    return dst


def _pack_gather_nibbles(graph) -> None:
    """Store each GatherBlockQuantized node's 4-bit table and zero points as uint8, two values a byte
    (low nibble first, each row packed on its own), with ``bits=4``: the kernel's MatMulNBits-style layout.

    Why: the quantizer writes them as ONNX uint4 tensors, which onnxruntime's ``.ort`` format cannot
    hold ("Unsupported tensor data type" at load); the uint8 layout computes the same outputs (measured:
    identical on all-MiniLM-L6-v2) from the same bytes."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    four_bit = (TensorProto.UINT4, TensorProto.INT4)
    for node in list(graph.node):
        if node.op_type != "GatherBlockQuantized" or inits.get(node.input[0]) is None or \
                inits[node.input[0]].data_type not in four_bit:
            continue
        # Signed tables have no zero point: the uint8 layout's implicit one (8) shifts them.
        shift = 8 if inits[node.input[0]].data_type == TensorProto.INT4 else 0
        width = inits[node.input[0]].dims[-1]
        for i in (0, 3) if len(node.input) > 3 and node.input[3] else (0,):
            t = inits[node.input[i]]
            values = numpy_helper.to_array(t).astype(np.int16) + shift
            t.CopyFrom(numpy_helper.from_array(_nibbles(values.astype(np.uint8)), t.name))
        node.attribute.append(helper.make_attribute("bits", 4))
        if width % 2:
            _slice_padded_column(graph, node, width)


def _slice_padded_column(graph, node, width: int) -> None:
    """An odd-width table packs a padding nibble into each row's last byte, which the kernel returns as one
    more column (a factored embedding of odd rank then fed its MatMul a wrong width): slice it off."""
    from onnx import helper, numpy_helper

    out, padded = node.output[0], f"{node.output[0]}_padded"
    node.output[0] = padded
    consts = {f"{padded}_{k}": np.array([v], np.int64) for k, v in (("start", 0), ("end", width), ("axis", -1))}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    index = list(graph.node).index(node)
    graph.node.insert(index + 1, helper.make_node("Slice", [padded, *consts], [out], name=f"{node.name}_unpad"))


def _nibbles(values: np.ndarray) -> np.ndarray:
    """``values`` (each < 16) packed two to a byte along the last axis, low nibble first (odd: padded)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _gemms_to_matmuls(graph) -> None:
    """Rewrite each ``Gemm(x, W, b)`` with a constant ``W`` (alpha = beta = 1, x not transposed) into
    ``MatMul(x, W')`` (+ ``Add(b)``) under the Gemm's name: onnxruntime's 4-bit quantizer reads MatMul only."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if w is None or len(w.dims) != 2 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or \
                attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        arr = numpy_helper.to_array(w)
        wt = numpy_helper.from_array(np.ascontiguousarray(arr.T if attrs.get("transB", 0) else arr),
                                     f"{w.name}__matmul")
        graph.initializer.append(wt)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        mm_out = f"{node.output[0]}__matmul" if bias else node.output[0]
        mm = helper.make_node("MatMul", [node.input[0], wt.name], [mm_out], name=node.name)
        mm.metadata_props.extend(node.metadata_props)  # the torch module it computes
        nodes.append(mm)
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [node.output[0]], name=f"{node.name}__bias"))
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def _matmul_modules(graph) -> dict[str, str]:
    """``{MatMul node name: torch module name}`` for the MatMuls by a constant 2-D weight."""
    inits = [t.name for t in graph.initializer if len(t.dims) == 2]
    out = {}
    for weight, node, _ in _weight_uses(graph, inits):
        module = module_name(weight, node) if node.op_type == "MatMul" else None
        if module and node.name:
            out[node.name] = module.removeprefix("model.")
    return out


def _add_corrections(graph, corrections: Mapping[str, tuple[Any, Any]]) -> set[str]:
    """Add ``x @ down^T @ up^T`` to the output of each MatMulNBits node named in ``corrections``; returns
    the names of the factor initializers."""
    from onnx import helper, numpy_helper

    names: set[str] = set()
    extra: dict[str, list] = {}  # the node after which each correction's nodes go
    nodes_by_name = {n.name: n for n in graph.node}
    for node_name, (up, down) in corrections.items():
        node = nodes_by_name[node_name]
        up, down = (np.asarray(f.detach().cpu().float() if isinstance(f, torch.Tensor) else f, np.float32)
                    for f in (up, down))
        attrs = {a.name: a.i for a in node.attribute}
        k, n = attrs["K"], attrs["N"]
        if down.shape[1] != k or up.shape[0] != n or up.shape[1] != down.shape[0]:
            raise CompressorError(f"int4 correction of node '{node.name}' has factors {up.shape} and "
                                  f"{down.shape}, not (out={n}, r) and (r, in={k})",
                                  "pass (up, down) as the module's weight is (out, in)")
        base = node.name.removesuffix("_Q4")
        a = numpy_helper.from_array(np.ascontiguousarray(down.T), f"{base}__correction_down")
        b = numpy_helper.from_array(np.ascontiguousarray(up.T), f"{base}__correction_up")
        graph.initializer.extend([a, b])
        names |= {a.name, b.name}
        out = node.output[0]
        node.output[0] = f"{out}__int4"
        extra[node.name] = [
            helper.make_node("MatMul", [node.input[0], a.name], [f"{base}__correction_h"],
                             name=f"{base}__correction_down"),
            helper.make_node("MatMul", [f"{base}__correction_h", b.name], [f"{base}__correction"],
                             name=f"{base}__correction_up"),
            helper.make_node("Add", [node.output[0], f"{base}__correction"], [out], name=f"{base}__corrected"),
        ]
    nodes = []
    for node in graph.node:
        nodes.append(node)
        nodes.extend(extra.get(node.name, []))
    graph.ClearField("node")
    graph.node.extend(nodes)
    return names


def _kept_nodes(graph, names: list[str], src: Path) -> set[str]:
    """Names of the nodes quantize_dynamic must leave alone to keep the layers ``names`` unquantized."""
    layers: dict[str, list] = {}  # module name, without export_onnx's "model." prefix -> [node, ...]
    weights = [t.name for t in graph.initializer if len(t.dims) >= 2]
    for weight, node, path in _weight_uses(graph, weights):
        module = module_name(weight, node)
        if module:
            layers.setdefault(module.removeprefix("model."), []).extend([node, *path])
    exclude = set()
    for name in names:
        hits = [m for m in layers if m in (name, f"{name}.down", f"{name}.up")]
        if not hits:
            some = ", ".join(list(layers)[:4])
            raise CompressorError(f"keep_fp16 names '{name}', which is no layer with a weight in '{src}'",
                                  f"name torch modules as in model.named_modules(), e.g. {some}")
        for node in (n for m in hits for n in layers[m]):
            if not node.name:
                raise CompressorError(f"the node of layer '{name}' in '{src}' has no name, so it cannot be "
                                      "left out of quantization", "export the model with export_onnx")
            # quantize_dynamic turns a Gemm into a MatMul named "<gemm>_MatMul" before it quantizes.
            exclude |= {node.name, f"{node.name}_MatMul"} if node.op_type == "Gemm" else {node.name}
    return exclude


def _load_full(path: Path):
    import onnx

    if not path.is_file():
        raise CompressorError(f"ONNX file '{path}' does not exist", "export the model first")
    return onnx.load(str(path))  # with external data, if any


def _save_atomic(model, dst: Path, onnx) -> Path:
    with atomic_files(dst) as tmpdir:
        _save_onnx(model, tmpdir / dst.name, onnx)
    return dst


def _save_onnx(model, path: Path, onnx) -> None:
    """``onnx.save``, with the weights in ``<name>.data`` beside it when they are too big for one file."""
    big = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=big, location=f"{path.name}.data")


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


def write_variant(name: str, src: str | Path, dst: str | Path, *, calibration: Any = None) -> Path:
    """Write the variant ``name`` of :data:`VARIANTS` from the fp32 file ``src`` to ``dst``; a calibrated
    variant measures its activations on ``calibration`` (a batch of model inputs or a list of them)."""
    v = VARIANTS[name]
    if v.calibrated:
        return v.write(Path(src), Path(dst), calibration=calibration)
    return v.write(Path(src), Path(dst))
