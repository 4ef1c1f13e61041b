"""Masks on module parameters and the optimizer hooks that enforce them.

A :class:`Masker` registers, for every target ``module.<p>``, a buffer ``module.<p>_mask`` of 0/1
values in the parameter's dtype (so masks appear in ``model.state_dict()`` under readable names such
as ``fc1.weight_mask``; a float mask multiplies 6× faster than a boolean one). It enforces them in one
of three modes, through the optimizer's public step hooks — nothing runs in the forward pass, so
masking adds no cost per forward:

* ``hard`` — pruned weights are zero and stay zero. Before ``optimizer.step()`` the gradients are
  multiplied by the mask, so momentum, Adam moments and weight decay never see pruned coordinates.
  With zero weight, zero gradient and zero state, the built-in optimizers (:data:`ZERO_PRESERVING`)
  leave pruned weights at exactly zero; for any other optimizer the weights are also re-masked after
  the step. When masks are set, the optimizer state of all pruned (and newly grown) coordinates is
  zeroed, otherwise momentum gathered while they were unmasked would revive them.
* ``straight_through`` — the parameter holds ``m ⊙ w`` during forward and backward, so autograd
  yields ``∇f(m ⊙ w)`` for *every* coordinate; the dense ``w`` lives in the buffer
  ``module.<p>_dense``. Before the step the parameter is pointed at the dense storage (no copy), the
  optimizer applies ``w ← w − lr·∇f(m ⊙ w)`` to the dense weights (DPF, Lin et al. ICLR 2020), and
  after the step ``m ⊙ w`` is written back into the parameter's own storage. Evaluating the model
  outside the step always evaluates the sparse model ``m ⊙ w``.
* ``off`` — hooks do nothing (AC/DC's decompressed phases).

The masker survives ``copy.deepcopy`` together with its model and optimizer (see
:class:`~prunekit.core.hooks.OptimizerHooks`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from prunekit.core.hooks import OptimizerHooks
from prunekit.core.targets import Target

logger = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"
DENSE_SUFFIX = "_dense"

GradObserver = Callable[[list[Tensor | None]], None]

#: Optimizers that never move a weight whose value, gradient and per-coordinate state are all zero.
ZERO_PRESERVING: tuple[type[Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def state_without_masks(model: nn.Module) -> dict[str, Tensor]:
    """A copy of ``model.state_dict()`` without the mask buffers (loadable into a fresh model)."""
    return {
        k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(MASK_SUFFIX)
    }


class MaskMode(StrEnum):
    """How masks are enforced during training."""

    HARD = "hard"
    STRAIGHT_THROUGH = "straight_through"
    OFF = "off"


class Masker:
    """Mask buffers plus the optimizer hooks that enforce them.

    Args:
        targets: parameters to mask.
        optimizer: the optimizer that updates them; ``None`` for one-shot use (no hooks).
        mode: initial :class:`MaskMode`.
        grad_observer: called before the gradients are masked at every step, with the raw
            gradients of the targets (RigL reads the dense gradient this way).
    """

    def __init__(
        self,
        targets: Sequence[Target],
        optimizer: Optimizer | None,
        mode: MaskMode | str = MaskMode.HARD,
        grad_observer: GradObserver | None = None,
    ) -> None:
        self.targets = list(targets)
        self.optimizer = optimizer
        self.grad_observer = grad_observer
        self._mode = MaskMode.OFF
        self._hooks: OptimizerHooks | None = None
        for t in self.targets:
            name = t.param_name + MASK_SUFFIX
            if hasattr(t.module, name):
                raise RuntimeError(
                    f"{t.name} already carries a mask buffer {name!r}: another pruner is attached; "
                    "call its finalize() first"
                )
            t.module.register_buffer(name, torch.ones_like(t.param.detach()))
        # exact type: a subclass may override step()
        self.remask_after_step = optimizer is not None and type(optimizer) not in ZERO_PRESERVING
        self._swapped: list[Tensor] = []
        self._observed = False  # the grad observer saw this step's gradients (mask_gradients_)
        self.set_mode_(mode)
        self._register_hooks()

    # ------------------------------------------------------------------ views
    @property
    def mode(self) -> MaskMode:
        return self._mode

    @property
    def masks(self) -> list[Tensor]:
        """Boolean keep-masks (new tensors; use :attr:`mask_buffers` for the stored 0/1 values)."""
        return [m.bool() for m in self.mask_buffers]

    @property
    def mask_buffers(self) -> list[Tensor]:
        """The mask buffers themselves: 0/1 in the parameter's dtype."""
        return [getattr(t.module, t.param_name + MASK_SUFFIX) for t in self.targets]

    def _dense_buffers(self) -> list[Tensor]:
        return [getattr(t.module, t.param_name + DENSE_SUFFIX) for t in self.targets]

    @property
    def params(self) -> list[Tensor]:
        return [t.param for t in self.targets]

    def dense_weights(self) -> list[Tensor]:
        """The dense weights: the ``_dense`` buffers in straight-through mode, else the parameters."""
        if self._mode is MaskMode.STRAIGHT_THROUGH:
            return self._dense_buffers()
        return [p.detach() for p in self.params]

    # ---------------------------------------------------------------- changes
    @torch.no_grad()
    def set_masks_(
        self, masks: Sequence[Tensor], reset_optimizer_state: bool | None = None
    ) -> None:
        """Replace the masks and apply them.

        Args:
            masks: boolean keep-masks, one per target.
            reset_optimizer_state: zero the optimizer state (momentum, moments) of every pruned and
                every newly grown coordinate. Defaults to ``True`` unless in straight-through mode,
                where the dense weights keep training and keep their momentum.
        """
        if len(masks) != len(self.targets):
            raise ValueError(f"expected {len(self.targets)} masks, got {len(masks)}")
        reset = (
            self._mode is not MaskMode.STRAIGHT_THROUGH
            if reset_optimizer_state is None
            else reset_optimizer_state
        )
        for t, old, new in zip(self.targets, self.mask_buffers, masks, strict=True):
            if new.shape != old.shape:
                raise ValueError(
                    f"mask for {t.name} has shape {tuple(new.shape)}, weight {tuple(old.shape)}"
                )
            new = new.to(device=old.device, dtype=torch.bool)
            if reset:
                # every pruned coordinate (its state may have grown while it was unmasked, e.g. in
                # an AC/DC dense phase) and every newly grown one (RigL: grown weights start afresh)
                self.zero_optimizer_state_(t.param, ~(old.bool() & new))
            old.copy_(new)
        self.apply_()

    @torch.no_grad()
    def zero_optimizer_state_(self, param: Tensor, where: Tensor) -> None:
        """Zero the optimizer state tensors of ``param`` (momentum, Adam moments) where ``where``."""
        if self.optimizer is None:
            return
        for value in self.optimizer.state.get(param, {}).values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                value.masked_fill_(where, 0)

    @torch.no_grad()
    def reset_optimizer_state_(self) -> None:
        """Zero the per-coordinate optimizer state of every target (e.g. momentum)."""
        for p in self.params:
            self.zero_optimizer_state_(p, torch.ones_like(p, dtype=torch.bool))

    @torch.no_grad()
    def apply_(self) -> None:
        """Make the parameters consistent with the masks under the current mode."""
        if self._mode is MaskMode.HARD:
            for p, m in zip(self.params, self.mask_buffers, strict=True):
                p.mul_(m)
        elif self._mode is MaskMode.STRAIGHT_THROUGH:
            for t, m, dense in zip(
                self.targets, self.mask_buffers, self._dense_buffers(), strict=True
            ):
                if t.param.data_ptr() == dense.data_ptr():  # a step was interrupted mid-swap
                    t.param.data = torch.empty_like(dense)
                torch.mul(dense, m, out=t.param.data)

    @torch.no_grad()
    def set_mode_(self, mode: MaskMode | str) -> None:
        """Switch mode. Leaving straight-through keeps ``m ⊙ w`` and drops the dense buffers."""
        mode = MaskMode(mode)
        if mode is self._mode:
            return
        if self._mode is MaskMode.STRAIGHT_THROUGH:
            self.apply_()
            for t in self.targets:
                del t.module._buffers[t.param_name + DENSE_SUFFIX]
        if mode is MaskMode.STRAIGHT_THROUGH:
            for t in self.targets:
                t.module.register_buffer(t.param_name + DENSE_SUFFIX, t.param.detach().clone())
        self._mode = mode
        self.apply_()

    @torch.no_grad()
    def remove(self) -> None:
        """Bake ``m ⊙ w`` into the weights, delete the buffers and the hooks."""
        if self._mode is MaskMode.OFF:
            self._mode = MaskMode.HARD
        self.set_mode_(MaskMode.HARD)
        for t in self.targets:
            t.module._buffers.pop(t.param_name + MASK_SUFFIX, None)
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Zero the gradients of pruned coordinates in hard mode (idempotent; no-op otherwise).

        The pre-step hook does this anyway; call it earlier when something between ``backward()`` and
        ``optimizer.step()`` reads the gradients (gradient clipping: pruned coordinates must not count
        in the clipping norm).
        """
        if self._mode is not MaskMode.HARD:
            return
        if self.grad_observer is not None and not self._observed:
            # it must see the raw gradients (RigL's growth), once per step
            self.grad_observer([p.grad for p in self.params])
            self._observed = True
        for p, m in zip(self.params, self.mask_buffers, strict=True):
            if p.grad is not None:
                p.grad.mul_(m)

    def end_step_(self) -> None:
        """Forget that this step's gradients were observed (a skipped optimizer step, e.g. by a
        gradient scaler, must not hide the next step's gradients from the observer)."""
        self._observed = False

    # ------------------------------------------------------------------ hooks
    def _register_hooks(self) -> None:
        if self.optimizer is None:
            return
        self._hooks = OptimizerHooks(self.optimizer, pre=self._pre_step, post=self._post_step)

    @torch.no_grad()
    def _pre_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._mode is MaskMode.OFF:
            return
        if self._mode is MaskMode.HARD:
            self.mask_gradients_()
            self.end_step_()
        else:
            if self.grad_observer is not None:
                self.grad_observer([p.grad for p in self.params])
            # point each parameter at its dense storage: the optimizer updates the dense weights
            self._swapped = [t.param.data for t in self.targets]
            for t, dense in zip(self.targets, self._dense_buffers(), strict=True):
                t.param.data = dense

    @torch.no_grad()
    def _post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._mode is MaskMode.STRAIGHT_THROUGH and self._swapped:
            for t, m, dense, own in zip(
                self.targets, self.mask_buffers, self._dense_buffers(), self._swapped, strict=True
            ):
                torch.mul(dense, m, out=own)
                t.param.data = own
            self._swapped = []
        elif self._mode is MaskMode.HARD and self.remask_after_step:
            self.apply_()
