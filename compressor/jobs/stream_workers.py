"""Where a streamed run's per-layer work runs: in this process, in a process pool, or as Ray tasks; each
result saved as soon as it is back (the layers do not depend on each other)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from compressor.analysis.stream import LayerTask, timed_layer
from compressor.core.errors import CompressorError
from compressor.jobs.options import Options


def run_all(todo: list[tuple[int, LayerTask]], save: Callable[[int, dict], None], opts: Options) -> None:
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


def probe_ray(address: str) -> None:
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

