"""report.json and report.md: what was done, what it saved, and whether the exported model checks out."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compressor.core.fileio import atomic_write_text
from compressor.core.plan import Plan
from compressor.data.perplexity import Perplexity
from compressor.export.onnx import Validation, validation_keys
from compressor.report.card import write_model_card

LAYER_FIELDS = ("name", "kind", "matrix_shape", "rank", "full_rank", "energy_kept", "rel_error",
                "estimated_output_error", "params_before", "params_after", "factored", "reason")


def versions() -> dict[str, str]:
    """Versions of what produced a result, for reports and benchmarks."""
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "machine": platform.machine(),
           "torch_threads": str(torch.get_num_threads())}
    for name in ("compressor", "onnx", "onnxruntime", "transformers", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            continue
    return out


def _plain(value: Any) -> Any:
    """JSON-ready: dataclasses to dicts, paths to strings, NaN to None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass
class PerplexityReport:
    """Perplexity of the dense model, the compressed model and each written ONNX file (``results`` by
    name: ``dense``, ``compressed``, ``model.onnx``, ``model.int8.onnx``, ...) on one text by one protocol
    (:mod:`compressor.data.perplexity`). In JSON the protocol is stated once, beside each model's numbers."""

    results: dict[str, Perplexity]

    def __post_init__(self) -> None:
        protocols = {json.dumps(p.protocol(), sort_keys=True) for p in self.results.values()}
        if len(protocols) > 1:
            raise ValueError(f"perplexities measured by different protocols cannot share a report: {protocols}")

    def ratio(self, name: str) -> float | None:
        """``name``'s perplexity over the dense model's (None without a dense measurement)."""
        dense = self.results.get("dense")
        return None if dense is None else self.results[name].ppl / dense.ppl

    def to_dict(self) -> dict[str, Any]:
        first = next(iter(self.results.values()))
        return {"protocol": first.protocol(),
                "models": {name: {"ppl": p.ppl, "mean_nll": p.mean_nll, "ratio_to_dense": self.ratio(name),
                                  "seconds": p.seconds, "notes": list(p.notes)}
                           for name, p in self.results.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerplexityReport:
        return cls({name: Perplexity.from_dict({**d["protocol"], **{k: v for k, v in m.items()
                                                                    if k != "ratio_to_dense"}})
                    for name, m in d["models"].items()})


@dataclass
class FileValidation:
    """One validated ONNX file of a run: its :class:`compressor.export.onnx.Validation` (``path`` relative to
    the output folder) and what the run adds about how it was made. In ``report.json`` it is one flat object
    under the variant's key, the validation's fields first. The validation is None when the export was
    skipped (``skipped`` says why)."""

    validation: Validation | None
    skipped: str | None = None
    kept_fp16: list[str] | None = None  # --keep-fp16: the layers kept in fp16
    settings: dict[str, Any] | None = None  # a calibrated variant: how it was chosen, and on what
    correction: dict[str, Any] | None = None  # --int4-correction: the low-rank correction's rule and ranks
    graph_problems: list[str] | None = None  # the factored graph's problems (they fail the validation)

    @property
    def passed(self) -> bool | None:
        """Whether the file passed its validation (None: skipped, nothing was checked)."""
        return None if self.validation is None else self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        out = _plain(self.validation) if self.validation is not None else {}
        extra = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "validation"}
        return {**out, **_plain({k: v for k, v in extra.items() if v is not None})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileValidation:
        names = {f.name for f in dataclasses.fields(Validation)}
        checked = {k: v for k, v in d.items() if k in names}
        for k in ("max_abs_diff", "cosine"):  # JSON holds a difference that was not finite as null
            if k in checked and checked[k] is None:
                checked[k] = math.nan
        return cls(Validation(**checked) if checked else None, **{k: v for k, v in d.items() if k not in names})


@dataclass
class Report:
    """What one run did and what it cost; :meth:`to_dict` is ``report.json``.

    Fields that a mode does not produce (no plan for "export", no ONNX for weights alone) stay None and
    are left out of the JSON. ``validations`` holds each validated ONNX file by key
    (:func:`compressor.export.onnx.validation_keys`: ``onnx`` for the fp32 export, then the variant names);
    in the JSON each is a top-level field of its key.
    """

    mode: str
    source: dict[str, Any]  # path, format, size_bytes
    output: str
    params_before: int
    params_after: int
    params_ratio: float | None
    files: dict[str, int]  # name -> bytes, of the output folder
    passed: bool  # every validation that ran passed
    timings_s: dict[str, float]
    command: str | None
    options: dict[str, Any]  # the job's options, as given
    versions: dict[str, str]
    date: str
    macs_before: int | None = None
    macs_after: int | None = None
    macs_unit: str | None = None
    method: str | None = None
    policy: dict[str, Any] | None = None
    plan_totals: dict[str, Any] | None = None
    notes: list[str] | None = None
    calibration: dict[str, Any] | None = None
    layers: list[dict[str, Any]] | None = None
    validations: dict[str, FileValidation] = field(default_factory=dict)
    # Dynamic and static int8 both written: each timed side by side with model.onnx, and the one to ship
    int8_choice: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    plots: list[str] | None = None
    latency: dict[str, Any] | None = None  # latency-aware runs: each file vs dense, next to the MAC ratio
    warnings: list[dict[str, Any]] | None = None  # e.g. low fidelity: "message" (Python), "cli" (command line)
    stream: dict[str, Any] | None = None  # streamed runs: per-layer seconds and SVD checks, peak RSS, bytes
    perplexity: PerplexityReport | None = None  # --eval-text: dense, compressed and every ONNX file
    edge: dict[str, Any] | None = None  # --edge: edge/manifest.json (compressor.export.edge)
    # --kv-cache: the cache layout and, per file (model_kv.onnx, model_kv.VARIANT.onnx), its greedy-generation
    # check (compressor.export.kv_cache.GenerationCheck as a dict)
    kv_cache: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "validations":  # each file under its own key, where the JSON has always had them
                out.update({key: v.to_dict() for key, v in value.items()})
            elif value is not None:
                out[f.name] = value.to_dict() if f.name == "perplexity" else _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        names = {f.name for f in dataclasses.fields(cls)} - {"validations"}
        fields = {"command": None, **{k: v for k, v in data.items() if k in names}}  # None is left out of the JSON
        if fields.get("perplexity") is not None:
            fields["perplexity"] = PerplexityReport.from_dict(fields["perplexity"])
        return cls(**fields, validations={key: FileValidation.from_dict(data[key]) for key in validation_keys()
                                          if data.get(key) is not None})


def build_report(*, source: Path, out: Path, mode: str, loaded, plan: Plan | None, original, compressed,
                 exports: dict[str, Any], timings: dict[str, float], options, folder: Path,
                 params: tuple[int, int] | None = None) -> Report:
    """The report of a run; file sizes are read from ``folder`` (the output being written). ``params``
    (before, after) stands in for counting the torch models' parameters (an ONNX input has none; analyze
    rewrites nothing, so it gives the plan's)."""
    if params is not None:
        params_before, params_after = params
    else:
        params_before = sum(p.numel() for p in original.parameters())
        params_after = sum(p.numel() for p in compressed.parameters())
    extra: dict[str, Any] = plan_fields(plan) if plan is not None else {}
    if loaded is not None and loaded.meta.get("notes"):  # what loading changed (e.g. a stripped key prefix)
        extra["notes"] = [*loaded.meta["notes"], *(extra.get("notes") or [])]
    if exports.get("notes"):  # what exporting changed (e.g. bfloat16 widened to float32)
        extra["notes"] = [*(extra.get("notes") or []), *exports["notes"]]
    validations = validations_of(exports)
    if exports.get("int8_choice"):
        extra["int8_choice"] = exports["int8_choice"]
    if exports.get("fidelity"):
        extra["fidelity"] = exports["fidelity"]
    if exports.get("latency"):
        extra["latency"] = exports["latency"]
    if exports.get("edge"):
        extra["edge"] = exports["edge"]
    if exports.get("kv_cache"):
        extra["kv_cache"] = _plain(exports["kv_cache"])
        for c in extra["kv_cache"]["files"].values():
            c["path"] = Path(c["path"]).name
    checks = [v.passed for v in validations.values() if v.passed is not None]
    checks += [extra["edge"]["passed"]] if "passed" in extra.get("edge", {}) else []
    checks += [c["passed"] for c in (extra.get("kv_cache") or {}).get("files", {}).values()]
    opts = _plain(dataclasses.asdict(options)) if dataclasses.is_dataclass(options) else {}
    return Report(mode=mode, source={"path": str(source), "format": loaded.format, "size_bytes": _size(source)},
                  output=str(out), params_before=params_before, params_after=params_after,
                  params_ratio=params_after / params_before if params_before else None,
                  files={p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()},
                  passed=all(checks), timings_s=timings, command=getattr(options, "command", None),
                  options={k: v for k, v in opts.items() if k not in ("command", "extra")},
                  versions=versions(), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  validations=validations, **extra)


def validations_of(exports: dict[str, Any]) -> dict[str, FileValidation]:
    """The validated files of a run's exports (what :mod:`compressor.jobs.exports` returns): each variant's
    :class:`~compressor.export.onnx.Validation` under its key, with its ``KEY_kept_fp16``, ``KEY_settings``
    and ``KEY_correction`` when the run made them; the graph problems and a skipped export belong to ``onnx``."""
    out = {}
    if "skipped" in exports:
        out["onnx"] = FileValidation(None, skipped=exports["skipped"])
    for key in validation_keys():
        if key in exports:
            out[key] = FileValidation(dataclasses.replace(exports[key], path=Path(exports[key].path).name),
                                      **{k: exports.get(f"{key}_{k}") or None
                                         for k in ("kept_fp16", "settings", "correction")})
    if exports.get("graph_problems"):
        out["onnx"].graph_problems = exports["graph_problems"]
        out["onnx"].validation.passed = False
    return out


def plan_fields(plan: Plan) -> dict[str, Any]:
    """The report fields a plan gives: multiply-adds, method, policy, totals, notes and the layer table."""
    totals = plan.totals()
    return dict(macs_before=totals["macs_before"], macs_after=totals["macs_after"], macs_unit=totals["macs_unit"],
                method=plan.method, policy=plan.policy, plan_totals=totals, notes=plan.notes,
                calibration=plan.calibration, layers=[{k: getattr(lp, k) for k in LAYER_FIELDS} for lp in plan.layers])


def stream_report(*, source: Path, out: Path, mode: str, plan: Plan, stream: dict[str, Any],
                  timings: dict[str, float], options, folder: Path) -> Report:
    """The report of a streamed run (:mod:`compressor.jobs.stream`): the plan's fields as in memory, and
    ``stream`` (per-layer seconds and SVD checks, peak RSS, bytes read and written). Nothing is validated
    (the model is never built), so ``passed`` is True and no ONNX fields appear."""
    totals = plan.totals()
    opts = _plain(dataclasses.asdict(options))
    return Report(mode=mode, source={"path": str(source), "format": "safetensors (streamed)",
                                     "size_bytes": stream["checkpoint_bytes"]},
                  output=str(out), params_before=totals["params_before"], params_after=totals["params_after"],
                  params_ratio=totals["params_after"] / totals["params_before"] if totals["params_before"] else None,
                  files={p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()},
                  passed=True, timings_s=timings, command=options.command,
                  options={k: v for k, v in opts.items() if k not in ("command", "extra")}, versions=versions(),
                  date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), stream=stream,
                  **plan_fields(plan))


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


class StepTimes(dict):
    """Seconds per step of a job (``report.timings_s``): ``step(name)`` records the time since the last."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = time.perf_counter()

    def step(self, name: str) -> None:
        now = time.perf_counter()
        self[name] = round(now - self._clock, 4)
        self._clock = now


def number(x: float | None, spec: str) -> str:
    """``x`` formatted with ``spec``, or "n/a" for a value JSON could not hold (a NaN or infinite difference
    is stored as None; a typed result still holds the NaN)."""
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def criterion(v: dict[str, Any]) -> str:
    """The pass rule of a validation, in words: ``atol 0.0001`` and/or ``cosine >= 0.9``."""
    rules = ([f"atol {v['atol']:g}"] if v.get("atol") is not None else []) + (
        [f"cosine >= {v['min_cosine']:g}"] if v.get("min_cosine") is not None else [])
    return " and ".join(rules) or "runs"


def write_report(report: Report, folder: Path) -> None:
    data = report.to_dict()
    atomic_write_text(folder / "report.json", json.dumps(data, indent=2) + "\n")
    atomic_write_text(folder / "report.md", render_markdown(data))
    if data["mode"] in ("compress", "apply") and (folder / "compressor.json").is_file():  # a model compressor loads
        write_model_card(folder, data)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def render_markdown(r: dict[str, Any]) -> str:
    """A report a person reads: summary, validation, per-layer table, provenance."""
    lines = _summary_markdown(r)
    if r.get("fidelity"):
        f = r["fidelity"]
        what = "ONNX graph" if r["source"].get("format") == "onnx" else "torch model"
        lines += [f"## Fidelity of the compressed {what} to the original ({f.get('inputs', 'the example inputs')})", "",
                  f"cosine mean {number(f['cosine_mean'], '.5f')}, min {number(f['cosine_min'], '.5f')}, "
                  f"relative error {number(f['relative_error'], '.4f')}"
                  + (f" (compared: {f['compared']})" if f.get("compared") else ""), ""]
    if any(k in r for k in validation_keys()):
        lines += _validation_markdown(r)
    if r.get("kv_cache"):
        lines += _kv_cache_markdown(r["kv_cache"])
    if r.get("latency"):
        lines += _latency_markdown(r["latency"])
    if r.get("edge"):
        lines += edge_markdown(r["edge"])
    if r.get("perplexity"):
        lines += perplexity_markdown(PerplexityReport.from_dict(r["perplexity"]))
    if r.get("stream"):
        lines += _stream_markdown(r["stream"])
    if r.get("plots"):
        lines += ["## Spectra", ""] + [f"![{Path(p).stem}]({p})" for p in r["plots"]] + [""]
    if r.get("layers"):
        lines += _layers_markdown(r["layers"])
    lines += ["## Provenance", "", f"- command: `{r.get('command')}`", f"- date: {r.get('date')}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items()),
              "- step times (s): " + ", ".join(f"{k} {v}" for k, v in r.get("timings_s", {}).items()), ""]
    return "\n".join(lines)


def _summary_markdown(r: dict[str, Any]) -> list[str]:
    """The title, sizes before and after, the policy, the calibration and the notes."""
    src_path = Path(r['source']['path'])
    lines = [f"# compressor report: {src_path.parent.name}/{src_path.name}", ""]
    lines += ["| | before | after | ratio |", "|---|---:|---:|---:|",
              f"| parameters | {r['params_before']:,} | {r['params_after']:,} | {r['params_ratio']:.3f} |"]
    if r.get("macs_before"):
        lines.append(f"| multiply-adds per position (factorizable layers) | {r['macs_before']:,} | "
                     f"{r['macs_after']:,} | {r['macs_after'] / r['macs_before']:.3f} |")
    files = r.get("files", {})
    src = r["source"]["size_bytes"]
    for name in ("model.safetensors", "model.onnx", *(f"model.{k}.onnx" for k in validation_keys()[1:])):
        if name in files:
            lines.append(f"| `{name}` size (input file: {_mb(src)}) | | {_mb(files[name])} | "
                         f"{files[name] / src:.3f} |")
    lines.append("")
    if r.get("policy"):
        pol = {k: v for k, v in r["policy"].items() if v not in (None, [], 1) or k == "rank"}
        lines.append(f"Method `{r.get('method')}`, policy `{json.dumps(pol)}`.")
    cal = r.get("calibration")
    if cal:
        lines.append(f"Calibration: {cal.get('samples')} samples ({cal.get('tokens') or '-'} tokens), "
                     f"sha256 `{str(cal.get('sha256'))[:12]}`, ranks by {cal.get('allocation')}; energy and "
                     "error columns below are of the whitened (activation-weighted) weights.")
    for note in r.get("notes") or []:
        lines.append(f"> note: {note}")
    lines.append("")
    return lines


def _validation_markdown(r: dict[str, Any]) -> list[str]:
    """The validated ONNX files, then how the int8, static int8 and int4 files were made."""
    against = ("the original ONNX model; variants vs `model.onnx`" if r["source"].get("format") == "onnx"
               else "the torch model")
    lines = [f"## ONNX validation (onnxruntime vs {against})", "",
             "| file | size | max abs diff | cosine | tolerance | result |", "|---|---:|---:|---:|---|---|"]
    files = [r[key] for key in validation_keys() if r.get(key)]
    for v in files:
        if "skipped" in v:
            lines.append(f"| - | | | | | skipped: {v['skipped']} |")
            continue
        tol = criterion(v)
        lines.append(f"| `{v['path']}` | {_mb(v.get('size_bytes'))} | {number(v.get('max_abs_diff', 0), '.2e')} | "
                     f"{number(v.get('cosine', float('nan')), '.6f')} | {tol} | "
                     f"{'PASS' if v.get('passed') else '**FAIL**'} |")
        for problem in v.get("graph_problems", []):
            lines.append(f"> graph: {problem}")
        for problem in v.get("problems", []):
            lines.append(f"> `{v['path']}`: {problem}")
    lines.append("")
    for v in files:
        if v.get("kept_fp16"):
            lines += [f"`{v['path']}` keeps these layers in fp16 (those whose int8 rounding moved the "
                      f"output most on the calibration inputs): {', '.join(v['kept_fp16'])}", ""]
    lines += _qdq_markdown(r, files)
    for v in files:
        s = v.get("settings") or {}
        if s.get("rounding") == "gptq":
            lines += [f"`{v['path']}` (blocks of {s['block_size']}): {s['gptq_layers']} layers' weights rounded "
                      f"by GPTQ, fitted to their inputs on {s['calibrated_on']}; the others to nearest.", ""]
        corr = v.get("correction")
        if corr:
            ranks = [x for x in corr["ranks"].values() if x]
            lines += [f"`{v['path']}` (blocks of {corr['block_size']}) corrects {len(ranks)} of "
                      f"{len(corr['ranks'])} 4-bit layers with low-rank factors ({corr['parameters']:,} weights, "
                      f"ranks {min(ranks, default=0)} to {max(ranks, default=0)}, rule "
                      f"{', '.join(f'{k}={x:g}' for k, x in corr['rule'].items())}, "
                      f"{'data-aware' if corr['data_aware'] else 'plain SVD'}).", ""]
    return lines


def _kv_cache_markdown(kv: dict[str, Any]) -> list[str]:
    """The key/value cache export: its layout and one row per file."""
    lay = kv["layout"]
    first = next(iter(kv["files"].values()))
    lines = ["## Key/value cache export (greedy generation, onnxruntime vs the torch model)", "",
             f"Inputs {', '.join(lay['inputs'][:2 + lay['position_ids']])}, `past_key_values.{{i}}.key/value` "
             f"[batch, {lay['kv_heads']}, past, {lay['head_dim']}] for {lay['layers']} layers; outputs `logits`, "
             f"`present.{{i}}.key/value`. {first['new_tokens']} greedy tokens (argmax, no stop at EOS) from each "
             f"of {first['prompts']} prompts ({first['prompt_source']}), onnxruntime threads "
             f"{first['threads'] or 'default'}; tokens/s include the prompt.", "",
             "| file | size | prompts identical | token agreement | prompt logits max abs diff | cosine | "
             "tokens/s onnx | tokens/s torch | criterion | result |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in kv["files"].values():
        rule = f"same {c['new_tokens']} tokens" if c["same_tokens"] else f"cosine >= {c['min_cosine']}"
        result = "PASS" if c["passed"] else "**FAIL**"
        lines.append(f"| `{c['path']}` | {_mb(c['size_bytes'])} | {c['identical']}/{c['prompts']} | "
                     f"{c['token_agreement']:.3f} | {number(c['max_abs_diff'], '.2e')} | "
                     f"{number(c['cosine'], '.6f')} | {number(c['onnx_tokens_per_s'], '.1f')} | "
                     f"{number(c['torch_tokens_per_s'], '.1f')} | {rule} | {result} |")
        for problem in c.get("problems", []):
            lines.append(f"> `{c['path']}`: {problem}")
    lines.append("")
    return lines


def _latency_markdown(lat: dict[str, Any]) -> list[str]:
    """Each file's latency measured side by side with the dense export, beside its multiply-add ratio."""
    mac = "-" if lat.get("macs_ratio") is None else f"{lat['macs_ratio']:.3f}"
    lines = ["## Latency vs multiply-adds (onnxruntime, each file side by side with the dense export)", "",
             f"{lat['threads']} threads, inputs {lat['inputs']}, {lat['rounds']} rounds ({lat['statistic']}).",
             "", "| file | dense ms | file ms | latency ratio | multiply-add ratio |", "|---|---:|---:|---:|---:|"]
    for name, f in lat["files"].items():
        lines.append(f"| `{name}` | {f['dense_ms']:.3f} | {f['ms']:.3f} | {f['latency_ratio']:.3f} | {mac} |")
    lines += [""] + [f"> differs: {d}" for d in lat["differ"]] + [""]
    return lines


def _layers_markdown(layers: list[dict[str, Any]]) -> list[str]:
    """One row per layer: shape, rank, energy kept, errors, parameters, and why it stayed dense."""
    lines = ["## Layers", "", "| layer | shape | rank | full | energy kept | rel. error | est. output error "
             "| params | note |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for lp in layers:
        shape = "x".join(str(s) for s in lp["matrix_shape"])
        energy = "" if lp["energy_kept"] is None else f"{lp['energy_kept']:.4f}"
        err = "" if lp["rel_error"] is None else f"{lp['rel_error']:.3f}"
        out_err = "" if lp.get("estimated_output_error") is None else f"{lp['estimated_output_error']:.3f}"
        lines.append(f"| `{lp['name']}` | {shape} | {lp['rank'] or '-'} | {lp['full_rank']} | {energy} | "
                     f"{err} | {out_err} | {lp['params_before']:,} → {lp['params_after']:,} | "
                     f"{'factored' if lp['factored'] else lp['reason']} |")
    lines.append("")
    return lines


def edge_markdown(m: dict[str, Any]) -> list[str]:
    """The edge folder (``edge/manifest.json``): one row per ``.ort`` file."""
    setup = m["latency_setup"]
    lines = [f"## Edge builds (`edge/`, ORT format, `{m['optimization']}` optimizations fixed at conversion)", "",
             f"Operators for a reduced build: `edge/{m['required_operators']}`. Latency: median of {setup['runs']} "
             f"runs, batch {setup['batch']}, {setup['threads']} thread(s), session optimizations "
             f"{setup['session_optimizations']}, {setup['machine']}.", "",
             "| file | size | opset / IR | oldest onnxruntime | latency | cosine vs `.onnx` | cosine vs model "
             "| result |", "|---|---:|---|---|---:|---:|---:|---|"]
    for f in m["variants"]:
        v = f["validation"]
        lines.append(f"| `{f['file']}` | {_mb(f['size_bytes'])} | {f['opset']} / {f['ir_version']} | "
                     f"{f['min_onnxruntime']['release'] or 'newer than the table'} | {f['latency_ms']:.3f} ms | "
                     f"{number(v['vs_onnx']['cosine'], '.6f')} | {number(v['vs_model']['cosine'], '.6f')} | "
                     f"{'PASS' if v['passed'] else '**FAIL**'} |")
    return [*lines, ""]


def _qdq_markdown(r: dict[str, Any], files: list[dict[str, Any]]) -> list[str]:
    """How each calibrated (static int8) file among ``files`` was chosen, and which int8 file to ship when
    both were written."""
    lines = []

    def what(c: dict[str, Any]) -> str:
        kept = ", ".join(f"`{n}`" for n in c["float_layers"]) or "none"
        acts = ", ".join(f"`{n}`" for n in c.get("float_activations", [])) or "none"
        # Files written before GPTQ was a choice record no rounding: theirs was to nearest.
        return (f"{c['method']}, {c.get('rounding', 'nearest')} rounding, float layers {kept}, float activations "
                f"{acts}: cosine {c['cosine']:.6f}")

    for v in files:
        s = v.get("settings")
        if not (s and s.get("chosen")):
            continue
        lines += [f"`{v['path']}`: static int8 (QDQ; weights {s['weights']}, activations {s['activations']}) "
                  f"calibrated on {s['calibrated_on']} ({s['calibration_samples']} samples), validated on "
                  f"{s.get('validated_on', 'the example inputs')}. Chosen by "
                  f"{s['criterion']}: {what(s['chosen'])}; tried: " + "; ".join(what(c) for c in s["tried"]) + ".", ""]
    choice = r.get("int8_choice")
    if choice:
        shipped = f"`{choice['recommended']}`" if choice["recommended"] else "none passed validation"
        lines += [f"### Which int8 file to ship: {shipped}",
                  "", f"Rule: {choice['rule']}. Latency: {choice['threads']} threads, inputs {choice['inputs']}, "
                  f"{choice['rounds']} rounds; cosine on {choice.get('fidelity_on', 'the example inputs')}.", "",
                  "| file | model.onnx ms | file ms | latency ratio | worst cosine | passed |",
                  "|---|---:|---:|---:|---:|---|"]
        for name, f in choice["files"].items():
            lines.append(f"| `{name}` | {f['fp32_ms']:.3f} | {f['ms']:.3f} | {f['latency_ratio']:.3f} | "
                         f"{number(f['cosine'], '.6f')} | {'yes' if f['passed'] else 'no'} |")
        lines.append("")
    return lines


def perplexity_markdown(report: PerplexityReport) -> list[str]:
    """The perplexity section: the protocol in words, then one row per model."""
    first = next(iter(report.results.values()))
    lines = ["## Perplexity", "", f"{first.describe()}.", "",
             "| model | perplexity | ratio to dense | mean NLL | seconds |", "|---|---:|---:|---:|---:|"]
    for name, p in report.results.items():
        ratio = report.ratio(name)
        shown = f"{name} torch model" if name in ("dense", "compressed") else f"`{name}`"
        lines.append(f"| {shown} | {p.ppl:.4f} | "
                     f"{'-' if ratio is None else f'{ratio:.4f}'} | {p.mean_nll:.5f} | {p.seconds:.1f} |")
    notes = [f"> `{name}`: {note}" for name, p in report.results.items() for note in p.notes]
    return [*lines, "", *notes, *([""] if notes else [])]


def _stream_markdown(st: dict[str, Any]) -> list[str]:
    """The streamed run: memory, bytes, SVD method and checks, and the time of every layer."""
    checks = [c for c in st["svd_checks"].values() if c]
    rand = [c for c in checks if c.get("method") == "randomized"]
    worst = max((c["bound"] for c in rand), default=None)
    lines = ["## Streamed run", "",
             f"{st['shards_in']} input shard(s), {_mb(st['checkpoint_bytes'])} read tensor by tensor; "
             f"{_mb(st.get('bytes_written'))} written. Peak RSS {st['peak_rss_analyze_gib']:.2f} GiB after the "
             f"analysis, {st['peak_rss_gib']:.2f} GiB in all (this process). Fingerprint (sha256 of every byte) "
             f"{st['fingerprint_seconds']:.1f} s. {st['resumed_layers']} of {st['layers']} layers resumed from "
             f"an earlier run; {st['workers']} worker(s){', Ray ' + str(st['ray']) if st.get('ray') else ''}.",
             f"SVD `{st['svd']}`" + (f", rank bound {st['max_rank']}" if st.get("max_rank") else "")
             + (f": {len(rand)} layers randomized (worst a-posteriori bound {worst:.3g}), {len(checks) - len(rand)} "
                "fell back to exact" if st["svd"] != "exact" else "") + ".", "",
             "| layer | seconds | SVD |", "|---|---:|---|"]
    for name, sec in st["seconds_per_layer"].items():
        c = st["svd_checks"].get(name) or {}
        how = (f"randomized, rank {c['rank']}, bound {c['bound']:.3g}" if c.get("method") == "randomized"
               else f"exact ({c['reason']})" if c else "exact")
        lines.append(f"| `{name}` | {sec:.3f} | {how} |")
    return [*lines, ""]
