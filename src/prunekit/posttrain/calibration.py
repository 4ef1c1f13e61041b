"""Calibration data for post-training compression: how one item becomes a model call.

An item is a tensor (one positional input), a tuple or list (positional inputs) or a mapping
(keyword inputs, so a tokenizer's output works as is). Tensors anywhere inside are moved to the
model's device; other values pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

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
        ValueError: the calibration set is empty.
    """
    calls = [to_device(as_call(item), device) for item in items]
    if not calls:
        raise ValueError("the calibration set is empty; pass at least one batch of model inputs")
    return calls
