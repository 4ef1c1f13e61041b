"""CrAM — Compression-aware minimizer (Peste, Vladu, Kurtic, Lampert, Alistarh; ICLR 2023).

A SAM-like wrapper around the user's optimizer that trains a *dense* model which can be pruned one-shot
with little loss. Each step, with ``C`` the top-k magnitude compression at a sparsity drawn from
``sparsities``::

    θ~  = θ + ρ ∇L(θ)
    g_c = ∇L(C(θ~))           (batch-norm statistics are not updated in this pass)
    θ  ← optimizer step with g_c + ∇L(θ)      (CrAM+, ``plus=True``)

It needs two forward/backward passes per step, so the optimizer must be stepped with a closure that
zeroes the gradients, recomputes the loss and calls ``backward()``::

    loss = F.cross_entropy(model(x), y); optimizer.zero_grad(); loss.backward()
    def closure():
        optimizer.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); return loss
    optimizer.step(closure); pruner.step()

The closure is consumed by CrAM's step pre-hook; the wrapped optimizer then steps with the combined
gradient. :meth:`finalize` prunes one-shot by magnitude to ``sparsity`` and, given calibration
inputs, re-estimates the batch-norm statistics of the pruned model (the paper's one-shot numbers are
"after batch-norm re-tuning"); ``prunekit train`` passes ``bn_recalibration_batches`` training
batches.

Data-parallel training (DDP): the closure's forward and backward must go through the DDP wrapper,
so the gradient at the compressed point is all-reduced like the first one. The compression level
is drawn from the pruner's own generator seeded with ``seed`` (not the global RNG), so every rank
draws the same level; its state is in :meth:`state_dict`. At :meth:`finalize`, when a process
group is initialised, the re-estimated batch-norm statistics are averaged over the ranks, weighted
by the number of calibration batches each used (:func:`~prunekit.core.ddp.all_reduce_batchnorm_`),
so every rank ends with the statistics of all ranks' batches; ``finalize`` is then a collective
and every rank must call it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from prunekit.config import ConfigError, check_int, check_non_negative
from prunekit.core.batchnorm import recalibrate_batchnorm_
from prunekit.core.ddp import all_reduce_batchnorm_
from prunekit.core.hooks import OptimizerHooks
from prunekit.methods.base import Pruner, SparsityConfig
from prunekit.methods.registry import register_method


@dataclass(kw_only=True)
class CrAMConfig(SparsityConfig):
    """``rho`` perturbation size; ``sparsities`` the compression levels drawn per step (the final
    ``sparsity`` is added unless ``include_target`` is false, since CrAM prunes one-shot at it)."""

    rho: float = 0.05
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    plus: bool = True
    include_target: bool = True
    bn_recalibration_batches: int = 100
    seed: int = 0

    def levels(self) -> list[float]:
        """The compression levels drawn per step (``sparsities``, plus the target by default)."""
        extra = (
            [self.sparsity] if self.include_target and self.sparsity not in self.sparsities else []
        )
        return [*self.sparsities, *extra]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("bn_recalibration_batches", self.bn_recalibration_batches, 0)
        check_int("seed", self.seed, 0)
        check_non_negative("rho", self.rho)
        if not self.sparsities or any(not 0.0 <= s < 1.0 for s in self.sparsities):
            raise ConfigError(
                f"sparsities must be a non-empty list in [0, 1), got {self.sparsities}"
            )


@register_method("cram")
class CrAM(Pruner):
    """Compression-aware training; the dense result is pruned one-shot at :meth:`finalize`."""

    config_class = CrAMConfig
    config: CrAMConfig
    needs_closure: ClassVar[bool] = True

    def __init__(self, model: nn.Module, optimizer: Optimizer | None, config: CrAMConfig):
        super().__init__(model, optimizer, config)
        if optimizer is None:
            raise ValueError("CrAM wraps an optimizer; pass one")
        self._hooks: OptimizerHooks | None = OptimizerHooks(optimizer, pre=self._pre_step)
        self.last_compression: float | None = None
        #: the method's own RNG for the compression level (the same draws on every rank)
        self.generator = torch.Generator().manual_seed(config.seed)

    def _pre_step(
        self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # ``args`` starts with the optimizer itself (torch passes ``step``'s full argument tuple).
        closure: Callable[[], Any] | None = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is None:
            raise RuntimeError(
                "CrAM needs optimizer.step(closure): the closure must zero the gradients, recompute "
                "the loss and call backward() (see prunekit.methods.cram)"
            )
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self._perturbed_gradients_(params, closure)
        rest = {k: v for k, v in kwargs.items() if k != "closure"}
        return args[:1], rest

    def _perturbed_gradients_(self, params: list[Tensor], closure: Callable[[], Any]) -> None:
        cfg = self.config
        with torch.no_grad():
            grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
            saved = [p.detach().clone() for p in params]
            buffers = [b.detach().clone() for b in self.model.buffers()]
            for p, g in zip(params, grads, strict=True):
                p.add_(g, alpha=cfg.rho)
            levels = cfg.levels()
            self.last_compression = levels[
                int(torch.randint(len(levels), (), generator=self.generator).item())
            ]
            scores = [t.param.detach().abs() for t in self.targets]
            level = self.pattern.sparsity if self.pattern is not None else self.last_compression
            masks = self.compute_masks(scores, level)
            for t, m in zip(self.targets, masks, strict=True):
                t.param.mul_(m)
        with torch.enable_grad():
            closure()
        with torch.no_grad():
            for b, saved_b in zip(self.model.buffers(), buffers, strict=True):
                b.copy_(saved_b)
            for p, w, g in zip(params, saved, grads, strict=True):
                p.copy_(w)
                if p.grad is None:
                    p.grad = g if cfg.plus else torch.zeros_like(g)
                elif cfg.plus:
                    p.grad.add_(g)

    def _on_step(self) -> None:
        pass

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "last_compression": self.last_compression}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.last_compression = state.get("last_compression")

    def calibration_batches(self) -> int:
        return self.config.bn_recalibration_batches

    def finalize(self, calibration: Iterable[Any] | None = None) -> nn.Module:
        """Prune one-shot by magnitude to ``sparsity``; then, given ``calibration`` (model inputs,
        e.g. training batches), re-estimate the batch-norm statistics of the compressed model on up
        to ``bn_recalibration_batches`` of them, as the paper does before reporting one-shot
        accuracy."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self.finalized:
            return self.model
        self._ensure_target_(warn=False)  # CrAM's one-shot pruning
        model = super().finalize()
        if calibration is not None and self.config.bn_recalibration_batches > 0:
            used = recalibrate_batchnorm_(model, calibration, self.config.bn_recalibration_batches)
            all_reduce_batchnorm_(model, used)  # data-parallel: every rank's batches count
        return model
