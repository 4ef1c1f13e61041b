"""``prunekit demo``: LeNet-300-100 on MNIST, dense vs DPF at high sparsity, on the bundled data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunekit.app.data import load_data
from prunekit.app.recipe import recipe_from_dict
from prunekit.app.training import train


def demo_recipes(epochs: int, sparsity: float) -> dict[str, dict[str, Any]]:
    """The two recipes of the demo (the settings of ``recipes/lenet300/``, fewer epochs)."""
    base: dict[str, Any] = {
        "model": {"name": "lenet300_100"},
        "data": {"name": "mnist", "batch_size": 128},
        "optimizer": {
            "name": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 0.0005,
            "nesterov": True,
        },
        "lr_schedule": {"name": "cosine"},
        "epochs": epochs,
        "seed": 0,
    }
    return {
        "dense": {**base, "name": "dense"},
        "dpf": {
            **base,
            "name": f"dpf-{sparsity:g}",
            "pruning": {"method": "dpf", "sparsity": sparsity},
        },
    }


def run_demo(
    out: Path,
    epochs: int = 20,
    sparsity: float = 0.98,
    progress: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Train both recipes, print a comparison table and return the metrics."""
    recipes = demo_recipes(epochs, sparsity)
    first = recipe_from_dict(recipes["dense"])
    data = load_data(first.data, first.seed)
    results = []
    for name, r in recipes.items():
        results.append(
            train(
                recipe_from_dict(r),
                out / name,
                progress=progress,
                data=data,
                device="cpu",
                overwrite=overwrite,
            )
        )
    print()
    print(f"LeNet-300-100 on MNIST, {epochs} epochs each (outputs in {out}/)")
    print(
        f"{'model':<12}{'test acc':>10}{'sparsity':>10}{'compress':>10}{'file':>12}{'sparse file':>13}{'train s':>9}"
    )
    for name, m in zip(recipes, results, strict=True):
        print(
            f"{name:<12}{100 * m['test_accuracy']:>9.2f}%{100 * m['global_sparsity']:>9.2f}%"
            f"{m['compression']:>9.1f}×{m['model_file_bytes'] / 1024:>10.0f}KB{m['sparse_file_bytes'] / 1024:>11.0f}KB"
            f"{m['wall_seconds']:>9.1f}"
        )
    return results
