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
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from prunekit.structured.channels import ChannelGraph, Flow, Ids


@dataclass(frozen=True)
class Param:
    """A parameter or buffer read directly in ``forward`` (an fx ``get_attr`` node, such as a layer
    scale ``γ`` in ``γ · x``), by canonical name."""

    name: str
    shape: tuple[int, ...]


Value = Flow | Param | tuple[Any, ...] | None
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
    """The shape of the tensor ``node`` makes (from :func:`propagate_shapes`), if it makes one."""
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
        ids = x.ids if x is not None else ctx.graph.fresh(m.in_channels, "untracked input")
        out_ids = np.repeat(ids, b)
        ctx.attach(out_ids, weight, 0, "out")
        ctx.attach(out_ids, bias, 0, "out")
        return Flow(1, out_ids)
    if x is not None:  # x.ids[s::a] is column s of the (g, a) layout
        by_group = x.ids.reshape(g, a)
        ctx.graph.union_all(by_group[:-1].ravel(), by_group[1:].ravel())
        # weight column s belongs to x.ids[s] (and so to its whole class)
        ctx.attach(x.ids[:a], weight, 1, "in")
    out = Flow(1, ctx.graph.fresh(m.out_channels))
    by_group = out.ids.reshape(g, b)
    ctx.graph.union_all(by_group[:-1].ravel(), by_group[1:].ravel())
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
    join_runs(ctx, x.ids, size)
    ctx.attach(x.ids, ctx.tensor_name(name, "weight", m), 0, "out")
    ctx.attach(x.ids, ctx.tensor_name(name, "bias", m), 0, "out")
    ctx.attach(x.ids, ctx.tensor_name(name, "running_mean", m), 0, "aux")
    ctx.attach(x.ids, ctx.tensor_name(name, "running_var", m), 0, "aux")
    return Flow(1, x.ids)


def normalize_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    """LayerNorm / InstanceNorm mix channels (mean and variance across them): pinned."""
    x = inputs[0]
    pin_all(ctx, [x], f"{node.target}: {type(m).__name__} normalises across channels")
    return Flow(x.dim, x.ids) if isinstance(x, Flow) else fresh_flow(ctx, node, "normalisation")


def passthrough_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    x = inputs[0]
    return Flow(x.dim, x.ids) if isinstance(x, Flow) else fresh_flow(ctx, node, "untracked input")


def pin_values(ctx: RuleContext, node: fx.Node, values: Sequence[Value], reason: str) -> None:
    """Value pins (see :class:`~prunekit.structured.channels.ChannelGraph`) at site ``node``: the
    tensor ``node`` makes is not zero at these channels when they are zeroed."""
    for v in values:
        if isinstance(v, Flow):
            ctx.graph.pin_value(v.ids, node.name, reason)
        elif isinstance(v, tuple):
            pin_values(ctx, node, list(v), reason)


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
    f0 = _module_value_at_zero(m)
    if f0 != 0.0:
        shown = "could not be evaluated" if f0 is None else f"= {f0:g}"
        pin_values(ctx, node, inputs, f"{node.target}: {m!r}(0) {shown}, not 0 (a zero channel is "
                   "not zero)")  # fmt: skip
    return passthrough_rule(ctx, node, m, inputs)


_VALUE_AT_ZERO: dict[tuple[type[nn.Module], str], float | None] = {}


def _module_value_at_zero(m: nn.Module) -> float | None:
    """``m(0)`` on a copy in eval mode; for the built-in activations (no state beyond their
    arguments, all shown by ``extra_repr``) remembered per type and arguments."""
    key = (type(m), m.extra_repr())
    builtin = type(m) in ELEMENTWISE_MODULES and not (
        m._parameters or m._buffers or m._forward_hooks or m._forward_pre_hooks
    )
    if builtin and key in _VALUE_AT_ZERO:
        return _VALUE_AT_ZERO[key]
    f0 = value_at_zero(copy.deepcopy(m).eval())
    if builtin:
        _VALUE_AT_ZERO[key] = f0
    return f0


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


def glu_module_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    assert isinstance(m, nn.GLU)
    return glu(ctx, node, inputs[0], m.dim)


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
    (nn.GLU, glu_module_rule),
    (nn.Embedding, embedding_rule),
    (ELEMENTWISE_MODULES, elementwise_rule),
    (ZERO_PRESERVING_MODULES, passthrough_rule),
    ((nn.Softmax, nn.LogSoftmax), pinning_passthrough_rule),
]


def register_module_rule(module_type: type[nn.Module], rule: ModuleRule) -> None:
    """Teach group discovery how channels flow through ``module_type`` (checked before built-ins)."""
    _MODULE_RULES.insert(0, (module_type, rule))
    _RULE_OF_TYPE.clear()


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


def _load(arg: Any, env: dict[fx.Node, Any]) -> Any:
    """``arg`` with every node replaced by its value (``fx.node.map_arg`` without pytree)."""
    if isinstance(arg, fx.Node):
        return env[arg]
    if isinstance(arg, tuple | list):
        values = [_load(a, env) for a in arg]
        return type(arg)(*values) if hasattr(arg, "_fields") else type(arg)(values)
    if isinstance(arg, dict):
        return {k: _load(v, env) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(_load(arg.start, env), _load(arg.stop, env), _load(arg.step, env))
    return arg


def propagate_shapes(
    root: nn.Module,
    graph: fx.Graph,
    inputs: Sequence[Any],
    modules: dict[str, nn.Module] | None = None,
) -> None:
    """Run ``graph`` (traced from ``root``) on ``inputs`` and record on every node the shape of the
    tensor it makes (``meta["shape"]``) or of the tensors of the tuple it makes
    (``meta["shapes"]``).

    A lean ``fx.Interpreter``: no ``GraphModule`` is compiled and nothing but shapes is recorded, and
    each value is dropped after its last use. Call it under ``torch.no_grad()``. ``modules``:
    ``dict(root.named_modules())`` if already made.
    """
    env: dict[fx.Node, Any] = {}
    last_use: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        for used in node.all_input_nodes:
            last_use[used] = node
    done: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for value_node, user in last_use.items():
        done[user].append(value_node)
    modules = dict(root.named_modules()) if modules is None else modules
    pending = list(inputs)
    value: Any
    for node in graph.nodes:
        if node.op == "output":
            break
        if node.op == "placeholder":
            if str(node.target).startswith("*"):
                value, pending = tuple(pending), []
            elif pending:
                value = pending.pop(0)
            elif node.args:  # a default value
                value = node.args[0]
            else:
                raise TypeError(f"missing example input for {node.target!r}")
        elif node.op == "get_attr":
            value = root
            for part in str(node.target).split("."):
                value = getattr(value, part)
        else:
            args, kwargs = _load(node.args, env), _load(node.kwargs, env)
            if node.op == "call_module":
                value = modules[str(node.target)](*args, **kwargs)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            else:
                value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if isinstance(value, Tensor):
            node.meta["shape"] = tuple(value.shape)
        elif (
            isinstance(value, list | tuple) and value and all(isinstance(v, Tensor) for v in value)
        ):
            node.meta["shapes"] = [tuple(v.shape) for v in value]
        env[node] = value
        for value_node in done.get(node, ()):
            env.pop(value_node, None)


_RULE_OF_TYPE: dict[type[nn.Module], ModuleRule | None] = {}


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule for ``module``'s type: the first registered for it or a base class."""
    kind = type(module)
    if kind not in _RULE_OF_TYPE:
        _RULE_OF_TYPE[kind] = next(
            (rule for types, rule in _MODULE_RULES if issubclass(kind, types)), None
        )
    return _RULE_OF_TYPE[kind]


# ------------------------------------------------------------------- function and method rules
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
    * A parameter read in ``forward`` (:class:`Param`) with one entry per channel (layer scale
      ``γ · x``, a bias ``x + β``) is sliced with the channel: for ``x · γ`` as a consumer (``in``:
      ``0 · γ_c = 0``), for ``x ± β`` as a producer (``out``: ``0 + β_c = 0`` only when ``β_c = 0``).
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


def glu(ctx: RuleContext, node: fx.Node, x: Value, dim: int) -> Value:
    """``glu(x) = a · σ(b)`` with ``x = [a, b]`` halved along ``dim`` (Dauphin et al., 2017). Along
    the channel dim, ``a``'s channel ``c`` and ``b``'s channel ``c`` are joined: when ``a_c = 0`` the
    output is ``0 · σ(b_c) = 0`` whatever ``b_c`` is, and ``b_c`` is used nowhere else, so both go
    with the group (the gate of :func:`join_rule`, inside one op). Along another dim the output
    keeps ``x``'s channels (zero where ``x`` is)."""
    shape = shape_of(node.args[0])
    if not isinstance(x, Flow) or shape is None:
        return unknown(ctx, node, [x])
    if dim % len(shape) != x.dim:
        return Flow(x.dim, x.ids)
    half = len(x.ids) // 2
    ctx.graph.union_all(x.ids[:half], x.ids[half:])
    return Flow(x.dim, x.ids[:half])


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
        ctx.graph.pin_value(
            x.ids, node.name, f"{describe(node)}(0) {shown}, not 0 (a zero channel is not zero)"
        )
    return Flow(x.dim, x.ids)


def _arg(node: fx.Node, pos: int, name: str, default: int) -> int:
    value = node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)
    return int(value)  # type: ignore[arg-type]
