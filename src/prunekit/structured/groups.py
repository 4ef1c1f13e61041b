"""Zero-invariant groups (Only-Train-Once; Chen et al., NeurIPS 2021), found automatically.

A group is a set of parameter slices such that, when all of its *producing* slices are zero, the
network's output does not depend on the channel they produce: the channel and every slice that
consumes it can be deleted and the output stays exactly the same. A conv's output channel, its bias
entry, the following batch norm's ``γ``/``β`` entries and, through a residual add, every other producer
of that channel form one group; concatenation offsets them; a depthwise conv joins its input's group.
Attention heads — of ``nn.MultiheadAttention`` and of attention written out by hand
(:mod:`prunekit.structured.heads`) — are groups too. Groups that reach the model output, touch shared
(tied) tensors or pass through an op that mixes channels (layer norm, an unknown op) are reported
unprunable with the reason.

Capture uses ``torch.fx`` tracing (a ``Tracer`` that keeps modules with a rule as leaves) and
``ShapeProp`` (public APIs); modules are recognised by type, never by class-name strings.
"""

from __future__ import annotations

import gc
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.fx.proxy import TraceError

from prunekit.core.cost import module_macs
from prunekit.core.ddp import unwrap
from prunekit.core.forward import eval_mode, example_args
from prunekit.structured.channels import ROLES, ChannelGraph, Flow, Member, MemberTable
from prunekit.structured.heads import head_rule, resolve_sites, split_rule
from prunekit.structured.module_rules import module_rule
from prunekit.structured.rule_context import (
    Param,
    RuleContext,
    Value,
    fresh_flow,
    pin_all,
    unknown,
)
from prunekit.structured.rules import function_rule
from prunekit.structured.tracer import RuleTracer, propagate_shapes


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


@dataclass
class GroupStore:
    """What the groups of one :func:`find_groups` call share: the member table and the order that
    sorts it by group (rows ``order[bounds[g] : bounds[g+1]]`` are group ``g``'s, by tensor, axis
    and index), each group's reason and head-count counters, and the model's tensors by name."""

    table: MemberTable
    order: np.ndarray
    bounds: list[int]
    reasons: list[str | None]
    counters: dict[int, list[tuple[str, int]]]
    tensors: dict[str, Tensor]


class Group:
    """One zero-invariant group: slices of parameters and buffers removed together.

    A zoo model has 10⁴–10⁵ groups: each is an index into a shared :class:`GroupStore` and builds
    Python objects for its members only when asked.
    """

    __slots__ = ("_out_index", "_slices", "_store", "index")
    _out_index: dict[tuple[str, int], Tensor]  # caches, set on first use
    _slices: dict[str | None, dict[tuple[str, int], list[int]]]

    def __init__(self, index: int, store: GroupStore):
        self.index = index
        self._store = store

    @property
    def reason(self) -> str | None:
        """Why the group cannot be removed (``None``: it can)."""
        return self._store.reasons[self.index]

    @property
    def counters(self) -> list[tuple[str, int]]:
        """``(module attribute path, value)`` that removing this group lowers by one (head
        counts)."""
        return self._store.counters.get(self.index, [])

    @property
    def _tensors(self) -> dict[str, Tensor]:
        return self._store.tensors

    @property
    def members(self) -> list[Member]:
        """The group's slices, sorted by tensor, axis, index (then role)."""
        store = self._store
        t, (a, b) = store.table, store.bounds[self.index : self.index + 2]
        rows = store.order[a:b]
        return [
            Member(t.names[n], axis, index, ROLES[role])
            for n, axis, index, role in zip(
                t.tensor[rows].tolist(), t.axis[rows].tolist(), t.index[rows].tolist(),
                t.role[rows].tolist(), strict=True,
            )
        ]  # fmt: skip

    @property
    def _out(self) -> dict[tuple[str, int], Tensor]:
        """The producing slices' indices as tensors (made on first use: a zoo model has 10⁴–10⁵
        groups and most are never zeroed)."""
        try:
            return self._out_index
        except AttributeError:  # not made yet
            self._out_index = {
                key: torch.tensor(idx, dtype=torch.long) for key, idx in self.slices("out").items()
            }
            return self._out_index

    @property
    def prunable(self) -> bool:
        """Whether the group may be zeroed and removed (``reason`` says why not)."""
        return self.reason is None

    def tensors_by_slice(self, role: str | None = None) -> dict[tuple[str, int], Tensor]:
        """``(tensor name, axis) → tensor`` for the slices of the group (optionally of one role)."""
        return {key: self._tensors[key[0]] for key in self.slices(role)}

    def tensors(self) -> dict[str, Tensor]:
        """The model's tensors this group slices, by name."""
        return {name: self._tensors[name] for name, _ in self.slices()}

    @property
    def size(self) -> int:
        """Number of channels in the group, counted on its first producing tensor."""
        return len(next(iter(self._out.values()))) if self._out else 0

    def slices(self, role: str | None = None) -> dict[tuple[str, int], list[int]]:
        """``(tensor name, axis) → indices`` of the group's members (optionally of one role); the
        lists are shared between calls: do not modify them."""
        try:
            made = self._slices
        except AttributeError:  # every role in one pass over the members, on first use
            by_role: dict[str | None, dict[tuple[str, int], list[int]]] = defaultdict(dict)
            for tensor, axis, index, member_role in self.members:
                for r in (None, member_role):
                    by_role[r].setdefault((tensor, axis), []).append(index)
            made = self._slices = dict(by_role)
        return dict(made.get(role, {}))

    def out_tensors(self) -> list[Tensor]:
        """The producing slices, each as a view-free copy (for criteria and optimizers)."""
        return [
            self._tensors[name].detach().index_select(axis, idx.to(self._tensors[name].device))
            for (name, axis), idx in self._out.items()
        ]

    def norm(self) -> float:
        """Euclidean norm of all producing slices."""
        return math.sqrt(sum(float(t.float().pow(2).sum()) for t in self.out_tensors()))

    def is_zero(self) -> bool:
        """Whether every producing slice is exactly zero."""
        return all(not bool(t.any()) for t in self.out_tensors())

    @property
    def family(self) -> tuple[tuple[str, int], ...]:
        """The ``(tensor, axis)`` pairs whose channels this group produces: groups with the same
        family remove channels of the same layers."""
        return tuple(sorted(self._out))

    @torch.no_grad()
    def zero_(self, tensors: dict[str, Tensor] | None = None) -> None:
        """Set every producing slice to zero (the channel then contributes nothing); in
        ``tensors`` (same names, e.g. a copy of the model's) instead of the model's own if given."""
        for (name, axis), idx in self._out.items():
            t = (self._tensors if tensors is None else tensors)[name]
            t.index_fill_(axis, idx.to(t.device), 0.0)

    def details(self) -> str:
        status = "prunable" if self.prunable else f"unprunable: {self.reason}"
        lines = [f"Group {self.index} ({status})"]
        for role in ("out", "in", "aux"):
            for (name, axis), idx in self.slices(role).items():
                lines.append(f"  {role:>3} {name}{_fmt_slice(axis, idx)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.details()


def _fmt_slice(axis: int, idx: list[int]) -> str:
    runs: list[str] = []
    start = prev = idx[0]
    for i in [*idx[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(str(start) if start == prev else f"{start}:{prev + 1}")
        if i is not None:
            start = prev = i
    return "[" + ", ".join([":"] * axis + [",".join(runs)]) + "]"


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any],
    modules: dict[str, nn.Module] | None = None,
) -> fx.Graph:
    """Trace ``model`` with ``torch.fx`` and annotate every node with its output shape.

    The model runs once in eval mode without gradients; its state (batch-norm statistics, training
    flag) is left as it was. The graph's ``get_attr`` and ``call_module`` targets are paths in
    ``model``.
    """
    try:
        graph = RuleTracer().trace(model)
    except Exception as exc:
        hint = (
            "Structured pruning needs a forward without data-dependent Python control flow."
            if isinstance(exc, TraceError)
            else "Structured pruning needs a forward that torch.fx can trace symbolically."
        )
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. {hint}"
        ) from exc
    with eval_mode(model), torch.no_grad():
        propagate_shapes(model, graph, example_inputs, modules)
    return graph


def find_groups(model: nn.Module, example_inputs: Sequence[Any] | Tensor) -> list[Group]:
    """All zero-invariant groups of ``model`` (prunable and not), in graph order.

    Args:
        model: any traceable ``nn.Module``, or a ``DistributedDataParallel`` wrapper of one (the
            module inside is analysed, so group names are the module's own, without ``module.``).
        example_inputs: a tensor or a tuple of positional inputs for one forward pass.
    """
    model = unwrap(model)
    inputs = example_args(example_inputs)
    modules = dict(model.named_modules())
    graph = capture(model, inputs, modules)

    def submodule(target: str) -> nn.Module:
        found = modules.get(target)
        return found if found is not None else model.get_submodule(target)

    names: dict[int, str] = {}
    tensors: dict[str, Tensor] = {}
    uses: dict[int, int] = defaultdict(int)
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        uses[id(t)] += 1
        if id(t) not in names:
            names[id(t)] = name
            tensors[name] = t
    shared = {names[i] for i, n in uses.items() if n > 1}
    calls: dict[str, int] = defaultdict(int)
    reads: dict[str, int] = defaultdict(int)  # tensors read by get_attr: their uses
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] += 1
        elif node.op == "get_attr":
            read = _attr(model, str(node.target))
            if read is not None and id(read) in names:
                reads[names[id(read)]] += len(node.users)
    for target, n in calls.items():
        if n == 1 and not reads:
            continue
        module = submodule(target)
        owned = {names[id(t)] for t in [*module.parameters(), *module.buffers()] if id(t) in names}
        if n > 1:
            shared |= owned
        shared |= owned & reads.keys()  # also read directly: two uses
    shared |= {name for name, n in reads.items() if n > 1}

    ctx = RuleContext(ChannelGraph(), names, shared)

    env: dict[fx.Node, Value] = ctx.values

    def value(arg: Any) -> Value:
        if isinstance(arg, fx.Node):
            return env.get(arg)
        if isinstance(arg, list | tuple):
            return tuple(value(a) for a in arg)
        return None

    for node in graph.nodes:
        args = [value(a) for a in node.args]
        if node.op == "placeholder":
            env[node] = fresh_flow(ctx, node, "model input")
        elif node.op == "get_attr":
            attr = _attr(model, str(node.target))
            env[node] = (
                Param(names[id(attr)], tuple(attr.shape))
                if attr is not None and id(attr) in names
                else None
            )
        elif _has_heads(args):
            owner = submodule(str(node.target)) if node.op == "call_module" else None
            env[node] = head_rule(ctx, node, owner, args)
        elif node.op == "call_module":
            module = submodule(str(node.target))
            rule = module_rule(module)
            env[node] = (
                rule(ctx, node, module, args) if rule is not None else unknown(ctx, node, args)
            )
        elif node.op in ("call_function", "call_method"):
            split = (
                split_rule(ctx, node, args[0])
                if _is_reshape(node) and args and isinstance(args[0], Flow)
                else None
            )
            env[node] = split if split is not None else function_rule(ctx, node, args)
        elif node.op == "output":
            pin_all(ctx, args, "reaches the model output")

    resolve_sites(ctx, model)
    return _assemble(ctx, tensors)


def _assemble(ctx: RuleContext, tensors: dict[str, Tensor]) -> list[Group]:
    """The groups of the classes of ``ctx.graph`` that have a producing member, ordered by their
    smallest channel id (graph order), with the first reason a channel of each was pinned for."""
    graph = ctx.graph
    labels = graph.labels()
    table = graph.members()
    row_class = labels[table.ids]
    has_out = np.zeros(graph.size, dtype=bool)
    has_out[row_class[table.role == ROLES.index("out")]] = True
    roots = np.flatnonzero(has_out)
    group_of = np.full(graph.size, -1, dtype=np.int64)
    group_of[roots] = np.arange(len(roots))
    row_group = group_of[row_class]
    row_group[row_group < 0] = len(roots)  # rows of classes without producers: last, dropped
    rank = np.argsort(np.argsort(np.array(table.names, dtype=object))).astype(np.int64)
    # a (tensor, axis, index) slice has one row, so the role never breaks a tie
    order = _member_order(row_group, rank[table.tensor], table.axis, table.index)
    bounds = np.searchsorted(row_group[order], np.arange(len(roots) + 1)).tolist()
    hard, value, texts = graph.first_pins()
    reason = np.full(graph.size, -1, dtype=np.int64)
    for first in (value, hard):  # hard pins win over value pins
        pinned = np.flatnonzero(first >= 0)  # ascending: the first of a class is its smallest
        classes, at = np.unique(labels[pinned], return_index=True)
        reason[classes] = first[pinned[at]]
    counters: dict[int, set[tuple[str, int]]] = defaultdict(set)
    for cid, attrs in ctx.head_attrs.items():
        counters[int(group_of[labels[cid]])] |= attrs
    store = GroupStore(
        table, order, bounds, [texts[r] if r >= 0 else None for r in reason[roots].tolist()],
        {g: sorted(attrs) for g, attrs in counters.items() if g >= 0}, tensors,
    )  # fmt: skip
    enabled = gc.isenabled()
    gc.disable()  # 10⁴–10⁵ small objects at once: collections would only rescan them
    try:
        return [Group(g, store) for g in range(len(roots))]
    finally:
        if enabled:
            gc.enable()


def _member_order(*keys: np.ndarray) -> np.ndarray:
    """The order that sorts rows by ``keys`` (most significant first; non-negative integers): one
    stable sort of a packed 64-bit key when the keys fit, else ``np.lexsort``."""
    spans = [int(k.max()) + 1 if len(k) else 1 for k in keys]
    if math.prod(spans) < 2**62:
        packed = np.zeros(len(keys[0]), dtype=np.int64)
        for k, span in zip(keys, spans, strict=True):
            packed = packed * span + k
        return np.argsort(packed, kind="stable")
    return np.lexsort(keys[::-1])


def _attr(model: nn.Module, target: str) -> Tensor | None:
    owner, _, attr = target.rpartition(".")
    t = getattr(model.get_submodule(owner), attr, None)
    return t if isinstance(t, Tensor) else None


def _has_heads(args: list[Value]) -> bool:
    for a in args:
        if isinstance(a, Flow) and (a.heads is not None or a.structural):
            return True
        if isinstance(a, tuple) and _has_heads(list(a)):
            return True
    return False


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.target is torch.reshape
    )


def group_macs(
    model: nn.Module,
    groups: Sequence[Group],
    example_inputs: Sequence[Any] | Tensor,
    rates: dict[str, float] | None = None,
) -> list[float]:
    """MACs of one forward pass on ``example_inputs`` that removing each group saves (approximately:
    a weight slice shared by a producing and a consuming group is counted for both).

    Each convolution or linear weight slice costs ``slice elements × MACs / weight elements`` of its
    layer; other members (biases, norms) cost nothing. ``rates`` from :func:`macs_rates` (one
    forward pass on ``example_inputs``) are reused when given.
    """
    rate = macs_rates(model, example_inputs) if rates is None else rates
    tensors = dict(model.named_parameters())
    costs = []
    for g in groups:
        total = 0.0
        for (name, axis), idx in g.slices().items():
            if name in rate:
                t = tensors[name]
                total += rate[name] * len(idx) * t.numel() / t.shape[axis]
        costs.append(total)
    return costs


def macs_rates(model: nn.Module, example_inputs: Sequence[Any] | Tensor) -> dict[str, float]:
    """``weight name → MACs per weight element`` for every convolution and linear layer."""
    return {
        f"{name}.weight" if name else "weight": macs / max(1, numel)
        for name, (macs, numel) in module_macs(model, example_inputs).items()
    }
