"""Sparsity statistics of a model: per layer and global, nonzeros and compression ratio."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prunekit.core.targets import DEFAULT_TYPES, Target, require_values, select_targets


def sparsity_report(
    model: nn.Module,
    targets: Sequence[Target] | None = None,
    types: Sequence[type[nn.Module]] = DEFAULT_TYPES,
) -> dict[str, Any]:
    """Measure sparsity from the weight values themselves (zeros are counted, masks are not trusted).

    Compression is ``prunable weights / nonzero prunable weights`` — the definition of the
    MNIST literature (Han et al. 2015, "Learning both Weights and Connections for Efficient
    Neural Networks"): a 98%-sparse model is 50× compressed.

    Returns:
        ``{"layers": [{"name", "shape", "numel", "nonzeros", "sparsity"}...], "total_weights",
        "nonzeros", "global_sparsity", "compression", "total_parameters", "nonzero_parameters"}``.
    """
    chosen = list(targets) if targets is not None else select_targets(model, types=types)
    require_values(chosen, "sparsity_report")
    layers = []
    total = nnz = 0
    for t in chosen:
        w = t.param.detach()
        n, k = w.numel(), int(torch.count_nonzero(w))
        layers.append(
            {
                "name": t.name,
                "shape": list(w.shape),
                "numel": n,
                "nonzeros": k,
                "sparsity": 1.0 - k / n,
            }
        )
        total += n
        nnz += k
    all_params = sum(p.numel() for p in model.parameters())
    all_nnz = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    return {
        "layers": layers,
        "total_weights": total,
        "nonzeros": nnz,
        "global_sparsity": 1.0 - nnz / total if total else 0.0,
        "compression": total / nnz if nnz else float("inf"),
        "total_parameters": all_params,
        "nonzero_parameters": all_nnz,
    }


def format_report(report: dict[str, Any]) -> str:
    """A markdown table of a :func:`sparsity_report`."""
    lines = ["| layer | shape | nonzeros | sparsity |", "|---|---|---:|---:|"]
    for layer in report["layers"]:
        shape = "×".join(str(s) for s in layer["shape"])
        lines.append(
            f"| {layer['name']} | {shape} | {layer['nonzeros']:,} | {layer['sparsity']:.2%} |"
        )
    lines.append(
        f"| **global** | | {report['nonzeros']:,} / {report['total_weights']:,} | "
        f"{report['global_sparsity']:.2%} ({report['compression']:.1f}×) |"
    )
    return "\n".join(lines)
