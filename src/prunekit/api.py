"""The high-level entry point: :func:`sparsify`."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from prunekit.core.ddp import broadcast_module_, unwrap
from prunekit.methods.base import Pruner
from prunekit.methods.registry import get_method


def sparsify(
    model: nn.Module,
    optimizer: Optimizer | None,
    method: str = "gmp",
    *,
    sparsity: float | None = None,
    total_steps: int | None = None,
    **config: Any,
) -> Pruner:
    """Attach a sparse-training method to a model and its optimizer.

    Data-parallel training: ``model`` may be a ``DistributedDataParallel`` wrapper or the module it
    holds. The pruner is attached to the module itself (``model.module``), so ``targets`` and
    ``ignore`` name layers as the module does (``fc1``, not ``module.fc1``). Call ``sparsify`` on
    every rank with the same arguments. Given the wrapper, once the pruner is built every parameter
    and buffer of the module is broadcast from rank 0: DDP only broadcasts the buffers that existed
    when it was built, and the mask buffers are new. Given the module before wrapping it, build it
    identically on every rank (same seed or weights); DDP's construction then broadcasts the masks
    with the weights. The methods draw their random numbers from their own seeded generator
    (``seed``), never from the global RNG, so replicas stay identical when ranks seed torch
    differently.

    Args:
        model: any ``nn.Module``, on any device, or a ``DistributedDataParallel`` wrapper of one.
        optimizer: the optimizer that trains ``model``.
        method: a registered name (see :func:`prunekit.methods.available_methods`).
        sparsity: final fraction of zeros among the pruned weights, in ``[0, 1)`` (required by
            every method but ``constant``, which keeps the model's current zeros).
        total_steps: number of optimizer steps the run will take (required likewise).
        **config: further fields of the method's config dataclass (unknown names are an error that
            lists the valid ones).

    Returns:
        The pruner; call ``pruner.step()`` after every ``optimizer.step()`` and ``pruner.finalize()``
        at the end.
    """
    cls = get_method(method)
    given = {"sparsity": sparsity, "total_steps": total_steps}
    cfg = cls.config_class.from_dict(
        {**{k: v for k, v in given.items() if v is not None}, **config}
    )
    module = unwrap(model)
    pruner = cls(module, optimizer, cfg)
    if isinstance(model, DistributedDataParallel):  # a no-op without a process group
        broadcast_module_(module, src=0, group=model.process_group)
    return pruner
