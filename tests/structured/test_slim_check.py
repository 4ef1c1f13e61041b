"""The exactness check of ``slim``: float32 rounding of a deep network passes, a wrong model not."""

import importlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.structured import SlimError, find_groups, slim

slim_module = importlib.import_module(
    "prunekit.structured.slim"
)  # the package's slim is the function


class _Block(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        with torch.no_grad():
            self.fc2.weight *= 4.0  # the residual stream grows with depth, as in a deep ResNet

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class _DeepResidual(nn.Module):
    """60 residual blocks: outputs of order 1e5, whose float32 rounding changes when the hidden
    layers narrow (a matrix product of 256 instead of 512 terms is summed in another order).
    Measured: float32 max |diff| 0.22 (2e-6 of the output), float64 4e-10; dropping one live
    channel of block 30 changes the output by 6e3 (6e-2 of it)."""

    def __init__(self, depth: int = 60, width: int = 64, hidden: int = 512) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.Sequential(*[_Block(width, hidden) for _ in range(depth)])
        self.head = nn.Linear(width, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.inp(x)))


@pytest.fixture(scope="module")
def deep() -> tuple[nn.Module, Tensor, list[Any]]:
    torch.manual_seed(0)
    model = _DeepResidual().eval()
    x = torch.randn(64, 8)
    groups = find_groups(model, x)
    hidden = [g for g in groups if g.prunable and any("fc1" in t for t, _ in g.slices("out"))]
    assert len(hidden) == 60 * 512
    for g in hidden[::2]:  # half of every block's hidden channels
        g.zero_()
    return model, x, groups


def test_a_correct_deep_slim_model_is_accepted_despite_float32_rounding(deep):
    model, x, groups = deep
    small = slim(model, x, groups)  # raised SlimError when compared in float32 with allclose
    assert all(b.fc1.out_features == 256 for b in small.blocks)
    with torch.no_grad():
        ref, got = model(x), small(x)
        assert ref.abs().max() > 100  # large outputs ...
        assert not torch.allclose(got, ref, rtol=1e-4, atol=1e-5)  # ... beyond the old check
        exact = model.double()(x.double()) - small.double()(x.double())
        model.float()
    assert exact.abs().max() < 1e-9  # the same function: equal up to float64 rounding


def test_a_slim_model_missing_one_live_channel_is_refused(deep, monkeypatch):
    model, x, groups = deep
    real = slim_module.slim_plan

    def drop_one(*args: Any, **kwargs: Any) -> slim_module.SlimPlan:
        plan = real(*args, **kwargs)
        channel = plan.kept["blocks.30.fc1.weight"][0]["kept"][0]  # a kept, non-zero channel
        for name, axis in [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]:
            entries = plan.kept[f"blocks.30.{name}"]
            entry = next(e for e in entries if e["axis"] == axis)
            entry["kept"].remove(channel)
        return plan

    monkeypatch.setattr(slim_module, "slim_plan", drop_one)
    with pytest.raises(SlimError, match=r"compared in float64"):
        slim(model, x, groups)


class _FixedDtype(nn.Module):
    """A forward that fixes float32 (``x.float()``): it cannot run in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x.float())))


def test_a_model_that_cannot_run_in_float64_is_checked_in_its_own_dtype(monkeypatch):
    torch.manual_seed(0)
    model = _FixedDtype().eval()
    x = torch.randn(5, 4)
    groups = find_groups(model, x)
    for g in [g for g in groups if ("fc1.weight", 0) in g.slices("out")][:2]:
        g.zero_()
    small = slim(model, x, groups)
    assert small.fc1.out_features == 4
    real = slim_module.slim_plan

    def drop_live(*args: Any, **kwargs: Any) -> slim_module.SlimPlan:
        plan = real(*args, **kwargs)
        for name, axis in [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]:
            next(e for e in plan.kept[name] if e["axis"] == axis)["kept"].pop()
        return plan

    monkeypatch.setattr(slim_module, "slim_plan", drop_live)
    with pytest.raises(SlimError, match=r"compared in torch\.float32"):
        slim(model, x, groups)
