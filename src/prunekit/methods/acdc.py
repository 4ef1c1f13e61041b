"""AC/DC — Alternating Compressed/DeCompressed training (Peste, Iofinova, Vladu, Alistarh; NeurIPS 2021).

Dense warm-up, then compressed phases (global magnitude mask at the target sparsity, hard) alternate
with decompressed phases (mask removed, pruned weights restart from zero, momentum reset) of equal
length; a last dense phase is followed by a longer final compressed phase. The run yields a *pair*:
the dense model at the end of the last decompressed phase (:meth:`ACDC.dense_state_dict`) and the
sparse final model. The ImageNet schedule of the paper (100 epochs: dense 0–9, 5-epoch phases to 75,
dense 75–84, compressed 85–99) is the default, as fractions of training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from prunekit.atomic import save_atomic
from prunekit.config import ConfigError, check_fraction, check_positive
from prunekit.core.masks import Masker, MaskMode, state_without_masks
from prunekit.methods.base import Pruner, SparsityConfig
from prunekit.methods.registry import register_method
from prunekit.schedules import alternating_phase


@dataclass(kw_only=True)
class ACDCConfig(SparsityConfig):
    """Phase boundaries as fractions of training: dense ``[0, warmup)``, alternating phases of
    ``period`` until ``alternate_end``, dense until ``final_start``, compressed to the end."""

    warmup: float = 0.10
    period: float = 0.05
    alternate_end: float = 0.75
    final_start: float = 0.85

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("warmup", "period", "alternate_end", "final_start"):
            check_fraction(name, getattr(self, name), closed=True)
        if not self.warmup <= self.alternate_end <= self.final_start < 1.0:
            raise ConfigError("need warmup <= alternate_end <= final_start < 1")
        check_positive("period", self.period)


@register_method("acdc")
class ACDC(Pruner):
    """Alternating compressed / decompressed training; yields a dense and a sparse model."""

    config_class = ACDCConfig
    config: ACDCConfig

    def __init__(self, model: nn.Module, optimizer: Optimizer | None, config: ACDCConfig):
        super().__init__(model, optimizer, config)
        self.masker = Masker(self.targets, optimizer, MaskMode.OFF)
        self._dense_snapshot: dict[str, Tensor] | None = None
        self._enter(self.is_compressed(0))

    def is_compressed(self, step: int) -> bool:
        """Whether step ``step`` lies in a compressed phase."""
        c = self.config
        return alternating_phase(
            step,
            c.fraction_step(c.warmup),
            max(1, c.fraction_step(c.period)),
            c.fraction_step(c.alternate_end),
            c.fraction_step(c.final_start),
        )

    @property
    def compressed(self) -> bool:
        assert self.masker is not None
        return self.masker.mode is MaskMode.HARD

    def _enter(self, compressed: bool) -> None:
        assert self.masker is not None
        if compressed:
            # install the new masks *before* switching to hard mode: switching applies the stored
            # masks, and the stale ones of the previous compressed phase would zero weights that
            # regrew in the dense phase and are selected again
            self.masker.set_masks_(self.magnitude_masks(self.config.sparsity))
            self.masker.set_mode_(MaskMode.HARD)
        else:
            self.masker.set_mode_(MaskMode.OFF)
            self.masker.reset_optimizer_state_()

    def _on_step(self) -> None:
        compressed = self.is_compressed(self.step_count)
        if compressed == self.compressed:
            return
        if compressed and self.step_count >= self.config.fraction_step(self.config.final_start):
            self._dense_snapshot = self.dense_state_dict(from_model=True)
        self._enter(compressed)

    @torch.no_grad()
    def dense_state_dict(self, from_model: bool = False) -> dict[str, Tensor]:
        """The dense model of the pair: the weights at the end of the last decompressed phase.

        Load it into a fresh instance of the model (mask buffers are left out). Before the final
        compressed phase starts, the current weights are returned.
        """
        if self._dense_snapshot is not None and not from_model:
            return {k: v.clone() for k, v in self._dense_snapshot.items()}
        return state_without_masks(self.model)

    def extra_artifacts(
        self,
        out_dir: Path,
        evaluate: Callable[[nn.Module], float],
        fresh_model: Callable[[], nn.Module],
    ) -> dict[str, Any]:
        """Write the dense model of the pair (``model_dense_pair.pt``) and return its accuracy."""
        dense_state = self.dense_state_dict()
        dense_model = fresh_model()
        dense_model.load_state_dict(dense_state)
        accuracy = evaluate(dense_model)
        save_atomic(dense_state, out_dir / "model_dense_pair.pt")
        return {"dense_pair_test_accuracy": accuracy}

    def _extra_state(self) -> dict[str, Any]:
        return {"dense_snapshot": self._dense_snapshot}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._dense_snapshot = state.get("dense_snapshot")
