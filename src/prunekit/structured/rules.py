"""How each op moves channels: the rules for function and method calls, and every rule's name.

:func:`function_rule` dispatches a ``call_function`` or ``call_method`` node: element-wise ops,
sums and products (with the gate of a product), concatenation, indexing, reshapes, reductions,
permutes and splits. A rule receives the :class:`~prunekit.structured.rule_context.RuleContext`,
the fx node and the values of its tensor arguments, registers members and unions/pins ids, and
returns the value of its output. Anything without a rule pins the channels of its inputs and gives
its output fresh pinned ids: an op that is not understood can make channels unprunable, never a
wrong slim model.

The rules' vocabulary (:mod:`~prunekit.structured.rule_context`), the rules for modules
(:mod:`~prunekit.structured.module_rules`) and the tracer (:mod:`~prunekit.structured.tracer`)
have their own modules; their names are re-exported here, so that ``prunekit.structured.rules``
still names every rule, :func:`~prunekit.structured.module_rules.register_module_rule` and
:func:`~prunekit.structured.tracer.trace`.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from prunekit.structured.channels import Flow
from prunekit.structured.module_rules import (
    BATCH_NORMS,
    CHANNEL_MIXING_NORMS,
    CONVS,
    ELEMENTWISE_MODULES,
    TRANSPOSED_CONVS,
    ZERO_PRESERVING_MODULES,
    ModuleRule,
    channel_norm_rule,
    conv_rule,
    elementwise_rule,
    embedding_rule,
    flatten_module_rule,
    glu_module_rule,
    grouped_conv,
    linear_rule,
    module_rule,
    normalize_rule,
    passthrough_rule,
    pin_values,
    pinning_passthrough_rule,
    prelu_rule,
    register_module_rule,
)
from prunekit.structured.rule_context import (
    Param,
    RuleContext,
    Value,
    describe,
    flatten,
    fresh_flow,
    glu,
    join_runs,
    pin_all,
    shape_of,
    unknown,
    value_at_zero,
)
from prunekit.structured.tracer import RuleTracer, propagate_shapes, trace

#: What this module names: its own rules and, re-exported, the rules' vocabulary, the module rules
#: and the tracer.
__all__ = [
    "BATCH_NORMS", "CHANNEL_MIXING_NORMS", "CONVS", "ELEMENTWISE_FUNCTIONS",
    "ELEMENTWISE_MODULES", "OPTIONAL_ZERO_PRESERVING", "PASS_METHODS", "SHAPE_METHODS",
    "SHAPE_ONLY_FUNCTIONS", "SHAPE_ONLY_METHODS", "TRANSPOSED_CONVS",
    "ZERO_PRESERVING_FUNCTIONS", "ZERO_PRESERVING_MODULES", "ModuleRule", "Param",
    "RuleContext", "RuleTracer", "Value", "cat_rule", "channel_norm_rule", "conv_rule",
    "describe", "elementwise_function", "elementwise_rule", "embedding_rule", "flatten",
    "flatten_module_rule", "fresh_flow", "function_rule", "getitem_rule", "glu",
    "glu_module_rule", "grouped_conv", "join_rule", "join_runs", "linear_rule", "module_rule",
    "normalize_rule", "passthrough_rule", "permute_rule", "pin_all", "pin_values",
    "pinning_passthrough_rule", "prelu_rule", "propagate_shapes", "reduce_rule",
    "register_module_rule", "reshape_rule", "setitem_rule", "shape_of", "split_rule", "trace",
    "unknown", "value_at_zero",
]  # fmt: skip


def reshape_rule(ctx: RuleContext, node: fx.Node, x: Value) -> Value:
    """view/reshape: handled when it flattens a contiguous range of dims (or keeps the channel dim)."""
    in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
    if not isinstance(x, Flow) or in_shape is None or out_shape is None:
        return unknown(ctx, node, [x])
    p = 0
    while p < min(len(in_shape), len(out_shape)) and in_shape[p] == out_shape[p]:
        p += 1
    if x.dim < p:
        return Flow(x.dim, x.ids)
    for q in range(p + 1, len(in_shape) + 1):
        if math.prod(in_shape[p:q]) == out_shape[p] and tuple(in_shape[q:]) == tuple(
            out_shape[p + 1 :]
        ):
            if x.dim < q:
                return flatten(ctx, node, x, p, q - 1)
            return Flow(x.dim - (q - 1 - p), x.ids)
    return unknown(ctx, node, [x])


def join_rule(ctx: RuleContext, node: fx.Node, inputs: list[Value], zero_absorbing: bool) -> Value:
    """Elementwise binary op ``y = a ∘ b``.

    * Two aligned flows are unioned: when both channels are zero, ``a ± b`` and ``a · b`` are zero.
      For a product, one zero factor is enough: ``a · g`` is zero at a channel where ``a`` is,
      whatever ``g`` is. So when ``g`` is not zero at zeroed channels (a *gate*, ``g = σ(…)`` with
      ``σ(0) = 1/2``: squeeze-and-excitation, GLU) and ``g`` is used only by this product, its value
      pins are waived (:func:`_gate`) and ``g``'s channel joins ``a``'s group, to be removed with it.
    * A constant operand passes the flow through when ``x ∘ c`` keeps zeros zero (mul, div) and
      value-pins it otherwise (add, sub: ``0 + c = c``).
    * A parameter read in ``forward`` (:class:`~prunekit.structured.rule_context.Param`) with one
      entry per channel (layer scale ``γ · x``, a bias ``x + β``) is sliced with the channel: for
      ``x · γ`` as a consumer (``in``: ``0 · γ_c = 0``), for ``x ± β`` as a producer (``out``:
      ``0 + β_c = 0`` only when ``β_c = 0``).
    * Any other tensor without channels (a per-sample random factor of stochastic depth / DropPath,
      a scalar parameter) passes the flow of a product through when it has size 1 on the channel
      dim: ``0 · r = 0`` for every sample and element.
    Anything else is a boundary.
    """
    flows = [v for v in inputs if isinstance(v, Flow)]
    scalars = [a for a in node.args if isinstance(a, int | float)]
    if len(flows) == 2 and len(flows[0].ids) == len(flows[1].ids) and _aligned(node, flows):
        if zero_absorbing and _is_product(node):
            _gate(ctx, node, flows)
        ctx.graph.union_all(flows[0].ids, flows[1].ids)
        return Flow(flows[0].dim, flows[0].ids)
    if len(flows) == 1 and len(node.args) == 2 and len(scalars) == 1:
        if not zero_absorbing:
            ctx.graph.pin_value(
                flows[0].ids, node.name, f"{describe(node)} with a constant breaks zero-invariance"
            )
        return Flow(flows[0].dim, flows[0].ids)
    if len(flows) == 1 and len(node.args) == 2 and not node.kwargs:
        joined = _join_tensor(ctx, node, inputs, zero_absorbing)
        if joined is not None:
            return joined
    return unknown(ctx, node, inputs)


def _is_product(node: fx.Node) -> bool:
    return node.target in (operator.mul, operator.imul, torch.mul, "mul", "mul_")


def _gate(ctx: RuleContext, node: fx.Node, flows: list[Flow]) -> None:
    """Waive the value pins of the gate of the product ``node`` (see :func:`join_rule`).

    The gate is the factor ``g`` whose channels carry value pins while the other factor's carry
    none; only pins placed at nodes of ``g``'s *exclusive chain* are waived: the nodes from ``g``
    back along first arguments, each used by exactly one node (so the non-zero tensor made at such
    a site reaches nothing but this product). The product's channel is then zero when the other
    factor's is, and ``g``'s channel, consumed only here, is removed with it.
    """
    sites = [ctx.graph.value_sites(f.ids) for f in flows]
    if bool(sites[0]) == bool(sites[1]):  # no gate, or two: nothing is known to be zero
        return
    gate = 0 if sites[0] else 1
    chain: set[str] = set()
    arg = node.args[gate]
    while isinstance(arg, fx.Node) and len(arg.users) == 1:
        chain.add(arg.name)
        arg = arg.args[0] if arg.args else None
    ctx.graph.waive(flows[gate].ids, sites[gate] & chain)


def _join_tensor(
    ctx: RuleContext, node: fx.Node, inputs: list[Value], zero_absorbing: bool
) -> Value:
    """``x ∘ t`` for a flow ``x`` and a tensor ``t`` without channel ids (see :func:`join_rule`);
    ``None`` when not handled."""
    i = 0 if isinstance(inputs[0], Flow) else 1
    x = inputs[i]
    assert isinstance(x, Flow)
    other, other_node = inputs[1 - i], node.args[1 - i]
    out, x_shape = shape_of(node), shape_of(node.args[i])
    t_shape = other.shape if isinstance(other, Param) else shape_of(other_node)
    if (other is not None and not isinstance(other, Param)) or out is None or x_shape is None:
        return None
    if t_shape is None or len(t_shape) > len(out) or len(x_shape) > len(out):
        return None
    dim = x.dim + len(out) - len(x_shape)
    if out[dim] != len(x.ids):  # x itself broadcast along its channels
        return None
    t_dim = dim - (len(out) - len(t_shape))
    per_channel = t_dim >= 0 and t_shape[t_dim] != 1
    product = _is_product(node)
    if not per_channel:
        if product:
            return Flow(dim, x.ids)
        if not zero_absorbing:  # the same value added to every channel
            ctx.graph.pin_value(
                x.ids, node.name, f"{describe(node)}: adding a tensor breaks zero-invariance"
            )
            return Flow(dim, x.ids)
        return None
    if not isinstance(other, Param) or not (product or not zero_absorbing):
        return None
    ctx.attach(x.ids, other.name, t_dim, "in" if product else "out")
    return Flow(dim, x.ids)


def _aligned(node: fx.Node, flows: list[Flow]) -> bool:
    out = shape_of(node)
    shapes = [shape_of(a) for a in node.args if isinstance(a, fx.Node)]
    if out is None or any(s is None or len(s) != len(out) for s in shapes):
        return False
    return flows[0].dim == flows[1].dim


def cat_rule(ctx: RuleContext, node: fx.Node, inputs: list[Value]) -> Value:
    parts = inputs[0] if isinstance(inputs[0], tuple) else tuple(inputs)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out_shape = shape_of(node)
    if out_shape is None or not all(isinstance(p, Flow) for p in parts) or not isinstance(dim, int):
        return unknown(ctx, node, list(parts))
    flows = [p for p in parts if isinstance(p, Flow)]
    dim %= len(out_shape)
    if all(f.dim == dim for f in flows):
        return Flow(dim, np.concatenate([f.ids for f in flows]))
    if all(f.dim == flows[0].dim for f in flows) and all(
        len(f.ids) == len(flows[0].ids) for f in flows
    ):
        for f in flows[1:]:
            ctx.graph.union_all(flows[0].ids, f.ids)
        return Flow(flows[0].dim, flows[0].ids)
    return unknown(ctx, node, list(parts))


def getitem_rule(ctx: RuleContext, node: fx.Node, inputs: list[Value]) -> Value:
    src, index = inputs[0], node.args[1]
    if isinstance(src, tuple):
        return src[index] if isinstance(index, int) else unknown(ctx, node, [src])
    if not isinstance(src, Flow):
        return fresh_flow(ctx, node, "untracked input")
    entries = index if isinstance(index, tuple) else (index,)
    # the channel dim survives unchanged when it and every dim before it are taken whole (``:``);
    # entries after it (integers, ``None``) do not move it
    if Ellipsis not in entries and all(e == slice(None) for e in entries[: src.dim + 1]):
        return Flow(src.dim, src.ids)
    return unknown(ctx, node, [src])


def setitem_rule(ctx: RuleContext, node: fx.Node, inputs: list[Value]) -> Value:
    """In-place item assignment ``h[idx] = v``: the assigned positions no longer follow ``h``'s
    producers (a removed channel could be written to, a kept one overwritten), so the channels of
    ``h`` — and of ``v`` — are pinned with that reason."""
    pin_all(ctx, inputs, f"{node.name}: in-place item assignment (tensor[...] = value) is not "
            "supported for pruning; its channels are kept")  # fmt: skip
    return None


def reduce_rule(ctx: RuleContext, node: fx.Node, inputs: list[Value]) -> Value:
    """mean/sum/amax over dims other than the channel dim keep the channels (the channel dim moves
    down by the number of reduced dims before it unless ``keepdim``)."""
    x = inputs[0]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    in_shape = shape_of(node.args[0])
    if isinstance(x, Flow) and in_shape is not None and dims is not None:
        raw = (dims,) if isinstance(dims, int) else tuple(dims)  # type: ignore[arg-type]
        reduced = {int(d) % len(in_shape) for d in raw}
        if x.dim not in reduced:
            shift = 0 if keepdim else sum(d < x.dim for d in reduced)
            return Flow(x.dim - shift, x.ids)
    return unknown(ctx, node, inputs)


def permute_rule(ctx: RuleContext, node: fx.Node, inputs: list[Value], kind: str) -> Value:
    x = inputs[0]
    shape = shape_of(node.args[0])
    if not isinstance(x, Flow) or shape is None:
        return unknown(ctx, node, inputs)
    n = len(shape)
    raw: Any = node.args[1:] if kind == "permute" else node.args[1:3]
    if len(raw) == 1 and isinstance(raw[0], tuple | list):
        raw = raw[0]
    if not all(isinstance(d, int) for d in raw):
        return unknown(ctx, node, inputs)
    dims: list[int] = [int(d) % n for d in raw]
    if kind == "permute":
        order = dims
    else:
        order = list(range(n))
        order[dims[0]], order[dims[1]] = order[dims[1]], order[dims[0]]
    heads = None if x.heads is None else order.index(x.heads)  # a head flow moves both its dims
    return Flow(order.index(x.dim), x.ids, heads=heads, structural=x.structural)


#: Element-wise functions: prunable through them only where f(0) = 0 for the call's own arguments.
ELEMENTWISE_FUNCTIONS: tuple[Any, ...] = (
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.tanh, F.tanh, F.leaky_relu, F.hardswish, F.elu,
    F.celu, F.selu, F.mish, F.hardtanh, F.threshold, F.softshrink, F.hardshrink, F.tanhshrink,
    F.softsign, F.softplus, torch.sigmoid, F.sigmoid, F.hardsigmoid, F.logsigmoid,
)  # fmt: skip
ZERO_PRESERVING_FUNCTIONS: tuple[Any, ...] = (
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate, torch.Tensor.contiguous,
)  # fmt: skip
#: Zero-preserving functions of optional libraries, ``(module, attribute)``, looked up (never
#: imported) when the library is loaded: ``x · r / (1 − p)`` with a per-sample (``row``) or
#: per-batch Bernoulli ``r`` keeps a zero channel zero in training and is the identity in eval.
OPTIONAL_ZERO_PRESERVING: tuple[tuple[str, str], ...] = (
    ("torchvision.ops.stochastic_depth", "stochastic_depth"),
    ("timm.layers.drop", "drop_path"),
)
#: Ops that read only their input's shape, dtype and device (``x.new_empty(shape)``, ``zeros_like``):
#: their output has no channels and they do not consume any.
SHAPE_ONLY_FUNCTIONS: tuple[Any, ...] = (
    torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like,
    torch.randn_like,
)  # fmt: skip
SHAPE_ONLY_METHODS = {"new_empty", "new_zeros", "new_ones", "new_full"}
PASS_METHODS = {"relu", "relu_", "contiguous", "clone", "detach", "float", "to", "tanh", "type_as"}
SHAPE_METHODS = {"size", "dim", "numel"}


def function_rule(ctx: RuleContext, node: fx.Node, inputs: list[Value]) -> Value:
    """Dispatch a ``call_function`` or ``call_method`` node."""
    target = node.target
    if node.op == "call_method":
        assert isinstance(target, str)
        if target in SHAPE_METHODS or target in SHAPE_ONLY_METHODS:
            return None
        if target in ("chunk", "split"):
            return split_rule(ctx, node, inputs[0], target)
        if target in PASS_METHODS:
            x = inputs[0]
            return Flow(x.dim, x.ids) if isinstance(x, Flow) else None
        if target == "flatten":
            return flatten(
                ctx, node, inputs[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
            )
        if target in ("view", "reshape"):
            return reshape_rule(ctx, node, inputs[0])
        if target in ("mean", "sum", "amax"):
            return reduce_rule(ctx, node, inputs)
        if target in ("permute", "transpose"):
            return permute_rule(ctx, node, inputs, target)
        if target in ("add", "sub", "add_"):
            return join_rule(ctx, node, inputs, zero_absorbing=False)
        if target in ("mul", "div", "mul_"):
            return join_rule(ctx, node, inputs, zero_absorbing=True)
        return unknown(ctx, node, inputs)
    if target in ELEMENTWISE_FUNCTIONS:
        return elementwise_function(ctx, node, inputs)
    if target in SHAPE_ONLY_FUNCTIONS:
        return None
    if target in (torch.chunk, torch.split):
        return split_rule(ctx, node, inputs[0], "chunk" if target is torch.chunk else "split")
    if target is F.glu:
        return glu(ctx, node, inputs[0], _arg(node, 1, "dim", -1))
    if target in ZERO_PRESERVING_FUNCTIONS or _optional_zero_preserving(target):
        x = inputs[0]
        return (
            Flow(x.dim, x.ids) if isinstance(x, Flow) else fresh_flow(ctx, node, "untracked input")
        )
    if target in (operator.add, operator.iadd, torch.add, operator.sub, torch.sub):
        return join_rule(ctx, node, inputs, zero_absorbing=False)
    if target in (operator.mul, operator.imul, torch.mul, operator.truediv, torch.div):
        return join_rule(ctx, node, inputs, zero_absorbing=True)
    if target in (torch.cat, torch.concat):
        return cat_rule(ctx, node, inputs)
    if target is operator.getitem:
        return getitem_rule(ctx, node, inputs)
    if target in (torch.transpose, torch.permute):
        return permute_rule(
            ctx, node, inputs, "transpose" if target is torch.transpose else "permute"
        )
    if target is operator.setitem:
        return setitem_rule(ctx, node, inputs)
    if target is torch.flatten:
        return flatten(
            ctx, node, inputs[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
        )
    if target in (torch.reshape,):
        return reshape_rule(ctx, node, inputs[0])
    if target in (torch.mean, torch.sum, torch.amax):
        return reduce_rule(ctx, node, inputs)
    if target is getattr:
        return None
    return unknown(ctx, node, inputs)


def _optional_zero_preserving(target: Any) -> bool:
    for module, attr in OPTIONAL_ZERO_PRESERVING:
        loaded = sys.modules.get(module)
        if loaded is not None and getattr(loaded, attr, None) is target:
            return True
    return False


def split_rule(ctx: RuleContext, node: fx.Node, x: Value, kind: str) -> Value:
    """``chunk`` / ``split``: a tuple of flows, the channel ids cut in consecutive pieces when the
    split is along the channel dim, each piece with all of them otherwise.

    Along the channel dim the pieces of the slim model are cut at ``C' / n``: they stay aligned
    with the removed channels only if every piece loses as many, so the ``i``-th channels of all
    pieces are joined (one group removes channel ``i`` of each). Pieces of different sizes, or sizes
    given as a list, are literals that would not follow: pinned.
    """
    shapes = node.meta.get("shapes")
    in_shape = shape_of(node.args[0])
    dim = _arg(node, 2, "dim", 0)
    if not isinstance(x, Flow) or shapes is None or in_shape is None:
        return unknown(ctx, node, [x])
    dim %= len(in_shape)
    sizes = [int(shape[dim]) for shape in shapes]
    if dim != x.dim:
        return tuple(Flow(x.dim, x.ids) for _ in sizes)
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    pieces = tuple(Flow(x.dim, x.ids[a : a + n]) for a, n in zip(starts, sizes, strict=True))
    sections = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections")
    if len(set(sizes)) > 1 or (kind == "split" and isinstance(sections, list | tuple)):
        ctx.graph.pin(x.ids, f"{node.name}: {kind} into sizes {sizes}, which would not follow "
                      "pruning")  # fmt: skip
    else:
        for piece in pieces[1:]:
            ctx.graph.union_all(pieces[0].ids, piece.ids)
    return pieces


def elementwise_function(ctx: RuleContext, node: fx.Node, inputs: list[Value]) -> Value:
    """:func:`~prunekit.structured.module_rules.elementwise_rule` for a call: ``f(0)`` with the
    call's constant arguments (``F.hardtanh(x, 0.5, 1.0)``); pinned if it is not zero or an
    argument is a tensor."""
    x = inputs[0] if inputs else None
    if not isinstance(x, Flow):
        return fresh_flow(ctx, node, "untracked input")
    rest = [*node.args[1:], *node.kwargs.values()]
    constant = not any(isinstance(a, fx.Node) for a in rest)
    target = cast(Callable[..., Any], node.target)
    f0 = value_at_zero(lambda z: target(z, *node.args[1:], **node.kwargs)) if constant else None
    if f0 != 0.0:
        shown = "could not be evaluated" if f0 is None else f"= {f0:g}"
        ctx.graph.pin_value(
            x.ids, node.name, f"{describe(node)}(0) {shown}, not 0 (a zero channel is not zero)"
        )
    return Flow(x.dim, x.ids)


def _arg(node: fx.Node, pos: int, name: str, default: int) -> int:
    value = node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)
    return int(value)  # type: ignore[arg-type]
