"""Where a process stands in a run: its rank, its device, and what ranks exchange.

Data parallelism (the maths is in :mod:`prunekit.app.launch`) needs every rank to agree on
what it reads and decides; the helpers here are those agreements.

:func:`join_process_group` finds the group: one already initialised (``prunekit.distributed.
run_workers``, a caller's own), or the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), which it initialises itself (``nccl`` on
``cuda:LOCAL_RANK``, ``gloo`` on CPU). Without either it is a single process and every collective
here is the identity. The launcher that starts local ranks is :mod:`prunekit.app.launch`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from prunekit.config import ConfigError
from prunekit.core.ddp import broadcast_tensors_
from prunekit.core.forward import count_correct
from prunekit.distributed.registry import compress_gradients
from prunekit.distributed.state import CommState

__all__ = [
    "TORCHRUN_VARIABLES",
    "Ranks",
    "agree",
    "attach_communication",
    "barrier",
    "broadcast_object",
    "communication_metrics",
    "default_device",
    "gather_object",
    "join_process_group",
    "leave_process_group",
    "mean_across",
    "on_main",
    "resolve_device",
    "sharded_accuracy",
    "sync_buffers",
    "under_torchrun",
    "wrap_model",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

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


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARIABLES)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a :class:`torch.device` that works here (``None``: CUDA when available, else CPU).

    Raises:
        ConfigError: an unknown device string, or a device this machine does not have.
    """
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"device {device!r} is not a device name ({exc}); use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "meta":
        raise ConfigError("device 'meta' holds no data; use --device cpu, cuda or cuda:N")
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as exc:  # torch raises AssertionError without CUDA
        raise ConfigError(
            f"device {str(dev)!r} is not available on this machine ({' '.join(str(exc).split())}); "
            "use --device cpu or another device"
        ) from None
    return dev


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
    ``Ranks()`` and :func:`resolve_device` of ``device``.

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
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
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
    ranks), what fp32 ring all-reduce would have sent, their ratio (``compression``) and the summation mode."""
    counts = gather_object((float(state.bytes_sent), float(state.bytes_dense)), ranks)
    sent = sum(c[0] for c in counts)
    dense = sum(c[1] for c in counts)
    return {
        "communication": {
            "method": state.method,
            "mode": state.mode,
            "bytes_sent": sent,
            "bytes_dense": dense,
            "compression": dense / sent if sent > 0 else None,
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


def on_main(fn: Callable[[], T], ranks: Ranks) -> T:
    """``fn()`` run by rank 0 alone (file system work), its result on every rank.

    If it raises, every rank raises that same error, so no rank waits on the others forever.
    """
    if not ranks.distributed:
        return fn()
    result: Any = None
    error: Exception | None = None
    if ranks.is_main:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    result, error = broadcast_object((result, error), ranks)
    if error is not None:
        raise error
    return cast(T, result)
