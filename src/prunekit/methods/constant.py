"""Sparse fine-tuning with a fixed mask: keep the zeros a model already has.

After one-shot compression (:func:`prunekit.compress`) or a sparse pre-trained checkpoint, the
mask is the set of nonzero weights; fine-tuning with that mask fixed (hard: pruned weights, their
gradients and optimizer state stay zero) recovers accuracy without losing sparsity — the sparse
transfer recipe of Iofinova et al. ("How well do sparse ImageNet models transfer?", CVPR 2022) and
of SparseML's ``ConstantPruningModifier``::

    prunekit.compress(model, calibration, method="sparsegpt", sparsity=0.5)
    pruner = prunekit.sparsify(model, optimizer, method="constant")
    ...  optimizer.step(); pruner.step()
    pruner.finalize()

With ``sparsity > 0`` the weights are first pruned by magnitude to at least that sparsity (current
zeros go first), then the mask is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn
from torch.optim import Optimizer

from prunekit.core.masks import Masker, MaskMode
from prunekit.methods.base import Pruner, SparsityConfig
from prunekit.methods.registry import register_method


@dataclass(kw_only=True)
class ConstantConfig(SparsityConfig):
    """Fixed mask from the current zeros.

    Attributes:
        sparsity: minimum sparsity; ``0`` (default) keeps exactly the current zeros, a larger
            value first prunes the smallest remaining weights to reach it.
        total_steps: unused by the method (the mask never changes); kept for the shared contract.
    """

    sparsity: float = 0.0
    total_steps: int = 1


@register_method("constant")
class Constant(Pruner):
    """Hard mask = the nonzeros at attach time (after the optional magnitude top-up)."""

    config_class: ClassVar[type[SparsityConfig]] = ConstantConfig

    def __init__(self, model: nn.Module, optimizer: Optimizer | None, config: ConstantConfig):
        super().__init__(model, optimizer, config)
        nonzero = [t.param.detach() != 0 for t in self.targets]
        if config.sparsity > 0:
            nonzero = [
                a & b for a, b in zip(nonzero, self.magnitude_masks(config.sparsity), strict=True)
            ]
        self.masker = Masker(self.targets, optimizer, MaskMode.HARD)
        self.masker.set_masks_(nonzero)
        self._keep = sum(int(m.sum()) for m in nonzero)

    def target_nonzeros(self) -> int:
        """The mask's nonzeros: finalize never prunes further."""
        return self._keep

    def _on_step(self) -> None:
        """The mask is constant: nothing to do (the masker keeps pruned weights at zero)."""

    def _extra_state(self) -> dict[str, Any]:
        return {"keep": self._keep}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._keep = int(state["keep"])
