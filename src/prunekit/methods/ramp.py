"""The cubic sparsity ramp shared by GMP and DPF (Zhu & Gupta 2017)."""

from __future__ import annotations

from dataclasses import dataclass

from prunekit.config import ConfigError
from prunekit.methods.base import Pruner, SparsityConfig, check_fraction
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
        check_fraction("start", self.start)
        check_fraction("end", self.end)
        if self.end < self.start:
            raise ConfigError(f"end ({self.end}) must not be before start ({self.start})")
        if not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise ConfigError(
                f"initial_sparsity must be in [0, sparsity], got {self.initial_sparsity}"
            )
        if self.update_every < 1:
            raise ConfigError(f"update_every must be >= 1, got {self.update_every}")
        if self.update_until is not None:
            check_fraction("update_until", self.update_until)
        if self.power <= 0:
            raise ConfigError(f"power must be positive, got {self.power}")


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


def ramp_step_(pruner: Pruner, config: RampConfig, step: int) -> None:
    """Recompute ``pruner``'s masks by magnitude at the ramp's sparsity when an update is due."""
    if pruner.masker is None:
        raise RuntimeError(f"{pruner.name} has no masker")
    if ramp_update_due(config, step) or (step == 0 and config.initial_sparsity > 0):
        pruner.masker.set_masks_(pruner.magnitude_masks(ramp_sparsity(config, step)))
