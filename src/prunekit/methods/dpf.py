"""DPF — Dynamic Model Pruning with Feedback (Lin, Stich, Barba, Dmitriev, Jaggi; ICLR 2020).

The gradient is computed at the *pruned* model and applied to the *dense* weights::

    w ← w − lr · ∇f(m ⊙ w)

Forward and backward use ``m ⊙ w`` and the full gradient reaches every coordinate of the dense ``w``
(straight-through mask mode), so a wrongly pruned weight keeps receiving signal and returns when the
mask is recomputed from ``|w|`` — every ``update_every`` (16) steps, at the sparsity of the cubic
ramp. The final model is ``m ⊙ w``; no fine-tuning is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunekit.core.masks import MaskMode
from prunekit.methods.base import SparsityConfig
from prunekit.methods.ramp import RampConfig, RampPruner
from prunekit.methods.registry import register_method


@dataclass(kw_only=True)
class DPFConfig(RampConfig):
    """DPF: the cubic ramp; the mask is recomputed from the dense weights every 16 steps for the whole
    run (also after the target sparsity is reached), so wrongly pruned weights can return."""

    update_every: int = 16
    update_until: float | None = 1.0


@register_method("dpf")
class DPF(RampPruner):
    """Pruning with feedback: straight-through masks over dense weights."""

    config_class: ClassVar[type[SparsityConfig]] = DPFConfig
    mask_mode: ClassVar[MaskMode] = MaskMode.STRAIGHT_THROUGH
