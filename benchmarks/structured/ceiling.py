"""Part 4: hand-picked slim architectures (random weights, made with ``find_groups`` + ``zero_`` +
``slim``) for the latency ceiling, and ``ceiling-accuracy``: each trained from scratch with the
dense loop and budget."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from prunekit.core import count_macs
from prunekit.data import load_mnist
from prunekit.models import build_model
from prunekit.structured import find_groups, slim

from .shared import HP, MODELS, SHAPE, accuracy, train_loop

# Hand-picked architectures for the ``ceiling`` part: kept width per family (named by its first
# producing tensor); families not named keep every channel, 0 removes a residual branch (folded).
_R20_DEPTH = {f"layers.{b}.bn1.bias": 0 for b in (1, 2, 4, 5, 7, 8)}
_VGG = [f"features.{i}.weight" for i in (0, 3, 7, 10, 14, 17, 21, 24)]
_VGG_WIDTHS = [
    (5, 5, 10, 10, 26, 34, 126, 124),  # what HESSO learned (seed 0)
    (8, 8, 16, 16, 32, 32, 64, 64),
    (4, 4, 16, 16, 32, 32, 96, 128),
    (2, 2, 16, 16, 32, 32, 128, 128),
    (2, 2, 16, 16, 32, 32, 112, 128),
    (1, 1, 16, 16, 32, 32, 128, 128),
]
CEILING: dict[str, dict[str, dict[str, int]]] = {
    "resnet20": {
        "uniform widths 8/17/34": {"bn1.bias": 8, "layers.3.bn2.bias": 17, "layers.6.bn2.bias": 34}
        | {f"layers.{b}.bn1.bias": (8, 17, 34)[b // 3] for b in range(9)},
        "as HESSO depth ×16 learned (seed 0)": {"layers.3.bn2.bias": 16, "layers.7.bn1.bias": 48}
        | {"layers.8.bn1.bias": 16}
        | {f"layers.{b}.bn1.bias": 0 for b in (0, 1, 2, 4, 5)},
        "branches 2-3 of each stage removed, full width": _R20_DEPTH,
        "branches 2-3 removed, branch 1 of stage 3 at 48": _R20_DEPTH | {"layers.6.bn1.bias": 48},
    },
    "vgg_bn": {
        f"widths {'/'.join(map(str, w))}": dict(zip(_VGG, w, strict=True)) for w in _VGG_WIDTHS
    },
}


def hand_slim(name: str, widths: dict[str, int]) -> nn.Module:
    """The dense ``name`` (seed 0, batch-norm statistics settled) with each family cut to
    ``widths`` by zeroing its last groups, then slimmed."""
    torch.manual_seed(0)
    model = build_model(name, SHAPE, 10, **MODELS[name])
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        model.train()(x)
    model.eval()
    groups = find_groups(model, x)
    families: dict[str, list[Any]] = {}
    for g in groups:
        if g.prunable:
            families.setdefault(min(n for n, _ in g.slices("out")), []).append(g)
    for family, width in widths.items():
        for g in families[family][width:]:
            g.zero_()
    return slim(model, x, groups)


def ceiling_models(name: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    models = {"dense": build_model(name, SHAPE, 10, **MODELS[name])}
    return models | {label: hand_slim(name, w) for label, w in CEILING[name].items()}


def ceiling_accuracy(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each ceiling architecture trained from scratch (fresh initialisation) with the dense budget
    and loop: could a method that found it meet the accuracy goal too?"""
    data = load_mnist().subset(args.train_subset, None)
    x1 = torch.randn(1, *SHAPE)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        macs0 = count_macs(build_model(name, SHAPE, 10, **MODELS[name]), x1)
        for label, widths in CEILING[name].items():
            model = hand_slim(name, widths)
            torch.manual_seed(args.seed)  # hand_slim seeds its own dense model
            for m in model.modules():
                if m is not model and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            torch.manual_seed(args.seed)
            train_loop(
                model, torch.optim.SGD(model.parameters(), **HP), data, args.epochs, seed=args.seed
            )
            rows.append(
                {
                    "model": name,
                    "seed": args.seed,
                    "architecture": label,
                    "accuracy": accuracy(model, data),
                    "macs_removed": 1 - count_macs(model, x1) / macs0,
                    "epochs": args.epochs,
                    "train_subset": args.train_subset,
                }
            )
            print(rows[-1], flush=True)
    return rows
