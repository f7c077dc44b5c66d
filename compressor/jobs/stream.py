"""Checkpoints bigger than memory: analysis and rewrite streamed tensor by tensor, resumable, parallel.

    summary = compressor.jobs.stream.stream_compress("llama-folder", "out", mode="compress", rank=256)

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
import multiprocessing
import os
import resource
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from compressor.analysis.analyze import check_patterns, find_layers, layer_plan, tied_notes, unique_param_count
from compressor.analysis.calibration import DAMPING, calibration_info, output_error
from compressor.analysis.decoder import BLOCKWISE_PASSES, is_decoder
from compressor.analysis.stream import LayerTask, bounded_spectrum, timed_layer
from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write_text, file_in_folder, signals_deferred
from compressor.core.output import OutputDir, check_not_over_inputs
from compressor.core.plan import Plan
from compressor.core.policies import LayerSpectrum, across_layers, allocate, policy_from_options, policy_to_dict
from compressor.core.rewrite import factored_table
from compressor.core.statefile import SEAL_SUFFIX, is_sealed, load_json, read_sealed, write_sealed
from compressor.core.svd import Decomposition, check_svd_fits, max_saving_rank
from compressor.data.calibration import describe
from compressor.formats.dropin import copy_sentence_transformers, mark_hf_config
from compressor.formats.load import detect_format
from compressor.formats.save import hf_architecture, write_meta
from compressor.formats.shards import Checkpoint, ShardWriter
from compressor.jobs.compress import default_out
from compressor.jobs.loading import weights_only_model
from compressor.jobs.options import OptionError, Options, options_from
from compressor.report.report import stream_report, write_report

STATE_FORMAT = 2  # 2: every state file sealed (sha256 beside it)


def state_dir(out: Path) -> Path:
    """Where an unfinished run keeps its finished layers: ``.OUT.stream/`` beside the output folder."""
    out = Path(out)
    return out.parent / f".{out.name}.stream"


def stream_compress(source: str | Path, out: str | Path | None = None, *, mode: str = "analyze",
                    options: Options | None = None, **kwargs: Any) -> dict[str, Any]:
    """Analyse (``mode="analyze"``) or analyse and factor (``"compress"``) the checkpoint at ``source``
    without loading it whole; returns the summary also written to ``stream.json``.

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
        raise ValueError("mode must be 'analyze' or 'compress'")
    policy = _check(opts)
    check_not_over_inputs(out, [("model", source), ("calibration file", opts.calibration)])
    OutputDir(out, opts.force).check()
    clock = time.perf_counter()
    if source.is_file() and detect_format(source) == "gguf":  # its tensors are quantized blocks, not safetensors
        raise CompressorError(f"'{source}' is a GGUF file, and a streamed run reads safetensors checkpoints tensor "
                              "by tensor", "use compressor.compress: the GGUF is dequantized in memory",
                              cli_fix="run without --stream: the GGUF is dequantized in memory")
    ckpt = Checkpoint.open(source)
    companions = _companions(source) if mode == "compress" else []
    batches = _calibration(source, opts) if opts.calibration is not None else None
    include, exclude = list(opts.include), list(opts.exclude)
    factor = mode == "compress"
    skeleton = _skeleton(source, ckpt, calibrated=batches is not None)
    found = find_layers(skeleton, include, exclude)
    check_patterns(include, exclude, [c.name for c in found])
    keymap = _keymap(skeleton, ckpt, [c.name for c in found if c.skip is None])
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
    state = _State(state_dir(out), {"format": STATE_FORMAT, "checkpoint": fingerprint, "settings": settings},
                   opts.restart)
    resumed = sum(state.has(i) for i in range(len(names)))
    blockwise = None
    if batches is not None:  # block by block through the model, in this process
        blockwise = _Blockwise(skeleton, ckpt, tasks, names, batches, state, policy, opts.rank_multiple)
        blockwise.run()
    else:
        _run_all([(i, tasks[n]) for i, n in enumerate(names) if not state.has(i)], state.save_layer, opts)
    layers = {n: state.layer(i) for i, n in enumerate(names)}

    decs = {n: Decomposition(torch.empty(0), info["S"], torch.empty(0), total_energy=info["total"],
                             check=info["check"]) for n, info in layers.items()}
    spectra = [bounded_spectrum(c.name, *c.weight_matrix().shape, decs[c.name].S, decs[c.name].total_energy,
                                opts.max_rank) for c in found if c.skip is None]
    ranks = allocate(policy, spectra, opts.rank_multiple)
    # The bound and the SVD method are recorded only when used: an exact unbounded plan has the in-memory bytes.
    extra = {**({"max_rank": opts.max_rank} if opts.max_rank is not None else {}),
             **({"svd": opts.svd} if opts.svd != "exact" else {})}
    plan = Plan(policy={**policy_to_dict(policy), "rank_multiple": opts.rank_multiple, "include": include,
                        "exclude": exclude, **extra},
                layers=[layer_plan(c, decs.get(c.name), ranks.get(c.name), False) for c in found],
                params_total_before=unique_param_count(skeleton))
    if batches is not None:  # what the in-memory analysis records without sequential refits and probes
        infos = {n: layers[n]["calibration"] for n in names}
        plan.method = "whitened-svd"
        plan.calibration = calibration_info(batches, infos, sequential=False, refit=0, hold_out=0, scales={},
                                            damping=DAMPING, spatial_layers=())
        if is_decoder(skeleton):  # as the in-memory analysis of a decoder records it (analysis.decoder)
            plan.calibration["passes"] = BLOCKWISE_PASSES
        for lp in plan.factored:
            lp.estimated_output_error = output_error(decs[lp.name], infos[lp.name], lp.rank)
    plan.notes += tied_notes(found, plan.params_total_before)  # as the in-memory analysis notes them
    if not tasks:
        plan.notes.append("no layer of this model can be factored")
    if getattr(policy, "target", None) is not None:
        got = plan.totals()["removed_fraction"]
        if abs(got - policy.target) > 0.01:
            plan.notes.append(f"removed {got:.3f} of the factorizable parameters against the target "
                              f"{policy.target:.3f}: the rank steps of these layers are too coarse")
    if factor and blockwise is not None:  # a target: the ranks are known only now; a second pass factors
        blockwise.run({n: plan.layer(n).rank for n in names})
    elif factor:  # a global policy (target) knows the ranks only now: factor those layers in a second pass
        second = [(i, replace(tasks[n], rank=plan.layer(n).rank,
                              svd_rank=(layers[n]["check"] or {}).get("rank")
                              if (layers[n]["check"] or {}).get("method") == "randomized" else None,
                              method="randomized" if (layers[n]["check"] or {}).get("method") == "randomized"
                              else "exact"))
                  for i, n in enumerate(names)
                  if plan.layer(n).rank is not None and not state.has_factors(i)]
        _run_all(second, state.save_factors, opts)
    analysed = time.perf_counter() - clock

    summary = {"source": str(source), "output": str(out), "mode": mode, "svd": opts.svd,
               "workers": 1 if opts.ray is None and opts.workers <= 1 else opts.workers,
               "ray": opts.ray, "shards_in": len(ckpt.files), "layers": len(names), "resumed_layers": resumed,
               "seconds_per_layer": {n: layers[n]["seconds"] for n in names}, "analyze_seconds": round(analysed, 3),
               "fingerprint_seconds": round(hashed, 3), "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.files),
               "peak_rss_analyze_gib": _peak_rss_gib(), "max_rank": opts.max_rank,
               "svd_checks": {n: layers[n]["check"] for n in names}, "totals": plan.totals()}
    if blockwise is not None:
        summary.update(workers=1, calibration=plan.calibration, blocks=blockwise.count,
                       seconds_per_block=blockwise.seconds)
    with OutputDir(out, opts.force) as tmp:
        plan.to_json(tmp / "plan.json")
        if factor:
            t = time.perf_counter()
            factored = {n: i for i, n in enumerate(names) if plan.layer(n).rank is not None}
            summary["files"] = [p.name for p in _write_weights(tmp, ckpt, tasks, factored, state, opts.shard_bytes)]
            for f in companions:
                shutil.copyfile(f, tmp / f.name)
            architecture = hf_architecture(skeleton)
            if architecture is not None:  # a folder compressor.load reads (a bare file's stand-in is not)
                write_meta(tmp, architecture, len(factored), (str(source), "hf-folder"))
                mark_hf_config(tmp, factored_table(plan))  # and transformers' from_pretrained
                copy_sentence_transformers(source, tmp)
            summary["rewrite_seconds"] = round(time.perf_counter() - t, 3)
        summary["peak_rss_gib"] = _peak_rss_gib()
        summary["bytes_written"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        atomic_write_text(tmp / "stream.json", json.dumps(summary, indent=2) + "\n")
        timings = {k: summary[f"{k}_seconds"] for k in ("fingerprint", "analyze", "rewrite")
                   if f"{k}_seconds" in summary}
        write_report(stream_report(source=source, out=out, mode=mode, plan=plan, stream=summary, timings=timings,
                                   options=opts, folder=tmp), tmp)
    state.remove()
    return summary


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
        _probe_ray(opts.ray)
    try:
        torch.empty(0, device=opts.device)
    except (RuntimeError, AssertionError) as err:
        raise CompressorError(f"device {opts.device!r} cannot be used here ({str(err).splitlines()[0][:100]})",
                              "pass device='cpu'", cli_fix="pass --device cpu") from None
    return policy


def _skeleton(source: Path, ckpt: Checkpoint, calibrated: bool = False) -> torch.nn.Module:
    """The module tree, without weights: from config.json for a Hugging Face folder, else the stand-in
    a bare state_dict gets (every 2-D ``X.weight`` a Linear, 3-5-D a conv). ``calibrated``: a decoder
    that can run block by block (real buffers, float32 parameters, on the meta device until read)."""
    if source.is_dir() and (source / "config.json").is_file():
        from compressor.formats.load import hf_config, hf_skeleton

        if calibrated:
            archs = hf_config(source).get("architectures") or []
            if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
                raise CompressorError(f"a streamed run with calibration data runs a Hugging Face decoder block by "
                                      f"block, but '{source}' holds {', '.join(archs) or 'no named architecture'}",
                                      "analyse it in memory (leave out --stream), or leave out --calibration")
            return hf_skeleton(source, buffers=True).float()
        return hf_skeleton(source)
    if calibrated:
        raise CompressorError(f"a streamed run with calibration data runs the model block by block, but '{source}' "
                              "has no config.json describing the model",
                              "pass the Hugging Face folder it came from, or leave out --calibration")
    return weights_only_model({n: torch.empty(t.shape, dtype=t.dtype, device="meta")
                               for n, t in ckpt.tensors.items()})


def _keymap(skeleton: torch.nn.Module, ckpt: Checkpoint, layers: list[str]) -> dict[str, str]:
    """Skeleton parameter name -> checkpoint name for the layers' parameters. Hugging Face checkpoints of a
    task model may store the base model's weights with or without its prefix (``bert.``, ``model.``)."""
    return {name: _key(skeleton, ckpt, name) for layer in layers
            for name in (f"{layer}.{p}" for p, _ in skeleton.get_submodule(layer).named_parameters())}


def _key(skeleton: torch.nn.Module, ckpt: Checkpoint, name: str) -> str:
    """The checkpoint name of the skeleton parameter ``name``, its shape checked."""
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    tries = [name, f"{prefix}.{name}"] + ([name[len(prefix) + 1:]] if prefix and name.startswith(f"{prefix}.") else [])
    key = next((k for k in tries if k in ckpt.tensors), None)
    if key is None:
        raise CompressorError(f"the checkpoint has no tensor '{name}', which its config.json describes",
                              "repair or re-download the model folder")
    want = tuple(skeleton.get_parameter(name).shape)
    if ckpt.tensors[key].shape != want:
        raise CompressorError(f"tensor '{key}' has shape {list(ckpt.tensors[key].shape)}, but the config "
                              f"describes {list(want)}", "repair or re-download the model folder")
    return key


class _State:
    """The finished layers of a run, one durable file each, under a fingerprint of inputs and settings.

    Every file is sealed (:mod:`compressor.core.statefile`): its sha256 is checked before it is used, so a
    file changed since it was written (by anything, or by bit rot) stops the run in one line instead of
    giving other factors with exit 0; a file whose seal is missing was cut off by a crash and is redone.
    """

    def __init__(self, folder: Path, fingerprint: dict[str, Any], restart: bool):
        self.folder = folder
        self.fingerprint = fingerprint
        if restart and (folder.exists() or folder.is_symlink()):
            self.remove()
        old = self._read_json(self.folder / "fingerprint.json", "fingerprint")
        if old is None and folder.is_dir() and _has_results(folder):
            raise self._damaged(f"the unfinished run in '{folder}' has no intact fingerprint.json")
        if old is not None and old != fingerprint:
            what = [k for k in ("checkpoint", "settings", "format") if old.get(k) != fingerprint.get(k)]
            changed = ", ".join("the model files" if k == "checkpoint" else k for k in what)
            raise CompressorError(f"the unfinished run in '{folder}' was started with other inputs ({changed} "
                                  "changed)", "rerun the same command to continue it, or pass restart=True to "
                                  "start over", cli_fix="rerun the same command to continue it, or pass "
                                  "--restart to start over")
        for path in sorted((*folder.glob("layers/*.safetensors"), *folder.glob("carry.*.pt"))):
            self._read(path, "state file")  # every seal checked before any work: a damaged state changes nothing

    @staticmethod
    def _damaged(problem: str) -> CompressorError:
        return CompressorError(problem, "pass restart=True to start over", cli_fix="rerun with --restart")

    def _read(self, path: Path, what: str) -> bytes | None:
        """A state file's bytes once its seal matches; None when it was never finished."""
        return read_sealed(path, f"the streamed run's {what}", "pass restart=True to start over",
                           cli_fix="rerun with --restart")

    def _read_json(self, path: Path, what: str) -> dict[str, Any] | None:
        data = self._read(path, what)
        if data is None:
            return None
        return load_json(data, f"the streamed run's {what} '{path}'", "pass restart=True to start over",
                         cli_fix="rerun with --restart")

    def _begin(self) -> None:
        """Create the folder and its fingerprint with the first finished layer: a run refused before any
        work leaves nothing behind. The fingerprint is sealed before any layer is written."""
        if not is_sealed(self.folder / "fingerprint.json"):
            self.folder.mkdir(parents=True, exist_ok=True)
            write_sealed(self.folder / "fingerprint.json", (json.dumps(self.fingerprint, indent=2) + "\n").encode())
        (self.folder / "layers").mkdir(exist_ok=True)

    def _path(self, i: int, kind: str = "layer") -> Path:
        return self.folder / "layers" / f"{i:05d}.{kind}.safetensors"

    def has(self, i: int) -> bool:
        return is_sealed(self._path(i))

    def has_factors(self, i: int) -> bool:
        return is_sealed(self._path(i, "factors")) or self.factors_in_layer(i)

    def factors_in_layer(self, i: int) -> bool:
        return self.has(i) and self.layer(i)["factored"]

    def save_layer(self, i: int, result: dict[str, Any]) -> None:
        from safetensors.torch import save

        self._begin()
        factors = result["factors"] or {}
        info = {"total": result["total"], "check": result["check"], "seconds": result["seconds"],
                "factored": bool(factors)}
        if "calibration" in result:  # the whitening's summary (calibrated runs)
            info["calibration"] = result["calibration"]
        write_sealed(self._path(i), save({"S": result["S"], **factors}, metadata={"info": json.dumps(info)}))

    def save_factors(self, i: int, result: dict[str, Any]) -> None:
        from safetensors.torch import save

        self._begin()
        write_sealed(self._path(i, "factors"), save(result["factors"]))

    def _tensors(self, path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and header metadata of a sealed safetensors state file (read once, then parsed)."""
        from safetensors.torch import load

        data = self._read(path, what)
        if data is None:
            raise self._damaged(f"the streamed run's {what} '{path}' is missing")
        try:
            header = load_json(data[8:8 + int.from_bytes(data[:8], "little")], "header", "")
            return load(data), header.get("__metadata__") or {}
        except Exception:  # sealed but not safetensors: not what this version writes
            raise self._damaged(f"the streamed run's {what} '{path}' is not a safetensors file") from None

    def layer(self, i: int) -> dict[str, Any]:
        """Layer ``i``'s spectrum and what was recorded with it, verified."""
        path = self._path(i)
        tensors, meta = self._tensors(path, "layer result")
        info = load_json(meta.get("info", ""), f"the streamed run's layer result '{path}'",
                         "pass restart=True to start over", cli_fix="rerun with --restart")
        s = tensors.get("S")
        if s is None or s.dim() != 1 or not isinstance(info.get("factored"), bool) or \
                not all(isinstance(info.get(k), dict | None) for k in ("check", "calibration")):
            raise self._damaged(f"the streamed run's layer result '{path}' is not what this version writes")
        return {**info, "S": s}

    def factors_path(self, i: int) -> Path:
        """The file holding layer ``i``'s factors (its own, or the layer's file: factored in one pass),
        verified against its seal just before the output is written from it."""
        path = self._path(i, "factors") if is_sealed(self._path(i, "factors")) else self._path(i)
        self._tensors(path, "factors")
        return path

    def save_carry(self, tag: str, block: int, outputs: list[Any]) -> None:
        """Block ``block - 1``'s outputs per calibration batch: where a calibrated pass continues."""
        import io

        self._begin()
        buf = io.BytesIO()
        torch.save({"block": block, "outputs": outputs}, buf)
        write_sealed(self.folder / f"carry.{tag}.pt", buf.getvalue())

    def carry(self, tag: str) -> tuple[int, list[Any] | None]:
        """``(next block, outputs of the block before it)`` of a calibrated pass; ``(0, None)`` at its start."""
        import io

        path = self.folder / f"carry.{tag}.pt"
        data = self._read(path, "block outputs")
        if data is None:
            return 0, None
        try:
            saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            block, outputs = saved["block"], saved["outputs"]
        except Exception:  # sealed, yet not what save_carry writes
            raise self._damaged(f"the streamed run's block outputs '{path}' are not what this version writes") \
                from None
        if isinstance(block, bool) or not isinstance(block, int) or block < 0 or not isinstance(outputs, list):
            raise self._damaged(f"the streamed run's block outputs '{path}' are not what this version writes")
        return block, outputs

    def remove(self) -> None:
        with signals_deferred():
            if self.folder.is_symlink():
                self.folder.unlink()
            else:
                shutil.rmtree(self.folder, ignore_errors=True)


def _has_results(folder: Path) -> bool:
    """Whether a run's state folder holds a sealed result (a layer, factors or block outputs)."""
    return any(p.name.endswith(SEAL_SUFFIX) for p in (*folder.glob("layers/*"), *folder.glob("carry.*")))


def _run_all(todo: list[tuple[int, LayerTask]], save: Callable[[int, dict], None], opts: Options) -> None:
    """Run the tasks here, in a process pool or on Ray, saving each result as soon as it is back (in
    whatever order they finish: each layer's result does not depend on the others)."""
    if not todo:
        return
    if opts.ray is not None:
        _run_ray(todo, save, opts.ray, opts.workers)
    elif opts.workers <= 1:
        for i, task in todo:
            save(i, timed_layer(task))
    else:
        # spawn: a forked child would inherit torch's thread pools and locks mid-use.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(opts.workers, mp_context=ctx) as pool:
            queue, running = list(todo), {}
            while queue or running:
                while queue and len(running) < 2 * opts.workers:  # bounded: a few layers in flight at most
                    i, task = queue.pop(0)
                    running[pool.submit(timed_layer, task)] = i
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    save(running.pop(fut), fut.result())


RAY_CONNECT_SECONDS = 10


def _probe_ray(address: str) -> None:
    """Refuse a Ray address that does not answer within :data:`RAY_CONNECT_SECONDS` (a TCP connect to its
    host and port), before any work: ``ray.init`` itself retries for minutes, then raises a traceback."""
    import socket

    fix = "start the cluster (ray start --head) and pass its address, or pass --ray alone for a local Ray"
    if address == "auto":  # Ray finds the address of a cluster started on this machine itself
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CompressorError(f"Ray address {address!r} is not HOST:PORT", fix)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_SECONDS).close()
    except OSError as err:
        raise CompressorError(f"Ray at {address} does not answer ({err.strerror or type(err).__name__} within "
                              f"{RAY_CONNECT_SECONDS} s)", fix) from None


def _run_ray(todo: list[tuple[int, LayerTask]], save: Callable[[int, dict], None], address: str,
             workers: int) -> None:
    try:
        import ray
    except ImportError:
        raise CompressorError("--ray needs Ray", "pip install 'compressor[ray]'") from None
    started = not ray.is_initialized()
    if started:
        # Workers import compressor from where this process does (a checkout need not be installed there).
        root = str(Path(__file__).resolve().parents[2])
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}}
        if address == "local":
            ray.init(num_cpus=max(workers, 1), include_dashboard=False, runtime_env=env, log_to_driver=False,
                     configure_logging=False, _node_ip_address="127.0.0.1")
        else:
            try:
                ray.init(address=address, runtime_env=env, log_to_driver=False, configure_logging=False)
            except (ConnectionError, TimeoutError, RuntimeError) as err:  # it answered, but is not a Ray head
                raise CompressorError(f"cannot join the Ray cluster at {address} ({str(err).splitlines()[0][:120]})",
                                      "pass the address `ray start --head` printed") from None
    try:
        remote = ray.remote(num_cpus=1, max_retries=2)(timed_layer)
        queue, running = list(todo), {}
        limit = 2 * max(workers, int(ray.cluster_resources().get("CPU", 1)))
        while queue or running:
            while queue and len(running) < limit:
                i, task = queue.pop(0)
                running[remote.remote(task)] = i
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                save(running.pop(ref), ray.get(ref))
    finally:
        if started:
            ray.shutdown()


def _write_weights(folder: Path, ckpt: Checkpoint, tasks: dict[str, LayerTask], factored: dict[str, int],
                   state: _State, shard_bytes: int) -> list[Path]:
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


class _Blockwise:
    """Calibrated streamed passes (:class:`compressor.analysis.blocks.BlockCalibration`): per block, its
    layers' whitened spectra (and factors where the rank follows from the layer's own spectrum) saved
    durably, then the block's outputs, so that a killed pass continues at the first unfinished block."""

    def __init__(self, skeleton: torch.nn.Module, ckpt: Checkpoint, tasks: dict[str, LayerTask], names: list[str],
                 batches: list, state: _State, policy, rank_multiple: int) -> None:
        self.skeleton, self.ckpt, self.tasks, self.names, self.batches = skeleton, ckpt, tasks, names, batches
        self.state, self.policy, self.rank_multiple = state, policy, rank_multiple
        self.index = {n: i for i, n in enumerate(names)}
        self.count = 0
        self.seconds: dict[str, float] = {}

    def run(self, ranks: dict[str, int | None] | None = None) -> None:
        """The first pass (``ranks`` None: spectra, and factors unless the policy is a target), or the second
        (factors at ``ranks``)."""
        from compressor.analysis.blocks import BlockCalibration

        if ranks is None:
            wanted = [n for n in self.names if not self.state.has(self.index[n])]
        else:
            wanted = [n for n in self.names if ranks[n] is not None and not self.state.has_factors(self.index[n])]
        if not wanted:
            return
        keys = {n: _key(self.skeleton, self.ckpt, n) for n, _ in self.skeleton.named_parameters()}
        cal = BlockCalibration(self.skeleton, lambda n: self.ckpt.tensor(keys[n]), self.batches,
                               {n: self.tasks[n].module for n in self.names})
        self.count = len(cal.blocks)
        tag = "analyze" if ranks is None else "factor"
        pending = {i: [n for n in cal.layers[i] if n in wanted] for i in range(self.count)}
        outer = [n for n in cal.outer if n in wanted]
        last = self.count if outer else max((i + 1 for i, todo in pending.items() if todo), default=0)
        start, carried = self.state.carry(tag)
        for i in range(start, last):
            t = time.perf_counter()
            with cal.loaded(i):
                moments, outputs = cal.block(i, carried, pending[i])
                for n in pending[i]:
                    self._layer(n, moments.pop(n), ranks)  # each layer's statistics freed once used
            carried = outputs
            self.state.save_carry(tag, i + 1, carried)
            self.seconds[f"{tag} {i}"] = round(time.perf_counter() - t, 3)
        if outer:
            t = time.perf_counter()
            moments = cal.outside(carried, outer)
            for n in outer:
                self._layer(n, moments.pop(n), ranks)
            self.seconds[f"{tag} outside the blocks"] = round(time.perf_counter() - t, 3)

    def _layer(self, name: str, moments, ranks: dict[str, int | None] | None) -> None:
        from compressor.analysis.calibration import decompose

        task = self.tasks[name]
        t = time.perf_counter()
        dec, info = decompose(task.module, moments, overwrite=True)  # its moments are not used again
        m, n = task.handler.weight_matrix(task.module).shape
        rank = ranks[name] if ranks is not None else None
        if ranks is None and not across_layers(self.policy):
            spectrum = LayerSpectrum.from_singular_values(name, m, n, dec.S)
            rank = allocate(self.policy, [spectrum], self.rank_multiple)[name]
        factors = None
        if rank is not None and rank <= max_saving_rank(m, n):
            new = task.handler.factor(task.module, rank, dec)  # float32, written in the checkpoint's dtype
            dtype = self.ckpt.tensors[task.keys["weight"]].dtype
            prefix = task.keys["weight"].rpartition(".")[0]
            factors = {f"{prefix}.{k}": v.to(dtype).contiguous() for k, v in new.state_dict().items()}
        i = self.index[name]
        if ranks is not None:
            self.state.save_factors(i, {"factors": factors})
        else:
            self.state.save_layer(i, {"S": dec.S.contiguous(), "total": None, "check": None, "factors": factors,
                                      "seconds": round(time.perf_counter() - t, 3), "calibration": info})
