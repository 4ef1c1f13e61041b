"""Read a compressed-tensors model directory back into a dense state dict.

:func:`load_compressed` reads what :func:`~prunekit.export.compressed_tensors.save_compressed`
writes and what llm-compressor writes for integer weights: every layer stored compressed becomes
its dense ``weight``; every other tensor is returned as stored. It needs no model: a layer's
config group is found by compressed-tensors' rules on names (an exact name, then a ``re:``
regular expression matched from the start, then a class target such as ``"Linear"``, which
stands for every layer no name or expression claims), and the ``ignore`` list is honoured.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from prunekit.export import layouts
from prunekit.export.compressed_tensors import TIED_KEY
from prunekit.export.directory import read_directory
from prunekit.export.quantization_config import (
    QUANT_METHOD,
    matches,
    parse_scheme,
    scheme_of,
)
from prunekit.serialization import CheckpointError

__all__ = ["load_compressed"]


def load_compressed(directory: str | Path) -> dict[str, Tensor]:
    """The dense state dict of a compressed-tensors model directory: one written by
    :func:`~prunekit.export.compressed_tensors.save_compressed`, or by llm-compressor
    (``pack-quantized``, ``int-quantized`` or ``naive-quantized`` integer weights per tensor,
    channel or group, with or without a zero point), or ``sparse-bitmask`` /
    ``sparse-24-bitmask``. Dequantized weights are
    ``(q − zp) · scale`` in the dtype of the stored scale, as compressed-tensors computes them.

    Raises:
        CheckpointError: missing or damaged files, or what a state dict cannot hold
            (activation or kv-cache quantization, float formats, sparse and quantized stacked).
    """
    config, tensors, metadata = read_directory(directory)
    qcfg = config.get("quantization_config")
    try:
        if qcfg is not None:
            _decode(tensors, qcfg)
        for alias, kept in json.loads(metadata.get(TIED_KEY, "{}")).items():
            tensors[alias] = tensors[kept]
    except (ValueError, KeyError, TypeError) as exc:  # a damaged or foreign config
        raise CheckpointError(f"{directory}: {exc}") from None
    return tensors


def _decode(tensors: dict[str, Tensor], qcfg: dict[str, Any]) -> None:
    """Replace the compressed tensors of every layer by its dense ``weight``, in place."""
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"quant_method {qcfg.get('quant_method')!r} is not {QUANT_METHOD!r}")
    sparse = (qcfg.get("sparsity_config") or {}).get("format")
    groups = qcfg.get("config_groups") or {}
    if groups and sparse not in (None, "dense"):
        raise ValueError(f"{sparse} stacked on quantization is not read")
    if groups:
        _decode_quantized(tensors, qcfg, groups)
    elif sparse == "sparse-bitmask":
        for m in _modules_with(tensors, "bitmask"):
            entry = _pop(tensors, m, ["shape", "compressed", "bitmask", "row_offsets"])
            tensors[f"{m}.weight"] = _layer(m, layouts.bitmask_decode, entry)
    elif sparse == "sparse-24-bitmask":
        for m in _modules_with(tensors, "bitmask"):
            entry = _pop(tensors, m, ["shape", "compressed", "bitmask"])
            tensors[f"{m}.weight"] = _layer(m, layouts.sparse24_decode, entry)
    elif sparse not in (None, "dense"):
        raise ValueError(f"sparsity format {sparse!r} is not read")


def _modules_with(tensors: dict[str, Tensor], suffix: str) -> list[str]:
    return sorted({k[: -len(suffix) - 1] for k in tensors if k.endswith(f".{suffix}")})


def _pop(
    tensors: dict[str, Tensor], module: str, names: list[str], optional: tuple[str, ...] = ()
) -> dict[str, Tensor]:
    """The tensors ``module.name`` (removed from ``tensors``); a missing one is an error,
    unless it is ``optional``."""
    missing = [n for n in names if f"{module}.{n}" not in tensors]
    if missing:
        raise ValueError(f"{module}: {', '.join(missing)} missing")
    if f"{module}.weight" in tensors and "weight" not in names:
        raise ValueError(f"{module}: both a weight and its compressed form are stored")
    return {
        n: tensors.pop(f"{module}.{n}") for n in [*names, *optional] if f"{module}.{n}" in tensors
    }


def _layer(module: str, decode: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    try:
        return decode(*args, **kwargs)
    except ValueError as exc:
        raise ValueError(f"{module}: {exc}") from None


def _decode_quantized(
    tensors: dict[str, Tensor], qcfg: dict[str, Any], groups: dict[str, Any]
) -> None:
    if qcfg.get("kv_cache_scheme"):
        raise ValueError("kv-cache quantization is not read")
    schemes = [parse_scheme(n, g, qcfg.get("format")) for n, g in groups.items()]
    ignore = list(qcfg.get("ignore") or [])
    modules = {k.rpartition(".")[0] for k in tensors}
    for m in _modules_with(tensors, "weight_scale"):
        if any(matches(m, target) for target in ignore):
            continue
        s = scheme_of(m, schemes, modules)
        if f"{m}.weight_g_idx" in tensors:
            raise ValueError(f"{m}: a group index (weight_g_idx) is not read")
        names = ["weight_packed", "weight_shape"] if s.packed else ["weight"]
        entry = _pop(tensors, m, ["weight_scale", *names], optional=("weight_zero_point",))
        tensors[f"{m}.weight"] = _layer(
            m,
            layouts.quantized_decode,
            entry,
            s.bits,
            symmetric=s.symmetric,
            packed=s.packed,
            strategy=s.strategy,
            group_size=s.group_size,
        )
