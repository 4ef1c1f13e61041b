"""The cubic sparsity ramp shared by GMP (hard masks) and DPF (straight-through masks)
(Zhu & Gupta 2017)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from torch.optim import Optimizer

from prunekit.config import ConfigError, check_fraction, check_int, check_positive
from prunekit.core.masks import Masker, MaskMode
from prunekit.methods.base import Pruner, SparsityConfig
from prunekit.schedules import polynomial


@dataclass(kw_only=True)
class RampConfig(SparsityConfig):
    """Sparsity ramps ``initial_sparsity → sparsity`` between fractions ``start`` and ``end`` of
    training, ``s_t = s_f + (s_i − s_f)(1 − (t − t0)/(t1 − t0))^power``, with the mask recomputed every
    ``update_every`` steps from ``start`` until ``update_until`` (a fraction of training; ``None`` = the
    end of the ramp) and once more exactly at the ramp's end."""

    initial_sparsity: float = 0.0
    start: float = 0.0
    end: float = 0.75
    update_every: int = 100
    power: float = 3.0
    update_until: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("start", self.start, closed=True)
        check_fraction("end", self.end, closed=True)
        if self.end < self.start:
            raise ConfigError(f"end ({self.end}) must not be before start ({self.start})")
        if not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise ConfigError(
                f"initial_sparsity must be in [0, sparsity], got {self.initial_sparsity}"
            )
        check_int("update_every", self.update_every, 1)
        if self.update_until is not None:
            check_fraction("update_until", self.update_until, closed=True)
        check_positive("power", self.power)


def ramp_sparsity(config: RampConfig, step: int) -> float:
    """Scheduled sparsity at ``step``."""
    return polynomial(
        step,
        config.initial_sparsity,
        config.sparsity,
        config.fraction_step(config.start),
        config.fraction_step(config.end),
        config.power,
    )


def ramp_update_due(config: RampConfig, step: int) -> bool:
    """Whether the mask is recomputed after ``step`` optimizer steps."""
    start, end = config.fraction_step(config.start), config.fraction_step(config.end)
    until = (
        end if config.update_until is None else max(end, config.fraction_step(config.update_until))
    )
    if step < start or step > until:
        return False
    return step == end or (step - start) % config.update_every == 0


class RampPruner(Pruner):
    """Magnitude masks recomputed on the cubic ramp; subclasses choose the :class:`MaskMode`."""

    config_class: ClassVar[type[SparsityConfig]] = RampConfig
    config: RampConfig
    mask_mode: ClassVar[MaskMode] = MaskMode.HARD

    def __init__(self, model: nn.Module, optimizer: Optimizer | None, config: RampConfig):
        super().__init__(model, optimizer, config)
        self.masker = Masker(self.targets, optimizer, self.mask_mode)
        self._update(0)

    def scheduled_sparsity(self, step: int | None = None) -> float:
        """Sparsity of the ramp at ``step`` (default: now)."""
        return ramp_sparsity(self.config, self.step_count if step is None else step)

    def _update(self, step: int) -> None:
        if ramp_update_due(self.config, step) or (step == 0 and self.config.initial_sparsity > 0):
            assert self.masker is not None
            self.masker.set_masks_(self.magnitude_masks(ramp_sparsity(self.config, step)))

    def _on_step(self) -> None:
        self._update(self.step_count)
