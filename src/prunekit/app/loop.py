"""The per-rank training loop: epochs of steps, a checkpoint after each epoch.

Deterministic and resumable: the batch order of an epoch depends only on ``(seed, epoch)``, the
learning rate is a pure function of the step (:func:`lr_factor`), and each epoch ends with an atomic
checkpoint holding model (with masks), optimizer, pruner, RNG and :class:`Progress`. A run
interrupted at any point and started again ends exactly where an uninterrupted run does (CPU, same
seed).

Each step: ``loss = CE(net(x), y)``, averaged over ranks; a loss that diverged
(:mod:`prunekit.app.divergence`) stops the run before the epoch is checkpointed. Then ``backward``,
gradient clipping (pruned coordinates masked first), and the optimizer step, unless a gradient is
not finite: then the step is skipped on every rank (after the gradient exchange every rank holds
the same gradients, so they agree), the optimizer, its state and the weights are left untouched,
and the skip is logged and counted (``Progress.skipped_steps``), as torch's AMP grad scaler does
for fp16 overflows. ``MAX_CONSECUTIVE_SKIPS`` skipped steps in a row stop the run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from prunekit.app.checkpoint import save_checkpoint
from prunekit.app.divergence import DivergenceError, NonFiniteLossError, divergence
from prunekit.app.ranks import (
    Ranks,
    barrier,
    gather_object,
    mean_across,
    sharded_accuracy,
    sync_buffers,
)
from prunekit.app.recipe import Recipe, ScheduleSpec
from prunekit.app.run_dir import RunDir
from prunekit.core.forward import count_correct
from prunekit.core.report import sparsity_report
from prunekit.data import ArrayDataset, BatchIterator
from prunekit.distributed.state import CommState
from prunekit.methods.base import Pruner
from prunekit.schedules import cosine, linear
from prunekit.structured import Group, GroupSparseOptimizer

__all__ = ["MAX_CONSECUTIVE_SKIPS", "Progress", "Trainable", "evaluate", "fit", "lr_factor"]

logger = logging.getLogger(__name__)

#: this many optimizer steps skipped in a row (non-finite gradients) stop the run
MAX_CONSECUTIVE_SKIPS = 100


@dataclass
class Trainable:
    """What the loop trains: the model, its optimizer, the pruner driving it (sparse training) and
    the structured groups (Only-Train-Once), with an example input for the structured path."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    pruner: Pruner | None = None
    groups: list[Group] = field(default_factory=list)
    example: Tensor | None = None
    #: the optimizer's learning rates as built (the schedule's base), before a checkpoint's
    #: scheduled values are loaded into it
    base_lrs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.base_lrs:
            self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]


@dataclass
class Progress:
    """Where a run stands, saved in every checkpoint: epochs and steps done, the per-epoch history,
    training seconds, the divergence scale (the first batch's loss), the steps skipped for
    non-finite gradients, and the resumable recipe keys changed on resume."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    reference_loss: float | None = None
    skipped_steps: int = 0
    #: optimizer steps skipped in a row, across epochs and resumes
    skipped_in_a_row: int = 0
    recipe_changes: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> Progress:
        return cls(
            epoch=ckpt["epoch"],
            step=ckpt["step"],
            history=ckpt["history"],
            wall_seconds=ckpt["wall_seconds"],
            reference_loss=ckpt.get("reference_loss"),
            skipped_steps=ckpt.get("skipped_steps", 0),
            skipped_in_a_row=ckpt.get("skipped_in_a_row", 0),
            recipe_changes=ckpt.get("recipe_changes", []),
        )


def lr_factor(spec: ScheduleSpec, step: int, total: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at ``step`` (pure function)."""
    warmup = int(spec.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    t, span = step - warmup, max(1, total - warmup)
    if spec.name == "cosine":
        return cosine(t, 1.0, span)
    if spec.name == "linear":
        return linear(t, 1.0, span)
    if spec.name == "step":
        return spec.gamma ** sum(step >= m * total for m in spec.milestones)
    return 1.0


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    return count_correct(model, x, y, batch_size=batch_size) / max(1, len(x))


def _grads_finite(model: nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


@dataclass
class _Context:
    """What every step of one call to :func:`fit` shares."""

    recipe: Recipe
    t: Trainable
    net: nn.Module
    ranks: Ranks
    device: torch.device
    total_steps: int
    steps_per_epoch: int
    base_lrs: list[float]

    def clip(self) -> None:
        clip = self.recipe.optimizer.clip_grad_norm
        if clip is not None:
            if self.t.pruner is not None:
                self.t.pruner.mask_gradients_()  # pruned coordinates must not count in the norm
            torch.nn.utils.clip_grad_norm_(self.t.model.parameters(), clip)


def fit(
    recipe: Recipe,
    t: Trainable,
    net: nn.Module,
    data: ArrayDataset,
    batches: BatchIterator,
    progress: Progress,
    run: RunDir,
    ranks: Ranks,
    device: torch.device,
    comm: CommState | None = None,
    show_progress: bool = True,
    stop_after_epoch: int | None = None,
) -> bool:
    """Train from ``progress`` to the recipe's last epoch (or ``stop_after_epoch``), updating
    ``progress`` and checkpointing after each epoch. Returns whether the last epoch was reached.

    Raises:
        DivergenceError, NonFiniteLossError: the loss diverged (the last checkpoint is intact).
    """
    ctx = _Context(
        recipe,
        t,
        net,
        ranks,
        device,
        recipe.epochs * len(batches),
        len(batches),
        t.base_lrs,
    )
    bar = tqdm(
        total=ctx.total_steps,
        initial=progress.step,
        disable=not show_progress or not ranks.is_main,
        desc=recipe.name or recipe.method,
        unit="step",
    )
    try:
        t.model.train()
        for epoch in range(progress.epoch, recipe.epochs):
            _epoch(ctx, epoch, batches, data, progress, run, bar)
            _checkpoint(ctx, progress, run, comm)
            if stop_after_epoch is not None and stop_after_epoch <= epoch + 1 < recipe.epochs:
                return False
    finally:
        bar.close()
    return True


def _epoch(
    ctx: _Context,
    epoch: int,
    batches: BatchIterator,
    data: ArrayDataset,
    progress: Progress,
    run: RunDir,
    bar: tqdm,
) -> None:
    t0 = time.perf_counter()
    loss_sum = 0.0
    for x, y in batches.epoch(epoch):
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        loss_value, stepped = _step(ctx, x, y, epoch, progress, run)
        progress.skipped_in_a_row = 0 if stepped else progress.skipped_in_a_row + 1
        if progress.skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteLossError(
                f"gradients were not finite for {progress.skipped_in_a_row} steps in a row (epoch "
                f"{epoch + 1}, step {progress.step}); stopped. {_kept(run, progress)}"
            )
        progress.step += 1
        loss_sum += loss_value
        bar.update(1)
    model = ctx.t.model
    sync_buffers(model, ctx.ranks)
    acc = (
        sharded_accuracy(model, data.x_test, data.y_test, ctx.ranks)
        if ctx.ranks.distributed
        else evaluate(model, data.x_test, data.y_test)
    )
    sparsity = sparsity_report(model)["global_sparsity"]
    progress.wall_seconds += time.perf_counter() - t0
    optimizer = ctx.t.optimizer
    progress.history.append(
        {
            "epoch": epoch + 1,
            "train_loss": loss_sum / ctx.steps_per_epoch,
            "test_accuracy": acc,
            "sparsity": sparsity,
            **(
                {"group_sparsity": optimizer.group_sparsity()}
                if isinstance(optimizer, GroupSparseOptimizer)
                else {}
            ),
        }
    )
    progress.epoch = epoch + 1
    bar.set_postfix(acc=f"{acc:.4f}", sparsity=f"{sparsity:.3f}")
    logger.info(
        "epoch %d: loss %.4f, test accuracy %.4f, sparsity %.4f",
        epoch + 1,
        progress.history[-1]["train_loss"],
        acc,
        sparsity,
    )


def _kept(run: RunDir, progress: Progress) -> str:
    """What is left to resume from, and what to do (the sentence after "stopped.")."""
    if run.checkpoint.exists():
        return (
            f"The last good checkpoint ({run.checkpoint}, epoch {progress.epoch}) is intact: "
            "lower the learning rate (or add lr_schedule.warmup_epochs) and resume."
        )
    return (
        "No epoch had completed, so there is no checkpoint: lower the learning rate (or add "
        "lr_schedule.warmup_epochs) and run again."
    )


def _step(
    ctx: _Context, x: Tensor, y: Tensor, epoch: int, progress: Progress, run: RunDir
) -> tuple[float, bool]:
    """One optimizer step; returns the batch loss (mean over ranks) and whether the step was
    taken (``False``: skipped for a non-finite gradient)."""
    t = ctx.t
    if not (t.pruner is not None and t.pruner.owns_lr):
        factor = lr_factor(
            ctx.recipe.lr_schedule, progress.step, ctx.total_steps, ctx.steps_per_epoch
        )
        for group, lr0 in zip(t.optimizer.param_groups, ctx.base_lrs, strict=True):
            group["lr"] = lr0 * factor
    loss = F.cross_entropy(ctx.net(x), y)
    loss_value = mean_across(float(loss.detach()), ctx.ranks, ctx.device)  # same on every rank
    if progress.reference_loss is None:
        progress.reference_loss = loss_value
    diverged = divergence(loss_value, progress.reference_loss)
    if diverged is not None:
        error = NonFiniteLossError if not math.isfinite(loss_value) else DivergenceError
        raise error(
            f"{diverged} at epoch {epoch + 1}, step {progress.step}; stopped. {_kept(run, progress)}"
        )
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ctx.clip()
    stepped = _grads_finite(t.model)
    if not stepped:
        progress.skipped_steps += 1
        logger.warning(
            "step %d (epoch %d): a gradient is not finite; optimizer step skipped on every rank "
            "(%d skipped so far)",
            progress.step,
            epoch + 1,
            progress.skipped_steps,
        )
        t.optimizer.zero_grad(set_to_none=True)
    elif t.pruner is not None and t.pruner.needs_closure:
        t.optimizer.step(_closure(ctx, x, y))
    else:
        t.optimizer.step()
    if t.pruner is not None:
        t.pruner.step()  # the pruning schedule follows the step count, taken or skipped
    return loss_value, stepped


def _closure(ctx: _Context, x: Tensor, y: Tensor) -> Callable[[], float]:
    def closure() -> float:
        ctx.t.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ctx.net(x), y)
        loss.backward()
        ctx.clip()
        return float(loss.detach())

    return closure


def _checkpoint(ctx: _Context, progress: Progress, run: RunDir, comm: CommState | None) -> None:
    """Every rank's compression state (top-k residuals, RNG) is gathered, so rank 0 saves them
    all with the model, optimizer, pruner, RNG and progress."""
    comm_states = None if comm is None else gather_object(comm.state_dict(), ctx.ranks)
    if ctx.ranks.is_main:
        t = ctx.t
        save_checkpoint(
            {
                "recipe": ctx.recipe.to_dict(),
                "model": t.model.state_dict(),
                "optimizer": t.optimizer.state_dict(),
                "pruner": None if t.pruner is None else t.pruner.state_dict(),
                "rng": torch.get_rng_state(),
                "communication": comm_states,
                **asdict(progress),
            },
            run.checkpoint,
        )
        run.checkpoint_saved()
    barrier(ctx.ranks)
