"""Atomic checkpoint files and the sparse export format.

* :func:`save_atomic` writes to a temporary file in the same directory, flushes it to disk and
  renames it over the target, so a crash never leaves a half-written checkpoint.
* :func:`load_checkpoint` refuses truncated files and files that are not prunekit checkpoints with a
  :class:`CheckpointError` that says which.
* :func:`save_sparse` / :func:`load_sparse`: a model file that stores, for each mostly-zero tensor,
  only its nonzero values and their flat positions, so a 98%-sparse model file is really ~25× smaller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prunekit.atomic import save_atomic

CHECKPOINT_FORMAT = "prunekit-checkpoint"
SPARSE_FORMAT = "prunekit-sparse"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A file is missing, truncated, corrupt or not the expected prunekit format."""


def _load(path: str | Path, expected: str) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} cannot be read as a torch file ({type(exc).__name__}: {str(exc)[:200]}); "
            "it is truncated, corrupt or not a checkpoint"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != expected:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} is not a {expected} file (found format {found!r})")
    if obj.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {obj['version']}, this prunekit reads <= {FORMAT_VERSION}"
        )
    return obj


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Save a training checkpoint (a dict of plain data and tensors) atomically."""
    save_atomic({"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, **state}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint written by :func:`save_checkpoint`."""
    return _load(path, CHECKPOINT_FORMAT)


def save_sparse(
    state_dict: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, Any] | None = None
) -> None:
    """Save a state dict storing mostly-zero floating tensors as (flat int32 positions, values).

    A tensor is stored sparsely when that is smaller than storing it densely (density below ~50%).
    """
    tensors: dict[str, Any] = {}
    for name, t in state_dict.items():
        t = t.detach().cpu()
        if t.is_floating_point() and t.numel() > 0:
            flat = t.reshape(-1)
            idx = torch.nonzero(flat, as_tuple=True)[0]
            if idx.numel() * (4 + t.element_size()) < flat.numel() * t.element_size():
                tensors[name] = {
                    "shape": list(t.shape),
                    "indices": idx.to(torch.int32),
                    "values": flat[idx].clone(),
                }
                continue
        tensors[name] = {"dense": t.clone()}
    save_atomic(
        {
            "format": SPARSE_FORMAT,
            "version": FORMAT_VERSION,
            "tensors": tensors,
            "metadata": dict(metadata or {}),
        },
        path,
    )


def load_sparse(path: str | Path) -> dict[str, Tensor]:
    """Read a file written by :func:`save_sparse` back into a dense state dict.

    Every entry is checked before use (shape, index range, lengths, dtypes), so a damaged or crafted
    file raises :class:`CheckpointError` naming the tensor, never a raw ``IndexError``/``KeyError``.
    """
    obj = _load(path, SPARSE_FORMAT)
    tensors = obj.get("tensors")
    if not isinstance(tensors, dict):
        raise CheckpointError(
            f"{path}: 'tensors' must be a dict of entries, got {type(tensors).__name__}"
        )
    return {str(name): _sparse_entry(path, str(name), entry) for name, entry in tensors.items()}


def read_sparse_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata`` stored by :func:`save_sparse` (e.g. the training recipe of a run)."""
    meta = _load(path, SPARSE_FORMAT).get("metadata", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: 'metadata' must be a dict, got {type(meta).__name__}")
    return meta


def _sparse_entry(path: str | Path, name: str, entry: Any) -> Tensor:
    """One validated tensor of a sparse file."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: tensor {name!r} {why}; the file is damaged or not written by save_sparse"
        )

    if not isinstance(entry, dict):
        raise bad(f"is a {type(entry).__name__}, not an entry dict")
    if set(entry) == {"dense"}:
        if not isinstance(entry["dense"], Tensor):
            raise bad("has a 'dense' value that is not a tensor")
        return entry["dense"]
    if set(entry) != {"shape", "indices", "values"}:
        raise bad(f"has keys {sorted(entry)}, expected ['dense'] or ['indices', 'shape', 'values']")
    shape, indices, values = entry["shape"], entry["indices"], entry["values"]
    if not (
        isinstance(shape, list | tuple)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise bad(f"has shape {shape!r}, expected a list of non-negative ints")
    if not isinstance(values, Tensor) or values.dim() != 1 or not values.is_floating_point():
        raise bad("has 'values' that is not a 1-D floating tensor")
    if (
        not isinstance(indices, Tensor)
        or indices.dim() != 1
        or indices.dtype not in (torch.int32, torch.int64)
    ):
        raise bad("has 'indices' that is not a 1-D int32/int64 tensor")
    if indices.numel() != values.numel():
        raise bad(f"has {indices.numel()} indices but {values.numel()} values")
    numel = math.prod(shape)
    idx = indices.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise bad(
            f"has indices in [{int(idx.min())}, {int(idx.max())}], outside [0, {numel}) for shape {list(shape)}"
        )
    if torch.unique(idx).numel() != idx.numel():
        raise bad("has repeated indices")
    flat = torch.zeros(numel, dtype=values.dtype)
    flat[idx] = values
    return flat.view(list(shape))
