"""``slim`` (:mod:`prunekit.structured.slim`): zeroed groups are removed with the output unchanged
on every tiny model, also after training steps, and the exactness check accepts the float32
rounding of a deep network but not a wrong model."""

import importlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.structured import SlimError, emptiable, find_groups, removal_plan, slim
from tests.structured.tiny_models import TINY_MODELS

slim_module = importlib.import_module(
    "prunekit.structured.slim"
)  # the package's slim is the function


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _settle_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Give batch norms non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x if x.is_floating_point() is False else x + 0.1 * torch.randn_like(x))


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_zero_random_groups_then_slim_is_exact(name):
    torch.manual_seed(0)
    model, x = TINY_MODELS[name]()
    _settle_bn(model, x)
    groups = find_groups(model, x)
    gen = torch.Generator().manual_seed(0)
    chosen = [g for g in groups if torch.rand((), generator=gen) < 0.5]  # prunable or not
    for g in chosen:
        g.zero_()
    model.eval()
    with torch.no_grad():
        ref = model(x)
    small = slim(model, x, groups, check=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref, rtol=1e-5, atol=1e-6)
    removed = [g for g in chosen if g.prunable]
    if removed:
        assert _params(small) < _params(model)
    plan = removal_plan(groups)
    for g in groups:  # unprunable groups are never removed
        if not g.prunable:
            for key, idx in g.slices().items():
                assert not set(idx) & set(plan.get(key, [])), (g.details(), key)


@pytest.mark.parametrize(
    "name",
    [
        "mlp",
        "conv_bn_flatten",
        "residual",
        "concat_bn",
        "inverted_residual",
        "conv1d",
        "grouped_unknown",
        "groupnorm",
        "head_attribute_attention",
        "sdpa_attention",
    ],
)
def test_slim_after_real_training_steps(name):
    """Groups zeroed and held at zero while SGD with momentum and BN updates trains the rest."""
    torch.manual_seed(0)
    model, x = TINY_MODELS[name]()
    groups = find_groups(model, x)
    prunable = [g for g in groups if g.prunable]
    chosen = prunable[::3]
    for g in chosen:
        g.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    model.train()
    for _ in range(20):
        out = model(x + 0.05 * torch.randn_like(x))
        loss = out.pow(2).mean() + F.cross_entropy(out, torch.zeros(len(x), dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in chosen:  # projection onto the group-sparse set (what HSPG-style optimizers do)
            g.zero_()
    before = _params(model)
    small = slim(model, x, groups)  # check=True: raises if the output differs
    assert _params(small) < before
    assert _params(model) == before  # the original is untouched


def test_emptiable_allows_residual_branches_and_refuses_every_path():
    from prunekit.models import build_model

    torch.manual_seed(0)
    for name, kwargs in (("resnet20", {}), ("vgg_bn", {"width": 0.25})):
        model, x = build_model(name, (1, 28, 28), 10, **kwargs), torch.randn(2, 1, 28, 28)
        groups = find_groups(model, x)
        flags = emptiable(model, groups, x)
        by_layer = {}
        for g, f in zip(groups, flags, strict=True):
            if g.prunable:
                by_layer.setdefault(min(n for n, _ in g.slices("out")), set()).add(f)
        assert all(len(v) == 1 for v in by_layer.values())  # a whole family or nothing
        may = {k for k, v in by_layer.items() if v == {True}}
        if name == "vgg_bn":  # a chain: every layer is on every path
            assert not may
        else:  # the 9 branches' inner channels; not the stem/stage streams
            assert may == {f"layers.{b}.bn1.bias" for b in range(9)}
        assert not any(f for g, f in zip(groups, flags, strict=True) if not g.prunable)


def test_emptiable_with_token_inputs_and_the_emptied_mlp_branch_is_exact():
    torch.manual_seed(0)
    model, idx = TINY_MODELS["embed_layernorm"]()  # h + fc2(gelu(fc1(h))): the MLP is a branch
    model.eval()
    groups = find_groups(model, idx)
    flags = emptiable(model, groups, idx)
    hidden = [i for i, g in enumerate(groups) if ("fc1.weight", 0) in g.slices("out")]
    assert len(hidden) == 16 and all(flags[i] for i in hidden)
    assert not any(f for i, f in enumerate(flags) if i not in hidden)
    for i in hidden:
        groups[i].zero_()
    with torch.no_grad():
        ref = model(idx)
    small = slim(model, idx, groups)
    assert small.fc1.out_features == 0 and small.fc2.in_features == 0  # nothing left to compute
    with torch.no_grad():
        torch.testing.assert_close(small(idx), ref)


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
