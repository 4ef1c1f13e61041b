"""Capturing a model as a graph: the ``torch.fx`` tracer of group discovery and shape propagation.

:class:`RuleTracer` keeps every module that has a rule (:mod:`~prunekit.structured.module_rules`)
as one node (a leaf) and records item assignment as a node; :func:`trace` traces a model with it,
and :func:`propagate_shapes` runs the traced graph on example inputs to record on every node the
shape it makes, which the rules read.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from torch import Tensor, fx, nn

from prunekit.structured.module_rules import module_rule


class _AssignableProxy(fx.Proxy):
    """A proxy that records item assignment (``h[:, 3] = 1.0``) as an ``operator.setitem`` node,
    which :func:`~prunekit.structured.rules.function_rule` pins, instead of failing the whole
    trace."""

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class RuleTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps every module with a rule as one node (a leaf), so a rule
    registered for a module defined outside ``torch.nn`` is applied instead of traced through, and
    records item assignment (see :func:`~prunekit.structured.rules.setitem_rule`)."""

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
