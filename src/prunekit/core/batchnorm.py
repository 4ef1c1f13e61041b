"""Re-estimate batch-norm statistics after a one-shot change of the weights.

Pruning a dense model one-shot shifts every activation, so the running mean and variance that batch
norm learned for the dense weights no longer match; CrAM (Peste et al., ICLR 2023) reports its one-shot
accuracies after re-estimating them on a few training batches. :func:`recalibrate_batchnorm_` resets
the statistics and recomputes them as the plain average over the given batches (``momentum=None``),
with gradients off and the model's modes and momenta restored afterwards. In data-parallel
training, :func:`prunekit.core.ddp.all_reduce_batchnorm_` then combines the statistics of
every rank's batches.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def tracked_batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(name, layer)`` of every batch-norm layer that tracks running statistics."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, tuple | list):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def recalibrate_batchnorm_(
    model: nn.Module, batches: Iterable[Any], max_batches: int | None = None
) -> int:
    """Recompute the running statistics of every batch-norm layer of ``model`` on ``batches``.

    Args:
        model: any module; batch-norm layers that track running statistics are recalibrated.
        batches: model inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        max_batches: stop after this many batches.

    Returns:
        The number of batches used (0 when the model has no such layer: nothing runs).
    """
    norms = [m for _, m in tracked_batchnorms(model)]
    if not norms:
        return 0
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("recalibrate_batchnorm_ got no batches; the statistics are unchanged")
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    used = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: the plain mean over the batches
            m.train()
        for batch in itertools.chain([first], iterator):
            if max_batches is not None and used >= max_batches:
                break
            _call(model, batch)
            used += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    logger.info("re-estimated %d batch-norm layers on %d batches", len(norms), used)
    return used
