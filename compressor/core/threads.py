"""How many threads each kind of work uses, and the one way to change torch's setting and put it back.

    with thread_budget(2):          # the user's --threads N: every torch op of the job, SVDs included
        plan = analyze(model, ...)
    with linalg_threads():          # around an SVD / Cholesky / eigh: 1 thread unless the user chose N
        U, S, Vh = torch.linalg.svd(A)

Why weight-only work defaults to one thread: torch's multi-threaded kernels (LAPACK's SVD above all)
spin-wait for their team at every step, so on a machine whose cores other processes hold they can be
an order of magnitude slower than one thread, while on an idle machine one thread costs little here
(benchmarks/threads.py measures `compress analyze` on MiniLM both ways, idle and under a generated
load). So SVDs, Cholesky and eigendecompositions, model loading and the whole analysis without
calibration run on :data:`LINALG_THREADS`; forward passes keep the caller's setting.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

from compressor.core.errors import CompressorError

# Threads of one SVD / Cholesky / eigendecomposition when the user did not choose (see the module doc).
LINALG_THREADS = 1

_chosen: contextvars.ContextVar[int | None] = contextvars.ContextVar("compressor_threads", default=None)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_threads(threads: int | None) -> None:
    """Refuse a thread count that is not a whole number >= 1 (None: the tool chooses)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise CompressorError(f"threads must be a whole number >= 1, got {threads!r}",
                              f"pass e.g. threads=1 (this machine has {available_cores()} cores), or leave it out "
                              "to let the tool choose per operation",
                              cli_fix=f"pass e.g. --threads 1 (this machine has {available_cores()} cores), or "
                                      "leave it out to let the tool choose per operation")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside the block (None: unchanged), then put back
    as the caller had it, also when the block raises."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@contextlib.contextmanager
def thread_budget(threads: int | None) -> Iterator[None]:
    """The user's choice for everything inside the block: torch runs with ``threads`` threads, and
    :func:`linalg_threads` uses them too instead of its own choice. None changes nothing."""
    check_threads(threads)
    token = _chosen.set(threads)
    try:
        with torch_threads(threads):
            yield
    finally:
        _chosen.reset(token)


def linalg_threads() -> contextlib.AbstractContextManager[None]:
    """Around one dense factorization: the user's thread count when a :func:`thread_budget` set one,
    otherwise :data:`LINALG_THREADS`."""
    chosen = _chosen.get()
    return torch_threads(chosen if chosen is not None else LINALG_THREADS)
