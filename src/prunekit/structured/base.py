"""The machinery HSPG, DHSPG and HESSO share: the SGD/Adam step with some groups held at zero, the
group bookkeeping, and the optimizer state that a resume needs."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from prunekit.config import Config
from prunekit.core.targets import NoPrunableLayersError
from prunekit.structured.group_index import GroupIndex
from prunekit.structured.groups import Group

VARIANTS = ("sgd", "adam", "adamw")


def deprecated_argument(owner: str, old: str, new: str) -> None:
    """Warn that keyword ``old`` of ``owner`` is deprecated in favour of ``new``."""
    warnings.warn(f"{owner}({old}=...) is deprecated; use {new}", DeprecationWarning, stacklevel=3)


class GroupSparseOptimizer(Optimizer):
    """Common machinery: the base update with some groups frozen at zero, and group bookkeeping.

    Args:
        params: the model's parameters (or parameter groups with their own ``lr``; every
            per-parameter quantity, including the group-lasso step, uses the parameter's own group).
        groups: the zero-invariant groups; the prunable ones are managed.
        lr, momentum, weight_decay, nesterov: the SGD update (``variant="sgd"``).
        variant: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        betas, eps: Adam's.
        target_group_sparsity: fraction of the managed groups to bring to zero; ``None`` for none
            (HSPG's default: it is driven by ``λ``, and the target is only an optional cap).

    Each registered subclass (:func:`~prunekit.structured.registry.register_structured`) has a
    config dataclass (``config_class``) and builds itself from it with ``from_config``; the
    optimizer's ``config`` is that config (``None`` when built from keyword arguments).
    """

    #: the registry name (set by :func:`~prunekit.structured.registry.register_structured`)
    name: ClassVar[str] = ""
    #: the config dataclass of the subclass
    config_class: ClassVar[type[Config]]
    config: Any = None

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        groups: Sequence[Group],
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        variant: str = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        target_group_sparsity: float | None = 0.5,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        if target_group_sparsity is not None and not 0.0 <= target_group_sparsity < 1.0:
            raise ValueError(
                f"target_group_sparsity must be in [0, 1), got {target_group_sparsity}"
            )
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        prunable = [g for g in groups if g.prunable]
        if not prunable:
            raise NoPrunableLayersError(
                "no prunable groups: find_groups() found nothing this optimizer can zero"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            betas=betas,
            eps=eps,
        )
        super().__init__(params, defaults)
        self.variant = variant
        self.index = GroupIndex(prunable)
        #: the target as a fraction (``0.0`` when there is none)
        self.target = target_group_sparsity or 0.0
        self.target_count = round(self.target * self.index.num_groups)
        device = self.index.sizes.device
        self.zero = torch.zeros(self.index.num_groups, dtype=torch.bool, device=device)
        self.num_steps = 0

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
    ) -> GroupSparseOptimizer:
        """The optimizer of ``config`` (an instance of ``config_class``) for a run of
        ``total_steps`` steps; ``update`` is the update rule (``lr``, ``momentum``,
        ``weight_decay``, ``nesterov``, ``variant``)."""
        raise NotImplementedError

    @classmethod
    def _require_config(cls, config: Any) -> None:
        if not isinstance(config, cls.config_class):
            raise TypeError(
                f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}"
            )

    # ------------------------------------------------------------------ reporting
    def group_sparsity(self) -> float:
        """Fraction of the managed groups that are exactly zero."""
        norms = self.index.sq_norms()
        return float((norms == 0).float().mean())

    # ------------------------------------------------------------- per-parameter lr
    def param_lrs(self) -> list[float]:
        """The learning rate of each of ``index.params``, from the parameter's own param group."""
        lr_of = {p: group["lr"] for group in self.param_groups for p in group["params"]}
        return [float(lr_of.get(p, 0.0)) for p in self.index.params]

    # ------------------------------------------------------------- the base update
    def _directions(self) -> dict[Tensor, Tensor]:
        out: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.detach().clone()
                if group["weight_decay"] and self.variant != "adamw":
                    d.add_(p.detach(), alpha=group["weight_decay"])
                out[p] = d
        return out

    @torch.no_grad()
    def _update(self, directions: dict[Tensor, Tensor], frozen: Tensor) -> None:
        """Apply the SGD/Adam step along ``directions``; groups in ``frozen`` do not move."""
        keep = (~frozen).float()
        ds = [directions.get(p, torch.zeros_like(p)) for p in self.index.params]
        self.index.scale_(keep, ds)
        for p, d in zip(self.index.params, ds, strict=True):
            if p in directions:
                directions[p] = d
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p not in directions:
                    continue
                d = directions[p]
                state = self.state[p]
                if self.variant == "sgd":
                    if group["momentum"]:
                        buf = state.get("momentum_buffer")
                        if buf is None:
                            buf = state["momentum_buffer"] = d.clone()
                        else:
                            buf.mul_(group["momentum"]).add_(d)
                        d = d.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    p.add_(d, alpha=-lr)
                else:
                    b1, b2 = group["betas"]
                    if not state:
                        state["step"] = torch.zeros((), device=p.device)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    t = float(state["step"])
                    state["exp_avg"].mul_(b1).add_(d, alpha=1 - b1)
                    state["exp_avg_sq"].mul_(b2).addcmul_(d, d, value=1 - b2)
                    denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
                    if self.variant == "adamw" and wd:
                        p.mul_(1 - lr * wd)
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))
        self._freeze_state(frozen)

    def _freeze_state(self, frozen: Tensor) -> None:
        keep = (~frozen).float()
        for name in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            tensors = [self.state[p].get(name) for p in self.index.params]
            if all(t is not None for t in tensors):
                self.index.scale_(keep, tensors)

    @torch.no_grad()
    def _set_zero(self, which: Tensor) -> None:
        """Mark groups as zero and zero them (and their optimizer state)."""
        self.zero |= which
        self.index.scale_((~self.zero).float())
        self._freeze_state(self.zero)

    @torch.no_grad()
    def _lasso_from_(self, before: Sequence[Tensor], lam: Tensor) -> None:
        """``x_g −= lr_p · λ_g · b_g/||b_g||`` with ``b`` the point ``before`` the step and each
        parameter's own ``lr_p``: the group-lasso step outside momentum and Adam's normalisation,
        as AdamW applies weight decay."""
        unit = unit_directions(self.index, before)
        for u, lr in zip(unit, self.param_lrs(), strict=True):
            u.mul_(lr)
        self.index.add_scaled_(-lam, unit, self.index.params)

    def _closure(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["group_sparse"] = {
            "zero": self.zero.cpu(),
            "num_steps": self.num_steps,
            **self._extra_state(),
        }
        if self.config is not None:
            state["group_sparse"]["config"] = self.config.to_dict()
            state["group_sparse"]["version"] = self.config.version
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = dict(state_dict.get("group_sparse", {}))
        base = {k: v for k, v in state_dict.items() if k != "group_sparse"}
        super().load_state_dict(base)
        if extra:
            self.zero = extra.pop("zero").to(self.zero.device)
            self.num_steps = int(extra.pop("num_steps"))
            extra.pop("config", None)
            extra.pop("version", None)
            self._load_extra_state(extra)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        del state


def unit_directions(index: GroupIndex, tensors: Sequence[Tensor] | None = None) -> list[Tensor]:
    """``x_g / ||x_g||`` for every parameter entry, of the parameters or of ``tensors`` shaped
    like them (zero groups give zero)."""
    xs = [p.detach() for p in index.params] if tensors is None else list(tensors)
    norms = index.sq_norms(xs).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    out = [x.clone() for x in xs]
    index.scale_(inv, out)
    return out
