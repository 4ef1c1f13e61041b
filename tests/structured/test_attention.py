"""Heads of ``nn.MultiheadAttention`` as zero-invariant groups, and the slimmed attention module
(:mod:`prunekit.structured.attention`)."""

import pytest
import torch

from prunekit.structured import find_groups, slim
from tests.structured.tiny_models import TINY_MODELS


@pytest.mark.parametrize("name", ["attention", "attention_seq_first"])
def test_attention_heads_are_groups_and_slim_drops_heads(name):
    from prunekit.structured import SlimMultiheadAttention

    torch.manual_seed(0)
    model, x = TINY_MODELS[name]()
    groups = find_groups(model, x)
    heads = [g for g in groups if ("attn.in_proj_weight", 0) in g.slices("out")]
    assert len(heads) == 4 and all(g.prunable for g in heads)
    assert heads[1].slices("out")[("attn.in_proj_weight", 0)] == [
        *range(4, 8),
        *range(20, 24),
        *range(36, 40),
    ]
    assert heads[1].slices("in")[("attn.out_proj.weight", 1)] == list(range(4, 8))
    mlp = [g for g in groups if ("fc1.weight", 0) in g.slices("out")]
    assert len(mlp) == 32 and all(g.prunable for g in mlp)
    stream = [g for g in groups if ("embed.weight", 0) in g.slices("out")]
    assert stream and not any(g.prunable for g in stream)  # through LayerNorm
    heads[0].zero_()
    heads[2].zero_()
    small = slim(model, x, groups)
    assert isinstance(small.attn, SlimMultiheadAttention) and small.attn.num_heads == 2
