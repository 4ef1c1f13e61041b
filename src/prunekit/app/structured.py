"""The Only-Train-Once path of a training run: group-sparsity optimizer in, slim model out."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from prunekit.app.recipe import Recipe
from prunekit.app.run_dir import RunDir
from prunekit.core.cost import count_macs, count_params
from prunekit.structured import (
    FoldedConv,
    Group,
    GroupSparseOptimizer,
    build_structured,
    config_from_section,
    slim_with_plan,
)
from prunekit.structured.io import save_slim


def build_structured_optimizer(
    recipe: Recipe, model: nn.Module, groups: list[Group], total_steps: int, example: Tensor
) -> GroupSparseOptimizer:
    """The recipe's structured optimizer over ``groups``: the ``structured`` section is its config
    (:func:`~prunekit.structured.registry.config_from_section`), the ``optimizer`` section its
    update rule."""
    assert recipe.structured is not None
    o = recipe.optimizer
    return build_structured(
        config_from_section(recipe.structured),
        model.parameters(),
        groups,
        total_steps=total_steps,
        model=model,
        example=example,
        lr=o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
        variant=o.name,
    )


def finish_structured(
    model: nn.Module,
    optimizer: Optimizer,
    groups: list[Group],
    example: Tensor,
    run: RunDir,
    evaluate: Any,
) -> dict[str, Any]:
    """Build, check and save the slim model; return its metrics (before/after parameters, MACs and
    accuracy of the group-sparse and the slim model, which must agree)."""
    one = example[:1]
    small, plan = slim_with_plan(model, one, groups)  # raises SlimError if the outputs differ
    run.write_with("slim", lambda path: save_slim(small, plan.spec(), path))
    acc_sparse, acc_slim = evaluate(model), evaluate(small)
    params, macs = count_params(model), count_macs(model, one)
    slim_params, slim_macs = count_params(small), count_macs(small, one)
    assert isinstance(optimizer, GroupSparseOptimizer)
    return {
        "group_sparsity": optimizer.group_sparsity(),
        "target_group_sparsity": None
        if getattr(optimizer, "capped", True) is False
        else optimizer.target,
        "flops_target": getattr(optimizer, "cost_removed", None),
        "params_before": params,
        "params_after": slim_params,
        "macs_before": macs,
        "macs_after": slim_macs,
        "flops_removed": 1.0 - slim_macs / macs,
        "folded_layers": sum(isinstance(m, FoldedConv) for m in small.modules()),
        "test_accuracy_group_sparse": acc_sparse,
        "test_accuracy_slim": acc_slim,
    }


def _targets(metrics: dict[str, Any]) -> str:
    """Reached figures next to the target that drove the optimizer (group count or MACs)."""
    groups, flops = 100 * metrics["group_sparsity"], 100 * metrics["flops_removed"]
    if metrics.get("flops_target") is not None:
        return (
            f"FLOPs removed {flops:.1f}% (target {100 * metrics['flops_target']:.1f}%), "
            f"group sparsity {groups:.1f}%."
        )
    target = metrics.get("target_group_sparsity")
    driven = f"target {100 * target:.1f}%" if target is not None else "driven by lambda, no cap"
    return f"Group sparsity {groups:.1f}% ({driven}), FLOPs removed {flops:.1f}%."


def structured_report(metrics: dict[str, Any]) -> str:
    """Markdown lines for report.md."""
    return (
        "\n## Structured pruning (Only-Train-Once)\n\n"
        "| | before | after (slim) |\n|---|---:|---:|\n"
        f"| parameters | {metrics['params_before']:,} | {metrics['params_after']:,} |\n"
        f"| MACs (batch 1) | {metrics['macs_before']:,} | {metrics['macs_after']:,} |\n"
        f"| test accuracy | {100 * metrics['test_accuracy_group_sparse']:.2f}% (group-sparse) | "
        f"{100 * metrics['test_accuracy_slim']:.2f}% |\n\n"
        f"{_targets(metrics)} "
        + (
            f"{metrics['folded_layers']} convolutions folded (whole branches removed). "
            if metrics.get("folded_layers")
            else ""
        )
        + "The slim model is in `slim/` (spec.json + the weights file it names; load with "
        "`prunekit.structured.io.load_slim(fresh_model, 'slim')`).\n"
    )
