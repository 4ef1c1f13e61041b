"""Capture (:mod:`prunekit.structured.tracer`, through ``groups.capture``): the lean shape pass
``propagate_shapes`` records what ``torch.fx``'s own ``ShapeProp`` does, and the model's state
is left as it was."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from prunekit.structured import find_groups
from prunekit.structured.groups import capture
from prunekit.structured.tracer import trace
from tests.structured.tiny_models import TINY_MODELS


def reference_shapes(model: nn.Module, x: Tensor) -> dict[str, object]:
    gm = trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    out: dict[str, object] = {}
    for node in gm.graph.nodes:
        if node.op == "output":  # its value is the model's: the shape pass stops before it
            continue
        meta = node.meta.get("tensor_meta")
        if hasattr(meta, "shape"):
            out[node.name] = tuple(meta.shape)
        elif isinstance(meta, list | tuple) and meta and all(hasattr(m, "shape") for m in meta):
            out[node.name] = [tuple(m.shape) for m in meta]
    return out


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_shapes_equal_fx_shape_prop(name: str) -> None:
    torch.manual_seed(0)
    model, x = TINY_MODELS[name]()
    model.eval()
    graph = capture(model, (x,))
    ours = {
        n.name: n.meta.get("shape", n.meta.get("shapes"))
        for n in graph.nodes
        if "shape" in n.meta or "shapes" in n.meta
    }
    assert ours == reference_shapes(model, x)


class WithDefault(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor, scale: float = 2.0) -> Tensor:
        return self.fc(x) * scale


def test_placeholder_defaults_are_used() -> None:
    graph = capture(WithDefault(), (torch.randn(5, 4),))
    shapes = {n.name: n.meta.get("shape") for n in graph.nodes}
    assert shapes["mul"] == (5, 3)
    assert isinstance(graph, fx.Graph)


def test_training_flags_and_gc_are_restored() -> None:
    model, x = TINY_MODELS["residual"]()
    model.train()
    model.layer = nn.BatchNorm2d(1).eval()  # a frozen sub-module keeps its flag
    enabled = gc.isenabled()
    find_groups(model, x)
    assert model.training and not model.layer.training
    assert gc.isenabled() == enabled
