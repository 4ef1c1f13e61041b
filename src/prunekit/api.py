"""The high-level entry point: :func:`sparsify`."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from prunekit.methods.base import Pruner
from prunekit.methods.registry import get_method


def sparsify(
    model: nn.Module,
    optimizer: Optimizer | None,
    method: str = "gmp",
    *,
    sparsity: float,
    total_steps: int,
    **config: Any,
) -> Pruner:
    """Attach a sparse-training method to a model and its optimizer.

    Args:
        model: any ``nn.Module``, on any device.
        optimizer: the optimizer that trains ``model``.
        method: a registered name (see :func:`prunekit.methods.available`).
        sparsity: final fraction of zeros among the pruned weights, in ``[0, 1)``.
        total_steps: number of optimizer steps the run will take.
        **config: further fields of the method's config dataclass (unknown names are an error that
            lists the valid ones).

    Returns:
        The pruner; call ``pruner.step()`` after every ``optimizer.step()`` and ``pruner.finalize()``
        at the end.
    """
    cls = get_method(method)
    cfg = cls.config_class.from_dict({"sparsity": sparsity, "total_steps": total_steps, **config})
    return cls(model, optimizer, cfg)
