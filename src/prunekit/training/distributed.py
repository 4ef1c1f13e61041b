"""Data-parallel ``prunekit train``: the process group, the model wrapper and gathered metrics.

Synchronous data parallelism (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training"): ``W`` ranks hold identical replicas, rank ``r`` computes the gradient
``g_r = ∇ (1/b) Σ_{i∈B_r} ℓ_i`` of its own batch ``B_r`` (``b`` examples, a shard of the epoch,
:func:`prunekit.data.shard_indices`), and :class:`~torch.nn.parallel.DistributedDataParallel`
all-reduces ``g = (1/W) Σ_r g_r`` = the gradient of the mean loss over the global batch
``B = ∪_r B_r`` of ``W × b`` examples. Every rank then takes the same optimizer (and pruner) step, so
the replicas stay identical without ever exchanging weights.

:func:`join_process_group` finds the group: one already initialised (``prunekit.distributed.
run_workers``, a caller's own), or the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), which it initialises itself (``nccl`` on
``cuda:LOCAL_RANK``, ``gloo`` on CPU). Without either it is a single process and nothing changes.
:func:`launch_train` is ``prunekit train --nproc N``: N local ranks through ``run_workers``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from prunekit.config import ConfigError
from prunekit.core.forward import count_correct
from prunekit.distributed.compress import compress_gradients
from prunekit.distributed.hooks import CommState
from prunekit.distributed.sync import broadcast_tensors_
from prunekit.training.guards import check_out_dir, resolve_device
from prunekit.training.recipe import Recipe

__all__ = [
    "TORCHRUN_VARIABLES",
    "Ranks",
    "agree",
    "attach_communication",
    "barrier",
    "broadcast_object",
    "communication_metrics",
    "gather_object",
    "join_process_group",
    "launch_train",
    "leave_process_group",
    "mean_across",
    "sharded_accuracy",
    "sync_buffers",
    "wrap_model",
]

logger = logging.getLogger(__name__)

#: the environment ``torchrun`` sets in every rank
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank, the number of ranks, its GPU index on this machine, and
    whether :func:`join_process_group` created the group (and so must destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0


def _under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARIABLES)


def _rank_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """The device of a rank: ``cuda:LOCAL_RANK`` when ``device`` is CUDA (or unset with a GPU)."""
    wanted = torch.device(device) if device is not None else None
    if wanted is None and torch.cuda.is_available():
        wanted = torch.device("cuda")
    if wanted is None or wanted.type != "cuda":
        return resolve_device(wanted if wanted is not None else "cpu")
    if wanted.index is not None and wanted.index != local_rank:
        raise ConfigError(
            f"device {str(wanted)!r} with several ranks: each rank uses cuda:LOCAL_RANK; "
            "give --device cuda (or cpu)"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"rank with LOCAL_RANK {local_rank} needs cuda:{local_rank} but {count} GPU(s) are "
            "visible: start at most one rank per GPU, or train on --device cpu"
        )
    return resolve_device(torch.device("cuda", local_rank))


def join_process_group(device: str | torch.device | None) -> tuple[Ranks, torch.device]:
    """This process's :class:`Ranks` and device, initialising the group under ``torchrun``.

    A single process (no group, no ``torchrun`` environment, or ``WORLD_SIZE=1``) gets
    ``Ranks()`` and :func:`~prunekit.training.guards.resolve_device` of ``device``, as before.

    Raises:
        ConfigError: a device this rank cannot use (see ``_rank_device``).
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if world == 1:
            return Ranks(), resolve_device(device)
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = _rank_device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return Ranks(rank, world, local), dev
    if not _under_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return Ranks(), resolve_device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    dev = _rank_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=rank, world_size=world)
    logger.info("rank %d of %d joined the %s process group on %s", rank, world, backend, dev)
    return Ranks(rank, world, local, owns_group=True), dev


def leave_process_group(ranks: Ranks) -> None:
    """Destroy the group if :func:`join_process_group` created it."""
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module:
    """``model`` in :class:`DistributedDataParallel` (``model`` itself for a single process).

    Call it after ``sparsify`` and after loading a checkpoint: DDP broadcasts rank 0's parameters
    and buffers (masks included) when it is built, then all-reduces (averages) every gradient in
    ``backward``. The plain ``model`` stays the one to save, evaluate and prune.
    """
    if not ranks.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _device_of_group(device: torch.device) -> torch.device:
    """Where collective tensors must live: the GPU for nccl, else the CPU."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_across(value: float, ranks: Ranks, device: torch.device) -> float:
    """The mean of ``value`` over all ranks (``value`` itself for a single process).

    Every rank gets the same number, so decisions taken from it (the divergence guard) agree.
    """
    if not ranks.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float32, device=_device_of_group(device))
    dist.all_reduce(t)
    return float(t.item()) / ranks.world_size


@torch.no_grad()
def sharded_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, ranks: Ranks, batch_size: int = 1000
) -> float:
    """Top-1 accuracy on ``(x, y)``: rank ``r`` counts its contiguous share of the examples and the
    counts are all-reduced, ``acc = Σ_r correct_r / Σ_r n_r``."""
    n = len(x)
    lo, hi = n * ranks.rank // ranks.world_size, n * (ranks.rank + 1) // ranks.world_size
    correct = count_correct(model, x, y, lo, hi, batch_size)
    if ranks.distributed:
        device = next(model.parameters()).device
        t = torch.tensor([correct], dtype=torch.int32, device=_device_of_group(device))
        dist.all_reduce(t)
        correct = int(t.item())
    return correct / max(1, n)


@torch.no_grad()
def sync_buffers(model: nn.Module, ranks: Ranks) -> None:
    """Copy rank 0's buffers to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last step of an epoch each
    rank's batch-norm statistics hold its own last batch; this makes the replicas identical again
    before they are evaluated or saved.
    """
    if ranks.distributed:
        broadcast_tensors_(model.buffers(), src=0)


def attach_communication(
    net: nn.Module, section: dict[str, Any] | None, ranks: Ranks
) -> CommState | None:
    """Register the recipe's gradient compression on the DDP model (``None`` when there is none).

    A single process exchanges nothing, so the section is then ignored with a warning.
    """
    if section is None:
        return None
    if not isinstance(net, DistributedDataParallel):
        logger.warning(
            "communication.method %s ignored: a single process exchanges no gradients",
            section.get("method"),
        )
        return None
    config = {k: v for k, v in section.items() if k != "method"}
    state = compress_gradients(net, str(section["method"]), **config)
    if ranks.is_main:
        logger.info("gradient exchange: %s, summed by %s", section["method"], state.mode)
    return state


def communication_metrics(state: CommState, ranks: Ranks) -> dict[str, Any]:
    """What the gradient exchange cost, for ``metrics.json``: bytes every rank sent (summed over
    ranks), what fp32 ring all-reduce would have sent, their ratio and the summation mode."""
    counts = gather_object((float(state.bytes_sent), float(state.bytes_dense)), ranks)
    sent = sum(c[0] for c in counts)
    dense = sum(c[1] for c in counts)
    return {
        "communication": {
            "method": state.method,
            "mode": state.mode,
            "bytes_sent": sent,
            "bytes_dense": dense,
            "ratio": dense / sent if sent > 0 else None,
        }
    }


def gather_object(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` for a single process)."""
    if not ranks.distributed:
        return [obj]
    values: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(values, obj)
    return values


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (no-op for a single process)."""
    if ranks.distributed:
        dist.barrier()


def broadcast_object(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's ``obj`` on every rank (picklable data)."""
    if not ranks.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(value: int, what: str, ranks: Ranks) -> None:
    """Raise on every rank (never on one alone, which would hang the others) unless all ranks
    hold the same ``value``.

    Raises:
        ConfigError: the ranks differ; the message names ``what`` and the values.
    """
    if not ranks.distributed:
        return
    values = gather_object(value, ranks)
    if len(set(values)) > 1:
        raise ConfigError(
            f"the ranks disagree on {what} ({values} by rank); every rank must see the same "
            "--out directory (a filesystem all ranks share) and the same recipe"
        )


def _train_rank(
    rank: int,
    world_size: int,
    recipe: Recipe,
    out: str,
    device: str | None,
    resume: bool,
    progress: bool,
    level: int,
) -> dict[str, Any]:
    """One rank of :func:`launch_train` (module level: it is pickled into the spawned process)."""
    from prunekit.training.trainer import train

    os.environ["LOCAL_RANK"] = str(rank)
    logging.basicConfig(
        level=level if rank == 0 else max(level, logging.WARNING),
        format=f"%(levelname)s rank {rank} %(name)s: %(message)s",
    )
    del world_size
    return train(recipe, out, resume=resume, progress=progress and rank == 0, device=device)


def launch_train(
    recipe: Recipe,
    out: str | Path,
    nproc: int,
    *,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
    level: int = logging.WARNING,
) -> dict[str, Any]:
    """``prunekit train --nproc N``: run ``recipe`` on ``nproc`` local ranks, return rank 0's metrics.

    Each rank uses ``max(1, cores // nproc)`` threads; ``gloo`` on CPU, ``nccl`` with one GPU per
    rank when ``device`` is CUDA (or unset on a machine with GPUs). ``nproc == 1`` trains in this
    process.

    Raises:
        ConfigError: ``nproc < 1``, a launch from inside ``torchrun``, too few GPUs, a bad device or
            ``out`` (all checked before any rank starts).
        prunekit.distributed.WorkerError: a rank failed (its traceback in the message).
    """
    from prunekit.distributed import run_workers
    from prunekit.training.trainer import train

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (number of local ranks), got {nproc}")
    if _under_torchrun() or (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "--nproc starts its own ranks; under torchrun (or in a process group) leave it out"
        )
    if nproc == 1:
        return train(recipe, out, resume=resume, progress=progress, device=device)
    check_out_dir(Path(out))
    dev = resolve_device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ConfigError(
            f"--nproc {nproc} on CUDA needs one GPU per rank (nccl) but "
            f"{torch.cuda.device_count()} are visible; use --nproc <= {torch.cuda.device_count()} "
            "or --device cpu"
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // nproc)
    logger.info("launching %d ranks (%s, %d threads each)", nproc, backend, threads)
    results = run_workers(
        _train_rank,
        nproc,
        recipe,
        str(out),
        None if device is None else str(dev.type),
        resume,
        progress,
        level,
        backend=backend,
        threads=threads,
        timeout=24 * 3600.0,
    )
    return dict(results[0])
