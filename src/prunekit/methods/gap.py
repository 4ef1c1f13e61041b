"""GaP — Gradual growth and pruning (Ma et al., *Effective model sparsification by scheduled
grow-and-prune methods*, ICLR 2022).

The target layers are split into ``κ`` contiguous partitions. All start magnitude-pruned to the target
sparsity. Cyclically, one partition is grown back to dense (its pruned weights restart at zero) while
the others stay sparse (hard masks); after a phase the grown partition is magnitude-pruned back to
its budget and the next one grows. After ``cycles`` passes (ending at ``grow_end`` of training) every
layer is sparse and the rest of training fine-tunes the sparse model. Needs no dense pre-trained model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from prunekit.config import ConfigError, check_fraction, check_int
from prunekit.core.masks import Masker, MaskMode
from prunekit.methods.base import Pruner, SparsityConfig
from prunekit.methods.registry import register_method


@dataclass(kw_only=True)
class GaPConfig(SparsityConfig):
    """``partitions`` = κ (0: one per layer, at most 4); ``cycles`` passes over the partitions end at
    fraction ``grow_end`` of training. ``allocation`` splits the budget at initialisation (``erk``
    suits a random network; ``global`` magnitude at init can empty a whole layer and is refused then);
    each partition keeps its share when it is pruned back."""

    allocation: str = "uniform"
    partitions: int = 0
    cycles: int = 2
    grow_end: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("partitions", self.partitions, 0)
        check_int("cycles", self.cycles, 1)
        check_fraction("grow_end", self.grow_end, closed=True)


@register_method("gap")
class GaP(Pruner):
    """Cyclic grow-and-prune over layer partitions."""

    config_class = GaPConfig
    config: GaPConfig

    def __init__(self, model: nn.Module, optimizer: Optimizer | None, config: GaPConfig):
        super().__init__(model, optimizer, config)
        n = len(self.targets)
        kappa = min(n, config.partitions or min(n, 4))
        bounds = [round(i * n / kappa) for i in range(kappa + 1)]
        self.partitions: list[list[int]] = [
            list(range(bounds[i], bounds[i + 1])) for i in range(kappa)
        ]
        self.phase_steps = max(1, config.fraction_step(config.grow_end) // (kappa * config.cycles))
        masks = self.magnitude_masks(
            config.sparsity
        )  # before the masker: a refusal leaves no trace
        # Each partition keeps its share of the budget when it is pruned back.
        self._budgets = [sum(int(masks[i].sum()) for i in part) for part in self.partitions]
        # collapse: a layer keeps under 1% of what uniform allocation would give it (global
        # allocation never empties a layer completely, but may leave it a single weight)
        empty = [
            self.targets[i].name
            for i, m in enumerate(masks)
            if int(m.sum()) < 0.01 * (1 - config.sparsity) * m.numel()
        ]
        if empty:
            raise ConfigError(
                f"GaP with allocation {config.allocation!r} at sparsity {config.sparsity} keeps no "
                f"weight of {', '.join(empty)} at initialisation (layer collapse: magnitudes at init "
                "differ by layer); use allocation 'erk' or 'uniform'"
            )
        self.masker = Masker(self.targets, optimizer, MaskMode.HARD)
        self.masker.set_masks_(masks)
        self._grown: int | None = None
        self._enter_phase(self.phase(0))

    def phase(self, step: int) -> int | None:
        """Index of the partition grown at ``step`` (``None`` once the cycles are over)."""
        index = step // self.phase_steps
        return (
            index % len(self.partitions)
            if index < len(self.partitions) * self.config.cycles
            else None
        )

    @torch.no_grad()
    def _prune_back(self, part: int) -> None:
        assert self.masker is not None
        layers = self.partitions[part]
        scores = [self.targets[i].param.detach().abs() for i in layers]
        total = sum(s.numel() for s in scores)
        # with an N:M pattern every compatible layer is at the pattern's sparsity (layers left dense
        # would otherwise inflate the budget and loosen the pattern)
        sparsity = (
            self.pattern.sparsity if self.pattern is not None else 1.0 - self._budgets[part] / total
        )
        allocation = "global" if self.config.allocation == "global" else self.config.allocation
        part_masks = self.compute_masks(
            scores, sparsity, allocation, [self.targets[i] for i in layers]
        )
        masks = list(self.masker.masks)
        for i, m in zip(layers, part_masks, strict=True):
            masks[i] = m
        self.masker.set_masks_([m.clone() for m in masks])

    def _enter_phase(self, part: int | None) -> None:
        assert self.masker is not None
        if self._grown is not None:
            self._prune_back(self._grown)
        self._grown = part
        if part is not None:
            masks: list[Tensor] = [m.clone() for m in self.masker.masks]
            for i in self.partitions[part]:
                masks[i] = torch.ones_like(masks[i])
            self.masker.set_masks_(masks)

    def _on_step(self) -> None:
        part = self.phase(self.step_count)
        boundary = self.step_count % self.phase_steps == 0
        if part != self._grown or (boundary and part is not None):
            self._enter_phase(part)

    def _extra_state(self) -> dict[str, Any]:
        return {"grown": self._grown}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._grown = state.get("grown")
