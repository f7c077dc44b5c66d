"""Edge builds: what ships to a device, in the format its runtime loads, measured on that runtime.

    manifest = build_edge(folder, model, example_inputs)      # writes folder/edge/, returns its summary

For every ONNX file at the top of ``folder`` (``model.onnx`` and each ``model.<variant>.onnx`` a run wrote:
a new variant's file is picked up by being there, nothing to register), ``folder/edge/`` gets:

- ``<name>.ort``: the file in onnxruntime's ORT format, which its mobile and minimal builds load, with the
  graph optimizations of :data:`OPTIMIZATION` applied once, at conversion. Each is validated like the
  other files (:func:`compressor.export.onnx.validate_onnx`): against the ``.onnx`` it came from (the same
  numbers, to :data:`ORT_MIN_COSINE`) and against the reference model (the variant's own floor).
- ``required_operators.config``: the operators (and, where onnxruntime can reduce them, the types) every
  ``.ort`` uses, in onnxruntime's format, for a reduced build (``build.sh --include_ops_by_config``).
  The build checks that it covers every operator of every ``.ort``, read back from the files.
- ``manifest.json``: per file its size, sha256, opset, IR version, the oldest onnxruntime that loads it,
  inputs and outputs, batch-1 latency, fidelity and where it came from.

Written into ``folder`` as it is being built: the caller's output folder publishes it with the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write_text
from compressor.data.inputs import flatten, map_tensors
from compressor.export.measure import cpu_model, file_size, onnx_latency
from compressor.export.onnx import DEFAULT_ATOL, VARIANTS, validate_onnx
from compressor.formats.runtime import session

EDGE_DIR = "edge"
CONFIG_NAME = "required_operators.config"
MANIFEST_NAME = "manifest.json"
# The graph optimizations baked into each .ort. "extended" keeps onnxruntime's operator fusions (Attention,
# SkipLayerNormalization, Gelu, MatMul + Add, Conv + activation ...), which a minimal build cannot apply
# at load (it runs the graph as stored), and which any CPU build runs: they are contrib operators, not
# machine code. "all" adds layout transforms (NCHWc blocking) tied to the converting machine's vector
# width, so its files are not portable (onnxruntime's own converter leaves them out unless told the target
# is amd64); "basic" keeps only standard operators (for NNAPI / CoreML, which compile the graph
# themselves) and leaves the CPU's fusions undone.
OPTIMIZATION = "extended"
# An .ort file is its .onnx after graph optimizations that do not change arithmetic beyond float summation
# order: their outputs agree to this cosine (worst sample), with the max difference recorded.
ORT_MIN_COSINE = 0.9999
LATENCY_RUNS = 30
LATENCY_WARMUP = 5
# The newest onnxruntime release of each row of the table in onnxruntime's docs, "ONNX Runtime
# compatibility" (https://onnxruntime.ai/docs/reference/compatibility.html, "ONNX opset support"):
# (release, highest ONNX opset it implements, highest ONNX IR version it loads), oldest first. It covers
# the default ONNX domain; contrib operators (com.microsoft: MatMulNBits, GatherBlockQuantized ...) and
# their attributes can need a newer release, which the manifest says.
ORT_RELEASES = (
    ("1.0", 11, 6), ("1.3", 12, 7), ("1.6", 13, 7), ("1.8", 14, 7), ("1.9", 15, 8), ("1.11", 16, 8),
    ("1.12", 17, 8), ("1.14", 18, 8), ("1.15", 19, 8), ("1.16", 19, 9), ("1.17", 20, 9), ("1.18", 21, 10),
)


def build_edge(folder: str | Path, reference: Any, inputs: Any, *, threads: int = 1,
               origin: Mapping[str, Any] | None = None, recipes: Mapping[str, Any] | None = None,
               fidelity_reference: Any = None, batch_variant: bool = True, atol: float = DEFAULT_ATOL
               ) -> dict[str, Any]:
    """Write ``folder/edge/`` for every ``*.onnx`` in ``folder``; returns the manifest (also written).

    ``reference``: what the files compute, a torch model or an ONNX file's path (as for
    :func:`compressor.export.onnx.validate_onnx`); ``inputs``: the example inputs they were validated on;
    ``atol``: the fp32 file's tolerance (the other variants are held to their cosine floors).
    ``fidelity_reference``: the original (uncompressed) model, whose outputs the manifest's fidelity is
    measured against (None: ``reference``). ``origin``: where the files came from (source model, plan),
    recorded as is; ``recipes``: per ONNX file name, how that variant was written. Latency: median of
    onnxruntime CPU runs on the first sample of ``inputs`` at ``threads`` threads, session optimizations
    off, as a minimal build runs an .ort file (only what was fixed at conversion). ``batch_variant=False``:
    the files have a fixed batch size, validated and timed on ``inputs`` as they are.
    A file that fails validation is recorded as such (``passed``, per file and in all), as the other files'
    validations are; one that does not convert raises :class:`CompressorError`."""
    import onnxruntime as ort

    folder = Path(folder)
    sources = sorted(p for p in folder.glob("*.onnx") if p.is_file())
    if not sources:
        raise CompressorError(f"'{folder}' holds no ONNX file to build an edge folder from",
                              "export the model first (compress export MODEL ...)")
    edge = folder / EDGE_DIR
    edge.mkdir(exist_ok=True)
    timed = map_tensors(inputs, lambda t: t[:1]) if batch_variant else inputs  # batch 1: what a device runs
    files = []
    for src in sources:
        ort_path = convert_to_ort(src, edge / f"{src.stem}.ort")
        kind = variant_of(src)
        files.append(_describe(src, ort_path, kind, reference, inputs, timed, threads, fidelity_reference,
                               (recipes or {}).get(src.name), batch_variant, atol))
    config = write_operator_config([edge / f["file"] for f in files], edge / CONFIG_NAME)
    manifest = {
        "format": "ort",
        "optimization": OPTIMIZATION,
        "converter": f"onnxruntime {ort.__version__}",
        "required_operators": config.name,
        "origin": dict(origin or {}),
        "latency_setup": {"batch": batch_of(timed), "threads": threads,
                          "session_optimizations": "off (as a minimal build)", "runs": LATENCY_RUNS,
                          "machine": f"{cpu_model()} ({platform.machine()})",
                          "onnxruntime": ort.__version__},
        "variants": files,
        "passed": all(f["validation"]["passed"] for f in files),
    }
    atomic_write_text(edge / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


def variant_of(onnx_path: Path) -> str:
    """The variant a file holds by its name: ``model.onnx`` fp32, ``model.int4.onnx`` int4."""
    parts = Path(onnx_path).name.split(".")
    return parts[-2] if len(parts) > 2 else "fp32"


# ---------------------------------------------------------------------------------------- convert


def convert_to_ort(src: Path, dst: Path) -> Path:
    """``src`` converted to the ORT format at ``dst`` with :data:`OPTIMIZATION` applied, as onnxruntime's
    ``convert_onnx_models_to_ort`` (Fixed style) does for one file: the session that optimizes the graph
    saves it. Raises :class:`CompressorError` when onnxruntime cannot convert or load the result."""
    try:
        session(src, optimize=OPTIMIZATION, config={"session.save_model_format": "ORT"}, save_as=dst)
        session(dst)  # it loads, or it is no use
    except Exception as err:  # onnxruntime raises its own types
        dst.unlink(missing_ok=True)
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise CompressorError(f"'{src.name}' does not convert to an ORT format file that loads ({first})",
                              "report the model; leave out --edge to write the ONNX files alone") from None
    return dst


# -------------------------------------------------------------------------------------- operators


def ort_operators(path: str | Path) -> set[tuple[str, int, str]]:
    """``(domain, since version, operator)`` of every node of an ``.ort`` file, subgraphs included, read
    from the file's flatbuffer (the empty domain is written ``ai.onnx``, as the config does)."""
    import onnxruntime.tools.ort_format_model  # noqa: F401  (puts its flatbuffer bindings on the path)
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py import fbs

    buf = bytearray(Path(path).read_bytes())
    if not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(buf, 0):
        raise CompressorError(f"'{path}' is not an ORT format file", "convert it with build_edge")
    found: set[tuple[str, int, str]] = set()

    def walk(graph) -> None:
        for i in range(graph.NodesLength()):
            node = graph.Nodes(i)
            found.add((node.Domain().decode() or "ai.onnx", node.SinceVersion(), node.OpType().decode()))
            for j in range(node.AttributesLength()):
                attr = node.Attributes(j)
                if attr.G() is not None:
                    walk(attr.G())
                for k in range(attr.GraphsLength()):
                    walk(attr.Graphs(k))

    walk(fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(buf, 0).Model().Graph())
    return found


def config_operators(path: str | Path) -> set[tuple[str, int, str]]:
    """``(domain, opset, operator)`` listed in a ``required_operators.config`` (types left aside)."""
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    required, _ = parse_config(str(path))
    return {(domain, opset, op) for domain, opsets in required.items() for opset, ops in opsets.items()
            for op in ops}


def write_operator_config(ort_files: list[Path], dst: Path) -> Path:
    """onnxruntime's reduced-build config for ``ort_files``, with per-operator types (``create_config_from_models``
    with type reduction), checked to list every operator of every file."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    quiet = logging.getLogger("ort_format_model.utils")  # it logs the path it wrote at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        create_config_from_models(ort_files, dst, enable_type_reduction=True)
    finally:
        quiet.setLevel(level)
    # Its header names the files by the path they were written at; a published folder has moved since.
    text = dst.read_text()
    for f in ort_files:
        text = text.replace(str(f), f.name)
    atomic_write_text(dst, text)
    listed = config_operators(dst)
    missing = sorted({op for f in ort_files for op in ort_operators(f)} - listed)
    if missing:
        raise CompressorError(f"{dst.name} misses operators {missing[:5]} of the .ort files",
                              "report this with the model")
    return dst


# ------------------------------------------------------------------------------------ description


def _describe(src: Path, ort_path: Path, kind: str, reference: Any, inputs: Any, timed: Any, threads: int,
              fidelity_reference: Any, recipe: Any, batch_variant: bool, atol: float) -> dict[str, Any]:
    """The manifest entry of one variant: validated, measured, described."""
    import onnx

    same = validate_onnx(ort_path, src, inputs, atol=None, min_cosine=ORT_MIN_COSINE, variant=kind,
                         batch_variant=batch_variant)
    floor = VARIANTS[kind].min_cosine if kind in VARIANTS else None
    vs_model = validate_onnx(ort_path, reference, inputs, atol=atol if floor is None else None,
                             min_cosine=floor, variant=kind, batch_variant=batch_variant)
    original = (validate_onnx(ort_path, fidelity_reference, inputs, atol=None, variant=kind, batch_variant=False)
                if fidelity_reference is not None else vs_model)
    model = onnx.load(str(src), load_external_data=False)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    problems = [f"vs {src.name}: {p}" for p in same.problems] + [f"vs the model: {p}" for p in vs_model.problems]
    return {
        "variant": kind,
        "file": ort_path.name,
        "size_bytes": file_size(ort_path),
        "sha256": sha256(ort_path),
        "onnx": {"file": src.name, "size_bytes": file_size(src), "sha256": sha256(src)},
        "opset": opsets.get("ai.onnx"),
        "opsets": opsets,
        "ir_version": model.ir_version,
        "min_onnxruntime": min_onnxruntime(model.ir_version, opsets.get("ai.onnx", 0), set(opsets) - {"ai.onnx"}),
        "inputs": _values(model.graph.input, {t.name for t in model.graph.initializer}),
        "outputs": _values(model.graph.output, set()),
        "latency_ms": round(onnx_latency(ort_path, timed, threads=threads, warmup=LATENCY_WARMUP, runs=LATENCY_RUNS,
                                         optimize=False)["median_ms"], 4),
        "fidelity": {"cosine_worst": _round(original.cosine), "max_abs_diff": _round(original.max_abs_diff),
                     "against": "the original model" if fidelity_reference is not None else "the reference model"},
        "validation": {"passed": same.passed and vs_model.passed, "problems": problems,
                       "vs_onnx": {"cosine": _round(same.cosine), "max_abs_diff": _round(same.max_abs_diff),
                                   "min_cosine": ORT_MIN_COSINE},
                       "vs_model": {"cosine": _round(vs_model.cosine), "max_abs_diff": _round(vs_model.max_abs_diff),
                                    "atol": vs_model.atol, "min_cosine": vs_model.min_cosine},
                       "batch_sizes": same.batch_sizes},
        "recipe": recipe if recipe is not None else (VARIANTS[kind].help if kind in VARIANTS else None),
    }


def min_onnxruntime(ir_version: int, opset: int, other_domains: Collection[str] = ()) -> dict[str, Any]:
    """The oldest onnxruntime release whose row of :data:`ORT_RELEASES` covers ``ir_version`` and the
    default-domain ``opset``, with a note on what the table does not cover."""
    release = next((r for r, max_opset, max_ir in ORT_RELEASES if opset <= max_opset and ir_version <= max_ir),
                   None)
    notes = []
    if release is None:
        newest = ORT_RELEASES[-1]
        notes.append(f"IR version {ir_version} / opset {opset} is beyond the table (onnxruntime {newest[0]}: "
                     f"opset {newest[1]}, IR {newest[2]}): a newer release is needed")
    if other_domains:
        notes.append(f"uses operators of {', '.join(sorted(other_domains))}, which the table does not cover: they "
                     "may need a newer release")
    notes.append("the .ort file is onnxruntime's own format: load it with the converter's release or newer")
    return {"release": release, "notes": notes,
            "source": "https://onnxruntime.ai/docs/reference/compatibility.html"}


def _values(values, initializers: set[str]) -> list[dict[str, Any]]:
    """Name, shape (symbolic axes by name) and dtype of graph inputs or outputs."""
    import onnx

    out = []
    for v in values:
        if v.name in initializers:
            continue
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim] if t.HasField("shape") else None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else None
        out.append({"name": v.name, "shape": shape, "dtype": dtype})
    return out


def batch_of(inputs: Any) -> int:
    """The batch size (dimension 0) of ``inputs``."""
    _, tensors = flatten(inputs)
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1


def sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _round(x: float) -> float | None:
    return round(float(x), 7) if x == x and abs(x) != float("inf") else None
