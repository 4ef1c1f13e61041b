"""Gradual magnitude pruning (Zhu & Gupta, *To prune, or not to prune*, 2017).

Sparsity follows the cubic ramp ``s_t = s_f + (s_i − s_f)(1 − (t − t0)/(n·Δt))^3``; every ``Δt`` steps
the smallest-magnitude weights are masked. Masks are *hard*: pruned weights are zero, their gradients
and optimizer state are zeroed, so they never return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunekit.core.masks import MaskMode
from prunekit.methods.base import SparsityConfig
from prunekit.methods.ramp import RampConfig, RampPruner
from prunekit.methods.registry import register_method


@dataclass(kw_only=True)
class GMPConfig(RampConfig):
    """GMP: the ramp of :class:`~prunekit.methods.ramp.RampConfig`; masks fixed after the ramp."""


@register_method("gmp")
class GMP(RampPruner):
    """Gradual magnitude pruning with hard masks."""

    config_class: ClassVar[type[SparsityConfig]] = GMPConfig
    mask_mode: ClassVar[MaskMode] = MaskMode.HARD
