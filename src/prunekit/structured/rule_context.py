"""What the rules of group discovery are written with: the context, the values, the shared helpers.

A rule (:mod:`prunekit.structured.module_rules` for modules, :mod:`prunekit.structured.rules` for
functions and methods) receives the :class:`RuleContext`, the fx node and the values of its tensor
arguments (a channel :class:`~prunekit.structured.channels.Flow`, a :class:`Param`, a tuple of them
or ``None``), registers members and unions/pins ids, and returns the value of its output. The
helpers here are those both kinds of rule use: fresh and pinned ids, joined runs, the fallback
:func:`unknown` (an op that is not understood is a boundary), ``f(0)`` of an element-wise op, and
the two transforms applied to modules and to calls alike (:func:`flatten`, :func:`glu`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from prunekit.structured.channels import ChannelGraph, Flow, Ids


@dataclass(frozen=True)
class Param:
    """A parameter or buffer read directly in ``forward`` (an fx ``get_attr`` node, such as a layer
    scale ``γ`` in ``γ · x``), by canonical name."""

    name: str
    shape: tuple[int, ...]


Value = Flow | Param | tuple[Any, ...] | None


@dataclass
class RuleContext:
    """What rules need: the channel graph, canonical tensor names and the shapes of nodes."""

    graph: ChannelGraph
    names: dict[int, str]  # id(tensor) -> canonical qualified name
    shared: set[str]  # canonical names of tensors used by several modules or calls
    head_sites: list[Any] = field(default_factory=list)  # heads.HeadSite: splits and merges
    coupled: list[int] = field(default_factory=list)  # one id per head joined by attention
    head_attrs: dict[int, set[tuple[str, int]]] = field(default_factory=dict)
    values: dict[fx.Node, Any] = field(default_factory=dict)  # each node's Value, filled in order

    def tensor_name(self, module_name: str, attr: str, module: nn.Module) -> str | None:
        t = getattr(module, attr, None)
        if not isinstance(t, torch.Tensor):
            return None
        return self.names.get(id(t), f"{module_name}.{attr}" if module_name else attr)

    def attach(self, ids: Ids, name: str | None, axis: int, role: str) -> None:
        """Attach slice ``i`` of tensor ``name`` along ``axis`` to channel ``ids[i]``."""
        if name is None:
            return
        self.graph.attach(ids, name, axis, role)
        if name in self.shared:
            self.graph.pin(ids, f"{name} is shared (tied weights or a module called twice)")


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The shape of the tensor ``node`` makes (from
    :func:`~prunekit.structured.tracer.propagate_shapes`), if it makes one."""
    return node.meta.get("shape") if isinstance(node, fx.Node) else None


def fresh_flow(
    ctx: RuleContext, node: fx.Node, reason: str | None, dim: int | None = None
) -> Flow | None:
    """New ids for ``node``'s output (pinned with ``reason`` if given)."""
    shape = shape_of(node)
    if shape is None or len(shape) == 0:
        return None
    d = dim if dim is not None else (1 if len(shape) >= 2 else 0)
    return Flow(d, ctx.graph.fresh(shape[d], reason))


def pin_all(ctx: RuleContext, values: Sequence[Value], reason: str) -> None:
    for v in values:
        if isinstance(v, Flow):
            ctx.graph.pin(v.ids, reason)
        elif isinstance(v, tuple):
            pin_all(ctx, list(v), reason)


def join_runs(ctx: RuleContext, ids: Ids, size: int) -> None:
    """Join each run of ``size`` consecutive ids (a norm group, a head)."""
    runs = ids.reshape(-1, size)
    ctx.graph.union_all(runs[:, :-1].ravel(), runs[:, 1:].ravel())


def unknown(ctx: RuleContext, node: fx.Node, inputs: list[Value]) -> Value:
    """Fallback: the op is a boundary. An op none of whose inputs carries channels (random noise,
    an ``arange``, a parameter reshaped) makes a tensor without channels: ``None``, which a rule that
    meets it treats as untracked (a product with it passes only where it broadcasts over channels)."""
    if not _carries_flow(inputs):
        return None
    reason = f"op {describe(node)} is not understood (boundary)"
    pin_all(ctx, inputs, reason)
    return fresh_flow(ctx, node, reason)


def _carries_flow(values: Sequence[Value]) -> bool:
    return any(
        isinstance(v, Flow) or (isinstance(v, tuple) and _carries_flow(list(v))) for v in values
    )


def describe(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return f"{node.op}:{name}"


def value_at_zero(f: Callable[[Tensor], Any]) -> float | None:
    """``f(0)`` for an element-wise ``f``, evaluated (``None`` if ``f`` does not run on a 0-d
    float tensor or gives no single number)."""
    try:
        with torch.no_grad():
            out = f(torch.zeros(()))
    except Exception:  # any failure: f(0) is unknown
        return None
    return float(out) if isinstance(out, Tensor) and out.numel() == 1 else None


def flatten(ctx: RuleContext, node: fx.Node, x: Value, start: int, end: int) -> Value:
    """Merging dims ``start..end``: each channel id repeats over the merged positions."""
    in_shape = shape_of(node.args[0]) if node.args else None
    if not isinstance(x, Flow) or in_shape is None:
        return fresh_flow(ctx, node, "untracked input")
    n = len(in_shape)
    start, end = start % n, end % n
    if x.dim < start:
        return Flow(x.dim, x.ids)
    if x.dim > end:
        return Flow(x.dim - (end - start), x.ids)
    outer = math.prod(in_shape[start : x.dim])
    inner = math.prod(in_shape[x.dim + 1 : end + 1])
    return Flow(start, np.tile(np.repeat(x.ids, inner), outer))


def glu(ctx: RuleContext, node: fx.Node, x: Value, dim: int) -> Value:
    """``glu(x) = a · σ(b)`` with ``x = [a, b]`` halved along ``dim`` (Dauphin et al., 2017). Along
    the channel dim, ``a``'s channel ``c`` and ``b``'s channel ``c`` are joined: when ``a_c = 0`` the
    output is ``0 · σ(b_c) = 0`` whatever ``b_c`` is, and ``b_c`` is used nowhere else, so both go
    with the group (the gate of :func:`~prunekit.structured.rules.join_rule`, inside one op). Along
    another dim the output keeps ``x``'s channels (zero where ``x`` is)."""
    shape = shape_of(node.args[0])
    if not isinstance(x, Flow) or shape is None:
        return unknown(ctx, node, [x])
    if dim % len(shape) != x.dim:
        return Flow(x.dim, x.ids)
    half = len(x.ids) // 2
    ctx.graph.union_all(x.ids[:half], x.ids[half:])
    return Flow(x.dim, x.ids[:half])
