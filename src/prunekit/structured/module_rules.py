"""The rules for modules, dispatched on the module's type, and the table that holds them.

Each rule says how channels flow through one kind of module (convolutions, linear layers, norms,
element-wise activations, pooling, ...), written with :mod:`~prunekit.structured.rule_context`.
:func:`module_rule` finds the rule for a module's type, the first registered for it or a base
class; anything without a rule pins the channels of its inputs and gives its output fresh
pinned ids: an op that is not understood can make channels unprunable, never a wrong slim model.
Users extend coverage with :func:`register_module_rule` (checked before the built-ins).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
from torch import fx, nn

from prunekit.core.targets import is_transposed_linear
from prunekit.structured.channels import Flow
from prunekit.structured.rule_context import (
    RuleContext,
    Value,
    flatten,
    fresh_flow,
    glu,
    join_runs,
    pin_all,
    shape_of,
    unknown,
    value_at_zero,
)

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


def _linear(
    ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value], in_axis: int
) -> Value:
    """A linear layer whose weight holds its input channels on ``in_axis`` and its output
    channels on the other axis; the bias holds the output channels."""
    x = inputs[0]
    name = str(node.target)
    weight = ctx.tensor_name(name, "weight", m)
    shape = shape_of(node)
    assert shape is not None
    last = len(shape) - 1
    if isinstance(x, Flow):
        if x.dim == last:
            ctx.attach(x.ids, weight, in_axis, "in")
        else:
            ctx.graph.pin(x.ids, f"{name}: channels not on the feature dimension")
    out = Flow(last, ctx.graph.fresh(shape[last]))
    ctx.attach(out.ids, weight, 1 - in_axis, "out")
    ctx.attach(out.ids, ctx.tensor_name(name, "bias", m), 0, "out")
    return out


def linear_rule(ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]) -> Value:
    return _linear(ctx, node, m, inputs, in_axis=1)


def transposed_linear_rule(
    ctx: RuleContext, node: fx.Node, m: nn.Module, inputs: list[Value]
) -> Value:
    """``transformers``' ``Conv1D`` (GPT-2): a Linear whose weight is stored ``(in, out)``, so its
    input channels are the weight's rows and its output channels its columns."""
    return _linear(ctx, node, m, inputs, in_axis=0)


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


_RULE_OF_TYPE: dict[type[nn.Module], ModuleRule | None] = {}


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule for ``module``'s type: the first registered for it or a base class
    (``transformers``' ``Conv1D``: :func:`transposed_linear_rule`, recognised without importing
    ``transformers``)."""
    kind = type(module)
    if is_transposed_linear(module) and not any(issubclass(kind, t) for t, _ in _MODULE_RULES):
        return transposed_linear_rule
    if kind not in _RULE_OF_TYPE:
        _RULE_OF_TYPE[kind] = next(
            (rule for types, rule in _MODULE_RULES if issubclass(kind, types)), None
        )
    return _RULE_OF_TYPE[kind]
