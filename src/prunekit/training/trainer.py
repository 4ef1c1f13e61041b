"""The training loop behind ``prunekit train``: one recipe → a sparse model and its report.

Deterministic and resumable: the batch order of an epoch depends only on ``(seed, epoch)``, the
learning rate is a pure function of the step, and each epoch ends with an atomic checkpoint holding
model (with masks), optimizer, pruner and RNG state. A run interrupted at any point and started again
with the same ``out_dir`` ends exactly where an uninterrupted run does (CPU, same seed).

A diverged loss (not finite, or above ``DIVERGENCE_FACTOR`` × the first batch's loss; see
:mod:`prunekit.training.guards`) stops the run with :class:`DivergenceError` /
:class:`NonFiniteLossError` before the epoch is checkpointed, so the last good checkpoint stays
untouched. Everything the user controls (recipe values, ``out_dir``, ``device``) is checked before
the first step; a problem raises :class:`~prunekit.config.ConfigError` with what to change.

Data parallel (:mod:`prunekit.training.distributed`): inside an initialised process group, or under
``torchrun``, each rank trains on its shard of every epoch with batches of ``batch_size`` (a global
batch of ``world_size × batch_size``) through :class:`~torch.nn.parallel.DistributedDataParallel`;
rank 0 alone writes files, the loss and the test accuracy are gathered over all ranks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from prunekit.api import sparsify
from prunekit.atomic import write_text_atomic
from prunekit.core.forward import count_correct
from prunekit.core.report import format_report, sparsity_report
from prunekit.data import ArrayDataset, BatchIterator, load_dataset
from prunekit.methods.base import Pruner
from prunekit.schedules import cosine, linear
from prunekit.structured import GroupSparseOptimizer, find_groups
from prunekit.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_atomic,
    save_checkpoint,
    save_sparse,
)
from prunekit.training.distributed import (
    Ranks,
    agree,
    attach_communication,
    barrier,
    broadcast_object,
    communication_metrics,
    gather_object,
    join_process_group,
    leave_process_group,
    mean_across,
    sharded_accuracy,
    sync_buffers,
    wrap_model,
)
from prunekit.training.guards import (
    DIVERGENCE_FACTOR,
    DivergenceError,
    NonFiniteLossError,
    build_recipe_model,
    check_out_dir,
    default_device,
    divergence,
)
from prunekit.training.plots import plot_accuracy, plot_layer_sparsity
from prunekit.training.recipe import Recipe, ScheduleSpec, recipe_from_dict
from prunekit.training.structured_run import (
    build_structured_optimizer,
    finish_structured,
    structured_report,
)

__all__ = [
    "CHECKPOINT_NAME",
    "DIVERGENCE_FACTOR",
    "DivergenceError",
    "NonFiniteLossError",
    "build_optimizer",
    "default_device",
    "evaluate",
    "load_data",
    "lr_factor",
    "train",
    "train_from_dict",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


#: Recipe keys that may differ when resuming (to get past a NaN stop from the last good checkpoint).
RESUMABLE_CHANGES = (
    "optimizer.lr",
    "optimizer.clip_grad_norm",
    "lr_schedule.warmup_epochs",
)


def _recipe_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dicts."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _recipe_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


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


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    o = recipe.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=o.nesterov,
        )
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def load_data(recipe: Recipe) -> ArrayDataset:
    d = recipe.data
    if d.name == "mnist":
        data = load_dataset("mnist", root=d.root, split=d.split)
    else:
        data = load_dataset("mnist1d", num_samples=d.num_samples, seed=recipe.seed)
    return data.subset(d.train_subset, d.test_subset)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    return count_correct(model, x, y, batch_size=batch_size) / max(1, len(x))


def train(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device | None = None,
    data: ArrayDataset | None = None,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Run a recipe and write its outputs to ``out_dir``.

    Args:
        recipe: a validated recipe.
        out_dir: output directory (created).
        resume: continue from ``out_dir/checkpoint.pt`` if present (the recipe must be the same).
        progress: show a progress bar.
        device: where to train; defaults to CUDA when available, else CPU.
        data: an already loaded data set (otherwise loaded from the recipe).
        stop_after_epoch: stop (as if interrupted) after this many epochs; for tests and time limits.

    Returns:
        The metrics written to ``metrics.json`` (or, when stopped early, the partial history); the
        same on every rank of a data-parallel run.
    """
    out = Path(out_dir)
    check_out_dir(out)
    ranks, dev = join_process_group(device)
    try:
        return _train(recipe, out, ranks, dev, resume, progress, data, stop_after_epoch)
    finally:
        leave_process_group(ranks)


def _train(
    recipe: Recipe,
    out: Path,
    ranks: Ranks,
    dev: torch.device,
    resume: bool,
    progress: bool,
    data: ArrayDataset | None,
    stop_after_epoch: int | None,
) -> dict[str, Any]:
    torch.manual_seed(recipe.seed)
    data = data if data is not None else load_data(recipe)
    model = build_recipe_model(recipe, data).to(dev)
    batches = BatchIterator(
        data.x_train,
        data.y_train,
        recipe.data.batch_size,
        seed=recipe.seed,
        rank=ranks.rank,
        world_size=ranks.world_size,
    )
    steps_per_epoch = len(batches)
    total_steps = recipe.epochs * steps_per_epoch
    example = data.x_train[:2].to(dev)
    groups = find_groups(model, example) if recipe.structured is not None else []
    optimizer: torch.optim.Optimizer = (
        build_structured_optimizer(recipe, model, groups, total_steps, example)
        if recipe.structured is not None
        else build_optimizer(recipe, model)
    )
    pruner: Pruner | None = None
    if recipe.pruning is not None:
        cfg = {k: v for k, v in recipe.pruning.items() if k != "method"}
        pruner = sparsify(
            model, optimizer, recipe.pruning["method"], total_steps=total_steps, **cfg
        )
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    start_epoch, step, history, wall = 0, 0, [], 0.0
    reference_loss: float | None = None  # the first batch's loss: the divergence scale
    saved_comm: list[dict[str, Any]] | None = None
    ckpt_path = out / CHECKPOINT_NAME
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        changed = _recipe_changes(ckpt["recipe"], recipe.to_dict())
        if any(key not in RESUMABLE_CHANGES for key in changed):
            raise CheckpointError(
                f"{ckpt_path} was written by a different recipe (changed: {', '.join(changed)}); "
                f"only {', '.join(RESUMABLE_CHANGES)} may change on resume. Use another --out "
                "or --no-resume"
            )
        if changed:
            logger.warning("resuming %s with changed %s", ckpt_path, ", ".join(changed))
        if pruner is not None:
            pruner.load_state_dict(ckpt["pruner"])
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start_epoch, step, history, wall = (
            ckpt["epoch"],
            ckpt["step"],
            ckpt["history"],
            ckpt["wall_seconds"],
        )
        reference_loss = ckpt.get("reference_loss")
        saved_comm = ckpt.get("communication")
        logger.info("resumed from %s at epoch %d (step %d)", ckpt_path, start_epoch, step)
    agree(step, "the checkpoint step to resume from", ranks)
    net = wrap_model(model, dev, ranks)  # after sparsify and resume: DDP sees masks and weights
    comm = attach_communication(net, recipe.communication, ranks)
    if comm is not None and saved_comm is not None:  # each rank's own residuals and RNG
        comm.load_state_dict(saved_comm[ranks.rank])
    if ranks.distributed and ranks.is_main:
        b, w = recipe.data.batch_size, ranks.world_size
        logger.info("data parallel: %d ranks x batch %d = global batch %d", w, b, w * b)

    owns_lr = pruner is not None and pruner.owns_lr
    clip = recipe.optimizer.clip_grad_norm

    def clip_gradients() -> None:
        if clip is not None:
            if pruner is not None:
                pruner.mask_gradients_()  # pruned coordinates must not count in the norm
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)

    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not progress or not ranks.is_main,
        desc=recipe.name or recipe.method,
        unit="step",
    )
    model.train()
    for epoch in range(start_epoch, recipe.epochs):
        t0 = time.perf_counter()
        loss_sum = 0.0
        for x, y in batches.epoch(epoch):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if not owns_lr:
                factor = lr_factor(recipe.lr_schedule, step, total_steps, steps_per_epoch)
                for group, lr0 in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = lr0 * factor
            loss = F.cross_entropy(net(x), y)
            loss_value = mean_across(float(loss.detach()), ranks, dev)  # same on every rank
            if reference_loss is None:
                reference_loss = loss_value
            diverged = divergence(loss_value, reference_loss)
            if diverged is not None:
                bar.close()
                kept = (
                    f"The last good checkpoint ({ckpt_path}, epoch "
                    f"{start_epoch if not history else history[-1]['epoch']}) is intact"
                    if ckpt_path.exists()
                    else "No epoch had completed, so there is no checkpoint"
                )
                error = NonFiniteLossError if not math.isfinite(loss_value) else DivergenceError
                raise error(
                    f"{diverged} at epoch {epoch + 1}, step {step}; stopped. {kept}: "
                    "lower the learning rate (or add lr_schedule.warmup_epochs) and resume."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients()
            if pruner is not None and pruner.needs_closure:

                def closure(x: Tensor = x, y: Tensor = y) -> float:
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(net(x), y)
                    loss.backward()
                    clip_gradients()
                    return float(loss.detach())

                optimizer.step(closure)
            else:
                optimizer.step()
            if pruner is not None:
                pruner.step()
            step += 1
            loss_sum += loss_value
            bar.update(1)
        sync_buffers(model, ranks)
        acc = (
            sharded_accuracy(model, data.x_test, data.y_test, ranks)
            if ranks.distributed
            else evaluate(model, data.x_test, data.y_test)
        )
        sparsity = sparsity_report(model)["global_sparsity"]
        wall += time.perf_counter() - t0
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / steps_per_epoch,
                "test_accuracy": acc,
                "sparsity": sparsity,
                **(
                    {"group_sparsity": optimizer.group_sparsity()}
                    if isinstance(optimizer, GroupSparseOptimizer)
                    else {}
                ),
            }
        )
        bar.set_postfix(acc=f"{acc:.4f}", sparsity=f"{sparsity:.3f}")
        logger.info(
            "epoch %d: loss %.4f, test accuracy %.4f, sparsity %.4f",
            epoch + 1,
            history[-1]["train_loss"],
            acc,
            sparsity,
        )
        # every rank's compression state (top-k residuals, RNG): gathered, so rank 0 saves them all
        comm_states = None if comm is None else gather_object(comm.state_dict(), ranks)
        if ranks.is_main:
            save_checkpoint(
                {
                    "recipe": recipe.to_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "pruner": None if pruner is None else pruner.state_dict(),
                    "rng": torch.get_rng_state(),
                    "history": history,
                    "wall_seconds": wall,
                    "reference_loss": reference_loss,
                    "communication": comm_states,
                },
                ckpt_path,
            )
        barrier(ranks)
        if (
            stop_after_epoch is not None
            and epoch + 1 >= stop_after_epoch
            and epoch + 1 < recipe.epochs
        ):
            bar.close()
            return {"history": history, "stopped_after_epoch": epoch + 1}
    bar.close()
    structured = (
        finish_structured(
            model, optimizer, groups, example, out, lambda m: evaluate(m, data.x_test, data.y_test)
        )
        if recipe.structured is not None and ranks.is_main
        else {}
    )
    communication = {} if comm is None else communication_metrics(comm, ranks)
    return _finish(
        recipe, model, pruner, data, history, wall, out, dev, structured, ranks, communication
    )


def _finish(
    recipe: Recipe,
    model: nn.Module,
    pruner: Pruner | None,
    data: ArrayDataset,
    history: list[dict[str, Any]],
    wall: float,
    out: Path,
    device: torch.device,
    structured: dict[str, Any],
    ranks: Ranks,
    communication: dict[str, Any],
) -> dict[str, Any]:
    """Finalize the pruner (every rank, so the replicas end identical), then on rank 0 alone
    evaluate, write every output file and return the metrics, which the other ranks receive."""
    extra: dict[str, Any] = {**structured, **communication}
    # before finalize: e.g. AC/DC's dense model of the pair (a file: rank 0 alone)
    if pruner is not None and ranks.is_main:
        extra.update(
            pruner.extra_artifacts(
                out,
                lambda m: evaluate(m.to(device), data.x_test, data.y_test),
                lambda: build_recipe_model(recipe, data),
            )
        )
    if pruner is not None:
        calibration = None
        if pruner.calibration_batches() > 0:  # one-shot at the end: re-estimate batch norm
            loader = BatchIterator(
                data.x_train, data.y_train, recipe.data.batch_size, seed=recipe.seed
            )
            calibration = (x.to(device) for x, _ in loader.epoch(recipe.epochs))
        pruner.finalize(calibration=calibration)
    if not ranks.is_main:
        return dict(broadcast_object(None, ranks))  # waits for rank 0's files
    report = sparsity_report(model)
    acc = evaluate(model, data.x_test, data.y_test)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic(state, out / "model.pt")
    save_sparse(
        state, out / "model_sparse.pt", {"model": recipe.model.name, "recipe": recipe.to_dict()}
    )
    target = 0.0 if recipe.pruning is None else float(recipe.pruning["sparsity"])
    metrics: dict[str, Any] = {
        "method": recipe.method,
        "model": recipe.model.name,
        "dataset": recipe.data.name,
        "target_sparsity": target,
        "global_sparsity": report["global_sparsity"],
        "compression": report["compression"],
        "nonzeros": report["nonzeros"],
        "total_weights": report["total_weights"],
        "test_accuracy": acc,
        "test_error": 100.0 * (1.0 - acc),
        "epochs": recipe.epochs,
        "steps": recipe.epochs
        * len(
            BatchIterator(
                data.x_train, data.y_train, recipe.data.batch_size, world_size=ranks.world_size
            )
        ),
        "world_size": ranks.world_size,
        "batch_size": recipe.data.batch_size,
        "global_batch_size": ranks.world_size * recipe.data.batch_size,
        "wall_seconds": wall,
        "model_file_bytes": (out / "model.pt").stat().st_size,
        "sparse_file_bytes": (out / "model_sparse.pt").stat().st_size,
        "device": str(device),
        **extra,
        "history": history,
        "layers": report["layers"],
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    title = f"{recipe.model.name} / {recipe.method}"
    plot_accuracy(history, out / "accuracy.png", title)
    plot_layer_sparsity(
        report,
        out / "layer_sparsity.png",
        f"{title}: {100 * report['global_sparsity']:.2f}% sparse",
    )
    write_text_atomic(
        out / "report.md",
        _report_md(recipe, metrics, report) + (structured_report(metrics) if structured else ""),
    )
    logger.info("wrote %s", out)
    return dict(broadcast_object(metrics, ranks))


def _report_md(recipe: Recipe, metrics: dict[str, Any], report: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {h['epoch']} | {h['train_loss']:.4f} | {100 * h['test_accuracy']:.2f} | {100 * h['sparsity']:.2f} |"
        for h in metrics["history"]
    )
    pair = (
        f"\nDense model of the AC/DC pair: {100 * metrics['dense_pair_test_accuracy']:.2f}% test accuracy.\n"
        if "dense_pair_test_accuracy" in metrics
        else ""
    )
    return f"""# {recipe.name or recipe.method}: {recipe.model.name} on {recipe.data.name}

| metric | value |
|---|---|
| method | {metrics["method"]} |
| target sparsity | {100 * metrics["target_sparsity"]:.2f}% |
| measured sparsity | {100 * metrics["global_sparsity"]:.2f}% |
| compression | {metrics["compression"]:.1f}× |
| test accuracy | {100 * metrics["test_accuracy"]:.2f}% (error {metrics["test_error"]:.2f}%) |
| epochs | {metrics["epochs"]} |
| training time | {metrics["wall_seconds"]:.1f} s |
| model file (dense format) | {metrics["model_file_bytes"]:,} bytes |
| model file (sparse format) | {metrics["sparse_file_bytes"]:,} bytes |
{pair}
## Layers

{format_report(report)}

## Training

| epoch | train loss | test accuracy (%) | sparsity (%) |
|---|---:|---:|---:|
{rows}

![accuracy](accuracy.png) ![layers](layer_sparsity.png)

## Recipe

```json
{json.dumps(recipe.to_dict(), indent=2)}
```
"""


def train_from_dict(data: dict[str, Any], out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Validate a recipe given as plain data and run it."""
    return train(recipe_from_dict(data), out_dir, **kwargs)
