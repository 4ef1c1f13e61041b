"""Construct the physically smaller network from a group-sparse one.

Every prunable group whose producing slices are all exactly zero is removed: its output channels and
the matching input channels of every consumer (and per-channel buffers) are sliced out of a deep copy
of the model, and module attributes (``in_features``, ``out_channels``, ``num_features``, depthwise
``groups`` …) are updated. The original model is untouched. The result is verified on the example
inputs: if its output differs from the original's, :class:`SlimError` is raised rather than a wrong
model returned.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from prunekit.structured.groups import Group, find_groups
from prunekit.structured.rules import BATCH_NORMS, CONVS

#: Updates a module's attributes after its tensors were sliced; may return a replacement module.
Fixup = Callable[[nn.Module], nn.Module | None]


class SlimError(RuntimeError):
    """The slim model does not reproduce the original's output."""


def _fix_conv(m: nn.Module) -> None:
    assert isinstance(m, CONVS)
    m = cast(nn.Conv2d, m)  # the attributes all convolutions share
    out_c, per_group_in = m.weight.shape[0], m.weight.shape[1]
    if m.groups > 1 and m.in_channels == m.groups:  # whole conv groups were removed (see rules)
        m.groups = m.in_channels = out_c // (m.out_channels // m.groups)
    else:  # every conv group narrowed alike (groups == 1 included)
        m.in_channels = per_group_in * m.groups
    m.out_channels = out_c


def _fix_linear(m: nn.Module) -> None:
    assert isinstance(m, nn.Linear)
    m.out_features, m.in_features = m.weight.shape


def _fix_bn(m: nn.Module) -> None:
    assert isinstance(m, BATCH_NORMS)
    m = cast(nn.BatchNorm2d, m)
    ref = m.weight if m.weight is not None else m.running_mean
    assert ref is not None
    m.num_features = ref.shape[0]


def _fix_groupnorm(m: nn.Module) -> None:
    assert isinstance(m, nn.GroupNorm)  # whole norm groups were removed (see rules)
    channels = m.weight.shape[0]
    m.num_groups = channels // (m.num_channels // m.num_groups)
    m.num_channels = channels


def _fix_embedding(m: nn.Module) -> None:
    assert isinstance(m, nn.Embedding)
    m.embedding_dim = m.weight.shape[1]


def _fix_prelu(m: nn.Module) -> None:
    assert isinstance(m, nn.PReLU)
    m.num_parameters = m.weight.numel()


_FIXUPS: list[tuple[type[nn.Module] | tuple[type[nn.Module], ...], Fixup]] = [
    (CONVS, _fix_conv),
    (nn.Linear, _fix_linear),
    (BATCH_NORMS, _fix_bn),
    (nn.GroupNorm, _fix_groupnorm),
    (nn.Embedding, _fix_embedding),
    (nn.PReLU, _fix_prelu),
]


def register_fixup(module_type: type[nn.Module], fixup: Fixup) -> None:
    """Tell :func:`slim` how to update ``module_type``'s attributes after its tensors are sliced."""
    _FIXUPS.insert(0, (module_type, fixup))


def removal_plan(
    groups: Sequence[Group], sizes: dict[tuple[str, int], int] | None = None
) -> dict[tuple[str, int], list[int]]:
    """``(tensor, axis) → indices`` removed for the prunable, all-zero groups.

    When removing every such group would leave a tensor with no channels along an axis (a layer
    PyTorch cannot run), one of those zero groups is kept: the output is the same either way.
    """
    return _plan(groups, sizes)[0]


def _plan(
    groups: Sequence[Group], sizes: dict[tuple[str, int], int] | None
) -> tuple[dict[tuple[str, int], list[int]], list[Group]]:
    removable = [g for g in groups if g.prunable and g.is_zero()]
    while True:
        plan: dict[tuple[str, int], set[int]] = defaultdict(set)
        for g in removable:
            for key, idx in g.slices().items():
                plan[key].update(idx)
        empty = [key for key, idx in plan.items() if sizes is not None and len(idx) >= sizes[key]]
        if not empty:
            return {k: sorted(v) for k, v in plan.items()}, removable
        keep = next(g for g in removable if empty[0] in g.slices())
        removable.remove(keep)


def _sizes(model: nn.Module, groups: Sequence[Group]) -> dict[tuple[str, int], int]:
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    return {key: tensors[key[0]].shape[key[1]] for g in groups for key in g.slices()}


def slim_plan(
    model: nn.Module, groups: Sequence[Group]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """What :func:`slim` does to ``model``, from one removal plan:

    * ``tensor name → [{"axis": a, "kept": [indices]}, ...]``;
    * ``module attribute path → new value`` for the counters of removed groups (head counts).
    """
    sizes = _sizes(model, groups)
    plan, removed = _plan(groups, sizes)
    kept: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (name, axis), drop in sorted(plan.items()):
        dropped = set(drop)
        kept[name].append(
            {"axis": axis, "kept": [i for i in range(sizes[(name, axis)]) if i not in dropped]}
        )
    attributes: dict[str, int] = {}
    for g in groups:
        for attr, value in g.counters:
            attributes.setdefault(attr, value)
    for g in removed:
        for attr, _ in g.counters:
            attributes[attr] -= 1
    return dict(kept), attributes


@torch.no_grad()
def apply_kept(
    model: nn.Module,
    kept: dict[str, list[dict[str, Any]]],
    copy_model: bool = False,
    attributes: dict[str, int] | None = None,
) -> nn.Module:
    """Slice ``model``'s tensors to the ``kept`` indices, fix module attributes and set the counted
    ``attributes`` (head counts; in place unless ``copy_model``): what :func:`slim` and
    :func:`~prunekit.structured.io.load_slim` do."""
    new = copy.deepcopy(model) if copy_model else model
    for path, value in (attributes or {}).items():
        owner, _, attr = path.rpartition(".")
        setattr(new.get_submodule(owner), attr, value)
    touched: set[str] = set()
    for name, axes in kept.items():
        module_name, _, attr = name.rpartition(".")
        module = new.get_submodule(module_name)
        t: Tensor = getattr(module, attr)
        sliced = t.detach()
        for entry in axes:
            index = torch.tensor(entry["kept"], dtype=torch.long, device=t.device)
            sliced = sliced.index_select(int(entry["axis"]), index)
        if isinstance(t, nn.Parameter):
            module._parameters[attr] = nn.Parameter(sliced.clone(), requires_grad=t.requires_grad)
        else:
            module._buffers[attr] = sliced.clone()
        touched.add(module_name)
    for module_name in sorted(touched, key=lambda n: -n.count(".")):  # children before parents
        module = new.get_submodule(module_name)
        for types, fix in _FIXUPS:
            if isinstance(module, types):
                replacement = fix(module)
                if replacement is not None:
                    parent_name, _, child = module_name.rpartition(".")
                    setattr(new.get_submodule(parent_name), child, replacement)
                break
    return new


def _outputs(model: nn.Module, inputs: tuple[Any, ...]) -> list[Tensor]:
    out = model(*inputs)
    flat: list[Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, Tensor):
            flat.append(o)
        elif isinstance(o, list | tuple):
            for x in o:
                walk(x)
        elif isinstance(o, dict):
            for x in o.values():
                walk(x)

    walk(out)
    return flat


@torch.no_grad()
def slim(
    model: nn.Module,
    example_inputs: Sequence[Any] | Tensor,
    groups: Sequence[Group] | None = None,
    *,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> nn.Module:
    """A new, smaller module without the zero groups of ``model``; ``model`` is not modified.

    Args:
        model: the group-sparse model.
        example_inputs: inputs for capture and for the output check.
        groups: groups from :func:`find_groups` (found again if ``None``).
        check: compare the slim and the original outputs on ``example_inputs`` (eval mode).
    """
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    groups = find_groups(model, inputs) if groups is None else groups
    kept, attributes = slim_plan(model, groups)
    new = apply_kept(model, kept, copy_model=True, attributes=attributes)
    if check:
        modes = {m: m.training for m in model.modules()}
        model.eval()
        new.eval()
        try:
            ref, got = _outputs(model, inputs), _outputs(new, inputs)
        finally:
            for m, mode in modes.items():
                m.training = mode
        new.train(model.training)
        for a, b in zip(ref, got, strict=True):
            if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=atol):
                diff = (
                    (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(b.shape)}"
                )
                raise SlimError(f"slim model output differs from the original (max |diff| {diff})")
    return new
