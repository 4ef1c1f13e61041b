"""Integer export of a quantized model: codes, scales and zero points instead of floats.

After ``prunekit.compress(..., bits=b)`` the model holds dequantized weights
``scale · (code − zero)``. :func:`save_quantized` stores, for every quantized layer, the integer
``code`` (one ``uint8`` per weight), and per output row (or group of ``group_size`` inputs) the
float ``scale`` and the integer ``zero``; every other tensor is stored as is. :func:`load_quantized`
rebuilds the exact dequantized state dict. Written atomically. Any grid of
:mod:`prunekit.posttrain.grid` exports the same way; the file's ``"sym"`` says whether the grids
are symmetric (``zero = 2^(bits-1)`` in every row and group, which a kernel can take as a constant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.atomic import save_atomic
from prunekit.core.targets import is_transposed_linear
from prunekit.posttrain.layers import matrices_to_weight
from prunekit.posttrain.quant import expand_grid
from prunekit.posttrain.report import CompressionReport

__all__ = ["QUANTIZED_FORMAT", "load_quantized", "save_quantized"]

QUANTIZED_FORMAT = "prunekit-quantized"
_VERSION = 1


def save_quantized(
    model: nn.Module,
    report: CompressionReport,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Write the integer export of ``model`` compressed with ``bits`` (see the module docstring).

    Returns:
        The file size in bytes.

    Raises:
        ValueError: the report has no quantization grids (the model was not quantized), or a
            weight is no longer on its grid (it was changed after compression).
    """
    if not report.grids:
        raise ValueError("the report holds no quantization grids: compress with bits=... first")
    bits = int(report.config["bits"])
    group_size = report.config.get("group_size")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    layers: dict[str, Any] = {}
    for name, grids in report.grids.items():
        weight = state.pop(name)
        # a weight stored (in, out) (transformers' Conv1D): its matrix, and the codes, are weight.T
        transposed = is_transposed_linear(model.get_submodule(name.rpartition(".")[0]))
        matrix_weight = weight.t() if transposed else weight
        dequantized = torch.stack(
            [_dequantize(q.codes, q.scale, q.zero, group_size) for q in grids]
        )
        if not torch.equal(
            matrices_to_weight(dequantized, tuple(matrix_weight.shape)).to(weight.dtype),
            matrix_weight,
        ):
            raise ValueError(
                f"{name} is no longer on its quantization grid (changed after compression, e.g. "
                "by fine-tuning); compress again before exporting"
            )
        layers[name] = {
            "shape": list(matrix_weight.shape),
            "transposed": transposed,
            "dtype": str(weight.dtype).removeprefix("torch."),
            "codes": torch.stack([q.codes for q in grids]),
            "scale": torch.stack([q.scale for q in grids]),
            "zero": torch.stack([q.zero for q in grids]),
        }
    save_atomic(
        {
            "format": QUANTIZED_FORMAT,
            "version": _VERSION,
            "bits": bits,
            "group_size": report.config.get("group_size"),
            "sym": bool(report.config.get("sym", False)),
            "layers": layers,
            "tensors": state,
            "metadata": dict(metadata or {}),
        },
        path,
    )
    return Path(path).stat().st_size


def _dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int | None) -> Tensor:
    """``scale · (codes − zero)`` per group, in the dtype of ``scale``."""
    d_in = codes.shape[-1]
    s = expand_grid(scale, d_in, group_size)
    z = expand_grid(zero.to(scale.dtype), d_in, group_size)
    return s * (codes.to(scale.dtype) - z)


def load_quantized(path: str | Path) -> dict[str, Tensor]:
    """The dequantized state dict of a file written by :func:`save_quantized` (bit-exact)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != QUANTIZED_FORMAT:
        raise ValueError(f"{path} is not a {QUANTIZED_FORMAT} file")
    out = dict(obj["tensors"])
    group_size = obj.get("group_size")
    for name, entry in obj["layers"].items():
        codes, scale, zero = entry["codes"], entry["scale"], entry["zero"]
        mats = torch.stack(
            [_dequantize(codes[g], scale[g], zero[g], group_size) for g in range(codes.shape[0])]
        )
        dtype = getattr(torch, entry["dtype"])
        weight = matrices_to_weight(mats, tuple(entry["shape"])).to(dtype)
        out[name] = weight.t().contiguous() if entry.get("transposed", False) else weight
    return out
