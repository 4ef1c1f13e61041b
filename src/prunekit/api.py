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
    sparsity: float | None = None,
    total_steps: int | None = None,
    **config: Any,
) -> Pruner:
    """Attach a sparse-training method to a model and its optimizer.

    Args:
        model: any ``nn.Module``, on any device.
        optimizer: the optimizer that trains ``model``.
        method: a registered name (see :func:`prunekit.methods.available`).
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
    return cls(model, optimizer, cfg)
