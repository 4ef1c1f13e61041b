"""Saving and loading slim models without pickling code.

A slim model is described by a JSON *spec* — for every sliced tensor, the axis and the indices kept,
and the new values of counted attributes such as head counts — plus an ordinary state dict.
:func:`load_slim` rebuilds the slim architecture on a fresh instance of the original class (the same
slicing and attribute updates as :func:`~prunekit.structured.slim`) and loads the weights, so no
Python objects are unpickled (``torch.load(weights_only=True)``).

Saving is atomic: the weights go to a new, uniquely named file first, then ``spec.json`` — which
names that file — replaces the old spec in one rename. A failure at any point (a full disk) leaves
the previous export in the directory loadable and unchanged.

Loading trusts nothing in the spec: the version, every tensor name, axis and index and every
attribute are checked against the fresh model (only head counts that a view/reshape follows, lowered,
may be set), and the weights must match the rebuilt shapes and be finite (a NaN/±Inf is allowed
only where the fresh model's own tensor of that name has one, as a −inf attention-mask buffer).
Anything else is a :class:`SlimSpecError`.

A failed load leaves the fresh model exactly as it was: the spec and the weights file are read and
checked first; the model is slimmed only after every module's bindings (attributes, parameters,
buffers, submodules) are recorded, and they are put back on any error. That is a complete undo
because slimming only rebinds — it slices into new tensors and never writes into the old ones —
and the weights are copied into the model only after they have passed every check.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import nn

from prunekit.atomic import fsync_dir, save_atomic, write_atomic
from prunekit.structured.groups import Group
from prunekit.structured.heads import drives_reshape_literal
from prunekit.structured.slim import SPEC_FORMAT, SPEC_VERSION, apply_kept, slim_with_plan

__all__ = ["SPEC_FORMAT", "SlimSpecError", "load_slim", "save_slim", "slim_spec"]

log = logging.getLogger(__name__)

_SPEC = "spec.json"
#: weights file of version-1 specs, which do not name theirs
_LEGACY_WEIGHTS = "weights.pt"
_WEIGHTS = re.compile(r"weights(-[0-9a-f]+)?\.pt")
_KEYS = {"format", "version", "kept", "attributes", "broadcast_folds", "weights"}


class SlimSpecError(ValueError):
    """A saved slim model (spec or weights) is not one :func:`save_slim` wrote for this model."""


def slim_spec(
    model: nn.Module, groups: Sequence[Group], example_inputs: Sequence[Any] | torch.Tensor
) -> dict[str, Any]:
    """The JSON-ready spec of the slim model :func:`~prunekit.structured.slim` builds (the inputs
    decide whether emptied layers can be folded); ``slim_with_plan(...)[1].spec()`` gives the same
    without slimming twice."""
    return slim_with_plan(model, example_inputs, groups, check=False)[1].spec()


def save_slim(slim_model: nn.Module, spec: dict[str, Any], directory: str | Path) -> None:
    """Write ``spec.json`` and the weights (tensors only) into ``directory``, atomically.

    The weights go to a new ``weights-<id>.pt``; then ``spec.json``, which names it, replaces the
    previous spec in one rename (the commit point); only then are older weight files removed. If
    any step fails the previous export still loads, unchanged.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights = f"weights-{uuid.uuid4().hex[:16]}.pt"
    state = {k: v.detach().cpu() for k, v in slim_model.state_dict().items()}
    text = json.dumps({**spec, "weights": weights}, indent=1).encode()
    try:
        save_atomic(state, out / weights)
        write_atomic(out / _SPEC, lambda f: f.write(text))
    except BaseException:
        (out / weights).unlink(missing_ok=True)
        raise
    fsync_dir(out)
    for old in out.iterdir():
        if old.name != weights and _WEIGHTS.fullmatch(old.name):
            old.unlink(missing_ok=True)


def _int(value: Any) -> TypeGuard[int]:
    return type(value) is int  # not bool


def _check_kept(kept: Any, tensors: dict[str, torch.Tensor], where: str) -> None:
    if not isinstance(kept, dict):
        raise SlimSpecError(f"{where}: 'kept' must be an object, not {type(kept).__name__}")
    for name, axes in kept.items():
        if name not in tensors:
            raise SlimSpecError(
                f"{where}: 'kept' names {name!r}, which is not a parameter or buffer of the model"
            )
        t = tensors[name]
        if not isinstance(axes, list) or not axes:
            raise SlimSpecError(f"{where}: kept[{name!r}] must be a non-empty list of axes")
        seen: set[int] = set()
        for entry in axes:
            if not isinstance(entry, dict) or set(entry) != {"axis", "kept"}:
                raise SlimSpecError(
                    f"{where}: kept[{name!r}] entries must be {{'axis': int, 'kept': [int]}}"
                )
            axis, idx = entry["axis"], entry["kept"]
            if not _int(axis) or not 0 <= axis < t.dim() or axis in seen:
                raise SlimSpecError(
                    f"{where}: kept[{name!r}] has axis {axis!r}; {name} has {t.dim()} dims and "
                    "each axis may appear once"
                )
            seen.add(axis)
            size = t.shape[axis]
            if not isinstance(idx, list) or not all(_int(i) and 0 <= i < size for i in idx):
                raise SlimSpecError(
                    f"{where}: kept[{name!r}] axis {axis} must list integer indices in "
                    f"[0, {size}) (the model's size of that axis)"
                )
            if any(a >= b for a, b in itertools.pairwise(idx)):
                raise SlimSpecError(
                    f"{where}: kept[{name!r}] axis {axis} indices must be increasing, without repeats"
                )


def _check_attributes(attributes: Any, model: nn.Module, where: str) -> None:
    if not isinstance(attributes, dict):
        raise SlimSpecError(f"{where}: 'attributes' must be an object")
    for path, value in attributes.items():
        owner, _, attr = str(path).rpartition(".")
        try:
            current = vars(model.get_submodule(owner)).get(attr)
        except AttributeError:
            current = None
        if not _int(current) or not drives_reshape_literal(model, str(path)):
            raise SlimSpecError(
                f"{where}: attribute {path!r} is not one slim records (only integer head counts "
                "that a view/reshape of the forward follows can be set)"
            )
        if not _int(value) or not 0 <= value <= current:
            raise SlimSpecError(
                f"{where}: attribute {path!r} = {value!r}; slim only lowers it (0 … {current})"
            )


def _read_spec(src: Path, model: nn.Module) -> dict[str, Any]:
    where = str(src / _SPEC)
    try:
        spec = json.loads((src / _SPEC).read_text())
    except (OSError, ValueError) as e:
        raise SlimSpecError(f"{where} cannot be read as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise SlimSpecError(f"{where} is not a {SPEC_FORMAT} spec")
    version = spec.get("version")
    if not _int(version) or not 1 <= version <= SPEC_VERSION:
        raise SlimSpecError(
            f"{where} has version {version!r}; this prunekit reads versions 1 to {SPEC_VERSION}"
        )
    unknown = set(spec) - _KEYS
    if unknown:
        raise SlimSpecError(f"{where} has unknown keys {sorted(unknown)}")
    if not isinstance(spec.get("broadcast_folds", True), bool):
        raise SlimSpecError(f"{where}: 'broadcast_folds' must be true or false")
    weights = spec.setdefault("weights", _LEGACY_WEIGHTS)
    if not isinstance(weights, str) or not _WEIGHTS.fullmatch(weights):
        raise SlimSpecError(f"{where}: 'weights' must name a weights file in the same directory")
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    _check_kept(spec.get("kept"), tensors, where)
    _check_attributes(spec.get("attributes", {}), model, where)
    return spec


def load_slim(fresh_model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild the slim model on ``fresh_model`` (a new instance of the original class) and load it.

    ``fresh_model`` is slimmed in place and returned. On any error it is left exactly as it was
    (same modules, attributes and tensors, bitwise).

    Raises:
        SlimSpecError: the spec or the weights are not a slim export of this model (see the module
            docstring for what is checked).
    """
    src = Path(directory)
    spec = _read_spec(src, fresh_model)
    path = src / spec["weights"]
    state = _read_weights(path, fresh_model)
    bindings = _bindings(fresh_model)
    try:
        model = apply_kept(fresh_model, spec["kept"], attributes=spec.get("attributes"),
                           broadcast_folds=spec.get("broadcast_folds", True))  # fmt: skip
        _check_weights(path, state, model.state_dict())
        model.load_state_dict(state)
    except BaseException:
        _restore(bindings)
        raise
    return model


def _read_weights(path: Path, fresh_model: nn.Module) -> dict[Any, Any]:
    """The weights file as a dict, refused unless its tensors are finite (see the module docstring)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SlimSpecError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict):
        raise SlimSpecError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    fresh: dict[str, torch.Tensor] | None = None
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or bool(torch.isfinite(t).all()):
            continue
        fresh = fresh_model.state_dict(keep_vars=True) if fresh is None else fresh
        own = fresh.get(name)
        if isinstance(own, torch.Tensor) and not bool(torch.isfinite(own).all()):
            continue  # a constant the model itself holds non-finite (a −inf mask buffer)
        bad = int((~torch.isfinite(t)).sum())
        raise SlimSpecError(
            f"{path}: {name} holds {bad} NaN/Inf of {t.numel()} values; refusing to load "
            "non-finite weights"
        )
    return state


def _check_weights(path: Path, state: dict[Any, Any], expected: dict[str, torch.Tensor]) -> None:
    """``state`` has exactly the rebuilt model's tensor names and shapes."""
    if set(state) != set(expected):
        raise SlimSpecError(
            f"{path} holds tensors {sorted(state)}, the rebuilt slim model {sorted(expected)}"
        )
    for name, t in expected.items():
        got = state[name]
        if not isinstance(got, torch.Tensor) or got.shape != t.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise SlimSpecError(
                f"{path}: {name} has shape {shape} but the spec gives {tuple(t.shape)}"
            )


#: one module's attribute dict, and the contents of the dicts in it (``_parameters``, …)
_Binding = tuple[nn.Module, dict[str, Any], dict[str, dict[Any, Any]]]


def _bindings(model: nn.Module) -> list[_Binding]:
    """What :func:`~prunekit.structured.slim.apply_kept` may rebind in ``model``: every module's
    attributes and the contents of its registries (parameters, buffers, submodules, hooks)."""
    out = []
    for module in model.modules():
        attrs = dict(vars(module))
        registries = {k: dict(v) for k, v in attrs.items() if isinstance(v, dict)}
        out.append((module, attrs, registries))
    return out


def _restore(bindings: list[_Binding]) -> None:
    """Put back :func:`_bindings` (the registries are refilled in place: same dict objects)."""
    for module, attrs, registries in bindings:
        current = vars(module)
        current.clear()
        current.update(attrs)
        for key, contents in registries.items():
            registry = attrs[key]
            registry.clear()
            registry.update(contents)
