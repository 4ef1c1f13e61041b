"""Construct the physically smaller network from a group-sparse one.

Every prunable group whose producing slices are all exactly zero is removed: its output channels and
the matching input channels of every consumer (and per-channel buffers) are sliced out of a deep copy
of the model, and module attributes (``in_features``, ``out_channels``, ``num_features``, depthwise
``groups`` …) are updated. The original model is untouched. The result is verified on the example
inputs, both models run in float64 (so the float32 rounding of a deep network, which differs once
layers are narrower, does not count): if the outputs differ by more than ``tol · max(1, max |out|)``
(``1e-6``), :class:`SlimError` is raised rather than a wrong model returned.

A layer may lose *all* its channels — a residual branch whose inner channels are all zero, for
instance. The emptied convolutions become :class:`~prunekit.structured.folded.FoldedConv` (the
constant or empty tensor they still compute, by default at spatial size 1 and broadcast) and emptied
norms ``nn.Identity``, so the branch costs no convolution at all. Where the model's own code needs
the constant at full size, :func:`slim` expands it; where it cannot run with an empty tensor at all,
one zero channel is kept in each such layer. The output is the same in every case, and checked.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MethodType
from typing import Any, cast

import torch
from torch import Tensor, nn

from prunekit.core.forward import eval_mode, example_args
from prunekit.core.targets import is_hf_conv1d
from prunekit.structured.folded import FoldedConv
from prunekit.structured.groups import Group, find_groups
from prunekit.structured.module_rules import BATCH_NORMS, CONVS

log = logging.getLogger(__name__)

#: ``format`` of the JSON spec that describes a slim model (see :mod:`prunekit.structured.io`).
SPEC_FORMAT = "prunekit-slim"
#: ``version`` of that spec: 2 names its weights file and records ``broadcast_folds``.
SPEC_VERSION = 2

#: Updates a module's attributes after its tensors were sliced; may return a replacement module.
Fixup = Callable[[nn.Module], nn.Module | None]


class SlimError(RuntimeError):
    """The slim model does not reproduce the original's output."""


def _fix_conv(m: nn.Module) -> nn.Module | None:
    assert isinstance(m, CONVS)
    m = cast(nn.Conv2d, m)  # the attributes all convolutions share
    out_c, per_group_in = m.weight.shape[0], m.weight.shape[1]
    if m.groups > 1 and m.in_channels == m.groups:  # whole conv groups were removed (see rules)
        m.groups = m.in_channels = out_c // (m.out_channels // m.groups)
    else:  # every conv group narrowed alike (groups == 1 included)
        m.in_channels = per_group_in * m.groups
    m.out_channels = out_c
    if out_c == 0 or per_group_in == 0:
        return FoldedConv.from_conv(m)
    return None


def _fix_linear(m: nn.Module) -> None:
    assert isinstance(m, nn.Linear)
    m.out_features, m.in_features = m.weight.shape


def _fix_transposed_linear(m: nn.Module) -> None:
    """``transformers``' ``Conv1D``: its widths ``nx`` and ``nf`` are the weight's rows and
    columns."""
    weight = m.weight
    assert isinstance(weight, torch.Tensor)
    setattr(m, "nx", int(weight.shape[0]))  # noqa: B010 - Module attributes mypy cannot see
    setattr(m, "nf", int(weight.shape[1]))  # noqa: B010


def _fix_bn(m: nn.Module) -> nn.Module | None:
    assert isinstance(m, BATCH_NORMS)
    m = cast(nn.BatchNorm2d, m)
    ref = m.weight if m.weight is not None else m.running_mean
    assert ref is not None
    m.num_features = ref.shape[0]
    return nn.Identity() if m.num_features == 0 else None


def _fix_groupnorm(m: nn.Module) -> nn.Module | None:
    assert isinstance(m, nn.GroupNorm)  # whole norm groups were removed (see rules)
    channels = m.weight.shape[0]
    m.num_groups = channels // (m.num_channels // m.num_groups)
    m.num_channels = channels
    return nn.Identity() if channels == 0 else None


def _fix_embedding(m: nn.Module) -> None:
    assert isinstance(m, nn.Embedding)
    m.embedding_dim = m.weight.shape[1]


def _fix_prelu(m: nn.Module) -> nn.Module | None:
    assert isinstance(m, nn.PReLU)
    m.num_parameters = m.weight.numel()
    return nn.Identity() if m.num_parameters == 0 else None


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
    groups: Sequence[Group],
    sizes: dict[tuple[str, int], int] | None = None,
    *,
    fold_empty: bool = False,
) -> dict[tuple[str, int], list[int]]:
    """``(tensor, axis) → indices`` removed for the prunable, all-zero groups.

    Unless ``fold_empty``, when removing every such group would leave a tensor with no channels
    along an axis, one of those zero groups is kept (the output is the same either way).
    """
    return _plan(groups, sizes, fold_empty)[0]


def _zero_indices(groups: Sequence[Group]) -> dict[tuple[str, int], set[int]]:
    """``(tensor, axis) → {indices whose slice is all zero}`` for every producing slice of
    ``groups`` (one pass per tensor instead of one ``index_select`` per group and tensor)."""
    out: dict[tuple[str, int], set[int]] = {}
    for g in groups:
        if not g.prunable:
            continue
        for (name, axis), t in g.tensors_by_slice("out").items():
            if (name, axis) not in out:
                nonzero = t.detach().ne(0).movedim(axis, 0).reshape(t.shape[axis], -1).any(1)
                out[(name, axis)] = set(torch.nonzero(~nonzero).flatten().tolist())
    return out


def _is_zero(g: Group, zero_index: dict[tuple[str, int], set[int]]) -> bool:
    return all(zero_index[key].issuperset(idx) for key, idx in g.slices("out").items())


def _plan(
    groups: Sequence[Group], sizes: dict[tuple[str, int], int] | None, fold_empty: bool
) -> tuple[dict[tuple[str, int], list[int]], list[Group]]:
    zero_index = _zero_indices(groups)
    removable = [g for g in groups if g.prunable and _is_zero(g, zero_index)]
    while True:
        plan: dict[tuple[str, int], set[int]] = defaultdict(set)
        for g in removable:
            for key, idx in g.slices().items():
                plan[key].update(idx)
        empty = [key for key, idx in plan.items() if sizes is not None and len(idx) >= sizes[key]]
        if fold_empty or not empty:
            return {k: sorted(v) for k, v in plan.items()}, removable
        keep = next(g for g in removable if empty[0] in g.slices())
        removable.remove(keep)


def _sizes(model: nn.Module, groups: Sequence[Group]) -> dict[tuple[str, int], int]:
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    return {key: tensors[key[0]].shape[key[1]] for g in groups for key in g.slices()}


@dataclass
class SlimPlan:
    """What :func:`slim` does to a model: the indices kept and the counted attributes set.

    * ``kept``: ``tensor name → [{"axis": a, "kept": [indices]}, ...]`` (an empty list of indices
      empties the layer, which is then folded);
    * ``attributes``: ``module attribute path → new value`` for the counters of removed groups
      (head counts).
    """

    kept: dict[str, list[dict[str, Any]]]
    attributes: dict[str, int]
    #: folded constants of shape ``(N, C, 1, …)`` (see :class:`~prunekit.structured.folded.FoldedConv`)
    broadcast_folds: bool = True

    @property
    def folds(self) -> bool:
        """Whether some layer loses all its channels."""
        return any(not e["kept"] for axes in self.kept.values() for e in axes)

    def spec(self) -> dict[str, Any]:
        """The JSON-ready spec that :func:`~prunekit.structured.io.load_slim` rebuilds from."""
        return {
            "format": SPEC_FORMAT,
            "version": SPEC_VERSION,
            "kept": self.kept,
            "attributes": self.attributes,
            "broadcast_folds": self.broadcast_folds,
        }


def slim_plan(model: nn.Module, groups: Sequence[Group], *, fold_empty: bool = False) -> SlimPlan:
    """The :class:`SlimPlan` of ``model`` for ``groups``, from one removal plan."""
    sizes = _sizes(model, groups)
    plan, removed = _plan(groups, sizes, fold_empty)
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
    return SlimPlan(dict(kept), attributes)


@torch.no_grad()
def apply_kept(
    model: nn.Module,
    kept: dict[str, list[dict[str, Any]]],
    copy_model: bool = False,
    attributes: dict[str, int] | None = None,
    broadcast_folds: bool = True,
) -> nn.Module:
    """Slice ``model``'s tensors to the ``kept`` indices, fix module attributes and set the counted
    ``attributes`` (head counts; in place unless ``copy_model``): what :func:`slim` and
    :func:`~prunekit.structured.io.load_slim` do."""
    replaced: dict[str, Tensor] = {}
    for name, axes in kept.items():
        module_name, _, attr = name.rpartition(".")
        t: Tensor = getattr(model.get_submodule(module_name), attr)
        sliced = t.detach()
        for entry in axes:
            index = torch.tensor(entry["kept"], dtype=torch.long, device=t.device)
            sliced = sliced.index_select(int(entry["axis"]), index)
        fresh = sliced if axes else sliced.clone()  # index_select already made a new tensor
        replaced[name] = (
            nn.Parameter(fresh, requires_grad=t.requires_grad)
            if isinstance(t, nn.Parameter)
            else fresh
        )
    if copy_model:  # the copy takes the sliced tensors directly (the full ones are never copied)
        memo: dict[int, Any] = {}
        for name, fresh in replaced.items():
            module_name, _, attr = name.rpartition(".")
            memo[id(getattr(model.get_submodule(module_name), attr))] = fresh
        new = copy.deepcopy(model, memo)
    else:
        new = model
    for path, value in (attributes or {}).items():
        owner, _, attr = path.rpartition(".")
        setattr(new.get_submodule(owner), attr, value)
    touched: set[str] = set()
    for name, fresh in replaced.items():
        module_name, _, attr = name.rpartition(".")
        module = new.get_submodule(module_name)
        if isinstance(fresh, nn.Parameter):
            module._parameters[attr] = fresh
        else:
            module._buffers[attr] = fresh
        touched.add(module_name)
    for module_name in sorted(touched, key=lambda n: -n.count(".")):  # children before parents
        module = new.get_submodule(module_name)
        if is_hf_conv1d(module):  # sliced: its nf no longer matches its weight
            _fix_transposed_linear(module)
            continue
        for types, fix in _FIXUPS:
            if isinstance(module, types):
                replacement = fix(module)
                if replacement is not None:
                    parent_name, _, child = module_name.rpartition(".")
                    setattr(new.get_submodule(parent_name), child, replacement)
                break
    for module in new.modules():
        if isinstance(module, FoldedConv):
            module.broadcast = broadcast_folds
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


#: Default exactness tolerance of the check: a fraction of the output's scale, compared in float64.
TOLERANCE = 1e-6
#: ``torch.allclose`` tolerances where the model cannot run in float64 (the check before float64).
_NATIVE_RTOL, _NATIVE_ATOL = 1e-4, 1e-5


def _to_double(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, list | tuple):
        return type(x)(_to_double(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_double(v) for k, v in x.items()}
    return x


def _differ(ref: list[Tensor], got: list[Tensor], tol: float | None) -> str | None:
    """Why ``got`` differs from ``ref``: ``max |got − ref| ≤ tol · max(1, max |ref|)`` per output
    (``tol=None``: the native ``allclose`` tolerances)."""
    if len(ref) != len(got):
        return f"{len(got)} outputs instead of {len(ref)}"
    for a, b in zip(ref, got, strict=True):
        if a.shape != b.shape:
            return f"output shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if not a.is_floating_point() or a.numel() == 0:
            if not torch.equal(a, b):
                return "non-floating-point output differs"
            continue
        diff = float((a - b).abs().max())
        if tol is None:
            if not torch.allclose(a, b, rtol=_NATIVE_RTOL, atol=_NATIVE_ATOL):
                return f"max |diff| {diff:.3g} (compared in {a.dtype})"
            continue
        scale = max(1.0, float(a.abs().max()))
        if not diff <= tol * scale:  # also refuses NaN
            return f"max |diff| {diff:.3g} > {tol:g} × {scale:.3g} (compared in float64)"
    return None


def _native_mismatch(model: nn.Module, new: nn.Module, inputs: tuple[Any, ...]) -> str | None:
    """The check in the models' own dtype (eval mode; the training flags are restored)."""
    with eval_mode(model, new):
        ref = _outputs(model, inputs)
        try:
            got = _outputs(new, inputs)
        except Exception as e:  # any failure of the slim forward is reported
            return f"slim forward failed: {type(e).__name__}: {e}"
    return _differ(ref, got, None)


def grouped_conv2d(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a grouped 2-d convolution with zero padding, as ``kh·kw`` batched products.

    ``y[n, g, o] = Σ_{i,j} Σ_a w[g, o, a, i, j] · x_pad[n, g, a, i·d_h + s_h·u, j·d_w + s_w·v]`` (+ bias):
    the same sum as ``F.conv2d`` in another order. On CPU, torch computes a float64 grouped
    convolution one conv group at a time (one call per channel for a depthwise conv), which made
    the float64 check of an EfficientNet take minutes; this takes ``kh·kw`` einsums.
    """
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    ph, pw = cast(tuple[int, int], conv.padding)  # a string padding is not routed here
    g, (sh, sw), (dh, dw) = conv.groups, conv.stride, conv.dilation
    out_c, a, kh, kw = conv.weight.shape
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    n, _, h, w = xp.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    xg = xp.reshape(n, g, a, h, w)
    wg = conv.weight.reshape(g, out_c // g, a, kh, kw)
    y = x.new_zeros(n, g, out_c // g, ho, wo)
    for i in range(kh):
        for j in range(kw):
            patch = xg[..., i * dh : i * dh + sh * (ho - 1) + 1 : sh,
                       j * dw : j * dw + sw * (wo - 1) + 1 : sw]  # fmt: skip
            y += torch.einsum("ngayx,gba->ngbyx", patch, wg[..., i, j])
    y = y.reshape(n, out_c, ho, wo)
    if conv.bias is not None:
        y = y + conv.bias.view(1, -1, 1, 1)
    return y.squeeze(0) if unbatched else y


def _double_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` in eval mode; each floating tensor is converted straight into
    the copy (not copied in its own dtype first)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and id(t) not in memo:
            wide = t.detach().double()
            memo[id(t)] = (
                nn.Parameter(wide, requires_grad=t.requires_grad)
                if isinstance(t, nn.Parameter)
                else wide
            )
    return copy.deepcopy(model, memo).double().eval()


def _fast_grouped_convs(model: nn.Module) -> nn.Module:
    """Route the grouped ``nn.Conv2d`` layers of ``model`` (a throw-away float64 copy) through
    :func:`grouped_conv2d`."""
    for m in model.modules():
        if (
            type(m) is nn.Conv2d
            and m.groups > 1
            and m.padding_mode == "zeros"
            and isinstance(m.padding, tuple)
        ):
            m.forward = MethodType(grouped_conv2d, m)  # type: ignore[method-assign]
    return model


@torch.no_grad()
def _mismatch(
    model: nn.Module, new: nn.Module, inputs: tuple[Any, ...], tol: float = TOLERANCE
) -> str | None:
    """Why ``new``'s outputs differ from ``model``'s on ``inputs`` (eval mode), or ``None``.

    Both run in float64 (copies cast with ``.double()``, floating-point inputs too), so the float32
    rounding of a deep network — which differs between the original and the narrower slim layers —
    does not count, while a wrong model (a removed channel that was not zero) differs by far more
    than ``tol · max(1, max |output|)``. A model whose forward cannot run in float64 (a dtype fixed
    in its code, a device without float64) is compared in its own dtype, as ``torch.allclose``
    with ``rtol=1e-4, atol=1e-5``.
    """
    try:
        wide = _fast_grouped_convs(_double_copy(model))
        wide_inputs = _to_double(inputs)
        ref = _outputs(wide, wide_inputs)
        del wide
        got = _outputs(_fast_grouped_convs(_double_copy(new)), wide_inputs)
    except Exception as e:  # the forward fixes a dtype, or the device lacks float64
        log.info("slim check in float64 failed (%s: %s); comparing in the model's dtype",
                 type(e).__name__, e)  # fmt: skip
        return _native_mismatch(model, new, inputs)
    return _differ(ref, got, tol)


@torch.no_grad()
def slim_with_plan(
    model: nn.Module,
    example_inputs: Sequence[Any] | Tensor,
    groups: Sequence[Group] | None = None,
    *,
    check: bool = True,
    tol: float = TOLERANCE,
) -> tuple[nn.Module, SlimPlan]:
    """:func:`slim`, and the :class:`SlimPlan` it applied (whose ``spec()`` :func:`save_slim`
    writes)."""
    inputs = example_args(example_inputs)
    groups = find_groups(model, inputs) if groups is None else groups
    plan = slim_plan(model, groups, fold_empty=True)
    if plan.folds:  # always verified: the model's own code may not run with an empty tensor
        for broadcast in (True, False):
            plan.broadcast_folds = broadcast
            try:  # a fixup may refuse an empty layer (a head count of 0, say)
                new = apply_kept(model, plan.kept, copy_model=True, attributes=plan.attributes,
                                 broadcast_folds=broadcast)  # fmt: skip
            except Exception as e:  # reported, then the plan that keeps one channel is used
                problem: str | None = f"folding failed: {type(e).__name__}: {e}"
            else:
                problem = _mismatch(model, new, inputs, tol)
            if problem is None:
                return new, plan
            log.info("folding emptied layers (broadcast=%s) failed: %s", broadcast, problem)
        plan = slim_plan(model, groups)  # one zero channel kept in each emptied layer
    new = apply_kept(model, plan.kept, copy_model=True, attributes=plan.attributes)
    if check:
        problem = _mismatch(model, new, inputs, tol)
        if problem is not None:
            raise SlimError(f"slim model output differs from the original ({problem})")
    return new, plan


def _perturb(x: Any, gen: torch.Generator) -> Any:
    if not isinstance(x, Tensor) or x.numel() == 0 or x.dtype == torch.bool:
        return x
    if x.is_floating_point():
        return x + torch.randn(x.shape, generator=gen).to(x)
    low, high = int(x.min()), int(x.max())
    return torch.randint(low, high + 1, x.shape, generator=gen).to(x)


@torch.no_grad()
def emptiable(
    model: nn.Module, groups: Sequence[Group], example_inputs: Sequence[Any] | Tensor
) -> list[bool]:
    """Per group: whether the layers it belongs to may lose *all* their channels.

    A *family* is the set of groups that remove channels of the same layers (a residual branch's
    inner channels, a stage's residual stream). Emptying a family is allowed when the output still
    depends on the input afterwards — a residual branch, whose skip path remains — and refused when
    every path goes through it (a plain chain, a stage's residual stream). Tested directly: the
    family is zeroed in a copy of the model (eval mode) and the outputs for the example inputs and
    for a perturbation of them must still differ (floating-point inputs get Gaussian noise, integer
    inputs such as token ids are redrawn within their observed range).
    """
    inputs = example_args(example_inputs)
    gen = torch.Generator().manual_seed(0)
    perturbed = tuple(_perturb(x, gen) for x in inputs)
    families: dict[tuple[tuple[str, int], ...], list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        if g.prunable:
            families[g.family].append(i)
    result = [False] * len(groups)
    for members in families.values():
        trial = copy.deepcopy(model).eval()
        tensors = dict([*trial.named_parameters(), *trial.named_buffers()])
        for i in members:
            groups[i].zero_(tensors)
        a, b = _outputs(trial, inputs), _outputs(trial, perturbed)
        alive = any(not torch.equal(x, y) for x, y in zip(a, b, strict=True))
        for i in members:
            result[i] = alive
    return result


def slim(
    model: nn.Module,
    example_inputs: Sequence[Any] | Tensor,
    groups: Sequence[Group] | None = None,
    *,
    check: bool = True,
    tol: float = TOLERANCE,
) -> nn.Module:
    """A new, smaller module without the zero groups of ``model``; ``model`` is not modified.

    Layers left with no channels are folded (see the module docstring), after checking that the
    folded model runs and matches on ``example_inputs``.

    Args:
        model: the group-sparse model.
        example_inputs: inputs for capture and for the output check.
        groups: groups from :func:`find_groups` (found again if ``None``).
        check: compare the slim and the original outputs on ``example_inputs`` (eval mode, in
            float64) and raise :class:`SlimError` if they differ by more than ``tol`` times the
            output's scale ``max(1, max |output|)``.
        tol: relative tolerance of that check (float64 rounding is ~1e-16; a wrong model is off by
            the contribution of a whole channel).
    """
    return slim_with_plan(model, example_inputs, groups, check=check, tol=tol)[0]
