"""Checkpoints bigger than memory: analysis and rewrite streamed tensor by tensor, resumable, parallel.

    result = compressor.jobs.stream.stream_compress("llama-folder", "out", mode="compress", rank=256)
    result.totals, result.resumed_layers      # a StreamResult; stream.json is result.to_dict()

The input is a safetensors file or a Hugging Face folder (one ``model.safetensors`` or shards named by
``model.safetensors.index.json``). Which tensors are layers is decided on a weightless skeleton (meta
tensors) by the same layer handlers as in memory: the Hugging Face model its ``config.json`` describes,
or, for a bare file, the stand-in of :func:`compressor.jobs.loading.weights_only_model`. Each layer's
tensors are then read alone through memory maps and analysed by :func:`compressor.analysis.stream.run_layer`
(here, in a process pool, or on Ray). Every finished layer is written at once, durably, to a state
folder beside the output (``.OUT.stream/``) with a fingerprint of the checkpoint and the settings; the
same command run again after a crash or SIGKILL continues from there and writes the same bytes. The
output folder holds ``plan.json`` (the same bytes as the in-memory analysis), ``stream.json`` (per-layer
times and SVD checks, peak RSS, bytes), ``report.md`` / ``report.json`` (as the in-memory job's, with a
"Streamed run" section), and with ``mode="compress"`` the factored weights, shard by shard, with the
folder's other files (config, tokenizer) copied and, for a Hugging Face folder, the ``compressor.json``
:func:`compressor.formats.save.save` writes, so that :func:`compressor.load` reads the output (a bare
file's output loads into the user's own module with :func:`compressor.load_into`).
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from compressor.analysis.analyze import check_patterns, find_layers, layer_plan, tied_notes, unique_param_count
from compressor.analysis.calibration import DAMPING, calibration_info, output_error
from compressor.analysis.decoder import BLOCKWISE_PASSES, is_decoder
from compressor.analysis.stream import LayerTask, bounded_spectrum
from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write_text, file_in_folder
from compressor.core.output import OutputDir, check_not_over_inputs
from compressor.core.plan import Plan
from compressor.core.policies import allocate, policy_from_options, policy_to_dict
from compressor.core.rewrite import factored_table
from compressor.core.svd import Decomposition, check_svd_fits
from compressor.data.calibration import describe
from compressor.formats.dropin import copy_sentence_transformers, mark_hf_config
from compressor.formats.load import detect_format
from compressor.formats.save import hf_architecture, write_meta
from compressor.formats.shards import Checkpoint, ShardWriter
from compressor.jobs.compress import default_out
from compressor.jobs.options import OptionError, Options, options_from
from compressor.jobs.results import StreamResult
from compressor.jobs.stream_blocks import Blockwise, checkpoint_keys, skeleton_of
from compressor.jobs.stream_state import STATE_FORMAT, StreamState, state_dir
from compressor.jobs.stream_workers import probe_ray, run_all
from compressor.report.report import stream_report, write_report


def stream_compress(source: str | Path, out: str | Path | None = None, *, mode: str = "analyze",
                    options: Options | None = None, **kwargs: Any) -> StreamResult:
    """Analyse (``mode="analyze"``) or analyse and factor (``"compress"``) the checkpoint at ``source``
    without loading it whole; returns a :class:`StreamResult` (its ``to_dict()`` is ``stream.json``).

    Options as for :func:`compressor.jobs.compress.compress`, plus ``svd`` ("exact" or "randomized"),
    ``device`` (where the SVDs run: "cpu", or "cuda" for a GPU; byte-identical results only on one kind),
    ``workers`` (processes; 1 runs in this one), ``ray`` (None, "local" to start Ray on this machine, or a
    cluster address), ``restart`` (drop an unfinished run's state instead of continuing it) and
    ``shard_bytes`` (largest output shard).
    """
    opts = options_from(options, kwargs, stream=True)  # a bad option: one line, before any work
    source = Path(source)
    out = Path(out) if out is not None else default_out(source)
    if mode not in ("analyze", "compress"):
        raise CompressorError(f"mode {mode!r} is not one of analyze, compress", "pass mode='analyze' or 'compress'")
    policy = _check(opts)
    check_not_over_inputs(out, [("model", source), ("calibration file", opts.calibration)])
    OutputDir(out, opts.force).check()
    clock = time.perf_counter()
    if source.is_file() and detect_format(source) == "gguf":  # its tensors are quantized blocks, not safetensors
        raise CompressorError(f"'{source}' is a GGUF file, and a streamed run reads safetensors checkpoints tensor "
                              "by tensor", "use compressor.compress: the GGUF is dequantized in memory",
                              cli_fix="run without --stream: the GGUF is dequantized in memory")
    run = _prepare(source, out, mode, opts, policy)
    blockwise = None
    if run.batches is not None:  # block by block through the model, in this process
        blockwise = Blockwise(run.skeleton, run.ckpt, run.tasks, run.names, run.batches, run.state, policy,
                              opts.rank_multiple)
        blockwise.run()
    else:
        run_all([(i, run.tasks[n]) for i, n in enumerate(run.names) if not run.state.has(i)], run.state.save_layer,
                opts)
    layers = {n: run.state.layer(i) for i, n in enumerate(run.names)}
    plan = _plan(run, layers, opts, policy)
    if mode == "compress" and blockwise is not None:  # a target: the ranks are known only now; a second pass
        blockwise.run({n: plan.layer(n).rank for n in run.names})
    elif mode == "compress":  # a global policy (target) knows the ranks only now: factor in a second pass
        run_all(_second_pass(run, layers, plan), run.state.save_factors, opts)
    summary = _summary(run, layers, plan, blockwise, opts, mode, time.perf_counter() - clock)
    _write(out, run, plan, summary, opts, mode)
    run.state.remove()
    return summary


@dataclass
class _Run:
    """A streamed run's checkpoint, its weightless skeleton, the layers' tasks and the state they resume from."""

    source: Path
    ckpt: Checkpoint
    companions: list[Path]  # the files copied beside the factored weights (mode "compress")
    batches: list | None  # calibration
    skeleton: torch.nn.Module
    found: list  # every layer candidate (compressor.analysis.analyze.find_layers)
    tasks: dict[str, LayerTask]
    names: list[str]
    state: StreamState
    resumed: int  # layers finished by an earlier run
    fingerprint_seconds: float


def _prepare(source: Path, out: Path, mode: str, opts: Options, policy) -> _Run:
    """Open the checkpoint, find its layers on the skeleton, and open the state of the run (refusing, before
    any layer is read, a matrix too large for an exact SVD or a state left by other inputs)."""
    ckpt = Checkpoint.open(source)
    companions = _companions(source) if mode == "compress" else []
    batches = _calibration(source, opts) if opts.calibration is not None else None
    include, exclude = list(opts.include), list(opts.exclude)
    factor = mode == "compress"
    skeleton = skeleton_of(source, ckpt, calibrated=batches is not None)
    found = find_layers(skeleton, include, exclude)
    check_patterns(include, exclude, [c.name for c in found])
    keymap = checkpoint_keys(skeleton, ckpt, [c.name for c in found if c.skip is None])
    tasks = {c.name: LayerTask(c.name, c.module, c.handler,
                               {p: keymap[f"{c.name}.{p}"] for p, _ in c.module.named_parameters()},
                               {keymap[f"{c.name}.{p}"]: str(ckpt.tensors[keymap[f"{c.name}.{p}"]].file)
                                for p, _ in c.module.named_parameters()},
                               policy, opts.rank_multiple, opts.svd, factor, device=opts.device,
                               max_rank=opts.max_rank)
             for c in found if c.skip is None}
    names = list(tasks)
    if opts.svd == "exact":  # a matrix too large for an exact SVD is refused before any layer is read
        for task in tasks.values():
            check_svd_fits(task.name, *task.handler.weight_matrix(task.module).shape)
    hashed = time.perf_counter()  # the fingerprint reads every byte: only once the layers are known to be workable
    fingerprint = ckpt.fingerprint()
    hashed = time.perf_counter() - hashed
    settings = {"policy": policy_to_dict(policy), "rank_multiple": opts.rank_multiple, "include": include,
                "exclude": exclude, "svd": opts.svd, "factor": factor, "device": opts.device,
                "calibration": None if batches is None else describe(batches)["sha256"], "max_rank": opts.max_rank}
    state = StreamState(state_dir(out), {"format": STATE_FORMAT, "checkpoint": fingerprint, "settings": settings},
                        opts.restart)
    resumed = sum(state.has(i) for i in range(len(names)))
    return _Run(source, ckpt, companions, batches, skeleton, found, tasks, names, state, resumed, hashed)


def _plan(run: _Run, layers: dict[str, dict[str, Any]], opts: Options, policy) -> Plan:
    """The plan from the layers' spectra, as the in-memory analysis writes it (the same bytes for an exact,
    unbounded, uncalibrated run)."""
    decs = {n: Decomposition(torch.empty(0), info["S"], torch.empty(0), total_energy=info["total"],
                             check=info["check"]) for n, info in layers.items()}
    spectra = [bounded_spectrum(c.name, *c.weight_matrix().shape, decs[c.name].S, decs[c.name].total_energy,
                                opts.max_rank) for c in run.found if c.skip is None]
    ranks = allocate(policy, spectra, opts.rank_multiple)
    # The bound and the SVD method are recorded only when used: an exact unbounded plan has the in-memory bytes.
    extra = {**({"max_rank": opts.max_rank} if opts.max_rank is not None else {}),
             **({"svd": opts.svd} if opts.svd != "exact" else {})}
    plan = Plan(policy={**policy_to_dict(policy), "rank_multiple": opts.rank_multiple, "include": list(opts.include),
                        "exclude": list(opts.exclude), **extra},
                layers=[layer_plan(c, decs.get(c.name), ranks.get(c.name), False) for c in run.found],
                params_total_before=unique_param_count(run.skeleton))
    if run.batches is not None:  # what the in-memory analysis records without sequential refits and probes
        infos = {n: layers[n]["calibration"] for n in run.names}
        plan.method = "whitened-svd"
        plan.calibration = calibration_info(run.batches, infos, sequential=False, refit=0, hold_out=0, scales={},
                                            damping=DAMPING, spatial_layers=())
        if is_decoder(run.skeleton):  # as the in-memory analysis of a decoder records it (analysis.decoder)
            plan.calibration["passes"] = BLOCKWISE_PASSES
        for lp in plan.factored:
            lp.estimated_output_error = output_error(decs[lp.name], infos[lp.name], lp.rank)
    plan.notes += tied_notes(run.found, plan.params_total_before)  # as the in-memory analysis notes them
    if not run.tasks:
        plan.notes.append("no layer of this model can be factored")
    if getattr(policy, "target", None) is not None:
        got = plan.totals()["removed_fraction"]
        if abs(got - policy.target) > 0.01:
            plan.notes.append(f"removed {got:.3f} of the factorizable parameters against the target "
                              f"{policy.target:.3f}: the rank steps of these layers are too coarse")
    return plan


def _second_pass(run: _Run, layers: dict[str, dict[str, Any]], plan: Plan) -> list[tuple[int, LayerTask]]:
    """The tasks factoring, at the plan's ranks, the layers whose factors are not saved yet (by the same SVD
    method the first pass checked)."""
    todo = []
    for i, n in enumerate(run.names):
        if plan.layer(n).rank is None or run.state.has_factors(i):
            continue
        randomized = (layers[n]["check"] or {}).get("method") == "randomized"
        todo.append((i, replace(run.tasks[n], rank=plan.layer(n).rank, method="randomized" if randomized else "exact",
                                svd_rank=layers[n]["check"].get("rank") if randomized else None)))
    return todo


def _summary(run: _Run, layers: dict[str, dict[str, Any]], plan: Plan, blockwise: Blockwise | None, opts: Options,
             mode: str, analysed: float) -> StreamResult:
    """What stream.json records of the analysis (the output step adds its files, bytes and time)."""
    names = run.names
    summary = StreamResult(
        source=str(run.source), output=None, mode=mode, svd=opts.svd,
        workers=1 if blockwise is not None or (opts.ray is None and opts.workers <= 1) else opts.workers,
        ray=opts.ray, shards_in=len(run.ckpt.files), layers=len(names), resumed_layers=run.resumed,
        seconds_per_layer={n: layers[n]["seconds"] for n in names}, analyze_seconds=round(analysed, 3),
        fingerprint_seconds=round(run.fingerprint_seconds, 3),
        checkpoint_bytes=sum(f.stat().st_size for f in run.ckpt.files), peak_rss_analyze_gib=_peak_rss_gib(),
        max_rank=opts.max_rank, svd_checks={n: layers[n]["check"] for n in names}, totals=plan.totals())
    if blockwise is not None:  # calibrated: block by block in this process
        summary.calibration, summary.blocks, summary.seconds_per_block = (plan.calibration, blockwise.count,
                                                                          blockwise.seconds)
    return summary


def _write(out: Path, run: _Run, plan: Plan, summary: StreamResult, opts: Options, mode: str) -> None:
    """The output folder, all or nothing: plan.json, stream.json, the reports and (mode "compress") the
    factored weights with the folder's other files."""
    summary.output = str(out)
    with OutputDir(out, opts.force) as tmp:
        plan.to_json(tmp / "plan.json")
        if mode == "compress":
            t = time.perf_counter()
            factored = {n: i for i, n in enumerate(run.names) if plan.layer(n).rank is not None}
            summary.files = [p.name for p in _write_weights(tmp, run.ckpt, run.tasks, factored, run.state,
                                                               opts.shard_bytes)]
            for f in run.companions:
                shutil.copyfile(f, tmp / f.name)
            architecture = hf_architecture(run.skeleton)
            if architecture is not None:  # a folder compressor.load reads (a bare file's stand-in is not)
                write_meta(tmp, architecture, len(factored), (str(run.source), "hf-folder"))
                mark_hf_config(tmp, factored_table(plan))  # and transformers' from_pretrained
                copy_sentence_transformers(run.source, tmp)
            summary.rewrite_seconds = round(time.perf_counter() - t, 3)
        summary.peak_rss_gib = _peak_rss_gib()
        summary.bytes_written = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        atomic_write_text(tmp / "stream.json", json.dumps(summary.to_dict(), indent=2) + "\n")
        write_report(stream_report(source=run.source, out=out, mode=mode, plan=plan, stream=summary.to_dict(),
                                   timings=summary.timings(), options=opts, folder=tmp), tmp)


def _peak_rss_gib() -> float:
    """This process's peak resident memory so far (the kernel's high-water mark; KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3)


def _check(opts: Options):
    """The policy, and the checks an :class:`Options` cannot make alone: the Ray cluster answers, the device
    exists here."""
    if not opts.policy():
        raise OptionError("exactly one rank policy is needed, got none",
                          "pass one of `energy`, `rank`, `rank_ratio` or `target`")
    policy = policy_from_options(**opts.policy())
    if opts.ray not in (None, "local"):
        probe_ray(opts.ray)
    try:
        torch.empty(0, device=opts.device)
    except (RuntimeError, AssertionError) as err:
        raise CompressorError(f"device {opts.device!r} cannot be used here ({str(err).splitlines()[0][:100]})",
                              "pass device='cpu'", cli_fix="pass --device cpu") from None
    return policy


def _write_weights(folder: Path, ckpt: Checkpoint, tasks: dict[str, LayerTask], factored: dict[str, int],
                   state: StreamState, shard_bytes: int) -> list[Path]:
    """Every tensor of the checkpoint in its order, a factored layer's weight (and bias) replaced by its
    factors, written shard by shard and tensor by tensor: one tensor in memory at a time."""
    replaced = {key: name for name in factored for key in tasks[name].keys.values()}
    writer = ShardWriter(folder, shard_bytes)
    for key, info in ckpt.tensors.items():
        name = replaced.get(key)
        if name is None:
            writer.add(key, info.shape, info.dtype, lambda key=key: ckpt.tensor(key))
        elif key == tasks[name].keys["weight"]:  # the factors take the weight's place
            path = state.factors_path(factored[name])
            for fkey, finfo in Checkpoint.open(path).tensors.items():
                if fkey != "S":
                    writer.add(fkey, finfo.shape, finfo.dtype, lambda path=path, fkey=fkey: _read(path, fkey))
    return writer.close()


def _read(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def _companions(source: Path) -> list[Path]:
    """A Hugging Face folder's small files (config, tokenizer) that go beside the factored weights, checked
    before any work: a link out of the model's folder (its target would be copied into the output) or a
    special file (a FIFO would block the copy forever) is refused."""
    if not source.is_dir():
        return []
    return [file_in_folder(source, f, "model folder file") for f in sorted(source.iterdir())
            if not (f.is_dir() or f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json")]


def _calibration(source: Path, opts: Options) -> list:
    """The calibration batches, read as the in-memory path reads them (text: the folder's tokenizer)."""
    from compressor.data.calibration import load_calibration
    from compressor.formats.load import hf_tokenizer

    tokenizer = hf_tokenizer(source) if source.is_dir() and (source / "config.json").is_file() else None
    return load_calibration(opts.calibration, tokenizer=tokenizer, samples=opts.calibration_samples)

