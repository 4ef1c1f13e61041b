"""The ``quantization_config`` of a compressed-tensors ``config.json``: written for a compressed
model (:func:`quantization_config`, inside :func:`model_config`), read back scheme by scheme
(:func:`parse_scheme`, :func:`scheme_of`).

A quantized model gets one config group targeting the class ``"Linear"`` (llm-compressor's
convention, which vLLM and ``transformers`` match) and an ``ignore`` list naming every module with
a weight matrix that is not stored compressed; a layer with fewer inputs than ``group_size`` has
one grid per row and gets a per-channel group naming it, placed first (an exact name takes
precedence over a class in ``transformers`` and vLLM; compressed-tensors' checkpoint dequantizer
takes the groups in order). Only fields every recent compressed-tensors release knows are written. A sparse model gets
a ``sparsity_config`` and no config group.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from prunekit.posttrain.report import CompressionReport

__all__ = [
    "FORMATS",
    "QUANTIZED_FORMATS",
    "QUANT_METHOD",
    "SPARSE_FORMATS",
    "Scheme",
    "matches",
    "model_config",
    "parse_scheme",
    "quantization_config",
    "scheme_of",
]

QUANTIZED_FORMATS = ("pack-quantized", "int-quantized")
SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
FORMATS = (*QUANTIZED_FORMATS, *SPARSE_FORMATS, "dense")
QUANT_METHOD = "compressed-tensors"
#: the compressed-tensors release whose layout a file follows (its config's ``"version"``): the
#: one the quantized formats are checked against, the last one with the sparse compressors
LAYOUT_VERSION = {"quantized": "0.19.0", "sparse": "0.14.0"}


def quantization_config(
    model: nn.Module,
    fmt: str,
    chosen: list[str],
    state: dict[str, Tensor],
    report: CompressionReport,
) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json`` for the layers ``chosen``."""
    written = {name.rpartition(".")[0] for name in chosen}
    ignore = sorted(
        name
        for name, m in model.named_modules()
        if name
        and name not in written
        and isinstance(getattr(m, "weight", None), Tensor)
        and m.weight.dim() >= 2
    )
    common = {"quant_method": QUANT_METHOD}
    if fmt in SPARSE_FORMATS:
        zeros = sum(int((state[n] == 0).sum()) for n in chosen)
        return common | {
            "version": LAYOUT_VERSION["sparse"],
            "sparsity_config": {
                "format": fmt,
                "targets": ["Linear"],
                "ignore": ignore,
                "global_sparsity": zeros / sum(state[n].numel() for n in chosen),
                "sparsity_structure": "2:4" if fmt == "sparse-24-bitmask" else "unstructured",
            },
        }
    cfg = report.config
    group_size = cfg.get("group_size")
    per_channel = sorted(
        name.rpartition(".")[0]
        for name in chosen
        if group_size is not None and state[name].shape[1] < group_size
    )

    def scheme(targets: list[str], strategy: str, size: int | None) -> dict[str, Any]:
        weights = {
            "num_bits": int(cfg["bits"]),
            "type": "int",
            "symmetric": bool(cfg.get("sym", False)),
            "strategy": strategy,
            "group_size": size,
            "block_structure": None,
            "dynamic": False,
            "actorder": "weight" if cfg.get("act_order") else None,
            "observer": "mse" if cfg.get("mse") else "minmax",
            "observer_kwargs": {},
        }
        return {
            "targets": targets,
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
            "format": fmt,
        }

    groups = {}
    if per_channel:  # first: compressed-tensors' checkpoint dequantizer takes groups in order
        groups["group_0"] = scheme(per_channel, "channel", None)
    if len(per_channel) < len(chosen):
        main = "channel" if group_size is None else "group"
        groups[f"group_{len(groups)}"] = scheme(["Linear"], main, group_size)
    return common | {
        "version": LAYOUT_VERSION["quantized"],
        "config_groups": groups,
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
    }


def model_config(
    model: nn.Module, state: dict[str, Tensor], qconfig: dict[str, Any] | None
) -> dict[str, Any]:
    """The model's Hugging Face config as ``save_pretrained`` writes it (``{}`` for a model
    without one), with ``qconfig`` as its ``quantization_config``."""
    config: Any = getattr(model, "config", None)
    if callable(getattr(config, "to_json_string", None)):
        out = json.loads(config.to_json_string())
        if not out.get("architectures"):
            out["architectures"] = [type(model).__name__]
        floating = [t.dtype for t in state.values() if t.is_floating_point()]
        if "dtype" not in out and "torch_dtype" not in out and floating:
            out["dtype"] = str(floating[0]).removeprefix("torch.")
    else:
        out = {}
    out.pop("quantization_config", None)
    if qconfig is not None:
        out["quantization_config"] = qconfig
    return out


@dataclass(frozen=True)
class Scheme:
    """The weights scheme of one config group, as the reader needs it."""

    targets: tuple[str, ...]
    packed: bool
    bits: int
    symmetric: bool
    strategy: str
    group_size: int | None


def parse_scheme(name: str, group: Any, default_format: str | None) -> Scheme:
    """The config group ``name`` of a ``quantization_config`` (``default_format``: the config's
    own ``format``, for a group without one).

    Raises:
        ValueError: a group a dense state dict cannot come from (activation quantization,
            float or dynamic weights, a format or strategy other than the integer ones).
    """
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise ValueError(f"config group {name!r} has no weights scheme (preset names are not read)")
    if group.get("input_activations") or group.get("output_activations"):
        raise ValueError(f"config group {name!r} quantizes activations, which no state dict holds")
    w, fmt = group["weights"], group.get("format") or default_format
    if fmt not in ("pack-quantized", "int-quantized", "naive-quantized"):
        raise ValueError(f"config group {name!r} has format {fmt!r}, not an integer format read")
    bits, size = int(w.get("num_bits", 8)), w.get("group_size")
    if w.get("type", "int") != "int" or not 1 <= bits <= 8 or w.get("dynamic"):
        raise ValueError(f"config group {name!r}: only static int weights of 1-8 bits are read")
    strategy = w.get("strategy") or ("group" if size and size > 0 else "tensor")
    strategy = "channel" if strategy == "tensor" and size == -1 else strategy
    if strategy not in ("tensor", "channel", "group"):
        raise ValueError(f"config group {name!r}: strategy {strategy!r} is not read")
    return Scheme(
        tuple(group.get("targets", [])),
        fmt == "pack-quantized",
        bits,
        bool(w.get("symmetric", True)),
        strategy,
        size if strategy == "group" else None,
    )


def matches(module: str, target: str) -> bool:
    """compressed-tensors' name matching: ``re:`` a regular expression from the start, else the
    exact name."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


def scheme_of(module: str, schemes: list[Scheme], modules: set[str]) -> Scheme:
    """The scheme of ``module``: by exact name, else by regular expression, else by a class
    target (a target that names none of the checkpoint's ``modules``: without the model the
    classes are not known, so a class target stands for every module)."""
    tiers = [
        [s for s in schemes if module in s.targets],
        [s for s in schemes if any(t.startswith("re:") and matches(module, t) for t in s.targets)],
        [
            s
            for s in schemes
            if any(not t.startswith("re:") and t not in modules for t in s.targets)
        ],
    ]
    for tier in tiers:
        found = {(s.packed, s.bits, s.symmetric, s.strategy, s.group_size): s for s in tier}
        if len(found) > 1:
            raise ValueError(f"{module} matches config groups that disagree; cannot tell which")
        if found:
            return next(iter(found.values()))
    raise ValueError(f"{module} holds quantized weights that no config group targets")
