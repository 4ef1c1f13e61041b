"""The training checkpoint of a run: model (with masks), optimizer, pruner, RNG and history.

Written atomically at the end of every epoch (:func:`save_checkpoint`), so a crash never leaves a
half-written file; :func:`load_checkpoint` refuses truncated and foreign files with a one-line
:class:`~prunekit.serialization.CheckpointError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunekit.atomic import save_atomic
from prunekit.serialization import CheckpointError, load_prunekit_file

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "prunekit-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Save a training checkpoint (a dict of plain data and tensors) atomically."""
    save_atomic({"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, **state}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint written by :func:`save_checkpoint`."""
    return load_prunekit_file(path, CHECKPOINT_FORMAT, FORMAT_VERSION)
