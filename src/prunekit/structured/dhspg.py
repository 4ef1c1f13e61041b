"""DHSPG — OTOv2 (Chen et al., "OTOv2: automatic, generic, user-friendly", ICLR 2023): dual
half-space projected gradient, which reaches a target group sparsity."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prunekit.config import (
    Config,
    ConfigError,
    check_fraction,
    check_non_negative,
    check_window,
    fraction_step,
)
from prunekit.structured.base import GroupSparseOptimizer, deprecated_argument
from prunekit.structured.groups import Group
from prunekit.structured.registry import register_structured
from prunekit.structured.selection import adaptive_lambda, half_space_mask, redundancy_score

#: OTOv2 reference defaults of ``(amplify, hat_coeff)`` per update rule
ADAPTIVE_DEFAULTS = {"sgd": (2.0, 10.0), "adam": (20.0, 1e3), "adamw": (20.0, 1e3)}


@dataclass(kw_only=True)
class DHSPGConfig(Config):
    """DHSPG's settings, as a recipe's ``structured: {optimizer: dhspg, ...}`` section holds them.

    Attributes:
        target_group_sparsity: the fraction ``s*`` of the groups brought to zero, in ``[0, 1)``.
        start: when the redundant groups are chosen, as a fraction of training.
        end: when ``N·s*`` groups are zero, as a fraction of training (``0 <= start < end <= 1``).
        lambda_: base ``λ >= 0``; ``None`` (default) picks it from the redundant groups' norms.
        epsilon: half-space control ``ε >= 0``.
        margin: added to ``s*`` to size the redundant set, ``>= 0`` (the reference's 0.05).
        amplify, hat_coeff: of the adaptive ``λ_g``, ``> 0``; ``None`` (default) takes the
            reference's values for the update rule (2 and 10 for SGD, 20 and 1000 for Adam/AdamW).
    """

    target_group_sparsity: float = 0.5
    start: float = 0.1
    end: float = 0.6
    lambda_: float | None = None
    epsilon: float = 0.0
    margin: float = 0.05
    amplify: float | None = None
    hat_coeff: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("target_group_sparsity", self.target_group_sparsity)
        check_window(self.start, self.end)
        if self.lambda_ is not None:  # None: picked from the redundant groups' norms
            check_non_negative("lambda_", self.lambda_)
        check_non_negative("epsilon", self.epsilon)
        check_non_negative("margin", self.margin)
        for name in ("amplify", "hat_coeff"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(
                    f"{name} must be > 0 (or None for the reference's), got {value!r}"
                )


@register_structured("dhspg")
class DHSPG(GroupSparseOptimizer):
    """Dual half-space projected gradient (OTOv2): target group sparsity ``s*`` of ``N`` groups.

    At ``start_step`` the ``K = ⌊N · min(s* + margin, 0.999)⌋`` most redundant groups are chosen
    by :func:`~prunekit.structured.selection.redundancy_score` (cosine between each group and its
    step direction, mixed with its inverse average magnitude, as the OTOv2 reference does). The
    margin lets the ``N·s*`` groups that reach zero first be the ones the loss gives up most
    easily. Every step is the optimizer's update ``x − lr·d`` (``d``: the gradient with weight
    decay and momentum, or Adam's direction), and for the redundant groups that are not zero yet
    the trial point ``x̂_g = x_g − lr·d_g − lr·λ_g x_g/||x_g||`` with the adaptive ``λ_g`` of
    :func:`~prunekit.structured.selection.adaptive_lambda`, followed by the half-space projection
    ``x̂_g ← 0`` iff ``<x̂_g, x_g> < ε ||x_g||²``. Once ``N·s*`` groups are zero the penalty
    stops, and the redundant groups still non-zero train freely again, as in the reference.

    Two departures from the reference keep the target exact: projections in one step stop at
    ``N·s*`` (crossing groups of smallest norm first; the reference may overshoot), and at
    ``end_step`` the redundant groups of smallest norm are zeroed until ``N·s*`` are zero
    (the reference relies on ``λ`` alone). Each parameter uses its own param group's ``lr``.

    Args:
        start_step: steps of plain training before the redundant groups are chosen.
        end_step: step by which ``N·s*`` groups are zero.
        lambda_: base ``λ``; ``None`` picks ``λ = median_g(||x_g|| / lr_g) / ((end_step −
            start_step) / 2)`` over the redundant groups at selection, so a typical redundant
            group reaches zero halfway under ``λ`` alone.
        epsilon: half-space control ``ε``.
        margin: added to ``s*`` to size the redundant set (the reference's 0.05).
        amplify, hat_coeff: of ``λ_g``; ``None`` takes the reference's values for the update
            rule (2 and 10 for SGD, 20 and 1000 for Adam/AdamW).
    """

    config_class: ClassVar[type[DHSPGConfig]] = DHSPGConfig

    def __init__(
        self,
        params: Any,
        groups: Sequence[Group],
        *,
        start_step: int = 0,
        end_step: int | None = None,
        lambda_: float | None = None,
        epsilon: float = 0.0,
        margin: float = 0.05,
        amplify: float | None = None,
        hat_coeff: float | None = None,
        **kwargs: Any,
    ):
        if "project_end" in kwargs:
            deprecated_argument("DHSPG", "project_end", "end_step")
            end_step = kwargs.pop("project_end")
        super().__init__(params, groups, **kwargs)
        if end_step is None:
            raise TypeError("DHSPG needs end_step, the step by which N·s* groups are zero")
        if end_step <= start_step:
            raise ValueError("end_step must be after start_step")
        if epsilon < 0 or margin < 0 or (lambda_ is not None and lambda_ < 0):
            raise ValueError("lambda_, epsilon and margin must be >= 0")
        self.start_step, self.end_step, self.epsilon = start_step, end_step, epsilon
        self.lambda_ = lambda_
        default_amplify, default_hat = ADAPTIVE_DEFAULTS[self.variant]
        self.amplify = default_amplify if amplify is None else amplify
        self.hat_coeff = default_hat if hat_coeff is None else hat_coeff
        n = self.index.num_groups
        self.num_redundant = (
            max(self.target_count, int(n * min(self.target + margin, 0.999)))
            if self.target_count
            else 0
        )
        self.redundant = torch.zeros_like(self.zero)

    @classmethod
    def from_config(
        cls,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        groups: Sequence[Group],
        config: Any,
        *,
        total_steps: int,
        model: nn.Module | None = None,
        example: Any = None,
        **update: Any,
    ) -> DHSPG:
        """DHSPG selecting at ``round(start · total_steps)``, all zero by ``round(end ·
        total_steps)``."""
        del model, example
        cls._require_config(config)
        optimizer = cls(
            params,
            groups,
            start_step=fraction_step(config.start, total_steps),
            end_step=fraction_step(config.end, total_steps),
            lambda_=config.lambda_,
            epsilon=config.epsilon,
            margin=config.margin,
            amplify=config.amplify,
            hat_coeff=config.hat_coeff,
            target_group_sparsity=config.target_group_sparsity,
            **update,
        )
        optimizer.config = config
        return optimizer

    def _group_lrs(self) -> Tensor:
        """Mean ``lr`` over each group's entries (from each parameter's own param group)."""
        index = self.index
        lrs = [torch.full_like(p, lr) for p, lr in zip(index.params, self.param_lrs(), strict=True)]
        ones = [torch.ones_like(p) for p in index.params]
        return index.dots(lrs, ones) / index.sizes.clamp_min(1)

    def _select(self, before: list[Tensor], d: list[Tensor]) -> None:
        index = self.index
        x_norm = index.sq_norms(before).sqrt()
        score = redundancy_score(
            index.dots(d, before), x_norm, index.sq_norms(d).sqrt(), index.sizes
        )
        self.redundant[torch.topk(score, self.num_redundant).indices] = True
        if self.lambda_ is None:
            lr = self._group_lrs()
            usable = self.redundant & (lr > 0)
            ratio = x_norm[usable] / lr[usable]
            median = float(ratio.median()) if ratio.numel() else 0.0
            self.lambda_ = median / max(1.0, (self.end_step - self.start_step) / 2)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure(closure)
        index = self.index
        before = [p.detach().clone() for p in index.params]
        self._update(self._directions(), self.zero)
        # the step direction d = (x − x_new) / lr: gradient with momentum, or Adam's direction
        d = [
            (b - p.detach()) / lr if lr > 0 else torch.zeros_like(b)
            for b, p, lr in zip(before, index.params, self.param_lrs(), strict=True)
        ]
        if self.num_steps == self.start_step and self.num_redundant:
            self._select(before, d)
        room = self.target_count - int(self.zero.sum())
        active = self.redundant & ~self.zero if room > 0 else torch.zeros_like(self.zero)
        if bool(active.any()):
            sq = index.sq_norms(before)
            lam = adaptive_lambda(
                index.dots(d, before),
                sq.sqrt(),
                index.sq_norms(d).sqrt(),
                float(self.lambda_ or 0.0),
                self.amplify,
                self.hat_coeff,
            )
            self._lasso_from_(before, lam * active.float())
            trial_dot_x = index.dots([p.detach() for p in index.params], before)
            cross = half_space_mask(trial_dot_x, sq, self.epsilon) & active
            self._zero_smallest(cross, room)
        if self.num_steps + 1 >= self.end_step:
            self._zero_smallest(
                self.redundant & ~self.zero, self.target_count - int(self.zero.sum())
            )
        self._set_zero(torch.zeros_like(self.zero))
        self.num_steps += 1
        return loss

    def _zero_smallest(self, candidates: Tensor, room: int) -> None:
        """Zero up to ``room`` of ``candidates``, smallest norm first."""
        count = min(room, int(candidates.sum()))
        if count <= 0:
            return
        norms = self.index.sq_norms().masked_fill(~candidates, float("inf"))
        chosen = torch.zeros_like(candidates)
        chosen[torch.topk(norms, count, largest=False).indices] = True
        self._set_zero(chosen)

    def _extra_state(self) -> dict[str, Any]:
        return {"redundant": self.redundant.cpu(), "lambda_": self.lambda_}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.redundant = state["redundant"].to(self.zero.device)
        self.lambda_ = state["lambda_"]
