"""HSPG — OTOv1 (Chen et al., "Only Train Once: a one-shot neural network training and pruning
framework", NeurIPS 2021): half-space stochastic projected gradient for
``min f(x) + λ Σ_g ||x_g||``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prunekit.config import Config, check_fraction, check_non_negative, fraction_step
from prunekit.structured.base import GroupSparseOptimizer, unit_directions
from prunekit.structured.groups import Group
from prunekit.structured.registry import register_structured
from prunekit.structured.selection import half_space_mask


@dataclass(kw_only=True)
class HSPGConfig(Config):
    """HSPG's settings, as a recipe's ``structured: {optimizer: hspg, ...}`` section holds them.

    Attributes:
        target_group_sparsity: an optional cap on the fraction of zero groups, in ``[0, 1)``;
            ``None`` (default): no cap, the sparsity is whatever ``λ`` and ``ε`` give (OTOv1).
        start: the subgradient phase, as a fraction of training in ``[0, 1)``; half-space steps
            follow (the paper runs about a quarter of training there).
        lambda_: group-lasso weight ``λ >= 0``.
        epsilon: half-space control ``ε >= 0``.
    """

    target_group_sparsity: float | None = None
    start: float = 0.1
    lambda_: float = 1e-3
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_group_sparsity is not None:  # None: no cap
            check_fraction("target_group_sparsity", self.target_group_sparsity)
        check_fraction("start", self.start)
        check_non_negative("lambda_", self.lambda_)
        check_non_negative("epsilon", self.epsilon)


@register_structured("hspg")
class HSPG(GroupSparseOptimizer):
    """Half-space stochastic projected gradient (OTOv1), driven by ``λ``.

    A subgradient phase of ``subgradient_steps`` steps along ``∇f + λ x_g/||x_g||``, then
    half-space steps: the trial point ``x̂ = x − lr (∇f + λ x_g/||x_g||)`` (with the optimizer's
    momentum or Adam update) followed by the projection ``x̂_g ← 0`` iff
    ``<x̂_g, x_g> < ε ||x_g||²`` (:func:`~prunekit.structured.selection.half_space_mask`). The
    sparsity reached is whatever ``λ`` and ``ε`` give, as in the paper; ``target_group_sparsity``,
    off by default, caps it (the crossing groups of smallest norm go first, none past the cap).
    With Adam the ``λ`` term is applied decoupled from Adam's normalisation
    (``x̂ = Adam step − lr·λ x_g/||x_g||``), as AdamW applies weight decay; each parameter uses
    its own param group's ``lr``.

    Args:
        lambda_: group-lasso weight ``λ``.
        epsilon: half-space control ``ε`` (0 projects only groups whose trial step crosses zero;
            larger values also project groups whose step shrinks them by more than ``1 − ε``).
        subgradient_steps: length of the first phase. The paper runs about a quarter of training
            there; ``None`` takes ``total_steps // 4``.
        total_steps: the length of training, needed when ``subgradient_steps`` is not given.
        target_group_sparsity: an optional cap on the fraction of zero groups (``None``: none).
    """

    config_class: ClassVar[type[HSPGConfig]] = HSPGConfig

    def __init__(
        self,
        params: Any,
        groups: Sequence[Group],
        *,
        lambda_: float = 1e-3,
        epsilon: float = 0.0,
        subgradient_steps: int | None = None,
        total_steps: int | None = None,
        target_group_sparsity: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(params, groups, target_group_sparsity=target_group_sparsity, **kwargs)
        if lambda_ < 0 or epsilon < 0:
            raise ValueError("lambda_ and epsilon must be >= 0")
        if subgradient_steps is None:
            if total_steps is None:
                raise ValueError(
                    "HSPG needs subgradient_steps, or total_steps to run the paper's quarter of "
                    "training as subgradient steps (subgradient_steps = total_steps // 4)"
                )
            subgradient_steps = total_steps // 4
        if subgradient_steps < 0:
            raise ValueError(f"subgradient_steps must be >= 0, got {subgradient_steps}")
        self.lambda_, self.epsilon, self.subgradient_steps = lambda_, epsilon, subgradient_steps
        self.capped = target_group_sparsity is not None

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
    ) -> HSPG:
        """HSPG with ``round(start · total_steps)`` subgradient steps."""
        del model, example
        cls._require_config(config)
        optimizer = cls(
            params,
            groups,
            lambda_=config.lambda_,
            epsilon=config.epsilon,
            subgradient_steps=fraction_step(config.start, total_steps),
            target_group_sparsity=config.target_group_sparsity,
            **update,
        )
        optimizer.config = config
        return optimizer

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure(closure)
        index = self.index
        directions = self._directions()
        lam = torch.full((index.num_groups,), self.lambda_, device=index.sizes.device)
        if self.variant == "sgd":  # OTOv1: the group-lasso subgradient joins the gradient
            ds = [directions.setdefault(p, torch.zeros_like(p)) for p in index.params]
            index.add_scaled_(lam, unit_directions(index), ds)
            for p, d in zip(index.params, ds, strict=True):
                directions[p] = d
            before = [p.detach().clone() for p in index.params]
            self._update(directions, self.zero)
        else:  # decoupled from Adam's normalisation, as AdamW does weight decay
            before = [p.detach().clone() for p in index.params]
            self._update(directions, self.zero)
            self._lasso_from_(before, lam * (~self.zero).float())
        if self.num_steps >= self.subgradient_steps:
            inner = index.dots([p.detach() for p in index.params], before)
            cross = half_space_mask(inner, index.sq_norms(before), self.epsilon) & ~self.zero
            room = self.target_count - int(self.zero.sum()) if self.capped else index.num_groups
            if room > 0 and bool(cross.any()):
                norms = index.sq_norms().masked_fill(~cross, float("inf"))
                chosen = torch.zeros_like(cross)
                chosen[torch.topk(norms, min(room, int(cross.sum())), largest=False).indices] = True
                self._set_zero(chosen)
        self._set_zero(torch.zeros_like(self.zero))
        self.num_steps += 1
        return loss
