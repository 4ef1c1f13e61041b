"""Layer-wise sparsity allocation as pure functions.

* ``uniform`` — every layer gets the target sparsity.
* ``global`` — one magnitude threshold across all layers (the global top-k of the scores).
* ``erk`` — Erdős–Rényi-Kernel (Evci et al., *Rigging the Lottery*, ICML 2020): the density of
  layer ``l`` is ``ε · Σ shape_l / Π shape_l``, with one ``ε`` solved so that the total number of
  kept weights matches the budget; layers whose density would exceed 1 are made dense and ``ε`` is
  re-solved over the rest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from prunekit.core.patterns import NMPattern, nm_compatible, nm_mask, topk_mask

logger = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "global", "erk")


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Per-layer densities of the ERK distribution for an overall ``density``.

    Args:
        shapes: weight shapes, e.g. ``(out, in)`` or ``(out, in, kh, kw)``.
        density: overall fraction of weights kept, in ``(0, 1]``.
    """
    numels = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    budget = density * sum(numels)
    dense: set[int] = set()
    while True:
        free_budget = budget - sum(numels[i] for i in dense)
        denom = sum(raw[i] * numels[i] for i in range(len(shapes)) if i not in dense)
        if denom <= 0:
            break
        eps = free_budget / denom
        over = {i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0}
        if not over:
            break
        dense |= over
    return [1.0 if i in dense else min(1.0, eps * raw[i]) for i in range(len(shapes))]


def layer_keep_counts(
    shapes: Sequence[Sequence[int]], sparsity: float, allocation: str
) -> list[int]:
    """Number of weights kept per layer under ``uniform`` or ``erk`` allocation."""
    numels = [math.prod(s) for s in shapes]
    if allocation == "uniform":
        return [round((1.0 - sparsity) * n) for n in numels]
    if allocation == "erk":
        return [
            round(d * n) for d, n in zip(erk_densities(shapes, 1.0 - sparsity), numels, strict=True)
        ]
    raise ValueError(f"per-layer keep counts exist for 'uniform' and 'erk', not {allocation!r}")


def compute_masks(
    scores: Sequence[Tensor],
    sparsity: float,
    allocation: str = "global",
    pattern: NMPattern | None = None,
) -> list[Tensor]:
    """Boolean keep-masks for a list of layers.

    Args:
        scores: importance per weight (e.g. ``|w|``), one tensor per layer.
        sparsity: fraction of weights to remove, in ``[0, 1)``.
        allocation: ``uniform``, ``global`` or ``erk``.
        pattern: an N:M pattern; then each group of ``M`` keeps ``M - round(sparsity·M)`` weights
            (so a ramp towards 2:4 passes through 3:4), and ``allocation`` is not used. Groups run
            along the input channels (at each kernel position for convolutions); a layer whose
            input channels are not a multiple of ``M`` stays dense (the pruners report them).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if pattern is not None:
        keep_n = pattern.m - round(sparsity * pattern.m)
        return [
            nm_mask(s, keep_n, pattern.m)
            if keep_n < pattern.m and nm_compatible(tuple(s.shape), pattern.m)
            else torch.ones_like(s, dtype=torch.bool)
            for s in scores
        ]
    if allocation == "global":
        return global_masks(scores, sparsity)
    counts = layer_keep_counts([tuple(s.shape) for s in scores], sparsity, allocation)
    return [topk_mask(s, k) for s, k in zip(scores, counts, strict=True)]


def global_masks(scores: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """One magnitude threshold across layers, except that no layer is ever emptied.

    A layer whose every score falls under the global threshold would turn the network into a
    constant function of its input; it keeps its single largest score instead (taken from the
    budget: the globally smallest kept score is dropped), and a warning names it.
    """
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    keep = round((1.0 - sparsity) * flat.numel())
    mask = topk_mask(flat, keep)
    bounds = [0]
    for s in scores:
        bounds.append(bounds[-1] + s.numel())
    emptied = [
        i for i in range(len(scores)) if keep and not bool(mask[bounds[i] : bounds[i + 1]].any())
    ]
    if emptied and keep >= len(scores):
        rescued = [bounds[i] + int(flat[bounds[i] : bounds[i + 1]].argmax()) for i in emptied]
        # give back as many kept entries as were rescued: the smallest kept ones of other layers,
        # never a layer's last kept weight (that would empty it in turn)
        kept_scores = torch.where(mask, flat, torch.inf)
        for i in range(len(scores)):
            layer = kept_scores[bounds[i] : bounds[i + 1]]
            if int(mask[bounds[i] : bounds[i + 1]].sum()) == 1:
                layer.fill_(torch.inf)
        donors = torch.topk(kept_scores, len(rescued), largest=False).indices
        mask[donors] = False
        mask[torch.tensor(rescued, device=mask.device)] = True
        logger.warning(
            "global allocation at sparsity %.4f would empty %d layer(s) (indices %s); each keeps its "
            "largest weight. Use allocation 'erk' or 'uniform' to give every layer a real budget",
            sparsity,
            len(emptied),
            emptied,
        )
    return [mask[bounds[i] : bounds[i + 1]].view_as(s) for i, s in enumerate(scores)]


def random_masks(
    shapes: Sequence[Sequence[int]],
    sparsity: float,
    allocation: str,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> list[Tensor]:
    """Random masks with the per-layer counts of ``allocation`` (``global`` acts as ``uniform``).

    The scores are drawn on the CPU from ``generator`` (the global RNG when ``None``). Methods pass
    their own seeded generator: data-parallel ranks often seed the global RNG differently (data
    order, dropout), and masks drawn from it would differ across replicas. Ties cannot change the
    result between ranks: :func:`~prunekit.core.patterns.topk_mask` keeps the lowest indices.
    """
    alloc = "uniform" if allocation == "global" else allocation
    counts = layer_keep_counts(shapes, sparsity, alloc)
    masks = []
    for shape, k in zip(shapes, counts, strict=True):
        scores = torch.rand(tuple(shape), generator=generator).to(device)
        masks.append(topk_mask(scores, k))
    return masks
