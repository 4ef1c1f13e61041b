"""How each op moves channels: rules for modules (dispatch on type) and for functions/methods.

A rule receives the :class:`RuleContext`, the fx node and the flows of its tensor arguments, registers
members and unions/pins ids, and returns the output flow. Anything without a rule pins the channels of
its inputs and gives its output fresh pinned ids: an op that is not understood can make channels
unprunable, never a wrong slim model. Users extend coverage with :func:`register_module_rule`.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from prunekit.structured.channels import ChannelGraph, Flow, Member

Value = Flow | tuple[Any, ...] | None
ModuleRule = Callable[["RuleContext", fx.Node, nn.Module, list[Value]], Value]

CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVS: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
BATCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)
CHANNEL_MIXING_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip


@dataclass
class RuleContext:
    """What rules need: the channel graph, canonical tensor names and the shapes of nodes."""

    graph: ChannelGraph
    names: dict[int, str]  # id(tensor) -> canonical qualified name
    shared: set[str]  # canonical names of tensors used by several modules or calls
    head_sites: list[Any] = field(default_factory=list)  # heads.HeadSite: splits and merges
    coupled: list[int] = field(default_factory=list)  # one id per head joined by attention
    head_attrs: dict[int, set[tuple[str, int]]] = field(default_factory=dict)

    def tensor_name(self, module_name: str, attr: str, module: nn.Module) -> str | None:
        t = getattr(module, attr, None)
        if not isinstance(t, torch.Tensor):
            return None
        return self.names.get(id(t), f"{module_name}.{attr}" if module_name else attr)

    def attach(
        self, ids: list[int], name: str | None, axis: int, role: str, stride: int = 1
    ) -> None:
        """Attach slice ``index // stride`` of tensor ``name`` along ``axis`` to each id (in order)."""
        if name is None:
            return
        for index, cid in enumerate(ids):
            self.graph.add_member(
                cid, Member(name, axis, index // stride if stride > 1 else index, role)
            )
        if name in self.shared:
            self.graph.pin(ids, f"{name} is shared (tied weights or a module called twice)")


def shape_of(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


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


def unknown(ctx: RuleContext, node: fx.Node, inputs: list[Value]) -> Value:
    """Fallback: the op is a boundary."""
    reason = f"op {describe(node)} is not understood (boundary)"
    pin_all(ctx, inputs, reason)
    return fresh_flow(ctx, node, reason)


def describe(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return f"{node.op}:{name}"


# ------------------------------------------------------------------------------------ module rules
def conv_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    assert isinstance(m, CONVS + TRANSPOSED_CONVS)
    m = cast(nn.Conv2d, m)  # the attributes all convolutions share
    x = inputs[0]
    name = node.target if isinstance(node.target, str) else ""
    weight = ctx.tensor_name(name, "weight", m)
    bias = ctx.tensor_name(name, "bias", m)
    if isinstance(x, Flow) and x.dim != 1:
        ctx.graph.pin(x.ids, f"{name}: channels not on dim 1")
        x = None
    if isinstance(m, TRANSPOSED_CONVS):
        reason = f"{name}: transposed convolution"
        pin_all(ctx, [x], reason)
        return fresh_flow(ctx, node, reason, dim=1)
    if m.groups > 1:
        return grouped_conv(ctx, node, m, x if isinstance(x, Flow) else None, weight, bias)
    if isinstance(x, Flow):
        ctx.attach(x.ids, weight, 1, "in")
    out = fresh_flow(ctx, node, None, dim=1)
    assert out is not None
    ctx.attach(out.ids, weight, 0, "out")
    ctx.attach(out.ids, bias, 0, "out")
    return out


def grouped_conv(
    ctx: RuleContext,
    node: fx.Node,
    m: nn.Conv2d,
    x: Flow | None,
    weight: str | None,
    bias: str | None,
) -> Value:
    """A convolution with ``g = groups > 1``: ``a`` input and ``b`` output channels per group.

    With ``a == 1`` (depthwise, with or without a channel multiplier ``b``) input channel ``k`` and
    output channels ``k·b … k·b+b-1`` are one channel: removing it removes a whole conv group (the
    slim conv has fewer groups). With ``a > 1`` every conv group must keep the same width, so the
    channels with the same index *within* their group are joined: input channels ``s, a+s, 2a+s, …``
    (weight column ``s``) and output channels ``t, b+t, 2b+t, …`` (weight rows): removing them keeps
    ``groups`` and narrows every group.
    """
    g = m.groups
    a, b = m.in_channels // g, m.out_channels // g
    shape = shape_of(node)
    if shape is None:
        return unknown(ctx, node, [x])
    if a == 1:
        ids = list(x.ids) if x is not None else ctx.graph.fresh(m.in_channels, "untracked input")
        out_ids = [cid for cid in ids for _ in range(b)]
        ctx.attach(out_ids, weight, 0, "out")
        ctx.attach(out_ids, bias, 0, "out")
        return Flow(1, out_ids)
    if x is not None:
        for s in range(a):
            column = x.ids[s::a]
            ctx.graph.union_all(column[:-1], column[1:])
        # weight column s belongs to x.ids[s] (and so to its whole class)
        ctx.attach(x.ids[:a], weight, 1, "in")
    out = Flow(1, ctx.graph.fresh(m.out_channels))
    for t in range(b):
        row = out.ids[t::b]
        ctx.graph.union_all(row[:-1], row[1:])
    ctx.attach(out.ids, weight, 0, "out")
    ctx.attach(out.ids, bias, 0, "out")
    return out


def linear_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    x = inputs[0]
    name = str(node.target)
    weight = ctx.tensor_name(name, "weight", m)
    shape = shape_of(node)
    assert shape is not None
    last = len(shape) - 1
    if isinstance(x, Flow):
        if x.dim == last:
            ctx.attach(x.ids, weight, 1, "in")
        else:
            ctx.graph.pin(x.ids, f"{name}: channels not on the feature dimension")
    out = Flow(last, ctx.graph.fresh(shape[last]))
    ctx.attach(out.ids, weight, 0, "out")
    ctx.attach(out.ids, ctx.tensor_name(name, "bias", m), 0, "out")
    return out


def channel_norm_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    """BatchNorm (statistics per channel) and GroupNorm (statistics per norm group of ``C / G``).

    A GroupNorm's norm group can only go whole: its channels are joined. When they and their
    ``γ``/``β`` are zero the norm group outputs ``0·γ + β = 0`` and no other statistics involve it,
    so it is removed exactly (the slim GroupNorm has fewer ``num_groups``). Without affine
    parameters batch norm maps a zero channel to ``−μ/σ`` and the slim width of a GroupNorm could
    not be read from its weights: pinned.
    """
    assert isinstance(m, (*BATCH_NORMS, nn.GroupNorm))
    x = inputs[0]
    name = str(node.target)
    if not isinstance(x, Flow) or x.dim != 1:
        return unknown(ctx, node, inputs)
    if not m.affine:
        ctx.graph.pin(x.ids, f"{name}: {type(m).__name__} without affine parameters")
    size = m.num_channels // m.num_groups if isinstance(m, nn.GroupNorm) else 1
    for j in range(0, len(x.ids), size):
        ctx.graph.union_all(x.ids[j : j + size - 1], x.ids[j + 1 : j + size])
    ctx.attach(x.ids, ctx.tensor_name(name, "weight", m), 0, "out")
    ctx.attach(x.ids, ctx.tensor_name(name, "bias", m), 0, "out")
    ctx.attach(x.ids, ctx.tensor_name(name, "running_mean", m), 0, "aux")
    ctx.attach(x.ids, ctx.tensor_name(name, "running_var", m), 0, "aux")
    return Flow(1, list(x.ids))


def normalize_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    """LayerNorm / InstanceNorm mix channels (mean and variance across them): pinned."""
    x = inputs[0]
    pin_all(ctx, [x], f"{node.target}: {type(m).__name__} normalises across channels")
    return (
        Flow(x.dim, list(x.ids)) if isinstance(x, Flow) else fresh_flow(ctx, node, "normalisation")
    )


def passthrough_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    x = inputs[0]
    return (
        Flow(x.dim, list(x.ids))
        if isinstance(x, Flow)
        else fresh_flow(ctx, node, "untracked input")
    )


def pinning_passthrough_rule(
    ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]
) -> Value:
    """Keeps the channels but pins them (softmax: its output at a zero channel is not zero)."""
    pin_all(ctx, inputs, f"{node.target}: {type(m).__name__}(0) != 0")
    return passthrough_rule(ctx, node, m, inputs)


def value_at_zero(f: Callable[[Tensor], Any]) -> float | None:
    """``f(0)`` for an element-wise ``f``, evaluated (``None`` if ``f`` does not run on a 0-d
    float tensor or gives no single number)."""
    try:
        with torch.no_grad():
            out = f(torch.zeros(()))
    except Exception:  # any failure: f(0) is unknown
        return None
    return float(out) if isinstance(out, Tensor) and out.numel() == 1 else None


def elementwise_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    """An element-wise activation keeps a zero channel zero only if ``f(0) = 0``, which depends on
    its arguments (``Hardtanh(0.5, 1.0)(0) = 0.5``, ``Threshold(0.1, 2.0)(0) = 2``): ``f(0)`` is
    evaluated on the module itself (a copy in eval mode, so a random activation draws nothing) and
    the channels are pinned with the value unless it is exactly zero."""
    probe = copy.deepcopy(m).eval()
    f0 = value_at_zero(probe)
    if f0 != 0.0:
        shown = "could not be evaluated" if f0 is None else f"= {f0:g}"
        pin_all(ctx, inputs, f"{node.target}: {m!r}(0) {shown}, not 0 (a zero channel is not zero)")
    return passthrough_rule(ctx, node, m, inputs)


def prelu_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    x = inputs[0]
    assert isinstance(m, nn.PReLU)
    if isinstance(x, Flow) and m.num_parameters > 1:
        ctx.attach(x.ids, ctx.tensor_name(str(node.target), "weight", m), 0, "aux")
    return passthrough_rule(ctx, node, m, inputs)


def flatten_module_rule(
    ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]
) -> Value:
    assert isinstance(m, nn.Flatten)
    return flatten(ctx, node, inputs[0], m.start_dim, m.end_dim)


def embedding_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    shape = shape_of(node)
    assert shape is not None
    out = Flow(len(shape) - 1, ctx.graph.fresh(shape[-1]))
    ctx.attach(out.ids, ctx.tensor_name(str(node.target), "weight", m), 1, "out")
    return out


#: Element-wise activations: prunable through them only where f(0) = 0 (see :func:`elementwise_rule`).
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.RReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.ELU, nn.CELU, nn.SELU,
    nn.Hardswish, nn.Hardtanh, nn.Mish, nn.Threshold, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink,
    nn.Softsign, nn.Softplus, nn.Sigmoid, nn.Hardsigmoid, nn.LogSigmoid,
)  # fmt: skip
#: Modules that map a zero channel to a zero channel whatever their arguments.
ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)  # fmt: skip

_MODULE_RULES: list[tuple[type[nn.Module] | tuple[type[nn.Module], ...], ModuleRule]] = [
    (CONVS + TRANSPOSED_CONVS, conv_rule),
    (nn.Linear, linear_rule),
    ((*BATCH_NORMS, nn.GroupNorm), channel_norm_rule),
    (CHANNEL_MIXING_NORMS, normalize_rule),
    (nn.PReLU, prelu_rule),
    (nn.Flatten, flatten_module_rule),
    (nn.Embedding, embedding_rule),
    (ELEMENTWISE_MODULES, elementwise_rule),
    (ZERO_PRESERVING_MODULES, passthrough_rule),
    ((nn.Softmax, nn.LogSoftmax), pinning_passthrough_rule),
]


def register_module_rule(module_type: type[nn.Module], rule: ModuleRule) -> None:
    """Teach group discovery how channels flow through ``module_type`` (checked before built-ins)."""
    _MODULE_RULES.insert(0, (module_type, rule))


class _AssignableProxy(fx.Proxy):
    """A proxy that records item assignment (``h[:, 3] = 1.0``) as an ``operator.setitem`` node,
    which :func:`function_rule` pins, instead of failing the whole trace."""

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class RuleTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps every module with a rule as one node (a leaf), so a rule
    registered for a module defined outside ``torch.nn`` is applied instead of traced through, and
    records item assignment (see :func:`setitem_rule`)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_rule(m) is not None or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AssignableProxy(node, self)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as a ``GraphModule`` traced by :class:`RuleTracer` (public ``torch.fx`` API)."""
    tracer = RuleTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def module_rule(module: nn.Module) -> ModuleRule | None:
    for types, rule in _MODULE_RULES:
        if isinstance(module, types):
            return rule
    return None


# ------------------------------------------------------------------- function and method rules
def flatten(ctx: RuleContext, node: fx.Node, x: Value, start: int, end: int) -> Value:
    """Merging dims ``start..end``: each channel id repeats over the merged positions."""
    in_shape = shape_of(node.args[0]) if node.args else None
    if not isinstance(x, Flow) or in_shape is None:
        return fresh_flow(ctx, node, "untracked input")
    n = len(in_shape)
    start, end = start % n, end % n
    if x.dim < start:
        return Flow(x.dim, list(x.ids))
    if x.dim > end:
        return Flow(x.dim - (end - start), list(x.ids))
    outer = math.prod(in_shape[start : x.dim])
    inner = math.prod(in_shape[x.dim + 1 : end + 1])
    return Flow(start, [cid for _ in range(outer) for cid in x.ids for _ in range(inner)])


def reshape_rule(ctx: RuleContext, node: fx.Node, x: Value) -> Value:
    """view/reshape: handled when it flattens a contiguous range of dims (or keeps the channel dim)."""
    in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
    if not isinstance(x, Flow) or in_shape is None or out_shape is None:
        return unknown(ctx, node, [x])
    p = 0
    while p < min(len(in_shape), len(out_shape)) and in_shape[p] == out_shape[p]:
        p += 1
    if x.dim < p:
        return Flow(x.dim, list(x.ids))
    for q in range(p + 1, len(in_shape) + 1):
        if math.prod(in_shape[p:q]) == out_shape[p] and tuple(in_shape[q:]) == tuple(
            out_shape[p + 1 :]
        ):
            if x.dim < q:
                return flatten(ctx, node, x, p, q - 1)
            return Flow(x.dim - (q - 1 - p), list(x.ids))
    return unknown(ctx, node, [x])


def join_rule(ctx: RuleContext, node: fx.Node, inputs: list[Value], zero_absorbing: bool) -> Value:
    """Elementwise binary op. Two aligned flows are unioned; a scalar operand passes the flow through
    when ``x op c`` keeps zeros zero (mul, div), and pins it otherwise (add, sub)."""
    flows = [v for v in inputs if isinstance(v, Flow)]
    scalars = [a for a in node.args if isinstance(a, int | float)]
    if len(flows) == 2 and len(flows[0].ids) == len(flows[1].ids) and _aligned(node, flows):
        ctx.graph.union_all(flows[0].ids, flows[1].ids)
        return Flow(flows[0].dim, list(flows[0].ids))
    if len(flows) == 1 and len(node.args) == 2 and len(scalars) == 1:
        if not zero_absorbing:
            ctx.graph.pin(flows[0].ids, f"{describe(node)} with a constant breaks zero-invariance")
        return Flow(flows[0].dim, list(flows[0].ids))
    return unknown(ctx, node, inputs)


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
        return Flow(dim, [cid for f in flows for cid in f.ids])
    if all(f.dim == flows[0].dim for f in flows) and all(
        len(f.ids) == len(flows[0].ids) for f in flows
    ):
        for f in flows[1:]:
            ctx.graph.union_all(flows[0].ids, f.ids)
        return Flow(flows[0].dim, list(flows[0].ids))
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
        return Flow(src.dim, list(src.ids))
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
            return Flow(x.dim - shift, list(x.ids))
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
    return Flow(order.index(x.dim), list(x.ids), heads=heads, structural=x.structural)


#: Element-wise functions: prunable through them only where f(0) = 0 for the call's own arguments.
ELEMENTWISE_FUNCTIONS: tuple[Any, ...] = (
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.tanh, F.tanh, F.leaky_relu, F.hardswish, F.elu,
    F.celu, F.selu, F.mish, F.hardtanh, F.threshold, F.softshrink, F.hardshrink, F.tanhshrink,
    F.softsign, F.softplus, torch.sigmoid, F.sigmoid, F.hardsigmoid, F.logsigmoid,
)  # fmt: skip
ZERO_PRESERVING_FUNCTIONS: tuple[Any, ...] = (
    F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate, torch.Tensor.contiguous,
)  # fmt: skip
PASS_METHODS = {"relu", "relu_", "contiguous", "clone", "detach", "float", "to", "tanh", "type_as"}
SHAPE_METHODS = {"size", "dim", "numel"}


def function_rule(ctx: RuleContext, node: fx.Node, inputs: list[Value]) -> Value:
    """Dispatch a ``call_function`` or ``call_method`` node."""
    target = node.target
    if node.op == "call_method":
        assert isinstance(target, str)
        if target in SHAPE_METHODS:
            return None
        if target in PASS_METHODS:
            x = inputs[0]
            return Flow(x.dim, list(x.ids)) if isinstance(x, Flow) else None
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
    if target in ZERO_PRESERVING_FUNCTIONS:
        x = inputs[0]
        return (
            Flow(x.dim, list(x.ids))
            if isinstance(x, Flow)
            else fresh_flow(ctx, node, "untracked input")
        )
    if target in (operator.add, operator.iadd, torch.add, operator.sub, torch.sub):
        return join_rule(ctx, node, inputs, zero_absorbing=False)
    if target in (operator.mul, operator.imul, torch.mul, operator.truediv, torch.div):
        return join_rule(ctx, node, inputs, zero_absorbing=True)
    if target in (torch.cat, torch.concat):
        return cat_rule(ctx, node, inputs)
    if target is operator.getitem:
        return getitem_rule(ctx, node, inputs)
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


def elementwise_function(ctx: RuleContext, node: fx.Node, inputs: list[Value]) -> Value:
    """:func:`elementwise_rule` for a call: ``f(0)`` with the call's constant arguments
    (``F.hardtanh(x, 0.5, 1.0)``); pinned if it is not zero or an argument is a tensor."""
    x = inputs[0] if inputs else None
    if not isinstance(x, Flow):
        return fresh_flow(ctx, node, "untracked input")
    rest = [*node.args[1:], *node.kwargs.values()]
    constant = not any(isinstance(a, fx.Node) for a in rest)
    target = cast(Callable[..., Any], node.target)
    f0 = value_at_zero(lambda z: target(z, *node.args[1:], **node.kwargs)) if constant else None
    if f0 != 0.0:
        shown = "could not be evaluated" if f0 is None else f"= {f0:g}"
        ctx.graph.pin(x.ids, f"{describe(node)}(0) {shown}, not 0 (a zero channel is not zero)")
    return Flow(x.dim, list(x.ids))


def _arg(node: fx.Node, pos: int, name: str, default: int) -> int:
    value = node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)
    return int(value)  # type: ignore[arg-type]
