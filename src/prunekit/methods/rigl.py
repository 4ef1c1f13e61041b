"""RigL — Rigging the Lottery (Evci, Gale, Menick, Castro, Elsen; ICML 2020).

The number of nonzeros is fixed for the whole run. Masks start random with per-layer densities
``uniform`` or ``erk``. Every ``update_every`` steps until ``end`` (75% of training), in each layer:

* drop the ``k = α_t · n_active`` active weights of smallest magnitude;
* grow the ``k`` inactive weights with the largest dense-gradient magnitude ``|∇_w L|`` (the gradient
  with respect to the masked weights on the current batch);
* grown weights start at zero with zero momentum (a weight dropped and regrown in the same update
  is not new: it keeps its value and momentum, as in the reference implementation).

``α_t = α/2 · (1 + cos(π t / T_end))`` with ``α = 0.3``.

The initial masks are drawn from the pruner's own generator seeded with ``seed`` (never the global
RNG), so data-parallel ranks that seed torch differently still draw the same masks; its state is in
:meth:`state_dict`.

Layer densities: ``erk`` (default) or ``uniform``; as in the paper, ``uniform`` keeps the first
layer dense and every other layer at ``sparsity``, so the total sparsity ends *below* ``sparsity``
(logged at the start; :meth:`finalize` keeps that distribution).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from prunekit.config import ConfigError, check_fraction, check_int, check_range
from prunekit.core.allocation import random_masks
from prunekit.core.masks import Masker, MaskMode
from prunekit.methods.base import Pruner, SparsityConfig
from prunekit.methods.registry import register_method
from prunekit.schedules import cosine

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RigLConfig(SparsityConfig):
    """RigL settings; ``allocation`` is ``erk`` (default) or ``uniform``; ``seed`` seeds the
    generator of the initial random masks (the same on every data-parallel rank)."""

    allocation: str = "erk"
    update_every: int = 100
    drop_fraction: float = 0.3
    end: float = 0.75
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation not in ("erk", "uniform"):
            raise ConfigError(
                f"RigL allocation must be 'erk' or 'uniform', got {self.allocation!r}"
            )
        if self.pattern != "unstructured":
            raise ConfigError("RigL supports only unstructured sparsity")
        check_int("update_every", self.update_every, 1)
        check_range("drop_fraction", self.drop_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_fraction("end", self.end, closed=True)
        check_int("seed", self.seed, 0)


def uniform_first_dense_masks(
    shapes: list[tuple[int, ...]],
    sparsity: float,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Random masks of RigL's ``uniform`` distribution: the first layer dense, the others at
    ``sparsity`` (so the total sparsity is below ``sparsity``)."""
    masks = random_masks(shapes[1:], sparsity, "uniform", generator=generator, device=device)
    return [torch.ones(shapes[0], dtype=torch.bool, device=device), *masks]


@register_method("rigl")
class RigL(Pruner):
    """Dynamic sparse training with magnitude drop and gradient growth."""

    config_class = RigLConfig
    config: RigLConfig

    def __init__(self, model: nn.Module, optimizer: Optimizer | None, config: RigLConfig):
        super().__init__(model, optimizer, config)
        self._grads: list[Tensor | None] | None = None
        self.masker = Masker(self.targets, optimizer, MaskMode.HARD, grad_observer=self._observe)
        device = self.targets[0].param.device
        #: the method's own RNG (CPU, so the draws do not depend on the device)
        self.generator = torch.Generator().manual_seed(config.seed)
        shapes = [tuple(t.param.shape) for t in self.targets]
        first_dense = config.allocation == "uniform" and len(shapes) > 1
        if first_dense:
            masks = uniform_first_dense_masks(shapes, config.sparsity, device, self.generator)
        else:
            masks = random_masks(
                shapes, config.sparsity, config.allocation, generator=self.generator, device=device
            )
        self.masker.set_masks_(masks)
        self._budget = sum(int(m.sum()) for m in masks)
        if first_dense:
            logger.info(
                "RigL uniform: %s stays dense (as in the paper); total sparsity %.4f",
                self.targets[0].name,
                1 - self._budget / sum(math.prod(s) for s in shapes),
            )

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def target_nonzeros(self) -> int:
        """RigL keeps the parameter count it starts with."""
        return self._budget

    def _update_due(self, step: int) -> bool:
        return step % self.config.update_every == 0 and step < self.config.fraction_step(
            self.config.end
        )

    def _observe(self, grads: list[Tensor | None]) -> None:
        # Called before the gradients are masked, for the step about to be taken.
        if self._update_due(self.step_count + 1):
            self._grads = [None if g is None else g.detach().clone() for g in grads]

    def drop_fraction(self, step: int) -> float:
        return cosine(step, self.config.drop_fraction, self.config.fraction_step(self.config.end))

    @torch.no_grad()
    def _on_step(self) -> None:
        grads, self._grads = self._grads, None
        if grads is None or not self._update_due(self.step_count):
            return
        assert self.masker is not None
        fraction = self.drop_fraction(self.step_count)
        new_masks = []
        grown: list[Tensor] = []
        for t, mask, grad in zip(self.targets, self.masker.masks, grads, strict=True):
            w = t.param.detach()
            n_active = int(mask.sum())
            k = int(fraction * n_active)
            new = mask.clone().reshape(-1)
            grow = torch.zeros_like(new)
            if k > 0 and grad is not None:
                drop_scores = torch.where(mask, w.abs(), torch.full_like(w, float("inf"))).reshape(
                    -1
                )
                new[torch.topk(drop_scores, k, largest=False).indices] = False
                grow_scores = torch.where(
                    new, torch.full_like(new, -1.0, dtype=w.dtype), grad.abs().reshape(-1)
                )
                grow[torch.topk(grow_scores, k).indices] = True
                new |= grow
            new_masks.append(new.view_as(mask))
            # a weight dropped and regrown in the same update keeps its value (as the reference
            # implementation does); only connections that were inactive start at zero
            grown.append((grow & ~mask.reshape(-1)).view_as(mask))
        self.masker.set_masks_(new_masks)
        for t, g in zip(self.targets, grown, strict=True):
            t.param.masked_fill_(g, 0.0)
            self.masker.zero_optimizer_state_(t.param, g)
