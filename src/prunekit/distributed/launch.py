"""Start a process group of local workers: the test and benchmark launcher.

:func:`run_workers` spawns ``world_size`` processes on this machine, joins them into one
``torch.distributed`` process group over TCP on 127.0.0.1 (``gloo`` by default, ``nccl`` when each
rank has a GPU), runs ``fn(rank, world_size, *args)`` in each and returns the results in rank
order. Every rank sets ``torch.set_num_threads(threads)`` first: two torch processes that each use
all cores slow each other down many times over. A failing rank's traceback is raised in the parent
as :class:`WorkerError`; no rank is left running.

``fn`` and its arguments must be picklable (a module-level function), as for any spawned process;
its result travels back through ``torch.save`` (tensors, state dicts and plain data all do).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dumps(obj: Any) -> bytes:
    # plain bytes, not a pickled tensor: a queue passes tensors as shared memory owned by the
    # sending process, which is gone once the rank exits
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    threads: int,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, _dumps(out)))
    except BaseException:  # reported to the parent with its traceback
        results.put((rank, False, traceback.format_exc()))


def run_workers(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    threads: int = 1,
    timeout: float = 300.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local ranks; return the results.

    Args:
        fn: a picklable (module-level) function; it runs inside an initialised process group.
        world_size: number of ranks (processes), at least 1.
        *args: further picklable arguments for ``fn``.
        backend: ``gloo`` (CPU) or ``nccl`` (one GPU per rank).
        threads: ``torch.set_num_threads`` in every rank.
        timeout: seconds a collective may wait, and the limit for each rank's result.

    Raises:
        WorkerError: a rank raised, or a rank did not report within ``timeout``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, backend, threads, timeout, fn, args, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            try:
                rank, ok, out = results.get(timeout=timeout)
            except queue.Empty:
                raise WorkerError(
                    f"no result from ranks {sorted(set(range(world_size)) - set(outs))} "
                    f"within {timeout:.0f} s"
                ) from None
            if not ok:
                raise WorkerError(f"rank {rank} failed:\n{out}")
            outs[rank] = _loads(out)
    finally:
        for p in procs:
            p.join(timeout=5 if len(outs) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [outs[r] for r in range(world_size)]
