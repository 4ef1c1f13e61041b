"""``prunekit train --nproc N``: start N local ranks, each running :func:`prunekit.app.training.train`.

Synchronous data parallelism (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training"): ``W`` ranks hold identical replicas, rank ``r`` computes the gradient
``g_r = ∇ (1/b) Σ_{i∈B_r} ℓ_i`` of its own batch ``B_r`` (``b`` examples, a shard of the epoch,
:func:`prunekit.data.shard_indices`), and :class:`~torch.nn.parallel.DistributedDataParallel`
all-reduces ``g = (1/W) Σ_r g_r`` = the gradient of the mean loss over the global batch
``B = ∪_r B_r`` of ``W × b`` examples. Every rank then takes the same optimizer (and pruner) step, so
the replicas stay identical without ever exchanging weights.

The launcher checks what it can before any rank starts (the rank count, the device, ``--out`` and
the run it holds: a resume with another world size is refused here, not in N tracebacks).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from prunekit.app.ranks import resolve_device, under_torchrun
from prunekit.app.recipe import Recipe
from prunekit.app.run_dir import RunDir
from prunekit.app.training import train
from prunekit.config import ConfigError

__all__ = ["MAX_RANKS_PER_CORE", "launch_train"]

logger = logging.getLogger(__name__)

#: CPU ranks are processes with a model copy each: more than this many per core is a mistake
MAX_RANKS_PER_CORE = 4


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _train_rank(
    rank: int,
    world_size: int,
    recipe: Recipe,
    out: str,
    device: str | None,
    options: dict[str, Any],
    level: int,
) -> dict[str, Any]:
    """One rank of :func:`launch_train` (module level: it is pickled into the spawned process)."""
    del world_size
    os.environ["LOCAL_RANK"] = str(rank)
    logging.basicConfig(
        level=level if rank == 0 else max(level, logging.WARNING),
        format=f"%(levelname)s rank {rank} %(name)s: %(message)s",
    )
    progress = options.pop("progress") and rank == 0
    return train(recipe, out, device=device, progress=progress, **options)


def launch_train(
    recipe: Recipe,
    out: str | Path,
    nproc: int,
    *,
    device: str | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    level: int = logging.WARNING,
) -> dict[str, Any]:
    """Run ``recipe`` on ``nproc`` local ranks, return rank 0's metrics.

    Each rank uses ``max(1, cores // nproc)`` threads; ``gloo`` on CPU, ``nccl`` with one GPU per
    rank when ``device`` is CUDA (or unset on a machine with GPUs). ``nproc == 1`` trains in this
    process.

    Raises:
        ConfigError: ``nproc`` below 1 or above what the machine can run (one GPU per rank, or
            ``MAX_RANKS_PER_CORE`` ranks per core), a launch from inside ``torchrun``, a bad device
            or ``out``, a resume with another rank count (all checked before any rank starts).
        prunekit.distributed.WorkerError: a rank failed (its traceback in the message).
    """
    from prunekit.distributed import run_workers

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (number of local ranks), got {nproc}")
    if under_torchrun() or (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "--nproc starts its own ranks; under torchrun (or in a process group) leave it out"
        )
    options = {"resume": resume, "overwrite": overwrite, "progress": progress}
    if nproc == 1:
        return train(
            recipe, out, device=device, resume=resume, overwrite=overwrite, progress=progress
        )
    dev = resolve_device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ConfigError(
            f"--nproc {nproc} on CUDA needs one GPU per rank (nccl) but "
            f"{torch.cuda.device_count()} are visible; use --nproc <= {torch.cuda.device_count()} "
            "or --device cpu"
        )
    cores = _cores()
    if backend == "gloo" and nproc > MAX_RANKS_PER_CORE * cores:
        raise ConfigError(
            f"--nproc {nproc} on {cores} CPU core(s): each rank is a process with its own model "
            f"copy; use at most {MAX_RANKS_PER_CORE * cores} ({MAX_RANKS_PER_CORE} per core)"
        )
    run = RunDir(out, "train")
    run.check_writable()
    if not overwrite:
        run.refuse_other_world_size(nproc)
    threads = max(1, cores // nproc)
    logger.info("launching %d ranks (%s, %d threads each)", nproc, backend, threads)
    try:
        results = run_workers(
            _train_rank,
            nproc,
            recipe,
            str(out),
            None if device is None else str(dev.type),
            options,
            level,
            backend=backend,
            threads=threads,
            timeout=24 * 3600.0,
        )
    except BaseException:
        run.recover()  # what a rank killed before its cleanup had set aside
        run.abandon()  # the directory this launcher created, if the ranks left it empty
        raise
    return dict(results[0])
