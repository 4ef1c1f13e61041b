"""Attention heads of hand-written attention as zero-invariant groups.

Code that writes attention out — ``q = self.q(x).view(b, t, H, D).transpose(1, 2)``, ``q @ kᵀ``,
``softmax``, ``@ v`` (or ``F.scaled_dot_product_attention``), ``transpose``, ``reshape(b, t, H·D)``,
``self.o(...)`` — is followed channel by channel:

* a view/reshape that splits the channel dim into ``(H, D)`` gives a *head flow*: the same channel ids,
  now laid out over two dims (``Flow.heads`` is the head dim, ``Flow.dim`` the within-head dim);
* ``q @ kᵀ`` contracts ``q``'s and ``k``'s within-head dims, so their channel ids are joined
  elementwise, and the ids of a head are joined with each other (a view with a fixed head size can
  only lose whole heads). The scores carry a *structural* flow, one id per head: their values are not
  zero-invariant (softmax of zeros is uniform), but their heads are removed with the group;
* ``scores @ v`` joins head ``h`` of the scores with head ``h`` of ``v``; its output is ``v``'s head flow.

A head is one group whose producers are its rows of the q, k and v projections; when they are zero
the head's output ``softmax(·) @ v_h`` is exactly zero, so the head, its q/k/v rows and the output
projection's columns can be removed. A view/reshape whose head count is a literal must get the new
count after slimming: the module attribute that holds it is found by tracing again with the attribute
changed (``self.num_heads`` → the literal follows it). When no attribute drives the literal (a
hard-coded ``2``), or the split is not part of attention, the channels are pinned with the reason —
except a *channel shuffle* (ShuffleNet): a split into a literal number of groups whose size is read
from the tensor at run time, transposed and merged back, only permutes the channels; the same
position of every group is joined so that the slim model's shuffle permutes the kept channels alike.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from prunekit.structured.channels import Flow, Ids, as_ids
from prunekit.structured.rule_context import (
    RuleContext,
    Value,
    join_runs,
    shape_of,
    unknown,
)
from prunekit.structured.rules import permute_rule
from prunekit.structured.tracer import trace

#: Element-wise ops that keep a head flow (or the structural flow of the scores) as it is.
_KEEP_METHODS = {"contiguous", "clone", "detach", "float", "to", "type_as"}
_SOFTMAX_FUNCTIONS: tuple[Any, ...] = (F.softmax, torch.softmax, F.log_softmax)
_SCALAR_OPS: tuple[Any, ...] = (operator.mul, operator.truediv, torch.mul, torch.div)


@dataclass
class HeadSite:
    """A view/reshape that splits channels into heads (``split``) or merges heads back (``merge``)."""

    node: fx.Node
    kind: str
    heads: int
    head_size: int
    position: int  # index of the head-count (split) or merged-size (merge) entry in the shape args
    ids: Ids  # every channel id, head by head

    @property
    def reps(self) -> Ids:
        """One channel id per head."""
        return self.ids[:: self.head_size]


def _shape_args(node: fx.Node) -> list[Any]:
    args = list(node.args[1:])
    if len(args) == 1 and isinstance(args[0], tuple | list):
        args = list(args[0])
    return args


def split_rule(ctx: RuleContext, node: fx.Node, x: Flow) -> Flow | None:
    """``view``/``reshape`` splitting channel dim ``c`` into ``(H, D)`` at dims ``c, c+1``."""
    in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
    c = x.dim
    if (
        in_shape is None
        or out_shape is None
        or x.heads is not None
        or x.structural
        or len(out_shape) != len(in_shape) + 1
        or tuple(out_shape[:c]) != tuple(in_shape[:c])
        or tuple(out_shape[c + 2 :]) != tuple(in_shape[c + 1 :])
        or out_shape[c] * out_shape[c + 1] != in_shape[c]
        or out_shape[c] < 2
    ):
        return None
    heads, size = out_shape[c], out_shape[c + 1]
    ctx.head_sites.append(HeadSite(node, "split", heads, size, c, x.ids))
    return Flow(c + 1, x.ids, heads=c)


def _merge(ctx: RuleContext, node: fx.Node, x: Flow, start: int, end: int) -> Value:
    """Merging the head and within-head dims back into one channel dim."""
    assert x.heads is not None
    if end != start + 1 or {x.heads, x.dim} != {start, end}:
        return unknown(ctx, node, [x])
    heads = len(x.ids) // _head_size(node, x)
    size = len(x.ids) // heads
    ids = x.ids if x.heads == start else x.ids.reshape(heads, size).T.ravel()
    ctx.head_sites.append(HeadSite(node, "merge", heads, size, start, x.ids))
    return Flow(start, ids)


def _head_size(node: fx.Node, x: Flow) -> int:
    shape = shape_of(node.args[0])
    assert shape is not None
    return shape[x.dim]


def head_rule(
    ctx: RuleContext, node: fx.Node, module: nn.Module | None, inputs: list[Value]
) -> Value:
    """Any node with a head flow or a structural flow among its inputs."""
    flows = [v for v in inputs if isinstance(v, Flow)]
    x = inputs[0] if inputs else None
    if not isinstance(x, Flow):
        return unknown(ctx, node, inputs)
    target = node.target
    method = target if node.op == "call_method" else None
    if module is not None:
        if isinstance(module, nn.Dropout | nn.Identity):
            return _same(x)
        if isinstance(module, nn.Softmax) and x.structural and _other_dim(node, x, module.dim):
            return _same(x)
        return unknown(ctx, node, inputs)
    if method in ("view", "reshape") or target is torch.reshape:
        return _reshape_heads(ctx, node, x, inputs)
    if method == "flatten" or target is torch.flatten:
        start, end = node.args[1:3] if len(node.args) == 3 else (None, None)
        n = len(shape_of(node.args[0]) or ())
        if x.heads is not None and isinstance(start, int) and isinstance(end, int) and n:
            return _merge(ctx, node, x, start % n, end % n)
        return unknown(ctx, node, inputs)
    if method in ("transpose", "permute"):
        return permute_rule(ctx, node, inputs, method)
    if target in (torch.transpose, torch.permute):
        return permute_rule(
            ctx, node, inputs, "transpose" if target is torch.transpose else "permute"
        )
    if target in (operator.matmul, torch.matmul):
        return _matmul(ctx, node, inputs)
    if target is F.scaled_dot_product_attention:
        return _sdpa(ctx, node, inputs)
    if method in _KEEP_METHODS or target is F.dropout:
        return _same(x)
    if method in ("softmax", "log_softmax") or target in _SOFTMAX_FUNCTIONS:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if x.structural and isinstance(dim, int) and _other_dim(node, x, dim):
            return _same(x)  # a softmax over the keys: the heads stay (values need not be zero)
        return unknown(ctx, node, inputs)
    if target in _SCALAR_OPS and len(flows) == 1 and _broadcast_ok(node, x):
        return _same(x)  # x · c, x / c: zeros stay zero
    masking = target in (operator.add, torch.add) or method == "masked_fill"
    if x.structural and masking and len(flows) == 1 and _broadcast_ok(node, x):
        return _same(x)  # an attention mask that does not vary over heads
    return unknown(ctx, node, inputs)


def _other_dim(node: fx.Node, x: Flow, dim: int | None) -> bool:
    n = len(shape_of(node) or ())
    return dim is not None and n > 0 and dim % n not in (x.dim, x.heads)


def _reshape_heads(ctx: RuleContext, node: fx.Node, x: Flow, inputs: list[Value]) -> Value:
    out_shape, in_shape = shape_of(node), shape_of(node.args[0])
    if x.heads is None or x.structural or out_shape is None or in_shape is None:
        return unknown(ctx, node, inputs)
    lo = min(x.heads, x.dim)
    if (
        abs(x.heads - x.dim) == 1
        and len(out_shape) == len(in_shape) - 1
        and tuple(out_shape[:lo]) == tuple(in_shape[:lo])
        and tuple(out_shape[lo + 1 :]) == tuple(in_shape[lo + 2 :])
    ):
        return _merge(ctx, node, x, lo, lo + 1)
    return unknown(ctx, node, inputs)


def _same(x: Flow) -> Flow:
    return Flow(x.dim, x.ids, heads=x.heads, structural=x.structural)


def _broadcast_ok(node: fx.Node, x: Flow) -> bool:
    """Every other tensor operand has size 1 (or is absent) along the flow's dims."""
    out = shape_of(node)
    if out is None:
        return False
    for a in node.args[1:]:
        if isinstance(a, fx.Node):
            s = shape_of(a)
            if s is None:
                return False
            lead = len(out) - len(s)
            for d in (x.dim, x.heads):
                if d is not None and d - lead >= 0 and s[d - lead] != 1:
                    return False
    return True


def _join_heads(ctx: RuleContext, flow: Flow, size: int) -> None:
    join_runs(ctx, flow.ids, size)


def _matmul(ctx: RuleContext, node: fx.Node, inputs: list[Value]) -> Value:
    a, b = [*inputs, None, None][:2]
    sa, sb = shape_of(node.args[0]), shape_of(node.args[1])
    if not (isinstance(a, Flow) and isinstance(b, Flow) and sa and sb and len(sa) == len(sb) >= 3):
        return unknown(ctx, node, inputs)
    n = len(sa)
    if (
        not a.structural
        and not b.structural
        and a.heads is not None
        and a.heads == b.heads
        and a.heads < n - 2
        and a.dim == n - 1
        and b.dim == n - 2
        and len(a.ids) == len(b.ids)
    ):  # q @ kᵀ
        size = sa[n - 1]
        ctx.graph.union_all(a.ids, b.ids)
        _join_heads(ctx, a, size)
        ctx.coupled.extend(a.ids[::size])
        return Flow(a.heads, a.ids[::size], structural=True)
    if (
        a.structural
        and b.heads is not None
        and not b.structural
        and a.dim == b.heads
        and b.dim == n - 1
        and len(b.ids) % len(a.ids) == 0
    ):  # softmax(scores) @ v
        size = len(b.ids) // len(a.ids)
        _join_heads(ctx, b, size)
        ctx.graph.union_all(a.ids, b.ids[::size])
        return Flow(b.dim, b.ids, heads=b.heads)
    return unknown(ctx, node, inputs)


def _sdpa(ctx: RuleContext, node: fx.Node, inputs: list[Value]) -> Value:
    q, k, v = [*inputs, None, None, None][:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    sq = shape_of(node.args[0])
    flows = [f for f in (q, k, v) if isinstance(f, Flow)]
    if len(flows) != 3 or sq is None or (isinstance(mask, fx.Node) and not _mask_ok(mask, q)):
        return unknown(ctx, node, inputs)
    assert isinstance(q, Flow) and isinstance(k, Flow) and isinstance(v, Flow)
    n = len(sq)
    if not (
        q.heads == k.heads == v.heads == n - 3
        and q.dim == k.dim == v.dim == n - 1
        and not any(f.structural for f in flows)
        and len(q.ids) == len(k.ids)
        and len(v.ids) % (len(q.ids) // sq[-1]) == 0
    ):
        return unknown(ctx, node, inputs)
    size_qk = sq[-1]
    heads = len(q.ids) // size_qk
    size_v = len(v.ids) // heads
    ctx.graph.union_all(q.ids, k.ids)
    _join_heads(ctx, q, size_qk)
    _join_heads(ctx, v, size_v)
    ctx.graph.union_all(q.ids[::size_qk], v.ids[::size_v])
    ctx.coupled.extend(q.ids[::size_qk])
    return Flow(v.dim, v.ids, heads=v.heads)


def _mask_ok(mask: fx.Node, q: Value) -> bool:
    s = shape_of(mask)
    if s is None or not isinstance(q, Flow) or q.heads is None:
        return False
    lead = 4 - len(s)
    return q.heads - lead < 0 or s[q.heads - lead] == 1


# ----------------------------------------------------------------------------- head-count literals
def resolve_sites(ctx: RuleContext, model: nn.Module) -> None:
    """Pin head splits that are not attention, and find the attribute behind each head-count literal.

    Sets ``ctx.head_attrs``: channel id (one per head) → ``(attribute path, value)``; removing that
    head lowers the attribute by one.
    """
    labels = ctx.graph.labels()
    coupled = set(labels[as_ids(ctx.coupled)].tolist())
    need: dict[str, list[HeadSite]] = {}
    shuffles: list[Ids] = []  # sorted ids of each channel-shuffle split
    for site in ctx.head_sites:
        if site.kind == "split" and not coupled.issuperset(labels[site.reps].tolist()):
            if _is_shuffle(ctx, site):
                shuffles.append(np.sort(site.ids))
                continue
            ctx.graph.pin(
                site.ids,
                f"{site.node.name}: split into ({site.heads}, {site.head_size}) outside attention",
            )
            continue
        if site.kind == "merge" and any(_same_ids(site.ids, ids) for ids in shuffles):
            width = _shape_args(site.node)[site.position]
            if width != -1 and not _channel_count(ctx, width, site.ids):
                ctx.graph.pin(site.ids, f"{site.node.name}: the merged width of a channel "
                              "shuffle is not the channel count of its input")  # fmt: skip
            continue
        problem, literal = _check_site(site)
        if problem is not None:
            ctx.graph.pin(site.ids, problem)
        elif literal:
            need.setdefault(_owner(site.node), []).append(site)
    for owner, sites in need.items():
        attrs = _driving_attributes(model, owner, sites)
        for site in sites:
            if not attrs:
                ctx.graph.pin(
                    site.ids,
                    f"{site.node.name}: the head count {site.heads} is a literal no module "
                    "attribute of "
                    f"{owner or type(model).__name__!r} drives (write it as self.<attr> or -1)",
                )
                continue
            for r in site.reps.tolist():
                for attr in attrs:
                    ctx.head_attrs.setdefault(r, set()).add((attr, site.heads))


def _is_shuffle(ctx: RuleContext, site: HeadSite) -> bool:
    """A split into a literal number of groups whose size follows the channel count, as ShuffleNet's
    ``x.view(b, g, C // g, h, w)`` (with ``C`` read from ``x.size()``), before a transpose and a
    merge: the channels are only permuted. The slim model computes ``C' // g``, so every group must
    lose the same positions: channel ``j`` of each group is joined (one group of the channel
    graph removes position ``j`` of all ``g``), and the permuted order stays the original's."""
    args = _shape_args(site.node)
    if len(args) <= site.position + 1 or not isinstance(args[site.position], int):
        return False
    count, size = args[site.position], args[site.position + 1]
    if count < 2 or not (size == -1 or _channel_count(ctx, size, site.ids, divisor=count)):
        return False
    join_columns = site.ids.reshape(site.heads, site.head_size)
    ctx.graph.union_all(join_columns[:-1].ravel(), join_columns[1:].ravel())
    return True


def _channel_count(ctx: RuleContext, arg: Any, ids: Ids, divisor: int = 1) -> bool:
    """Whether ``arg`` is, at run time, the channel count (``// divisor``) of a tensor whose
    channels are ``ids``: ``t.size(d)``, ``t.size()[d]`` or ``t.shape[d]`` on its channel dim."""
    if not isinstance(arg, fx.Node):
        return False
    if divisor != 1:
        return (
            arg.op == "call_function"
            and arg.target is operator.floordiv
            and isinstance(arg.args[1], int)
            and arg.args[1] == divisor
            and _channel_count(ctx, arg.args[0], ids)
        )
    if arg.op == "call_method" and arg.target == "size" and len(arg.args) == 2:
        tensor, dim = arg.args
    elif arg.op == "call_function" and arg.target is operator.getitem:
        source, dim = arg.args
        if not isinstance(source, fx.Node):
            return False
        if (source.op == "call_method" and source.target == "size" and len(source.args) == 1) or (
            source.op == "call_function"
            and source.target is getattr
            and source.args[1:] == ("shape",)
        ):
            tensor = source.args[0]
        else:
            return False
    else:
        return False
    if not isinstance(tensor, fx.Node):
        return False
    flow, shape = ctx.values.get(tensor), shape_of(tensor)
    return (
        isinstance(flow, Flow)
        and flow.heads is None
        and shape is not None
        and isinstance(dim, int)
        and dim % len(shape) == flow.dim
        and _same_ids(flow.ids, ids)
    )


def _same_ids(a: Ids, b: Ids) -> bool:
    """Whether ``a`` and ``b`` hold the same ids (in any order)."""
    return len(a) == len(b) and bool(np.array_equal(np.sort(a), np.sort(b)))


def _check_site(site: HeadSite) -> tuple[str | None, bool]:
    """``(why the head count cannot change, whether a literal must follow an attribute)``.

    After heads are removed the split must still produce heads of the same size and the merge the
    new width: the head size must be a literal (or ``-1``), the head count and the merged width a
    literal that an attribute drives, or ``-1``. A size computed at run time from another tensor
    (``x.size(-1)``, the embedding width) would not follow.
    """
    if site.node.target == "flatten" or site.node.target is torch.flatten:
        return None, False
    args = _shape_args(site.node)
    where = f"{site.node.name}{tuple(a.name if isinstance(a, fx.Node) else a for a in args)}"
    count = args[site.position] if len(args) > site.position else None
    if site.kind == "split":
        size = args[site.position + 1] if len(args) > site.position + 1 else None
        if size not in (site.head_size, -1) or (size == -1 and count == -1):
            return f"{where}: the head size is not a literal; heads cannot be removed", False
    if count == -1:
        return None, False
    if isinstance(count, int):
        return None, True
    return (
        f"{where}: the {'head count' if site.kind == 'split' else 'merged width'} is computed at "
        "run time from another tensor; write it as self.<attr> or -1 to make heads removable",
        False,
    )


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return str(list(stack.values())[-1][0])


def _driving_attributes(model: nn.Module, owner: str, sites: list[HeadSite]) -> list[str]:
    """Integer attributes of module ``owner`` that every literal of ``sites`` follows."""
    module = model.get_submodule(owner)
    heads = sites[0].heads
    if any(s.heads != heads for s in sites):
        return []
    found: list[str] = []
    for attr, value in list(vars(module).items()):
        if type(value) is not int or value != heads or attr.startswith("_"):
            continue
        setattr(module, attr, heads + 1)
        try:
            graph = trace(model).graph
        except Exception:  # any failure: the attribute does not drive the literal
            continue
        finally:
            setattr(module, attr, value)
        nodes = {n.name: n for n in graph.nodes}
        if all(_follows(nodes.get(s.node.name), s) for s in sites):
            found.append(f"{owner}.{attr}" if owner else attr)
    return found


def _follows(node: fx.Node | None, site: HeadSite) -> bool:
    if node is None:
        return False
    args = _shape_args(node)
    if len(args) <= site.position:
        return False
    want = site.heads + 1 if site.kind == "split" else (site.heads + 1) * site.head_size
    return args[site.position] == want


def drives_reshape_literal(model: nn.Module, path: str) -> bool:
    """Whether the integer attribute ``path`` (``"owner.attr"``) of ``model`` is a head count that
    :func:`resolve_sites` could record: an instance attribute whose value a view/reshape of the
    traced forward follows (tracing again with the attribute raised by one changes a shape
    literal). Used to refuse saved specs that name any other attribute."""
    owner, _, attr = path.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    value = vars(module).get(attr)
    if attr.startswith("_") or type(value) is not int:
        return False

    def literals() -> list[tuple[str, tuple[Any, ...]]]:
        graph = trace(model).graph
        return [
            (n.name, tuple(a for a in _shape_args(n) if isinstance(a, int)))
            for n in graph.nodes
            if (n.op == "call_method" and n.target in ("view", "reshape"))
            or n.target is torch.reshape
        ]

    try:
        before = literals()
        setattr(module, attr, value + 1)
        try:
            after = literals()
        finally:
            setattr(module, attr, value)
    except Exception:  # any failure: the attribute does not drive a literal
        return False
    return before != after
