"""Attention heads as zero-invariant groups, and the slimmed attention module.

For ``nn.MultiheadAttention`` (packed projections, no ``bias_k``/``add_zero_attn``) each head ``h`` is one
group: rows ``h·d … (h+1)·d`` of the query, key and value blocks of ``in_proj_weight``/``in_proj_bias``
produce it, columns ``h·d … (h+1)·d`` of ``out_proj.weight`` consume it. When a head's value rows are
zero its output is exactly zero, so the head and its ``out_proj`` columns can be removed. PyTorch's
module ties the head size to ``embed_dim / num_heads``, so a slimmed one is replaced by
:class:`SlimMultiheadAttention`, which has the same interface and arithmetic with fewer heads.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from prunekit.structured.channels import Flow
from prunekit.structured.rule_context import RuleContext, Value, pin_all, shape_of


class SlimMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` arithmetic with ``num_heads`` heads of ``head_dim`` each, where
    ``num_heads · head_dim`` may differ from ``embed_dim``."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, dropout: float = 0.0,
                 batch_first: bool = False, bias: bool = True):  # fmt: skip
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, tq, _ = query.shape
        tk = key.shape[1]
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = (
            self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        )
        h, d = self.num_heads, self.head_dim
        q = F.linear(query, wq, bq).view(b, tq, h, d).transpose(1, 2)
        k = F.linear(key, wk, bk).view(b, tk, h, d).transpose(1, 2)
        v = F.linear(value, wv, bv).view(b, tk, h, d).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / d**0.5
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(b, h, tq, tk)
            scores = (
                scores.masked_fill(mask, float("-inf"))
                if mask.dtype == torch.bool
                else scores + mask
            )
        elif is_causal:
            causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            pad = key_padding_mask.view(b, 1, 1, tk)
            scores = (
                scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
            )
        weights = scores.softmax(-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(b, tq, h * d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


def mha_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    """Heads of ``nn.MultiheadAttention`` / :class:`SlimMultiheadAttention` as groups."""
    assert isinstance(m, nn.MultiheadAttention | SlimMultiheadAttention)
    name = str(node.target)
    qkv = inputs[:3]
    query_shape = shape_of(node.args[0]) if node.args else None
    packed = isinstance(m, SlimMultiheadAttention) or (
        m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn
    )
    if query_shape is None or len(qkv) < 3 or not packed or m.in_proj_weight is None:
        reason = f"{name}: attention layout not supported (separate q/k/v projections or bias_k)"
        pin_all(ctx, inputs, reason)
        return (
            (Flow(len(query_shape) - 1, ctx.graph.fresh(query_shape[-1], reason)), None)
            if query_shape
            else None
        )
    embed = m.embed_dim
    heads = m.num_heads
    d = m.head_dim
    inner = heads * d
    weight = ctx.tensor_name(name, "in_proj_weight", m)
    bias = ctx.tensor_name(name, "in_proj_bias", m)
    out_w = ctx.tensor_name(f"{name}.out_proj", "weight", m.out_proj)
    out_b = ctx.tensor_name(f"{name}.out_proj", "bias", m.out_proj)
    last = len(query_shape) - 1
    for x in qkv:  # every input channel j is consumed by column j of the packed projection
        if isinstance(x, Flow) and x.dim == last:
            ctx.attach(x.ids, weight, 1, "in")
        elif isinstance(x, Flow):
            ctx.graph.pin(x.ids, f"{name}: channels not on the embedding dimension")
    head_ids = ctx.graph.fresh(heads)
    rows = np.arange(inner)  # head h: rows h·d … (h+1)·d − 1 of each of the q, k and v blocks
    per_row = np.repeat(head_ids, d)
    for block in range(3):
        for t in (weight, bias):
            if t is not None:
                ctx.graph.attach(per_row, t, 0, "out", block * inner + rows)
    if out_w is not None:
        ctx.graph.attach(per_row, out_w, 1, "in", rows)
    for t in (weight, bias, out_w):
        if t is not None and t in ctx.shared:
            ctx.graph.pin(head_ids, f"{t} is shared")
    out = Flow(last, ctx.graph.fresh(embed))
    ctx.attach(out.ids, out_w, 0, "out")
    ctx.attach(out.ids, out_b, 0, "out")
    return (out, None)


def fix_mha(m: nn.Module) -> nn.Module | None:
    """After slicing: a :class:`SlimMultiheadAttention` holding the remaining heads."""
    assert isinstance(m, nn.MultiheadAttention | SlimMultiheadAttention)
    inner = m.in_proj_weight.shape[0] // 3
    d = m.head_dim
    slim = SlimMultiheadAttention(
        m.embed_dim, inner // d, d, dropout=float(m.dropout), batch_first=bool(m.batch_first),
        bias=m.in_proj_bias is not None,
    )  # fmt: skip
    slim.in_proj_weight = m.in_proj_weight
    slim.in_proj_bias = m.in_proj_bias
    slim.out_proj.weight = m.out_proj.weight
    slim.out_proj.bias = m.out_proj.bias
    slim.train(m.training)
    return slim
