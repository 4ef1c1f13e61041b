"""Data-parallel helpers that keep replicas identical: small collectives, no state.

Under ``torch.nn.parallel.DistributedDataParallel`` (DDP) every rank holds a full replica of the
model and sees its own shard of the data; DDP all-reduces (averages) the gradients during
``backward()``, so a deterministic update keeps the replicas bit-identical. What DDP does not cover is
the responsibility of the sparse-training methods, and these helpers serve them:

* :func:`unwrap` — the module inside a DDP (or ``DataParallel``) wrapper, so target names are the
  module's own (``fc1.weight``, not ``module.fc1.weight``);
* :func:`broadcast_module_` — rank 0's parameters and buffers to every rank (buffers registered after
  DDP was built, such as mask buffers of a pruner attached to a wrapped model, are not in DDP's list
  of buffers to broadcast);
* :func:`all_reduce_mean_` — ``x ← (1/W) Σ_r x_r`` over the ``W`` ranks, for a statistic computed on
  each rank's own data;
* :func:`replicas_identical` / :func:`differing_names` — which tensors differ across ranks (by
  comparing SHA-256 digests of their bytes), for checks and tests.

Every function is a no-op (or trivially true) when no process group is initialised, so a method can
call them unconditionally.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from prunekit.core.batchnorm import tracked_batchnorms

logger = logging.getLogger(__name__)

__all__ = [
    "all_reduce_batchnorm_",
    "all_reduce_mean_",
    "broadcast_module_",
    "broadcast_tensors_",
    "differing_names",
    "is_distributed",
    "replicas_identical",
    "tensor_digest",
    "unwrap",
    "world_size",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` / ``DataParallel`` wrapper holds (``model.module``),
    or ``model`` itself; nested wrappers are unwrapped fully."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def is_distributed(group: Any = None) -> bool:
    """Whether a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: Any = None) -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def broadcast_tensors_(tensors: Iterable[Tensor], src: int = 0, group: Any = None) -> None:
    """Overwrite every tensor, in place, with its value on rank ``src`` of ``group`` (its rank within
    the group; the default group when ``None``). No-op without a process group.

    All ranks must pass tensors of the same shapes and dtypes in the same order.
    """
    if not is_distributed(group):
        return
    for t in tensors:
        dist.broadcast(t.data, group=group, group_src=src)


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0, group: Any = None) -> None:
    """Make every parameter and buffer of ``unwrap(module)`` equal to rank ``src``'s, in place."""
    module = unwrap(module)
    tensors: list[Tensor] = [p for _, p in module.named_parameters()]
    tensors += [b for _, b in module.named_buffers()]
    broadcast_tensors_(tensors, src=src, group=group)


@torch.no_grad()
def all_reduce_mean_(tensors: Iterable[Tensor], group: Any = None) -> None:
    """``x ← (1/W) Σ_r x_r`` in place for every tensor, over the ``W`` ranks (no-op without a group).

    Floating-point tensors only (a mean of integers is not an integer); the sum is taken in the
    tensor's dtype, as ``dist.all_reduce`` does.
    """
    if not is_distributed(group):
        return
    n = dist.get_world_size(group)
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"all_reduce_mean_ needs floating-point tensors, got {t.dtype}")
        dist.all_reduce(t.data, op=dist.ReduceOp.SUM, group=group)
        t.data.div_(n)


def tensor_digest(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (bit-exact identity, ``-0.0 != 0.0``)."""
    c = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{c.dtype}{tuple(c.shape)}".encode())
    if c.numel():
        h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def differing_names(named: Mapping[str, Tensor], group: Any = None) -> list[str]:
    """Names whose tensors are not bit-identical on every rank (also names some ranks lack),
    sorted; ``[]`` without a process group. A collective: every rank must call it."""
    if not is_distributed(group):
        return []
    digests = {k: tensor_digest(v) for k, v in named.items()}
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, digests, group=group)
    names = set().union(*(d or {} for d in gathered))
    return sorted(k for k in names if len({(d or {}).get(k) for d in gathered}) > 1)


def replicas_identical(module: nn.Module, group: Any = None) -> list[str]:
    """Names of the parameters and buffers of ``unwrap(module)`` that differ across ranks (``[]``
    when the replicas are bit-identical). A collective: every rank must call it."""
    module = unwrap(module)
    named: dict[str, Tensor] = dict(module.named_parameters())
    named.update(dict(module.named_buffers()))
    return differing_names(named, group=group)


@torch.no_grad()
def all_reduce_batchnorm_(model: nn.Module, batches_used: int, group: Any = None) -> int:
    """Combine the statistics that :func:`recalibrate_batchnorm_` estimated on each rank's own
    batches into those of all ranks' batches (data-parallel training); a no-op without a process
    group. A collective: every rank must call it.

    With ``momentum=None`` a rank that used ``n_r`` batches holds ``μ_r = (1/n_r) Σ_b μ_b`` (and
    likewise the variances), so the statistics of all ``N = Σ_r n_r`` batches are
    ``μ = Σ_r n_r μ_r / N``: the same as recalibrating one process on every rank's batches.

    Args:
        model: the model whose batch-norm layers were recalibrated (identical on every rank).
        batches_used: ``n_r``, what :func:`recalibrate_batchnorm_` returned on this rank.
        group: the process group (default: the world).

    Returns:
        ``N``, the number of batches over all ranks (``batches_used`` without a process group).
    """
    norms = [m for _, m in tracked_batchnorms(model)]
    if not norms or not is_distributed(group):
        return batches_used
    device = norms[0].running_mean.device  # type: ignore[union-attr]
    count = torch.tensor([float(batches_used)], device=device)
    dist.all_reduce(count, group=group)
    total = int(count.item())
    if total == 0:
        return 0
    for m in norms:
        for stat in (m.running_mean, m.running_var):
            if stat is None:
                continue
            stat.mul_(batches_used)
            dist.all_reduce(stat, group=group)
            stat.div_(total)
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(total)
    logger.info("averaged %d batch-norm layers over %d batches on all ranks", len(norms), total)
    return total
