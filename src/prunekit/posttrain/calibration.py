"""Calibration data for post-training compression: how one item becomes a model call.

An item is a tensor (one positional input), a tuple or list (positional inputs) or a mapping
(keyword inputs, so a tokenizer's output works as is). Tensors anywhere inside are moved to the
model's device; other values pass through unchanged.

:func:`prepare_calibration` refuses, with one line naming the item, what cannot be a calibration
set: a single tensor or mapping (one batch, not an iterable of batches), a non-iterable, an empty
set, an item of another type, and NaN in any floating-point tensor of an item. An infinity is
not refused here: an additive attention mask holds ``-inf`` legitimately; an infinity that reaches
a target layer's input is refused during the walk (:mod:`~prunekit.posttrain.checks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.config import ConfigError

Call = tuple[tuple[Any, ...], dict[str, Any]]


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def as_call(item: Any) -> Call:
    """``(args, kwargs)`` of the model call for one calibration item.

    Raises:
        TypeError: the item is none of tensor, tuple/list or mapping.
    """
    if isinstance(item, Tensor):
        return (item,), {}
    if isinstance(item, tuple | list):
        return tuple(item), {}
    if isinstance(item, Mapping):
        if not all(isinstance(k, str) for k in item):
            raise TypeError("a mapping calibration item needs string keys (keyword argument names)")
        return (), dict(item)
    raise TypeError(
        "a calibration item must be a tensor (one input), a tuple of positional inputs or a dict "
        f"of keyword inputs, got {type(item).__name__}"
    )


def batch_size(call: Call) -> int | None:
    """The common first dimension of a call's top-level tensors (``None`` if they disagree or
    there is none)."""
    args, kwargs = call
    sizes = {t.shape[0] for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without either."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def prepare_calibration(items: Iterable[Any], device: torch.device) -> list[Call]:
    """All calibration items as model calls on ``device`` (the set is materialised once).

    Raises:
        ConfigError: ``items`` is a single batch (a tensor, a mapping) or not iterable; the set
            is empty; an item holds NaN.
        TypeError: an item is none of tensor, tuple/list or mapping (the message names it).
    """
    _check_collection(items)
    calls = []
    for index, item in enumerate(items):
        try:
            call = as_call(item)
        except TypeError as exc:
            raise TypeError(f"calibration item {index}: {exc}") from None
        call = to_device(call, device)
        _check_no_nan(index, call)
        calls.append(call)
    if not calls:
        raise ConfigError(
            "the calibration set is empty (an exhausted iterator is empty too); pass at least "
            "one batch of model inputs"
        )
    return calls


def _check_collection(items: Any) -> None:
    """Refuse a calibration "set" that is one batch, or that cannot be iterated."""
    if isinstance(items, Tensor):
        raise ConfigError(
            "calibration must be an iterable of batches, got a single tensor of shape "
            f"{tuple(items.shape)} (iterating over it would give its rows as batches); wrap a "
            "single batch as [x]"
        )
    if isinstance(items, Mapping):
        raise ConfigError(
            "calibration must be an iterable of batches, got a single mapping (one batch of "
            "keyword inputs, e.g. a tokenizer's output); wrap a single batch as [batch]"
        )
    if isinstance(items, str | bytes):
        raise ConfigError(
            f"calibration must be an iterable of batches of model inputs, got a {type(items).__name__}"
        )
    try:
        iter(items)
    except TypeError:
        raise ConfigError(
            "calibration must be an iterable of batches (a list, a DataLoader, ...), got "
            f"{type(items).__name__}; wrap a single batch as [x]"
        ) from None


def tensors_of(obj: Any, where: str) -> Iterator[tuple[str, Tensor]]:
    """``(where, tensor)`` for every tensor inside ``obj`` (tuples, lists, mappings), each with
    its place, e.g. ``"input 0"`` or ``"input 'mask'"``."""
    if isinstance(obj, Tensor):
        yield where, obj
    elif isinstance(obj, tuple | list):
        for i, o in enumerate(obj):
            yield from tensors_of(o, f"{where}[{i}]")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from tensors_of(v, f"{where}[{k!r}]")


def call_tensors(call: Call) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of a prepared call with its place: ``"input 0"``, ``"input 'mask'"``."""
    args, kwargs = call
    for i, a in enumerate(args):
        yield from tensors_of(a, f"input {i}")
    for k, v in kwargs.items():
        yield from tensors_of(v, f"input {k!r}")


def describe(call: Call) -> str:
    """The shapes and dtypes of a call's tensors, for error messages:
    ``"input 0: (8, 100) float32"``."""
    parts = [
        f"{where}: {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        for where, t in call_tensors(call)
    ]
    return ", ".join(parts) if parts else "no tensors"


def _check_no_nan(index: int, call: Call) -> None:
    """Refuse NaN in any floating-point tensor of calibration item ``index``."""
    for where, t in call_tensors(call):
        if (t.is_floating_point() or t.is_complex()) and bool(torch.isnan(t).any()):
            count = int(torch.isnan(t).sum())
            raise ConfigError(
                f"calibration item {index}: {where} of shape {tuple(t.shape)} holds {count} NaN "
                f"value{'s' if count != 1 else ''}; drop or clean that batch (NaN inputs would "
                "corrupt every layer's statistics)"
            )


def first_non_finite(call: Call) -> str | None:
    """The place of the first floating-point tensor of ``call`` that holds NaN or inf."""
    for where, t in call_tensors(call):
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return where
    return None


def token_mask(call: Call) -> Tensor | None:
    """The token positions that count in layer statistics: ``attention_mask != 0`` when the call's
    keyword inputs carry a 2-D ``attention_mask`` (batch, sequence), as a tokenizer's padded
    batch does; ``None`` (every position counts) otherwise."""
    mask = call[1].get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return mask != 0
    return None
