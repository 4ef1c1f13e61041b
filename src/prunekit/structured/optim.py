"""Optimizers that drive whole zero-invariant groups to exactly zero during ordinary training.

* :class:`HSPG` — OTOv1 (Chen et al., NeurIPS 2021), for ``min f(x) + λ Σ_g ||x_g||``: a subgradient
  phase, then trial steps ``x̂ = x − lr (∇f + λ x_g/||x_g||)`` followed by the half-space projection
  ``x̂_g ← 0 if <x̂_g, x_g> < ε ||x_g||²``. Driven by ``λ``; ``target_group_sparsity`` caps how many
  groups are projected (smallest norms first). With Adam the ``λ`` term is applied decoupled from
  Adam's normalisation (``x̂ = Adam step − lr·λ x_g/||x_g||``), as AdamW applies weight decay.
* :class:`DHSPG` — OTOv2 (Chen et al., ICLR 2023): picks the ``K = N·s*`` most redundant groups once,
  adapts ``λ_g = λ + max(0, −<∇f_g, x_g>/||x_g||)`` so they shrink, projects them by the half-space
  rule, and zeroes any that remain at ``project_end``: the target is reached by construction.
* :class:`HESSO` — OTOv3 (Chen et al. 2023): no ``λ``. Over ``periods`` equal periods, picks the
  lowest-importance groups (normalised mixture of magnitude, average magnitude, cosine between the
  group and its descent direction, first- and second-order Taylor terms) and decays them linearly to
  exactly zero within the period.

All three are ``torch.optim.Optimizer`` subclasses with SGD (momentum, weight decay, Nesterov) or Adam
/AdamW updates, run on the device of the parameters, and keep zero groups exactly zero (their
gradient, momentum and Adam moments are zeroed too).
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from prunekit.structured.group_index import GroupIndex
from prunekit.structured.groups import Group

VARIANTS = ("sgd", "adam", "adamw")


class GroupSparseOptimizer(Optimizer):
    """Common machinery: the base update with some groups frozen at zero, and group bookkeeping."""

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
        target_group_sparsity: float = 0.5,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        if not 0.0 <= target_group_sparsity < 1.0:
            raise ValueError(
                f"target_group_sparsity must be in [0, 1), got {target_group_sparsity}"
            )
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        prunable = [g for g in groups if g.prunable]
        if not prunable:
            raise ValueError(
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
        self.target = target_group_sparsity
        self.target_count = round(target_group_sparsity * self.index.num_groups)
        device = self.index.sizes.device
        self.zero = torch.zeros(self.index.num_groups, dtype=torch.bool, device=device)
        self.num_steps = 0

    # ------------------------------------------------------------------ reporting
    def group_sparsity(self) -> float:
        """Fraction of the managed groups that are exactly zero."""
        norms = self.index.sq_norms()
        return float((norms == 0).float().mean())

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
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = dict(state_dict.get("group_sparse", {}))
        base = {k: v for k, v in state_dict.items() if k != "group_sparse"}
        super().load_state_dict(base)
        if extra:
            self.zero = extra.pop("zero").to(self.zero.device)
            self.num_steps = int(extra.pop("num_steps"))
            self._load_extra_state(extra)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        del state


def _unit(index: GroupIndex) -> list[Tensor]:
    """``x_g / ||x_g||`` for every parameter entry (zero groups give zero)."""
    norms = index.sq_norms().sqrt()
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    out = [p.detach().clone() for p in index.params]
    index.scale_(inv, out)
    return out


class HSPG(GroupSparseOptimizer):
    """Half-space stochastic projected gradient (OTOv1).

    Args:
        lambda_: group-lasso weight ``λ``.
        epsilon: half-space control ``ε`` (0 projects only groups whose trial step crosses zero).
        subgradient_steps: length of the first phase (plain subgradient steps).
    """

    def __init__(
        self,
        params: Any,
        groups: Sequence[Group],
        *,
        lambda_: float = 1e-3,
        epsilon: float = 0.0,
        subgradient_steps: int = 0,
        **kwargs: Any,
    ):
        super().__init__(params, groups, **kwargs)
        if lambda_ < 0 or epsilon < 0:
            raise ValueError("lambda_ and epsilon must be >= 0")
        self.lambda_, self.epsilon, self.subgradient_steps = lambda_, epsilon, subgradient_steps

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure(closure)
        index = self.index
        directions = self._directions()
        unit = _unit(index)
        lam = torch.full((index.num_groups,), self.lambda_, device=index.sizes.device)
        if self.variant == "sgd":  # OTOv1: the group-lasso subgradient joins the gradient
            ds = [directions.setdefault(p, torch.zeros_like(p)) for p in index.params]
            index.add_scaled_(lam, unit, ds)
            for p, d in zip(index.params, ds, strict=True):
                directions[p] = d
        before = [p.detach().clone() for p in index.params]
        self._update(directions, self.zero)
        if self.variant != "sgd":  # decoupled from Adam's normalisation, as AdamW does weight decay
            index.add_scaled_(
                -self.param_groups[0]["lr"] * lam * (~self.zero).float(), unit, index.params
            )
        if self.num_steps >= self.subgradient_steps:
            inner = index.dots([p.detach() for p in index.params], before)
            sq = index.sq_norms(before)
            cross = (inner < self.epsilon * sq) & ~self.zero & (sq > 0)
            room = self.target_count - int(self.zero.sum()) if self.target > 0 else index.num_groups
            if room > 0 and bool(cross.any()):
                norms = index.sq_norms().masked_fill(~cross, float("inf"))
                chosen = torch.zeros_like(cross)
                chosen[torch.topk(norms, min(room, int(cross.sum())), largest=False).indices] = True
                self._set_zero(chosen)
        self._set_zero(torch.zeros_like(self.zero))
        self.num_steps += 1
        return loss


class DHSPG(GroupSparseOptimizer):
    """Dual half-space projected gradient (OTOv2): target group sparsity by construction.

    Args:
        start_step: steps of plain training before the redundant groups are chosen.
        project_end: step by which every redundant group is zero (the rest are zeroed then).
        lambda_: base ``λ``; ``None`` picks ``λ = median ||x_g|| / (lr · (project_end − start_step) / 2)``
            at selection, so a typical redundant group reaches zero halfway through.
        epsilon: half-space control ``ε``.
    """

    def __init__(
        self,
        params: Any,
        groups: Sequence[Group],
        *,
        start_step: int = 0,
        project_end: int,
        lambda_: float | None = None,
        epsilon: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(params, groups, **kwargs)
        if project_end <= start_step:
            raise ValueError("project_end must be after start_step")
        self.start_step, self.project_end, self.epsilon = start_step, project_end, epsilon
        self.lambda_ = lambda_
        self.redundant = torch.zeros_like(self.zero)

    def _select(self) -> None:
        index = self.index
        score = (index.sq_norms() / index.sizes.clamp_min(1)).sqrt()  # average magnitude
        chosen = torch.topk(score, self.target_count, largest=False).indices
        self.redundant[chosen] = True
        if self.lambda_ is None:
            lr = self.param_groups[0]["lr"]
            median = (
                float(index.sq_norms()[self.redundant].sqrt().median())
                if self.target_count
                else 0.0
            )
            self.lambda_ = median / (lr * max(1, (self.project_end - self.start_step) / 2))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure(closure)
        index = self.index
        if self.num_steps == self.start_step and self.target_count:
            self._select()
        directions = self._directions()
        active = self.redundant & ~self.zero
        if bool(active.any()):
            ds = [directions.setdefault(p, torch.zeros_like(p)) for p in index.params]
            norms = index.sq_norms().sqrt().clamp_min(1e-30)
            inner = index.dots(index.grads(), [p.detach() for p in index.params])
            lam = (
                float(self.lambda_ or 0.0) + torch.clamp(-inner / norms, min=0.0)
            ) * active.float()
            index.add_scaled_(lam, _unit(index), ds)
            for p, d in zip(index.params, ds, strict=True):
                directions[p] = d
        before = [p.detach().clone() for p in index.params]
        self._update(directions, self.zero)
        if bool(active.any()):
            inner = index.dots([p.detach() for p in index.params], before)
            cross = (inner < self.epsilon * index.sq_norms(before)) & active
            self._set_zero(cross)
        if self.num_steps + 1 >= self.project_end:
            self._set_zero(self.redundant)
        self._set_zero(torch.zeros_like(self.zero))
        self.num_steps += 1
        return loss

    def _extra_state(self) -> dict[str, Any]:
        return {"redundant": self.redundant.cpu(), "lambda_": self.lambda_}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.redundant = state["redundant"].to(self.zero.device)
        self.lambda_ = state["lambda_"]


HESSO_CRITERIA = ("magnitude", "avg_magnitude", "cosine", "taylor_first", "taylor_second")


class HESSO(GroupSparseOptimizer):
    """Hybrid efficient structured sparse optimizer (OTOv3): no ``λ``; redundant groups decay to zero.

    Args:
        start_step: steps of plain training before the first period.
        pruning_steps: total length of the pruning periods.
        periods: number of periods; each selects ``N·s*/periods`` more groups and decays them
            linearly to exactly zero by its end.
        criteria: weights of the importance terms (see :data:`HESSO_CRITERIA`), equal by default.
        group_costs: what each of ``groups`` costs (or each prunable one), e.g. its MACs from
            :func:`~prunekit.structured.groups.group_macs`; with ``cost_target`` the target is a
            fraction of the total cost instead of a group count.
        cost_target: fraction of ``sum(group_costs)`` to remove (e.g. 0.7 for 70% of the FLOPs).
            Each period then selects the groups of least ``importance / (cost / mean cost) **
            cost_power`` until its share of the target is reached, so expensive, unimportant groups
            go first.
        max_layer_fraction: with ``cost_target``, the most of any layer's channels that may go.
        may_empty: with ``cost_target``, per group (or per prunable group) whether its layers may
            lose all their channels despite ``max_layer_fraction`` — from
            :func:`~prunekit.structured.slim.emptiable`, true for a residual branch's inner
            channels. An emptied branch is folded by :func:`~prunekit.structured.slim.slim`, which
            removes whole blocks (depth) as well as channels; the units of ``channel_multiple``
            still apply, so a 16-channel branch with ``channel_multiple=16`` stays or goes whole.
        cost_power: how strongly cost discounts importance in that ranking. ``1`` is the greedy
            knapsack rule (importance per unit cost), right if importance were a loss change; the
            HESSO importance is a mixture of normalised terms, and ranked per full MAC it took the
            expensive early layers down to their cap first (ResNet-20 on MNIST at 72% of the MACs:
            4 of 16 stage-1 channels left, 0.2–0.3 points below ``0.5`` with ``0.7`` as the cap, on
            two seeds and on VGG as well). ``0`` ignores cost in the ranking (cost still sets when
            to stop); it leaves the early layers wide, which costs CPU latency.
        channel_multiple: with ``cost_target``, groups that remove channels of the same layers
            are taken in units that keep the layer's width a multiple of this (runtimes with
            blocked layouts, such as onnxruntime's 8-channel blocks, run odd widths slowly); a
            unit ranks by the mean score of its groups.
        cost_rates: MACs per weight element by weight name
            (:func:`~prunekit.structured.groups.macs_rates`); with them the MACs a set of groups
            saves is computed exactly (a weight slice shared by two removed groups counts once),
            so ``cost_target`` is a fraction of the model's MACs.
    """

    def __init__(
        self,
        params: Any,
        groups: Sequence[Group],
        *,
        start_step: int = 0,
        pruning_steps: int,
        periods: int = 10,
        criteria: dict[str, float] | None = None,
        group_costs: Sequence[float] | None = None,
        cost_target: float | None = None,
        max_layer_fraction: float = 0.7,
        cost_rates: dict[str, float] | None = None,
        cost_power: float = 0.5,
        channel_multiple: int = 1,
        may_empty: Sequence[bool] | None = None,
        **kwargs: Any,
    ):
        super().__init__(params, groups, **kwargs)
        if pruning_steps < periods or periods < 1:
            raise ValueError("need periods >= 1 and pruning_steps >= periods")
        if (group_costs is None) != (cost_target is None):
            raise ValueError("group_costs and cost_target go together")
        self.costs: Tensor | None = None
        self.cost_target = cost_target
        if group_costs is not None and cost_target is not None:
            if not 0.0 <= cost_target < 1.0:
                raise ValueError(f"cost_target must be in [0, 1), got {cost_target}")
            costs = self._per_prunable("group_costs", group_costs, groups)
            self.costs = torch.tensor(costs, dtype=torch.float64)
            if not 0.0 < max_layer_fraction <= 1.0:
                raise ValueError(f"max_layer_fraction must be in (0, 1], got {max_layer_fraction}")
            self.max_layer_fraction = max_layer_fraction
            if not 0.0 <= cost_power <= 1.0:
                raise ValueError(f"cost_power must be in [0, 1], got {cost_power}")
            self._layer_slices = [
                {key: len(idx) for key, idx in g.slices("out").items()} for g in self.index.groups
            ]
            self._layer_sizes = {
                key: g.tensors()[key[0]].shape[key[1]]
                for g in self.index.groups
                for key in g.slices("out")
            }
            self._rates = dict(cost_rates or {})
            self._shapes = {
                name: tuple(t.shape)
                for g in self.index.groups
                for name, t in g.tensors().items()
                if name in self._rates
            }
            self._rated_slices = [
                {k: len(v) for k, v in g.slices().items() if k[0] in self._rates}
                for g in self.index.groups
            ]
            if self._rates:  # the target is a fraction of the model's MACs
                self._total_macs = sum(
                    rate * math.prod(self._shapes.get(n, ()))
                    for n, rate in self._rates.items()
                    if n in self._shapes
                )
            self.costs = self.costs.to(self.zero.device)
            self._may_empty = (
                self._per_prunable("may_empty", may_empty, groups)
                if may_empty is not None
                else [False] * len(costs)
            )
        self.cost_power = cost_power
        if channel_multiple < 1:
            raise ValueError(f"channel_multiple must be >= 1, got {channel_multiple}")
        self.channel_multiple = channel_multiple
        self.start_step, self.periods = start_step, periods
        self.period_len = pruning_steps // periods
        self.criteria = criteria or {c: 1.0 / len(HESSO_CRITERIA) for c in HESSO_CRITERIA}
        unknown = set(self.criteria) - set(HESSO_CRITERIA)
        if unknown:
            raise ValueError(f"unknown criteria {sorted(unknown)}; valid: {list(HESSO_CRITERIA)}")
        self.decaying = torch.zeros_like(self.zero)

    def _per_prunable(self, what: str, values: Sequence[Any], groups: Sequence[Group]) -> list[Any]:
        """``values`` given per group (the prunable ones kept) or per prunable group."""
        out = list(values)
        if len(out) == len(groups):
            out = [v for v, g in zip(out, groups, strict=True) if g.prunable]
        if len(out) != self.index.num_groups:
            raise ValueError(
                f"{what} has {len(values)} entries for {len(groups)} groups "
                f"({self.index.num_groups} prunable)"
            )
        return out

    def importance(self) -> Tensor:
        """Importance per group (higher = keep), each term normalised by its largest magnitude."""
        index = self.index
        x = [p.detach() for p in index.params]
        g = index.grads()
        sq = index.sq_norms(x)
        norm = sq.sqrt()
        inner = index.dots(x, g)
        terms = {
            "magnitude": norm,
            "avg_magnitude": norm / index.sizes.clamp_min(1).sqrt(),
            # descent direction −∇f aligned with x_g: the loss wants the group to grow
            "cosine": -inner / (norm * index.sq_norms(g).sqrt()).clamp_min(1e-30),
            "taylor_first": inner.abs(),
            "taylor_second": 0.5 * index.sq_norms([a * b for a, b in zip(x, g, strict=True)]),
        }
        score = torch.zeros_like(norm)
        for name, weight in self.criteria.items():
            t = terms[name]
            score += weight * t / t.abs().max().clamp_min(1e-30)
        return score

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure(closure)
        t = self.num_steps - self.start_step
        in_pruning = 0 <= t < self.period_len * self.periods
        if in_pruning and t % self.period_len == 0:
            period = t // self.period_len
            if self.costs is not None:
                self._select_by_cost((period + 1) / self.periods)
            else:
                wanted = round(self.target_count * (period + 1) / self.periods)
                new = wanted - int((self.zero | self.decaying).sum())
                if new > 0:
                    score = self.importance().masked_fill(self.zero | self.decaying, float("inf"))
                    self.decaying[torch.topk(score, new, largest=False).indices] = True
        self._update(self._directions(), self.zero | self.decaying)
        if in_pruning and bool(self.decaying.any()):
            k = t % self.period_len
            factor = torch.ones_like(self.index.sizes)
            factor[self.decaying] = (self.period_len - k - 1) / (self.period_len - k)
            self.index.scale_(factor)
            if k == self.period_len - 1:
                self._set_zero(self.decaying)
                self.decaying.zero_()
        self._set_zero(torch.zeros_like(self.zero))
        self.num_steps += 1
        return loss

    def _select_by_cost(self, share: float) -> None:
        """Add groups, least importance per unit cost first, until ``share`` of the cost target.

        No layer loses more than ``max_layer_fraction`` of its channels: cheapest-per-importance
        first would otherwise empty the expensive early layers and disconnect the network. With
        ``cost_rates`` the MACs the whole selected set saves are computed exactly; otherwise the
        group costs are summed.
        """
        assert self.costs is not None and self.cost_target is not None
        taken = self.zero | self.decaying
        layers: dict[tuple[str, int], int] = {}  # channels removed per (tensor, axis) of producers
        removed: dict[tuple[str, int], int] = {}  # slices removed per (weight, axis), for MACs

        def add(i: int) -> None:
            for k, n in self._layer_slices[i].items():
                layers[k] = layers.get(k, 0) + n
            for k, n in self._rated_slices[i].items():
                removed[k] = removed.get(k, 0) + n

        def saved(name: str) -> float:
            shape = self._shapes[name]
            kept = float(math.prod(shape))
            for axis in (0, 1):
                if len(shape) > axis:
                    kept *= 1 - min(removed.get((name, axis), 0), shape[axis]) / shape[axis]
            return self._rates[name] * (math.prod(shape) - kept)

        for i in torch.nonzero(taken).flatten().tolist():
            add(i)
        per_name = {n: saved(n) for n in self._shapes}
        if self._rates:
            wanted, reached = self.cost_target * share * self._total_macs, sum(per_name.values())
        else:
            wanted = self.cost_target * share * float(self.costs.sum())
            reached = float(self.costs[taken].sum())
        costs = self.costs.tolist()
        relative = (self.costs / self.costs.mean().clamp_min(1e-30)).clamp_min(1e-12)
        score = (self.importance().double() / relative**self.cost_power).masked_fill(
            taken, float("inf")
        )
        # families: groups removing channels of the same layers; each family's candidates in
        # ascending score; a unit takes as many as make the family's kept width a multiple
        family_of = [g.family for g in self.index.groups]
        pending: dict[tuple[tuple[str, int], ...], list[int]] = defaultdict(list)
        for i in torch.argsort(score).tolist():
            if not bool(taken[i]):
                pending[family_of[i]].append(i)
        heap: list[tuple[float, int, list[int]]] = []

        def push(family: tuple[tuple[str, int], ...]) -> None:
            members = pending[family]
            if not members:
                return
            key, per_group = family[0], self._layer_slices[members[0]][family[0]]
            kept = (self._layer_sizes[key] - layers.get(key, 0)) // per_group
            need = kept % self.channel_multiple or self.channel_multiple
            if len(members) >= need:
                unit = members[:need]
                heapq.heappush(heap, (sum(float(score[i]) for i in unit) / need, unit[0], unit))

        for family in pending:
            push(family)
        while heap and reached < wanted:
            _, _, unit = heapq.heappop(heap)
            family = family_of[unit[0]]
            total: dict[tuple[str, int], int] = defaultdict(int)
            for i in unit:
                for k, n in self._layer_slices[i].items():
                    total[k] += n
            cap = 1.0 if all(self._may_empty[i] for i in unit) else self.max_layer_fraction
            if any(layers.get(k, 0) + n > cap * self._layer_sizes[k] for k, n in total.items()):
                continue  # this family is as thin as the cap allows
            for i in unit:
                add(i)
                self.decaying[i] = True
                if not self._rates:
                    reached += costs[i]
                for name in {k[0] for k in self._rated_slices[i]}:
                    now = saved(name)
                    reached += now - per_name[name]
                    per_name[name] = now
            pending[family] = pending[family][len(unit) :]
            push(family)

    def _extra_state(self) -> dict[str, Any]:
        return {"decaying": self.decaying.cpu()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.decaying = state["decaying"].to(self.zero.device)
