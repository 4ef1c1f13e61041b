"""Iterative magnitude pruning with retraining schedules.

Han et al. 2015 (prune + retrain); Renda, Frankle, Carbin 2020 (learning-rate rewinding); Zimmer,
Spiegel, Pokutta, *How I learned to stop worrying and love retraining*, ICLR 2023 (SLR, LLR).

Train dense for ``pretrain`` of the budget with the base schedule, then ``rounds`` times: prune
globally by magnitude to ``s_r = 1 − (1 − s)^{r/R}`` and retrain. The learning rate of a retraining
phase of ``R`` steps (``j`` = step inside it, ``T0`` = pretrain steps, ``η(t)`` = base schedule) is:

* ``ft``  — fine-tuning: ``ft_lr_factor · η(0)``, constant;
* ``lrw`` — learning-rate rewinding: ``η(T0 − R + j)``, the last ``R`` steps of the base schedule;
* ``slr`` — scaled learning-rate restarting: ``η(j · T0 / R)``, the whole base schedule compressed;
* ``llr`` — linear learning-rate restarting: ``η(0) · (1 − j / R)``.

IMP owns the learning rate (it sets every param group's ``lr`` after each step, scaled by the
group's initial ``lr``); attach no other scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from torch.optim import Optimizer

from prunekit.config import ConfigError
from prunekit.core.masks import Masker, MaskMode
from prunekit.methods.base import Pruner, SparsityConfig, check_fraction
from prunekit.methods.registry import register_method
from prunekit.schedules import constant, cosine, linear

RETRAIN_SCHEDULES = ("ft", "lrw", "slr", "llr")
BASE_SCHEDULES = ("cosine", "linear", "constant")


@dataclass(kw_only=True)
class IMPConfig(SparsityConfig):
    """IMP settings (see the module docstring for the schedules)."""

    rounds: int = 3
    pretrain: float = 0.4
    retrain_schedule: str = "llr"
    base_schedule: str = "cosine"
    ft_lr_factor: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        check_fraction("pretrain", self.pretrain, allow_one=False)
        if self.retrain_schedule not in RETRAIN_SCHEDULES:
            raise ConfigError(
                f"retrain_schedule must be one of {list(RETRAIN_SCHEDULES)}, got {self.retrain_schedule!r}"
            )
        if self.base_schedule not in BASE_SCHEDULES:
            raise ConfigError(
                f"base_schedule must be one of {list(BASE_SCHEDULES)}, got {self.base_schedule!r}"
            )
        if not 0 < self.ft_lr_factor <= 1:
            raise ConfigError(f"ft_lr_factor must be in (0, 1], got {self.ft_lr_factor}")
        if self.total_steps - self.fraction_step(self.pretrain) < self.rounds:
            raise ConfigError("total_steps leaves fewer retraining steps than rounds")


def imp_lr_factor(config: IMPConfig, step: int) -> float:
    """Learning rate at ``step`` as a fraction of the initial one (pure function of the step)."""
    t0 = config.fraction_step(config.pretrain)
    retrain = (config.total_steps - t0) // config.rounds

    def base(t: int) -> float:
        if config.base_schedule == "cosine":
            return cosine(t, 1.0, t0)
        if config.base_schedule == "linear":
            return linear(t, 1.0, t0)
        return constant(t, 1.0)

    if step < t0:
        return base(step)
    j = min((step - t0) - retrain * min((step - t0) // retrain, config.rounds - 1), retrain)
    schedule = config.retrain_schedule
    if schedule == "ft":
        return config.ft_lr_factor
    if schedule == "lrw":
        return base(t0 - retrain + j)
    if schedule == "slr":
        return base(int(j * t0 / retrain))
    return linear(j, 1.0, retrain)


@register_method("imp")
class IMP(Pruner):
    """Iterative magnitude pruning with FT / LRW / SLR / LLR retraining."""

    config_class = IMPConfig
    config: IMPConfig
    owns_lr: ClassVar[bool] = True

    def __init__(self, model: nn.Module, optimizer: Optimizer | None, config: IMPConfig):
        super().__init__(model, optimizer, config)
        self.masker = Masker(self.targets, optimizer, MaskMode.HARD)
        self._base_lrs = [g["lr"] for g in optimizer.param_groups] if optimizer is not None else []
        self._set_lr(0)

    def round_starts(self) -> list[int]:
        """Steps after which each pruning round happens."""
        t0 = self.config.fraction_step(self.config.pretrain)
        retrain = (self.config.total_steps - t0) // self.config.rounds
        return [t0 + r * retrain for r in range(self.config.rounds)]

    def round_sparsity(self, r: int) -> float:
        """Sparsity after round ``r`` (0-based): a constant fraction of the survivors is pruned."""
        return 1.0 - (1.0 - self.config.sparsity) ** ((r + 1) / self.config.rounds)

    def _set_lr(self, step: int) -> None:
        if self.optimizer is None:
            return
        factor = imp_lr_factor(self.config, step)
        for group, lr0 in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = lr0 * factor

    def _on_step(self) -> None:
        starts = self.round_starts()
        if self.step_count in starts:
            assert self.masker is not None
            r = starts.index(self.step_count)
            self.masker.set_masks_(self.magnitude_masks(self.round_sparsity(r)))
        self._set_lr(self.step_count)
