"""prunekit's model files: the sparse export format and the checks every prunekit file passes.

:func:`save_sparse` stores each floating tensor in the smallest of three encodings, per tensor:

* ``dense``: the tensor itself, ``4n`` bytes (fp32);
* ``indices``: int32 flat positions of the nonzeros and their values, ``(4 + 4)·nnz`` bytes, the
  smallest at density ``d = nnz/n`` below ``1/32``;
* ``bitmask``: one bit per element (``n/8`` bytes, packed little-endian bit order) and the values,
  ``n/8 + 4·nnz`` bytes, the smallest for ``1/32 < d < 7/8``.

So a 50%-sparse model file is ~53% of the dense one and a 98%-sparse one ~4%. Every prunekit file
is a ``torch.save`` of ``{"format": ..., "version": ..., ...}`` read with ``weights_only=True``;
:func:`load_prunekit_file` refuses a missing, truncated or foreign file with one
:class:`CheckpointError` line. :func:`load_sparse` checks every entry (shape, index range, lengths,
dtypes, finite values) so a damaged or crafted file never gives a raw ``IndexError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prunekit.atomic import save_atomic

__all__ = [
    "SPARSE_FORMAT",
    "CheckpointError",
    "load_prunekit_file",
    "load_sparse",
    "read_sparse_metadata",
    "save_sparse",
]

SPARSE_FORMAT = "prunekit-sparse"
#: version 2 adds the ``bitmask`` encoding; version-1 files (dense and indices) still load
FORMAT_VERSION = 2
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


class CheckpointError(RuntimeError):
    """A file is missing, truncated, corrupt or not the expected prunekit format."""


def load_prunekit_file(path: str | Path, expected: str, max_version: int) -> dict[str, Any]:
    """The dict stored in ``path`` if it is a prunekit file of format ``expected``.

    Raises:
        CheckpointError: missing, unreadable (truncated, not a torch file, a pickled object), another
            format or a newer version; one line saying which.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} cannot be read as a torch file ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:160]}); it is truncated, corrupt or not a checkpoint"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != expected:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} is not a {expected} file (found format {found!r})")
    if obj.get("version", 0) > max_version:
        raise CheckpointError(
            f"{path} has format version {obj['version']}, this prunekit reads <= {max_version}"
        )
    return obj


def _pack_bits(mask: Tensor) -> Tensor:
    """``mask`` (1-D bool) as uint8 bytes, element ``i`` in bit ``i % 8`` of byte ``i // 8``."""
    pad = (-mask.numel()) % 8
    bits = torch.cat([mask, mask.new_zeros(pad)]).view(-1, 8).to(torch.uint8)
    return (bits * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`_pack_bits`: the first ``numel`` bits as a bool tensor."""
    bits = packed.unsqueeze(1).bitwise_and(_BIT_WEIGHTS).ne(0)
    return bits.reshape(-1)[:numel]


def _encode(t: Tensor) -> dict[str, Any]:
    """The smallest encoding of one tensor (see the module docstring)."""
    t = t.detach().cpu()
    if not t.is_floating_point() or t.numel() == 0:
        return {"dense": t.clone()}
    flat = t.reshape(-1)
    nonzero = flat != 0
    nnz, n, size = int(nonzero.sum()), flat.numel(), t.element_size()
    costs = {
        "dense": n * size,
        "indices": nnz * (4 + size),
        "bitmask": (n + 7) // 8 + nnz * size,
    }
    best = min(costs, key=lambda k: (costs[k], k != "dense"))  # ties: dense
    if best == "dense":
        return {"dense": t.clone()}
    values = flat[nonzero].clone()
    if best == "indices":
        idx = torch.nonzero(nonzero, as_tuple=True)[0].to(torch.int32)
        return {"shape": list(t.shape), "indices": idx, "values": values}
    return {"shape": list(t.shape), "bitmask": _pack_bits(nonzero), "values": values}


def save_sparse(
    state_dict: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, Any] | None = None
) -> None:
    """Save a state dict, each floating tensor in its smallest encoding, atomically."""
    save_atomic(
        {
            "format": SPARSE_FORMAT,
            "version": FORMAT_VERSION,
            "tensors": {name: _encode(t) for name, t in state_dict.items()},
            "metadata": dict(metadata or {}),
        },
        path,
    )


def load_sparse(path: str | Path) -> dict[str, Tensor]:
    """Read a file written by :func:`save_sparse` back into a dense state dict.

    Raises:
        CheckpointError: the file or one of its entries is damaged (the message names the tensor).
    """
    obj = load_prunekit_file(path, SPARSE_FORMAT, FORMAT_VERSION)
    tensors = obj.get("tensors")
    if not isinstance(tensors, dict):
        raise CheckpointError(
            f"{path}: 'tensors' must be a dict of entries, got {type(tensors).__name__}"
        )
    return {str(name): _decode(path, str(name), entry) for name, entry in tensors.items()}


def read_sparse_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata`` stored by :func:`save_sparse` (e.g. the training recipe of a run)."""
    meta = load_prunekit_file(path, SPARSE_FORMAT, FORMAT_VERSION).get("metadata", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: 'metadata' must be a dict, got {type(meta).__name__}")
    return meta


def _decode(path: str | Path, name: str, entry: Any) -> Tensor:
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
    keys = set(entry)
    if keys not in ({"shape", "indices", "values"}, {"shape", "bitmask", "values"}):
        raise bad(
            f"has keys {sorted(entry)}, expected ['dense'], ['indices', 'shape', 'values'] or "
            "['bitmask', 'shape', 'values']"
        )
    shape, values = entry["shape"], entry["values"]
    if not (
        isinstance(shape, list | tuple)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise bad(f"has shape {shape!r}, expected a list of non-negative ints")
    if not isinstance(values, Tensor) or values.dim() != 1 or not values.is_floating_point():
        raise bad("has 'values' that is not a 1-D floating tensor")
    numel = math.prod(shape)
    flat = torch.zeros(numel, dtype=values.dtype)
    if "bitmask" in entry:
        packed = entry["bitmask"]
        if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
            raise bad("has a 'bitmask' that is not a 1-D uint8 tensor")
        if packed.numel() != (numel + 7) // 8:
            raise bad(f"has a bitmask of {packed.numel()} bytes, expected {(numel + 7) // 8}")
        mask = _unpack_bits(packed, numel)
        if int(mask.sum()) != values.numel():
            raise bad(f"has {int(mask.sum())} bits set but {values.numel()} values")
        flat[mask] = values
        return flat.view(list(shape))
    indices = entry["indices"]
    if (
        not isinstance(indices, Tensor)
        or indices.dim() != 1
        or indices.dtype not in (torch.int32, torch.int64)
    ):
        raise bad("has 'indices' that is not a 1-D int32/int64 tensor")
    if indices.numel() != values.numel():
        raise bad(f"has {indices.numel()} indices but {values.numel()} values")
    idx = indices.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise bad(
            f"has indices in [{int(idx.min())}, {int(idx.max())}], outside [0, {numel}) for "
            f"shape {list(shape)}"
        )
    if torch.unique(idx).numel() != idx.numel():
        raise bad("has repeated indices")
    flat[idx] = values
    return flat.view(list(shape))
