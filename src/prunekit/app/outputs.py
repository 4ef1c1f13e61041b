"""What a finished training run writes: the model files, ``metrics.json``, ``report.md``, plots.

:func:`finish` finalizes the pruner on every rank (so the replicas end identical), then rank 0
alone evaluates, writes every output through the run's :class:`~prunekit.app.run_dir.RunDir` and
returns the metrics, which the other ranks receive.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunekit.app.loop import Progress, Trainable, evaluate
from prunekit.app.ranks import Ranks, broadcast_object
from prunekit.app.recipe import Recipe
from prunekit.app.run_dir import RunDir
from prunekit.app.structured import structured_report
from prunekit.core.report import format_report, sparsity_report
from prunekit.data import ArrayDataset, BatchIterator

__all__ = ["finish", "report_markdown"]

logger = logging.getLogger(__name__)


def finish(
    recipe: Recipe,
    arch: tuple[str, dict[str, Any]],
    t: Trainable,
    data: ArrayDataset,
    progress: Progress,
    run: RunDir,
    device: torch.device,
    ranks: Ranks,
    extra: dict[str, Any],
    fresh_model: Callable[[], nn.Module],
) -> dict[str, Any]:
    """Finalize, evaluate and write the outputs (see the module docstring).

    Args:
        arch: the architecture's name and keyword arguments (recorded in the sparse model file).
        extra: metrics from the structured path and the gradient exchange.
        fresh_model: builds a new instance of the architecture (AC/DC's dense pair).
    """
    pruner = t.pruner
    extra = dict(extra)
    # before finalize: e.g. AC/DC's dense model of the pair (a file: rank 0 alone)
    if pruner is not None and ranks.is_main:
        extra.update(
            pruner.extra_artifacts(
                run.path,
                lambda m: evaluate(m.to(device), data.x_test, data.y_test),
                fresh_model,
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
    metrics = _write(recipe, arch, t.model, data, progress, run, device, ranks, extra)
    return dict(broadcast_object(metrics, ranks))


def _write(
    recipe: Recipe,
    arch: tuple[str, dict[str, Any]],
    model: nn.Module,
    data: ArrayDataset,
    progress: Progress,
    run: RunDir,
    device: torch.device,
    ranks: Ranks,
    extra: dict[str, Any],
) -> dict[str, Any]:
    from prunekit.app.plots import plot_accuracy, plot_layer_sparsity

    report = sparsity_report(model)
    acc = evaluate(model, data.x_test, data.y_test)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model_bytes = run.save("model.pt", state)
    name, kwargs = arch
    sparse_bytes = run.save_sparse(
        "model_sparse.pt", state, {"model": name, "kwargs": kwargs, "recipe": recipe.to_dict()}
    )
    metrics: dict[str, Any] = {
        "method": recipe.method,
        "model": name,
        "dataset": recipe.data.name,
        "target_sparsity": recipe.sparsity_target,
        "global_sparsity": report["global_sparsity"],
        "compression": report["compression"],
        "nonzeros": report["nonzeros"],
        "total_weights": report["total_weights"],
        "test_accuracy": acc,
        "test_error": 100.0 * (1.0 - acc),
        "epochs": recipe.epochs,
        "steps": progress.step,  # epochs × steps per epoch: the loop counts every batch
        "skipped_steps": progress.skipped_steps,
        "world_size": ranks.world_size,
        "batch_size": recipe.data.batch_size,
        "global_batch_size": ranks.world_size * recipe.data.batch_size,
        "wall_seconds": progress.wall_seconds,
        "model_file_bytes": model_bytes,
        "sparse_file_bytes": sparse_bytes,
        "device": str(device),
        "recipe_changes": progress.recipe_changes,
        **extra,
        "history": progress.history,
        "layers": report["layers"],
    }
    run.write_metrics(metrics)
    title = f"{name} / {recipe.method}"
    run.write_with("accuracy.png", lambda p: plot_accuracy(progress.history, p, title))
    run.write_with(
        "layer_sparsity.png",
        lambda p: plot_layer_sparsity(
            report, p, f"{title}: {100 * report['global_sparsity']:.2f}% sparse"
        ),
    )
    text = report_markdown(recipe, metrics, report)
    if "params_after" in metrics:
        text += structured_report(metrics)
    run.write_text("report.md", text)
    logger.info("wrote %s", run.path)
    return metrics


def _target_row(recipe: Recipe, metrics: dict[str, Any]) -> str:
    if recipe.structured is not None:
        return "| target | whole groups (see *Structured pruning* below) |"
    target = metrics["target_sparsity"]
    return (
        "| target sparsity | none (dense training) |"
        if target is None
        else f"| target sparsity | {100 * target:.2f}% |"
    )


def _changes(metrics: dict[str, Any]) -> str:
    rows = [
        f"- from epoch {c['epoch'] + 1}: `{c['key']}` {c['from']!r} → {c['to']!r}"
        for c in metrics.get("recipe_changes", [])
    ]
    return "\nChanged on resume (the recipe below is the last one):\n\n" + "\n".join(rows) + "\n"


def report_markdown(recipe: Recipe, metrics: dict[str, Any], report: dict[str, Any]) -> str:
    """``report.md`` of a training run: the figures, the layers, the epochs and the recipe."""
    rows = "\n".join(
        f"| {h['epoch']} | {h['train_loss']:.4f} | {100 * h['test_accuracy']:.2f} | {100 * h['sparsity']:.2f} |"
        for h in metrics["history"]
    )
    pair = (
        f"\nDense model of the AC/DC pair: {100 * metrics['dense_pair_test_accuracy']:.2f}% test accuracy.\n"
        if "dense_pair_test_accuracy" in metrics
        else ""
    )
    skipped = (
        f"| steps skipped (non-finite gradient) | {metrics['skipped_steps']} |\n"
        if metrics.get("skipped_steps")
        else ""
    )
    changes = _changes(metrics) if metrics.get("recipe_changes") else ""
    return f"""# {recipe.name or recipe.method}: {metrics["model"]} on {recipe.data.name}

| metric | value |
|---|---|
| method | {metrics["method"]} |
{_target_row(recipe, metrics)}
| measured sparsity | {100 * metrics["global_sparsity"]:.2f}% |
| compression | {metrics["compression"]:.1f}× |
| test accuracy | {100 * metrics["test_accuracy"]:.2f}% (error {metrics["test_error"]:.2f}%) |
| epochs | {metrics["epochs"]} ({metrics["steps"]} steps, {metrics["world_size"]} rank(s)) |
{skipped}| training time | {metrics["wall_seconds"]:.1f} s |
| model file (dense format) | {metrics["model_file_bytes"]:,} bytes |
| model file (sparse format) | {metrics["sparse_file_bytes"]:,} bytes |
{pair}{changes}
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
