"""What the parts share: the models, the training loop and accuracy, the peers' loaders."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.data import BatchIterator
from prunekit.schedules import cosine

MODELS = {
    "resnet20": {},
    "resnet56": {},
    "vgg_bn": {"width": 0.25},
    "mobilenet_v2": {"width": 0.5},
    "densenet": {},  # concatenation followed by batch norm (OTO's exactness bug)
}
SHAPE = (1, 28, 28)
# HESSO (both libraries) prunes over this part of training; the rest is pruning-free. Ending at 40%
# rather than 60% left 0.1-0.2 points more accuracy at 72% of the MACs removed (ResNet-20, VGG).
PRUNE_START, PRUNE_END = 0.05, 0.4
#: SGD's settings for every library and architecture (both HESSOs take them too)
HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
SLIM_DIR = Path(__file__).resolve().parents[2] / "runs" / "structured"  # gitignored
#: the command line (``python -m structured`` in ``BENCHMARKS``), which the latency part starts
#: afresh in worker processes
ENTRY = (sys.executable, "-m", "structured")
BENCHMARKS = Path(__file__).resolve().parents[1]


def load_oto(shim: Path) -> Any | None:
    """only_train_once.OTO, or None (with the reason printed) if it cannot run here."""
    try:
        sys.path.insert(0, str(shim.parent))
        importlib.import_module(shim.stem)
        from only_train_once import OTO

        return OTO
    except Exception as exc:
        print(f"only-train-once unavailable: {type(exc).__name__}: {exc}")
        return None


def load_tp() -> Any | None:
    try:
        import torch_pruning as tp

        return tp
    except Exception as exc:
        print(f"torch-pruning unavailable: {exc}")
        return None


def zero_random_groups(groups: list[Any], fraction: float) -> int:
    """Zero each prunable group with probability ``fraction`` (seeded); returns how many are prunable."""
    prunable = [g for g in groups if g.prunable]
    gen = torch.Generator().manual_seed(0)
    for g in prunable:
        if torch.rand((), generator=gen) < fraction:
            g.zero_()
    return len(prunable)


def train_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Any,
    epochs: int,
    start_epoch: int = 0,
    total_epochs: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
) -> None:
    batches = BatchIterator(data.x_train, data.y_train, batch_size, seed=seed)
    total = (total_epochs or epochs) * len(batches)
    base = [g["lr"] for g in opt.param_groups]
    step = start_epoch * len(batches)
    model.train()
    for epoch in range(start_epoch, start_epoch + epochs):
        for xb, yb in batches.epoch(epoch):
            for g, lr0 in zip(opt.param_groups, base, strict=True):
                g["lr"] = lr0 * cosine(step, 1.0, total)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1


@torch.no_grad()
def accuracy(model: nn.Module, data: Any) -> float:
    model.eval()
    correct = sum(
        int((model(data.x_test[i : i + 1000]).argmax(1) == data.y_test[i : i + 1000]).sum())
        for i in range(0, len(data.x_test), 1000)
    )
    return correct / len(data.x_test)
