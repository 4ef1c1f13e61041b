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

from torch import nn
from torch.optim import Optimizer

from prunekit.core.masks import Masker, MaskMode
from prunekit.methods.base import Pruner
from prunekit.methods.ramp import RampConfig, ramp_sparsity, ramp_step_
from prunekit.methods.registry import register_method


@dataclass(kw_only=True)
class DPFConfig(RampConfig):
    """DPF: the cubic ramp; the mask is recomputed from the dense weights every 16 steps for the whole
    run (also after the target sparsity is reached), so wrongly pruned weights can return."""

    update_every: int = 16
    update_until: float | None = 1.0


@register_method("dpf")
class DPF(Pruner):
    """Pruning with feedback: straight-through masks over dense weights."""

    config_class = DPFConfig
    config: DPFConfig

    def __init__(self, model: nn.Module, optimizer: Optimizer | None, config: DPFConfig):
        super().__init__(model, optimizer, config)
        self.masker = Masker(self.targets, optimizer, MaskMode.STRAIGHT_THROUGH)
        ramp_step_(self, config, 0)

    def scheduled_sparsity(self, step: int | None = None) -> float:
        return ramp_sparsity(self.config, self.step_count if step is None else step)

    def _on_step(self) -> None:
        ramp_step_(self, self.config, self.step_count)
