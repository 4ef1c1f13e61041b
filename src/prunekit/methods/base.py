"""The contract every sparse-training method follows, and the config fields they share.

A method is a :class:`Pruner` subclass with a config dataclass. It is created on a model and its
optimizer, and used like an optimizer::

    pruner = prunekit.sparsify(model, optimizer, method="dpf", sparsity=0.95, total_steps=n)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y); optimizer.zero_grad(); loss.backward()
        optimizer.step(); pruner.step()
    pruner.finalize()

``step()`` is called once after every ``optimizer.step()``; it advances the method's step counter and
changes masks when the method's schedule says so. ``state_dict()`` / ``load_state_dict()`` hold the
method's own state; masks (and dense weights in straight-through mode) live in the model's buffers,
so ``model.state_dict()`` carries them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from prunekit.config import ConfigError, fraction_step
from prunekit.core.allocation import ALLOCATIONS, compute_masks
from prunekit.core.masks import Masker
from prunekit.core.patterns import NMPattern, nm_compatible, parse_pattern
from prunekit.core.sparsity import SparsitySpec
from prunekit.core.targets import Target, require_values, select_targets

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SparsityConfig(SparsitySpec):
    """Fields shared by all sparse-training methods (``sparsity``, ``pattern``, ``targets`` and
    ``ignore`` are :class:`~prunekit.core.sparsity.SparsitySpec`'s, as in post-training).

    Attributes:
        sparsity: final fraction of zero weights among the targets, in ``[0, 1)``.
        total_steps: number of ``pruner.step()`` calls the run will make (optimizer steps).
        allocation: ``global`` (one magnitude threshold), ``uniform`` or ``erk``.
    """

    total_steps: int
    allocation: str = "global"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ConfigError(f"total_steps must be a positive integer, got {self.total_steps!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(
                f"allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}"
            )

    def fraction_step(self, fraction: float) -> int:
        """A point of the run given as a fraction of ``total_steps``, in steps."""
        return fraction_step(fraction, self.total_steps)


def _out_in_shape(target: Target) -> tuple[int, ...]:
    """The weight's shape as ``(out, in, *kernel)`` (a transposed linear's is reversed)."""
    shape = tuple(target.param.shape)
    return shape[::-1] if target.transposed else shape


class Pruner:
    """Base of all sparse-training methods (the contract; behaviour lives in the subclasses).

    Subclasses set ``name`` and ``config_class`` and implement :meth:`_on_step` and, where needed,
    :meth:`_extra_state` / :meth:`_load_extra_state`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[SparsityConfig]] = SparsityConfig
    #: ``True`` when the optimizer must be stepped with a closure (``optimizer.step(closure)``).
    needs_closure: ClassVar[bool] = False
    #: ``True`` when the method sets the learning rate itself (no other scheduler should).
    owns_lr: ClassVar[bool] = False

    def __init__(self, model: nn.Module, optimizer: Optimizer | None, config: SparsityConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.targets: list[Target] = select_targets(model, config.targets, config.ignore)
        require_values(self.targets, f"{self.name or type(self).__name__} (magnitudes, masks)")
        self.pattern: NMPattern | None = parse_pattern(config.pattern)
        #: targets left dense because their input channels are not a multiple of the pattern's M
        self.dense_targets: list[str] = []
        if self.pattern is not None:
            m = self.pattern.m
            self.dense_targets = [
                t.name for t in self.targets if not nm_compatible(_out_in_shape(t), m)
            ]
            if self.dense_targets:
                logger.warning(
                    "%s: pattern %s groups %d input channels; %s have a number of input channels "
                    "that is not a multiple of %d and stay dense",
                    self.name or type(self).__name__,
                    config.pattern,
                    m,
                    ", ".join(self.dense_targets),
                    m,
                )
        self.step_count = 0
        self.finalized = False
        self.masker: Masker | None = None

    # ----------------------------------------------------------- public API
    def step(self) -> None:
        """Advance one optimizer step; update masks when the schedule says so."""
        if self.finalized:
            raise RuntimeError(f"{self.name}: step() after finalize()")
        self.step_count += 1
        if self.masker is not None:
            self.masker.end_step_()
        self._on_step()

    def finalize(self, calibration: Iterable[Any] | None = None) -> nn.Module:
        """Bake the final masks into the weights, remove buffers and hooks; return the model.

        If called before the schedule reached the target, the weights are pruned to the target
        sparsity by magnitude first (and a warning is logged).

        Args:
            calibration: model inputs for methods that compress one-shot at the end and re-estimate
                batch-norm statistics (:meth:`calibration_batches` > 0, e.g. CrAM); unused otherwise.
        """
        del calibration
        if self.finalized:
            return self.model
        require_values(self.targets, f"{self.name}.finalize()")
        if self.masker is not None:
            self.masker.remove()
        self._ensure_target_()
        self.finalized = True
        return self.model

    def extra_artifacts(
        self,
        out_dir: Path,
        evaluate: Callable[[nn.Module], float],
        fresh_model: Callable[[], nn.Module],
    ) -> dict[str, Any]:
        """Files and metrics a method adds to a ``prunekit train`` run, called before
        :meth:`finalize` (AC/DC writes the dense model of its pair). Returns metrics to record.

        Args:
            out_dir: the run's output directory.
            evaluate: test accuracy of a model.
            fresh_model: a new instance of the run's architecture.
        """
        del out_dir, evaluate, fresh_model
        return {}

    def calibration_batches(self) -> int:
        """How many training batches :meth:`finalize` wants as ``calibration`` (0: none)."""
        return 0

    def mask_gradients_(self) -> None:
        """Zero the gradients of hard-pruned weights now (idempotent).

        The optimizer hook masks them before every step anyway; call this right after ``backward()``
        when something reads the gradients first, e.g. ``clip_grad_norm_`` (pruned coordinates must
        not count in the clipping norm)::

            loss.backward(); pruner.mask_gradients_(); clip_grad_norm_(model.parameters(), 1.0)
        """
        if self.masker is not None:
            self.masker.mask_gradients_()

    def current_sparsity(self) -> float:
        """Measured sparsity of the targets now (from the weight values)."""
        total = sum(t.param.numel() for t in self.targets)
        nnz = sum(int(torch.count_nonzero(t.param.detach())) for t in self.targets)
        return 1.0 - nnz / total

    def state_dict(self) -> dict[str, Any]:
        """Method state (step counter, config and method-specific entries); masks are model buffers."""
        return {
            "method": self.name,
            "version": self.config.version,
            "step_count": self.step_count,
            "config": self.config.to_dict(),
            "mode": None if self.masker is None else str(self.masker.mode),
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; load the model's state dict too."""
        if state.get("method") != self.name:
            raise ValueError(f"state is for method {state.get('method')!r}, not {self.name!r}")
        self.step_count = int(state["step_count"])
        if self.masker is not None and state.get("mode") is not None:
            self.masker.set_mode_(state["mode"])
        self._load_extra_state(state.get("extra", {}))

    # -------------------------------------------------------------- helpers
    def magnitude_masks(self, sparsity: float, scores: list[Tensor] | None = None) -> list[Tensor]:
        """Masks keeping the largest-magnitude weights (dense weights in straight-through mode)."""
        if scores is None:
            weights = (
                self.masker.dense_weights()
                if self.masker is not None
                else [t.param.detach() for t in self.targets]
            )
            scores = [w.abs() for w in weights]
        return self.compute_masks(scores, sparsity)

    def compute_masks(
        self,
        scores: list[Tensor],
        sparsity: float,
        allocation: str | None = None,
        targets: list[Target] | None = None,
    ) -> list[Tensor]:
        """:func:`~prunekit.core.allocation.compute_masks` for ``targets`` (default: all) with
        this method's allocation and pattern; an N:M group runs along each target's inputs, also
        for a weight stored ``(in, out)`` (``transformers``' ``Conv1D``)."""
        chosen = self.targets if targets is None else targets
        flip = [self.pattern is not None and t.transposed for t in chosen]
        oriented = [s.t() if f else s for s, f in zip(scores, flip, strict=True)]
        masks = compute_masks(
            oriented, sparsity, allocation or self.config.allocation, self.pattern
        )
        return [m.t().contiguous() if f else m for m, f in zip(masks, flip, strict=True)]

    def target_nonzeros(self) -> int:
        """How many weights the final model keeps at most (the method's masks at the target)."""
        if self.pattern is None and self.config.allocation == "global":
            # masks keep round((1 - s) * n) weights globally (per layer: allow that rounding)
            total = sum(t.param.numel() for t in self.targets)
            return round((1.0 - self.config.sparsity) * total) + len(self.targets)
        # per-layer counts, N:M groups and layers left dense: what the masks at the target keep
        return sum(int(m.sum()) for m in self.magnitude_masks(self.config.sparsity))

    @torch.no_grad()
    def _ensure_target_(self, warn: bool = True) -> None:
        nnz = sum(int(torch.count_nonzero(t.param.detach())) for t in self.targets)
        if nnz <= self.target_nonzeros():
            return
        if warn:
            logger.warning(
                "%s: finalize() at step %d before the schedule reached sparsity %.4f; pruning by magnitude now",
                self.name,
                self.step_count,
                self.config.sparsity,
            )
        for t, m in zip(self.targets, self.magnitude_masks(self.config.sparsity), strict=True):
            t.param.mul_(m)

    def _on_step(self) -> None:
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        del state
