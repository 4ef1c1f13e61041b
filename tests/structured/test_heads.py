"""Heads of hand-written attention as zero-invariant groups (:mod:`prunekit.structured.heads`):
found through reshapes, ``q @ kᵀ``, softmax and ``@ v``, pinned where the head count is a literal
or the split is not attention, and removed exactly by ``slim``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.structured import find_groups, slim
from tests.structured.tiny_models import TINY_MODELS


def test_handwritten_attention_with_literal_head_count_is_pinned_but_exact():
    model, x = TINY_MODELS["handwritten_attention"]()
    groups = find_groups(model, x)
    for proj in ("q.weight", "k.weight", "v.weight"):
        gs = [g for g in groups if (proj, 0) in g.slices("out")]
        assert gs and not any(g.prunable for g in gs)
        assert all("head count 2 is a literal" in g.reason for g in gs)
    assert all(g.prunable for g in groups if ("fc.weight", 0) in g.slices("out"))


@pytest.mark.parametrize(
    ("name", "attribute"), [("head_attribute_attention", "num_heads"), ("sdpa_attention", None)]
)
def test_handwritten_attention_heads_are_groups_and_slim_drops_heads(name, attribute):
    torch.manual_seed(0)
    model, x = TINY_MODELS[name]()
    groups = find_groups(model, x)
    heads = [g for g in groups if ("q.weight", 0) in g.slices("out")]
    assert len(heads) == 4 and all(g.prunable for g in heads)
    # head 1: rows 3..5 of q, k and v (and their biases) produce it; columns 3..5 of o consume it
    for proj in ("q", "k", "v"):
        assert heads[1].slices("out")[(f"{proj}.weight", 0)] == [3, 4, 5]
        assert heads[1].slices("out")[(f"{proj}.bias", 0)] == [3, 4, 5]
    assert heads[1].slices("in")[("o.weight", 1)] == [3, 4, 5]
    assert heads[1].counters == ([(attribute, 4)] if attribute else [])
    heads[1].zero_()
    heads[3].zero_()
    small = slim(model, x, groups)  # checks the output
    assert small.q.out_features == small.v.out_features == small.o.in_features == 6
    if attribute:
        assert getattr(small, attribute) == 2 and small.depth == 4  # the unrelated int is untouched
    assert getattr(model, attribute or "training") in (4, True)  # the original is untouched


def test_only_the_value_rows_matter_for_exactness():
    """A head whose q and k rows are nonzero but whose v rows are zero outputs exactly zero."""
    torch.manual_seed(0)
    model, x = TINY_MODELS["head_attribute_attention"]()
    with torch.no_grad():
        model.v.weight[3:6] = 0
        model.v.bias[3:6] = 0
    groups = find_groups(model, x)
    head = next(g for g in groups if g.slices("out").get(("q.weight", 0)) == [3, 4, 5])
    assert not head.is_zero()  # the group's q/k rows are not zero: slim keeps the head
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.q.weight[3:6] = 0  # what zeroing the rest of the group changes: nothing
        model.k.weight[3:6] = 0
        model.q.bias[3:6] = 0
        model.k.bias[3:6] = 0
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)
    assert head.is_zero()
    assert slim(model, x, groups).num_heads == 3


def test_split_into_heads_outside_attention_is_pinned():
    class Shuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x).view(-1, 2, 3).transpose(1, 2).reshape(-1, 6)  # a channel shuffle
            return self.b(F.relu(y))

    x = torch.randn(5, 4)
    groups = find_groups(Shuffle(), x)
    gs = [g for g in groups if ("a.weight", 0) in g.slices("out")]
    assert gs and all("outside attention" in g.reason for g in gs)
