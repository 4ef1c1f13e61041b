"""Gradual magnitude pruning (Zhu & Gupta, *To prune, or not to prune*, 2017).

Sparsity follows the cubic ramp ``s_t = s_f + (s_i − s_f)(1 − (t − t0)/(n·Δt))^3``; every ``Δt`` steps
the smallest-magnitude weights are masked. Masks are *hard*: pruned weights are zero, their gradients
and optimizer state are zeroed, so they never return.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.optim import Optimizer

from prunekit.core.masks import Masker, MaskMode
from prunekit.methods.base import Pruner
from prunekit.methods.ramp import RampConfig, ramp_sparsity, ramp_step_
from prunekit.methods.registry import register_method


@dataclass(kw_only=True)
class GMPConfig(RampConfig):
    """GMP: the ramp of :class:`~prunekit.methods.ramp.RampConfig` with hard masks."""


@register_method("gmp")
class GMP(Pruner):
    """Gradual magnitude pruning with hard masks."""

    config_class = GMPConfig
    config: GMPConfig

    def __init__(self, model: nn.Module, optimizer: Optimizer | None, config: GMPConfig):
        super().__init__(model, optimizer, config)
        self.masker = Masker(self.targets, optimizer, MaskMode.HARD)
        ramp_step_(self, config, 0)

    def scheduled_sparsity(self, step: int | None = None) -> float:
        return ramp_sparsity(self.config, self.step_count if step is None else step)

    def _on_step(self) -> None:
        ramp_step_(self, self.config, self.step_count)
