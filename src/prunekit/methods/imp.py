"""Iterative magnitude pruning with retraining schedules.

Han et al. 2015 (prune + retrain); Renda, Frankle, Carbin 2020 (learning-rate rewinding); Zimmer,
Spiegel, Pokutta, *How I learned to stop worrying and love retraining*, ICLR 2023 (SLR, LLR).

Train dense for ``pretrain`` of the budget with the base schedule, then ``rounds`` times: prune
globally by magnitude to ``s_r = 1 − (1 − s)^{r/R}`` and retrain. The learning rate of a retraining
phase of ``R`` steps (``j`` = step inside it, ``T0`` = pretrain steps, ``η(t)`` = base schedule) is:

* ``ft``  — fine-tuning: ``ft_lr_factor · η(0)``, constant;
* ``lrw`` — learning-rate rewinding: ``η(T0 − R + j)``, the last ``R`` steps of the base schedule;
* ``slr`` — scaled learning-rate restarting: ``η(j · T0 / R)``, the whole base schedule compressed;
* ``llr`` — linear learning-rate restarting: ``η(0) · (1 − j / R)``;
* ``allr`` — adaptive LLR (Zimmer et al.): ``η_r · (1 − j / R)`` with the peak scaled by how much the
  round's pruning moved the weights, ``η_r = clip(d_r / √s_r, min(R / T0, 1), 1) · η(0)``, where
  ``d_r = ‖w − m ⊙ w‖ / ‖w‖`` (over the pruned layers, just before the round's masks are applied) and
  ``s_r`` the fraction of the remaining weights the round prunes (as in the authors' code; their
  10% warm-up of the restart is left out here, as for ``llr``).

Weight rewinding (``rewind_to``): the survivors restart each round from their values at that point of
training instead of continuing — ``0.0`` is the lottery-ticket reset to initialisation (Frankle &
Carbin 2019); an early point (a few % of training) is weight rewinding (Frankle et al. 2020, Renda et
al. 2020), which Renda et al. pair with ``lrw`` so the learning rate rewinds to the same point.
Optimizer state is reset when the weights rewind.

IMP owns the learning rate (it sets every param group's ``lr`` after each step, scaled by the
group's initial ``lr``); attach no other scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from prunekit.config import ConfigError, check_fraction, check_int, check_range
from prunekit.core.masks import Masker, MaskMode, state_without_masks
from prunekit.methods.base import Pruner, SparsityConfig
from prunekit.methods.registry import register_method
from prunekit.schedules import constant, cosine, linear

RETRAIN_SCHEDULES = ("ft", "lrw", "slr", "llr", "allr")
BASE_SCHEDULES = ("cosine", "linear", "constant")


@dataclass(kw_only=True)
class IMPConfig(SparsityConfig):
    """IMP settings (see the module docstring for the schedules)."""

    rounds: int = 3
    pretrain: float = 0.4
    retrain_schedule: str = "llr"
    base_schedule: str = "cosine"
    ft_lr_factor: float = 0.01
    rewind_to: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rounds", self.rounds, 1)
        check_fraction("pretrain", self.pretrain)
        if self.retrain_schedule not in RETRAIN_SCHEDULES:
            raise ConfigError(
                f"retrain_schedule must be one of {list(RETRAIN_SCHEDULES)}, got {self.retrain_schedule!r}"
            )
        if self.base_schedule not in BASE_SCHEDULES:
            raise ConfigError(
                f"base_schedule must be one of {list(BASE_SCHEDULES)}, got {self.base_schedule!r}"
            )
        check_range("ft_lr_factor", self.ft_lr_factor, 0.0, 1.0, low_open=True)
        if self.total_steps - self.fraction_step(self.pretrain) < self.rounds:
            raise ConfigError("total_steps leaves fewer retraining steps than rounds")
        if self.rewind_to is not None and not 0.0 <= self.rewind_to <= self.pretrain:
            raise ConfigError(
                f"rewind_to must lie in the dense phase [0, pretrain={self.pretrain}], got {self.rewind_to!r}"
            )


def allr_peak(relative_norm_drop: float, round_sparsity: float, config: IMPConfig) -> float:
    """ALLR's restart learning rate as a fraction of ``η(0)``: ``clip(d / √s, min(R/T0, 1), 1)``."""
    t0 = config.fraction_step(config.pretrain)
    retrain = (config.total_steps - t0) // config.rounds
    floor = min(retrain / t0, 1.0) if t0 > 0 else 1.0
    raw = relative_norm_drop / math.sqrt(round_sparsity) if round_sparsity > 0 else 1.0
    return min(max(raw, floor), 1.0)


def imp_lr_factor(config: IMPConfig, step: int, peaks: Sequence[float] = ()) -> float:
    """Learning rate at ``step`` as a fraction of the initial one (pure function of the step and,
    for ``allr``, of each round's measured ``peaks``)."""
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
    peak = 1.0
    if schedule == "allr":
        r = min((step - t0) // retrain, config.rounds - 1)
        peak = peaks[r] if r < len(peaks) else 1.0
    return linear(j, peak, retrain)


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
        #: ALLR's measured restart peak of each round so far (fractions of the initial lr)
        self.allr_peaks: list[float] = []
        self._rewind: dict[str, Tensor] | None = None
        self._maybe_snapshot(0)
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
        factor = imp_lr_factor(self.config, step, self.allr_peaks)
        for group, lr0 in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = lr0 * factor

    def _maybe_snapshot(self, step: int) -> None:
        c = self.config
        if c.rewind_to is not None and step == c.fraction_step(c.rewind_to):
            # the whole network rewinds (biases, norms, layers left dense), not only the targets
            self._rewind = state_without_masks(self.model)

    @torch.no_grad()
    def _prune_round(self, r: int) -> None:
        assert self.masker is not None
        masks = self.magnitude_masks(self.round_sparsity(r))
        if self.config.retrain_schedule == "allr":
            weights = [t.param.detach() for t in self.targets]
            total = sum(float(w.float().pow(2).sum()) for w in weights)  # fp16 would overflow
            removed = sum(
                float(w[~m].float().pow(2).sum()) for w, m in zip(weights, masks, strict=True)
            )
            before = self.round_sparsity(r - 1) if r > 0 else 0.0
            pruned_share = 1.0 - (1.0 - self.round_sparsity(r)) / (1.0 - before)
            drop = math.sqrt(removed / total) if total > 0 else 0.0
            self.allr_peaks.append(allr_peak(drop, pruned_share, self.config))
        self.masker.set_masks_(masks)
        if self._rewind is not None:
            current = self.model.state_dict()
            for k, v in self._rewind.items():
                current[k].copy_(v)
            self.masker.apply_()  # survivors restart from their early values, pruned ones at 0
            if self.optimizer is not None:  # the whole run restarts: momentum and moments too
                self.optimizer.state.clear()

    def _on_step(self) -> None:
        self._maybe_snapshot(self.step_count)
        starts = self.round_starts()
        if self.step_count in starts:
            self._prune_round(starts.index(self.step_count))
        self._set_lr(self.step_count)

    def _extra_state(self) -> dict[str, Any]:
        return {"allr_peaks": list(self.allr_peaks), "rewind": self._rewind}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.allr_peaks = [float(p) for p in state.get("allr_peaks", [])]
        rewind = state.get("rewind")
        current = self.model.state_dict()
        self._rewind = (
            None if rewind is None else {k: v.to(current[k].device) for k, v in rewind.items()}
        )
