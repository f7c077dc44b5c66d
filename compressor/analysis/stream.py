"""The work on one layer of a streamed checkpoint, self-contained so it can run anywhere: in this
process, in a local process pool, or as a Ray task on another machine (which must see the same files).

A :class:`LayerTask` names the layer's tensors in the checkpoint, carries the layer's module from a
weightless skeleton (meta tensors) and its handler, and says what to compute. :func:`run_layer` reads
only that layer's tensors (memory-mapped), computes its spectrum in float32 with one thread (so the
result does not depend on where or beside what it ran), and, when its rank follows from its own
spectrum, its factors in the checkpoint's dtype.
"""

from __future__ import annotations

import contextlib
import copy
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.handlers import LayerHandler
from compressor.core.policies import LayerSpectrum, Policy, across_layers, allocate, spectral
from compressor.core.svd import Decomposition, leading_svd, max_saving_rank, svd

SVD_METHODS = ("exact", "randomized")
FIRST_ENERGY_RANK = 64  # randomized SVD under --energy: the first rank tried, doubled until reached


@dataclass(frozen=True)
class LayerTask:
    """One layer to analyse (and factor when ``factor``); ``keys`` maps the module's own parameter names
    (``weight``, ``bias``) to checkpoint names, ``files`` those to the shard holding them."""

    name: str
    module: nn.Module  # from the meta skeleton: structure only
    handler: LayerHandler
    keys: dict[str, str]
    files: dict[str, str]
    policy: Policy
    rank_multiple: int = 1
    method: str = "exact"
    factor: bool = True
    rank: int | None = None  # factor at this rank (a second pass, when the policy is global)
    svd_rank: int | None = None  # randomized: the rank of the analysis' SVD, so factors match its spectrum
    device: str = "cpu"  # where the SVD runs ("cuda" on a GPU machine); results are stored on the CPU
    max_rank: int | None = None  # no rank above this: the randomized SVD then needs only this many triplets


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block: per-layer results then do not depend on how many run at
    once, and parallel workers do not fight over cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_layer(task: LayerTask) -> nn.Module:
    """The task's module with its real tensors, read from the checkpoint through memory maps."""
    from safetensors import safe_open

    module = copy.deepcopy(task.module).to_empty(device="cpu")  # the skeleton's own module stays weightless
    with torch.no_grad():
        for pname, key in task.keys.items():
            with safe_open(task.files[key], framework="pt") as f:
                t = f.get_tensor(key)
            holder, _, leaf = pname.rpartition(".")
            target = module.get_submodule(holder) if holder else module
            setattr(target, leaf, nn.Parameter(t, requires_grad=False))
    return module


def run_layer(task: LayerTask) -> dict[str, Any]:
    """``{"S", "total", "check", "factors"}`` for one layer: singular values (all, or the leading ones
    with ``total`` = ``||W||_F**2``), how they were found, and the factored module's tensors keyed by
    checkpoint name (None when not factored here)."""
    with one_thread(), torch.no_grad():
        module = load_layer(task)
        matrix = task.handler.weight_matrix(module)
        if not torch.isfinite(matrix).all():
            raise CompressorError(f"layer '{task.name}' has NaN or Inf values in its weight",
                                  f"repair the weights, or leave the layer out with exclude=['{task.name}']",
                                  cli_fix=f"repair the weights, or leave the layer out with --exclude '{task.name}'")
        dec = _decompose(task, matrix.to(task.device))
        dec = Decomposition(*(t.cpu() for t in (dec.U, dec.S, dec.Vh)), total_energy=dec.total_energy,
                            check=dec.check)
        m, n = matrix.shape
        spectrum = bounded_spectrum(task.name, m, n, dec.S, dec.total_energy, task.max_rank)
        rank = task.rank
        if rank is None and task.factor and not across_layers(task.policy):
            rank = allocate(task.policy, [spectrum], task.rank_multiple)[task.name]
        factors = None
        if rank is not None and rank <= max_saving_rank(m, n):
            new = task.handler.factor(module, rank, dec)
            prefix = task.keys["weight"].rpartition(".")[0]
            factors = {f"{prefix}.{k}": v.contiguous() for k, v in new.state_dict().items()}
        return {"S": dec.S.contiguous(), "total": dec.total_energy, "check": dec.check, "factors": factors}


def bounded_spectrum(name: str, m: int, n: int, S: torch.Tensor, total: float | None,
                     max_rank: int | None) -> LayerSpectrum:
    """The layer's spectrum as the allocators see it: cut at ``max_rank`` (the tail's energy then comes
    from the total, ``||W||_F**2``), so that no policy gives it a larger rank, whichever SVD found ``S``."""
    if max_rank is not None and max_rank < len(S):
        total = float(S.double().square().sum()) if total is None else total
        S = S[:max_rank]
    return LayerSpectrum.from_singular_values(name, m, n, S, total)


def timed_layer(task: LayerTask) -> dict[str, Any]:
    """:func:`run_layer` and its wall time in ``seconds``."""
    start = time.perf_counter()
    result = run_layer(task)
    return {**result, "seconds": round(time.perf_counter() - start, 3)}


def _decompose(task: LayerTask, matrix: torch.Tensor) -> Decomposition:
    if task.method == "exact":
        return svd(matrix)
    seed = zlib.crc32(task.name.encode())  # the same draw on every machine and every run
    full = min(matrix.shape)
    if task.svd_rank is not None:
        return leading_svd(matrix, task.svd_rank, seed=seed)
    m, n = matrix.shape
    bound = full if task.max_rank is None else min(task.max_rank, full)
    if across_layers(task.policy):  # the job refuses it without a bound (jobs.stream)
        return leading_svd(matrix, bound, seed=seed)  # the global allocation chooses among ranks <= bound
    if not spectral(task.policy):  # rank policies: known up front
        probe = LayerSpectrum(task.name, m, n, torch.ones(full), torch.zeros(full + 1))
        want = allocate(task.policy, [probe], task.rank_multiple)[task.name]
        return leading_svd(matrix, min(want, bound), seed=seed)
    # Energy: the total is ||W||_F**2 (no SVD); grow the rank until the leading values hold the energy.
    k = min(FIRST_ENERGY_RANK, bound)
    while True:
        dec = leading_svd(matrix, k, seed=seed)
        if dec.total_energy is None:  # the exact SVD was taken: every value is there
            return dec
        kept = float(dec.S.double().square().sum()) / dec.total_energy if dec.total_energy > 0 else 1.0
        if kept >= task.policy.energy or k >= bound:
            return dec
        k = min(2 * k, bound)
