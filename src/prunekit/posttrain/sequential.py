"""The order in which a model's layers are compressed, and the forwards that feed them.

Units are compressed in forward order. A *unit* is a block — a child of the model's layer
``ModuleList`` (a transformer's ``encoder.layer``) that holds targets — or a single target layer
outside such a list (plain CNNs and MLPs: each target layer is a unit). Every unit sees the
outputs of the already compressed units.

Two ways to feed a unit its calibration inputs:

* **Cached chain**: when consecutive blocks form a chain (block ``k+1`` is called on block
  ``k``'s output with the same other arguments — checked on the first calibration item), the
  inputs of the first block are captured once, and each block's outputs, computed after it is
  compressed, are the next block's inputs: one block forward per calibration item per block.
* **Early-stopped forward**: otherwise the whole model runs on each calibration item and stops
  (:class:`StopForward`) right after the unit; correct for any topology (residual connections,
  branches), at the cost of the forward up to the unit.

All hooks are owned by a :class:`HookSet` and removed when its ``with`` block exits, also on an
exception. Every forward on a calibration item runs under :func:`blame_item`: what fails there is
reported as one line naming the item.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from prunekit.config import ConfigError
from prunekit.core.targets import Target
from prunekit.posttrain.calibration import Call, describe, first_non_finite
from prunekit.posttrain.checks import NonFiniteInput, check_finite_input
from prunekit.posttrain.hessian import HessianError

__all__ = ["HookSet", "StopForward", "Unit", "blame_item", "layer_list", "plan_units"]


class StopForward(Exception):
    """Raised by a hook to end a calibration forward early (caught by the caller)."""


class HookSet:
    """Forward hooks owned by one object and removed together (context manager).

    Example::

        with HookSet() as hooks:
            hooks.pre(layer, lambda m, args: ...)
            model(x)
        # every hook is gone here, even if model(x) raised
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def pre(self, module: nn.Module, fn: Callable[..., Any], with_kwargs: bool = False) -> None:
        """A forward pre-hook ``fn(module, args[, kwargs])``."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def post(self, module: nn.Module, fn: Callable[..., Any], with_kwargs: bool = False) -> None:
        """A forward hook ``fn(module, args[, kwargs], output)``."""
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass
class Unit:
    """A block or a single layer compressed in one step.

    Attributes:
        name: module name of the block (or of the layer).
        module: the block or layer.
        targets: the targets inside it, in forward order.
        chained: ``True`` when this block's inputs are the previous unit's outputs (cached chain).
    """

    name: str
    module: nn.Module
    targets: list[Target]
    chained: bool = False


@contextmanager
def blame_item(index: int, call: Call | None = None) -> Iterator[None]:
    """Errors raised while calibration item ``index`` (``call``) runs, as one line naming it.

    :class:`StopForward`, :class:`~prunekit.config.ConfigError`, out-of-memory errors and
    :class:`~prunekit.posttrain.hessian.HessianError` pass through, a :class:`NonFiniteInput` with
    the item named (and whether the item itself is to blame); any other exception (the model cannot
    consume the item: a shape or dtype it does not take, an argument it does not know) becomes a
    :class:`~prunekit.config.ConfigError` naming the item, its input shapes and the first line of
    what was raised, which stays chained as the cause.
    """
    try:
        yield
    except NonFiniteInput as exc:
        if exc.item is not None:
            raise
        raise NonFiniteInput(exc.layer, exc.count, index, _non_finite_hint(call)) from None
    except (StopForward, ConfigError, HessianError, MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:
        raise ConfigError(_item_failure(index, call, exc)) from exc


def _non_finite_hint(call: Call | None) -> str:
    """What to do about a non-finite layer input: clean the item, or find the overflow."""
    where = None if call is None else first_non_finite(call)
    if where is not None:
        return f"the item holds inf in {where}: drop or clean that batch"
    return (
        "the item itself is finite, so the model overflows before this layer (float16? compress "
        "the model in float32)"
    )


def _item_failure(index: int, call: Call | None, exc: Exception) -> str:
    """One line: the item, its input shapes, the first line of what the forward raised, and a
    hint when a tuple item looks like an ``(inputs, labels)`` pair."""
    lines = str(exc).strip().splitlines()
    said = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    shapes = "" if call is None else f" ({describe(call)})"
    hint = ""
    if isinstance(exc, TypeError) and call is not None and len(call[0]) > 1:
        hint = (
            "; a tuple item is the model's positional inputs (for a DataLoader of "
            "(inputs, labels) pairs pass [x for x, _ in loader])"
        )
    return f"calibration item {index}{shapes} cannot be run through the model: {said}{hint}"


def run_call(model: nn.Module, call: Call, index: int = 0) -> None:
    """One forward of ``model`` on calibration item ``index``; a :class:`StopForward` ends it
    quietly, another failure is reported by :func:`blame_item`."""
    args, kwargs = call
    try:
        with blame_item(index, call):
            model(*args, **kwargs)
    except StopForward:
        pass


def execution_order(
    model: nn.Module, targets: Sequence[Target], calls: Sequence[Call]
) -> tuple[list[Target], list[Target]]:
    """Targets in the order the model first calls them, and those it never calls.

    The calls run one after the other until every target has been seen (usually one forward);
    a target that only later items reach (a conditional branch, an expert) is ordered after the
    ones seen before it."""
    order: list[Target] = []
    with HookSet() as hooks:
        for t in targets:

            def seen(module: nn.Module, args: Any, t: Target = t) -> None:
                if t not in order:
                    order.append(t)

            hooks.pre(t.module, seen)
        for i, call in enumerate(calls):
            run_call(model, call, i)
            if len(order) == len(targets):
                break
    return order, [t for t in targets if t not in order]


def layer_list(model: nn.Module, targets: Sequence[Target]) -> tuple[str, nn.ModuleList] | None:
    """The ``ModuleList`` whose children hold the most targets (ties: the outermost), if any."""
    best: tuple[int, str, nn.ModuleList] | None = None
    target_modules = {id(t.module) for t in targets}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        n = sum(
            1
            for child in module
            for m in child.modules()
            if id(m) in target_modules and m is not child
        )
        if n > 0 and (best is None or n > best[0]):
            best = (n, name, module)
    return None if best is None else (best[1], best[2])


def plan_units(model: nn.Module, ordered: Sequence[Target], call: Call) -> list[Unit]:
    """Units in forward order, with the chained ones marked (see the module docstring)."""
    found = layer_list(model, ordered)
    block_of: dict[int, tuple[str, nn.Module]] = {}
    if found is not None:
        list_name, layers = found
        for i, child in enumerate(layers):
            for m in child.modules():
                block_of[id(m)] = (f"{list_name}.{i}" if list_name else str(i), child)
    units: list[Unit] = []
    index: dict[int, Unit] = {}
    for t in ordered:
        owner = block_of.get(id(t.module))
        if owner is None or owner[1] is t.module:
            units.append(Unit(t.module_name, t.module, [t]))
            continue
        unit = index.get(id(owner[1]))
        if unit is None:
            unit = Unit(owner[0], owner[1], [])
            index[id(owner[1])] = unit
            units.append(unit)
        unit.targets.append(t)
    _mark_chains(model, units, call)
    return units


_SCALARS = (bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _same(a: Any, b: Any) -> bool:
    """Whether two block arguments are provably the same value: equal tensors, ``None``, equal
    immutable scalars, or containers of these. Any other object (a key/value cache, a module, a
    mutable state holder) is *not* the same, even if it is the same object: a block may change it,
    so the chain is not used and the early-stopped forward feeds the block instead."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, _SCALARS) and isinstance(b, _SCALARS):
        return type(a) is type(b) and a == b
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return False  # lists, dicts and other objects may be mutated by the blocks


def _same_kwargs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


def first_output(output: Any) -> Tensor | None:
    """The hidden state a block passes on: the output itself or its first element."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _mark_chains(model: nn.Module, units: list[Unit], call: Call) -> None:
    """Mark unit ``k+1`` chained when, on ``call``, it receives unit ``k``'s output as its first
    argument and exactly the other arguments unit ``k`` received (consecutive blocks only)."""
    seen: dict[int, tuple[tuple[Any, ...], dict[str, Any], Any]] = {}
    # tensor versions: the block's output must reach the next block unmodified (no in-place op
    # between them), which the identity check alone cannot see
    versions: dict[int, int] = {}
    out_versions: dict[int, int | None] = {}
    blocks = [u for u in units if len(u.targets) > 1 or u.module is not u.targets[0].module]
    if len(blocks) < 2:
        return
    with HookSet() as hooks:
        for u in blocks:

            def pre(m: nn.Module, args: Any, kwargs: Any, u: Unit = u) -> None:
                if args and isinstance(args[0], Tensor):
                    versions.setdefault(id(u), args[0]._version)

            def record(m: nn.Module, args: Any, kwargs: Any, out: Any, u: Unit = u) -> None:
                hidden = first_output(out)
                out_versions.setdefault(id(u), None if hidden is None else hidden._version)
                seen.setdefault(id(u), (args, kwargs, out))

            hooks.pre(u.module, pre, with_kwargs=True)

            hooks.post(u.module, record, with_kwargs=True)
        with torch.no_grad():
            run_call(model, call)
    for prev, unit in itertools.pairwise(units):
        if id(prev) not in seen or id(unit) not in seen or prev not in blocks:
            continue
        p_args, p_kwargs, p_out = seen[id(prev)]
        args, kwargs, _ = seen[id(unit)]
        hidden = first_output(p_out)
        unit.chained = (
            hidden is not None
            and len(args) >= 1
            and args[0] is hidden
            and out_versions.get(id(prev)) == versions.get(id(unit))
            and _same(args[1:], p_args[1:])
            and _same_kwargs(kwargs, p_kwargs)
        )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode and no autograd for the duration; the training flags are restored."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags.items():
            m.train(flag)


def capture_inputs(model: nn.Module, module: nn.Module, calls: Sequence[Call]) -> list[Call]:
    """The ``(args, kwargs)`` that ``module`` receives on every calibration call (the forward
    stops at ``module``)."""
    captured: list[Call] = []

    def grab(m: nn.Module, args: Any, kwargs: Any) -> None:
        captured.append((tuple(args), dict(kwargs)))
        raise StopForward

    with HookSet() as hooks:
        hooks.pre(module, grab, with_kwargs=True)
        for i, call in enumerate(calls):
            n = len(captured)
            run_call(model, call, i)
            if len(captured) == n:
                raise RuntimeError(
                    f"{type(module).__name__} was not called by the model's forward on "
                    f"calibration item {i}; it cannot be compressed sequentially"
                )
    return captured


def feed_unit(
    model: nn.Module,
    unit: Unit,
    calls: Sequence[Call],
    before: Callable[[int], None] | None = None,
) -> None:
    """Run the model on every call, stopping right after ``unit`` has run (``before(i)`` is
    called before call ``i``)."""

    def stop(m: nn.Module, args: Any, out: Any) -> None:
        raise StopForward

    with HookSet() as hooks:
        hooks.post(unit.module, stop)
        for i, call in enumerate(calls):
            if before is not None:
                before(i)
            run_call(model, call, i)


def fresh(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The cached arguments with the hidden state cloned: a block that updates its input in place
    (``x += f(x)``) must not change the cache that the next pass reads."""
    if args and isinstance(args[0], Tensor):
        return (args[0].clone(), *args[1:])
    return args


def run_block(
    unit: Unit, inputs: Sequence[Call], calls: Sequence[Call] | None = None
) -> list[Call]:
    """Run a chained block on cached inputs; its outputs as the next block's inputs (``calls``:
    the calibration items the inputs come from, named in an error)."""
    outputs: list[Call] = []
    for i, (args, kwargs) in enumerate(inputs):
        with blame_item(i, None if calls is None else calls[i]):
            hidden = first_output(unit.module(*fresh(args), **kwargs))
        if hidden is None:
            raise RuntimeError(f"block {unit.name} returned no tensor to pass on")
        outputs.append(((hidden, *args[1:]), kwargs))
    return outputs


def check_layer_inputs(model: nn.Module, targets: Sequence[Target], calls: Sequence[Call]) -> None:
    """One forward on every calibration item with every target's input checked: a NaN or inf
    there raises :class:`NonFiniteInput` naming the layer and the item (for methods that do not
    collect layer inputs themselves, like M-FAC).

    Raises:
        NonFiniteInput: a target received NaN or inf.
        ConfigError: the model cannot consume an item (see :func:`blame_item`).
    """
    with HookSet() as hooks:
        for t in targets:

            def check(module: nn.Module, args: Any, t: Target = t) -> None:
                if args and isinstance(args[0], Tensor):
                    check_finite_input(t.name, args[0])

            hooks.pre(t.module, check)
        with torch.no_grad():
            for i, call in enumerate(calls):
                run_call(model, call, i)
