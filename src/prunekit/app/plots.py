"""PNG plots of a run: test accuracy per epoch and per-layer sparsity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: the user's backend is never changed

from prunekit.atomic import write_atomic


def _save(fig: Figure, path: str | Path) -> None:
    """PNG at 120 dpi, written atomically."""
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))


def plot_accuracy(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Test accuracy (and measured sparsity) per epoch."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    ax.plot(epochs, [100 * h["test_accuracy"] for h in history], marker="o", label="test accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax2 = ax.twinx()
    ax2.plot(
        epochs, [100 * h["sparsity"] for h in history], color="tab:red", ls="--", label="sparsity"
    )
    ax2.set_ylabel("sparsity (%)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def plot_layer_sparsity(report: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Bar chart of the final sparsity of every pruned layer."""
    layers = report["layers"]
    fig = Figure(figsize=(max(4.0, 0.7 * len(layers) + 2), 3.6))
    ax = fig.subplots()
    ax.bar(range(len(layers)), [100 * layer["sparsity"] for layer in layers])
    ax.set_xticks(range(len(layers)), [layer["name"] for layer in layers], rotation=45, ha="right")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or f"global sparsity {100 * report['global_sparsity']:.2f}%")
    fig.tight_layout()
    _save(fig, path)


def plot_layer_error(report: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Bar chart of every compressed layer's relative reconstruction error (log scale), with its
    sparsity written above the bar."""
    layers = report["layers"]
    fig = Figure(figsize=(max(4.0, 0.7 * len(layers) + 2), 3.8))
    ax = fig.subplots()
    errors = [max(layer["rel_error"], 1e-12) for layer in layers]
    ax.bar(range(len(layers)), errors)
    for i, layer in enumerate(layers):
        label = f"{100 * layer['sparsity']:.0f}%"
        if layer.get("bits"):
            label += f"/{layer['bits']}b"
        ax.text(i, errors[i], label, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(layers)), [layer["name"] for layer in layers], rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("‖WX − ŴX‖² / ‖WX‖²")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
