"""Tiny models, toy data and a plain training loop shared by the tests."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import prunekit


class MLP(nn.Module):
    """Three Linear layers with ReLUs (``fc1``, ``fc2``, ``fc3``), widths ``d``."""

    def __init__(self, d: tuple[int, ...] = (12, 16, 8, 4)) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(a, b) for a, b in itertools.pairwise(d))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def calibration_batches(
    n: int = 4, shape: tuple[int, ...] = (16, 12), seed: int = 0
) -> list[Tensor]:
    """``n`` random input batches of ``shape``: calibration data for ``prunekit.compress``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    )


def toy_data(n: int = 256, seed: int = 0, image: bool = False) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g) if image else torch.randn(n, 16, generator=g)
    flat = x.flatten(1)
    y = (flat[:, 0] > 0).long() + 2 * (flat[:, 1] > 0).long()
    return x, y


def sgd(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)


def run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pruner: prunekit.Pruner | None,
    steps: int,
    data: tuple[Tensor, Tensor] | None = None,
    batch: int = 32,
    seed: int = 0,
    callback: Any = None,
) -> None:
    """The three-line integration: backward, optimizer.step (with a closure if needed), pruner.step."""
    x, y = data if data is not None else toy_data()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        if pruner is not None and pruner.needs_closure:

            def closure(i: Tensor = i) -> Tensor:
                optimizer.zero_grad()
                out = F.cross_entropy(model(x[i]), y[i])
                out.backward()
                return out

            optimizer.step(closure)
        else:
            optimizer.step()
        if pruner is not None:
            pruner.step()
        if callback is not None:
            callback()


# Small configs that exercise each method's schedule inside a short run.
QUICK: dict[str, dict[str, Any]] = {
    "gmp": {"update_every": 5},
    "dpf": {"update_every": 4},
    "rigl": {"update_every": 10},
    "acdc": {},
    "gap": {},
    "imp": {},
    "cram": {},
    "constant": {},
}


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss whose backward overflows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * float("nan")
