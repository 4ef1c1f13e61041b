"""Contract tests run for every registered gradient compression method (a new method is covered
the moment it is registered): a strict config whose every field survives ``to_dict``/``from_dict``
and JSON, an unknown key refused by name, and a hook that returns the average of the ranks'
gradients within the method's stated error, on 2 ranks whose gradients differ (so a hook that
returns the local gradient, or zeros, breaks it)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

import prunekit
from prunekit.distributed import (
    available_gradient_methods,
    compress_gradients,
    get_gradient_method,
    run_workers,
)

NAMES = available_gradient_methods()
N = 2000  # entries of each rank's gradient: one DDP bucket
WORLD = 2

#: per method, a valid config with every field away from its default, whose stated error is small
#: enough that a hook returning zeros or the local gradient is far outside it; a new method needs
#: its entry here and in :func:`error_bound`
CONFIGS: dict[str, dict[str, Any]] = {
    "none": {},
    "qsgd": {"levels": 64, "bucket_size": 64, "seed": 3, "mode": "allgather"},
    "natural": {"seed": 5, "mode": "allgather"},
    "topk": {"ratio": 0.5, "error_feedback": False},
}


def rank_gradient(rank: int) -> Tensor:
    """Different on every rank, entries spread over several scales."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(N, generator=g) * torch.rand(N, generator=g) * (rank + 1)


def error_bound(name: str, grads: list[Tensor]) -> float:
    """The largest ``‖hook output − mean of grads‖²`` the method's documentation allows.

    ``none`` is exact. QSGD and natural compression are unbiased with, per rank,
    ``E‖Q(g) − g‖² ≤ min(d/s², √d/s)·‖g‖²`` and ``≤ ⅛·‖g‖²``; the errors of the ranks are
    independent, so the average's is ``≤ Σ_r bound_r / W²`` in expectation, and one draw over
    2000 entries stays within twice that. Top-k drops, on each rank, exactly the ``n − k``
    smallest-magnitude entries (no residual at the first step), so the average is off by at most
    the mean of the dropped parts' norms.
    """
    cfg = CONFIGS[name]
    energy = sum(float(g.double().square().sum()) for g in grads) / len(grads) ** 2
    if name == "none":
        return 0.0
    if name == "qsgd":
        s, d = cfg["levels"], cfg["bucket_size"]
        return 2 * min(d / s**2, math.sqrt(d) / s) * energy
    if name == "natural":
        return 2 * energy / 8
    if name == "topk":
        k = math.ceil(cfg["ratio"] * N)
        dropped = [float(g.double().abs().sort().values[: N - k].square().sum()) for g in grads]
        return (sum(math.sqrt(e) for e in dropped) / len(grads)) ** 2
    raise KeyError(f"no stated error for {name!r}: add it to error_bound")


class Linear1(nn.Module):
    """One parameter vector ``p``; the loss ``(p·g).sum()`` has gradient ``g``."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(N))

    def forward(self, g: Tensor) -> Tensor:
        return (self.p * g).sum()


def _exchange(rank: int, world: int) -> dict[str, Tensor]:
    """Every rank: one backward per method, its gradient through the method's hook."""
    out = {}
    for name in available_gradient_methods():
        if name not in CONFIGS:
            continue  # test_every_method_has_a_config_here fails for it
        model = DDP(Linear1())
        compress_gradients(model, name, **CONFIGS[name])
        model(rank_gradient(rank)).backward()
        out[name] = model.module.p.grad.detach().clone()
    return out


@pytest.fixture(scope="module")
def exchanged() -> list[dict[str, Tensor]]:
    return run_workers(_exchange, WORLD, timeout=120)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def test_the_gradient_methods_are_registered():
    assert {"none", "qsgd", "natural", "topk"} <= set(NAMES)


def test_every_method_has_a_config_here():
    assert set(CONFIGS) == set(NAMES), "add the new method's config to CONFIGS and error_bound"


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_to_dict_and_json(name: str) -> None:
    cls = get_gradient_method(name).config_class
    config = cls.from_dict(CONFIGS[name])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert all(v != _default(fields[k]) for k, v in CONFIGS[name].items())
    data = config.to_dict()
    assert data == CONFIGS[name] and set(data) == set(fields)  # every field, none dropped
    again = cls.from_dict(data)
    assert again == config and again is not config
    assert cls.from_dict(json.loads(json.dumps(data))) == config


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_key_is_a_config_error_naming_it(name: str) -> None:
    assert issubclass(prunekit.ConfigError, ValueError)
    with pytest.raises(prunekit.ConfigError, match="unknown key 'bucket_sise'"):
        get_gradient_method(name).config_class.from_dict({**CONFIGS[name], "bucket_sise": 64})
    with pytest.raises(prunekit.ConfigError, match="unknown key 'bucket_sise'"):
        compress_gradients(None, name, bucket_sise=64)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_the_hook_returns_the_average_within_the_stated_error(exchanged, name: str) -> None:
    grads = [rank_gradient(r) for r in range(WORLD)]
    mean = grads[0] * (1 / WORLD) + grads[1] * (1 / WORLD)  # DDP's exact fp32 average
    bound = error_bound(name, grads)
    for rank, out in enumerate(exchanged):
        got = out[name]
        assert torch.equal(got, exchanged[0][name]), f"rank {rank} differs from rank 0"
        err = float((got.double() - mean.double()).square().sum())
        assert err <= bound, (name, rank, err, bound)
        if bound == 0.0:
            assert torch.equal(got, mean)
