"""Checks that stop a run early with a message instead of a traceback or a bad checkpoint.

* Before training (:func:`check_out_dir`, :func:`resolve_device`, :func:`build_recipe_model`): what
  the user controls is tried up front, so a read-only ``--out`` or a missing GPU is reported before
  an epoch is spent, as a :class:`~prunekit.config.ConfigError` saying what to change.
* During training (:func:`divergence`): a batch loss that is not finite, or above
  ``DIVERGENCE_FACTOR × max(1, L0)`` with ``L0`` the run's first batch loss, means the run diverged.
  A cross-entropy of 1000 × ln(10) ≈ 2300 on a 10-class task needs logits thousands apart: the run
  has exploded even if no value has overflowed yet, and that epoch must not be checkpointed.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from prunekit.config import ConfigError
from prunekit.data import ArrayDataset
from prunekit.models import build_model
from prunekit.training.recipe import Recipe

#: a batch loss above ``DIVERGENCE_FACTOR × max(1, first batch loss)`` counts as divergence
DIVERGENCE_FACTOR = 1000.0


class DivergenceError(RuntimeError):
    """The loss exploded (above ``DIVERGENCE_FACTOR`` × the initial loss); the last good checkpoint
    is left intact."""


class NonFiniteLossError(DivergenceError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a :class:`torch.device` that works here (``None``: CUDA when available, else CPU).

    Raises:
        ConfigError: an unknown device string, or a device this machine does not have.
    """
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"device {device!r} is not a device name ({exc}); use cpu, cuda or cuda:N"
        ) from None
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as exc:  # torch raises AssertionError without CUDA
        raise ConfigError(
            f"device {str(dev)!r} is not available on this machine ({' '.join(str(exc).split())}); "
            "use --device cpu or another device"
        ) from None
    return dev


def check_out_dir(out: Path) -> None:
    """Create ``out`` and make sure files can be written in it, before any training.

    Raises:
        ConfigError: ``out`` names a file, or cannot be created or written to.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {out} is a file; choose a directory for --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".prunekit-write-test."):
            pass
    except OSError as exc:
        raise ConfigError(
            f"output directory {out} is not writable ({exc.strerror or exc}); choose another --out"
        ) from None


def build_recipe_model(recipe: Recipe, data: ArrayDataset) -> nn.Module:
    """The recipe's model for ``data``; keyword arguments the model refuses are a ConfigError."""
    kwargs = recipe.model.kwargs
    try:
        return build_model(recipe.model.name, data.input_shape, data.num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        if not kwargs:
            raise
        raise ConfigError(
            f"model {recipe.model.name!r} refuses model.kwargs {kwargs} ({exc}); fix or remove them"
        ) from None


def divergence(loss: float, reference: float) -> str | None:
    """Why ``loss`` means the run diverged, or ``None`` if it did not.

    Diverged: ``loss`` is not finite, or ``loss > DIVERGENCE_FACTOR × max(1, reference)`` with
    ``reference`` the loss of the run's first batch.
    """
    if not math.isfinite(loss):
        return f"loss is {loss}"
    limit = DIVERGENCE_FACTOR * max(1.0, reference)
    if loss > limit:
        return (
            f"loss is {loss:.4g}, above the limit {limit:.4g} = {DIVERGENCE_FACTOR:g} x max(1, "
            f"first batch loss {reference:.4g}): the run diverged"
        )
    return None
