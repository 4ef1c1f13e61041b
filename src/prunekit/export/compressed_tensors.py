"""Save a compressed model in the compressed-tensors layout, the one llm-compressor writes.

:func:`save_compressed` writes a model directory that Hugging Face ``transformers`` (with the
``compressed-tensors`` package) and vLLM read: the weights as ``model.safetensors``, the model's
config as ``config.json`` with a ``quantization_config`` that says how they are stored, and its
``generation_config.json`` where it has one. Formats (:data:`FORMATS`), one per model:

* ``pack-quantized`` (the default for a quantized model): per layer ``weight_packed`` (the
  ``b``-bit codes packed into ``int32``), ``weight_scale`` (``(d_out, 1)`` per channel or
  ``(d_out, d_in / group_size)`` per group, in the grid's dtype), ``weight_shape`` and, for an
  asymmetric grid, ``weight_zero_point`` (packed along the outputs); a symmetric grid
  (``sym=True``) stores no zero point. Any ``bits`` from 2 to 8 (vLLM's weight-only kernels take
  4 and 8; other widths follow the layout of compressed-tensors 0.18 and later, where a code may
  straddle two words).
* ``int-quantized``: the codes as ``int8`` ``weight`` and an ``int8`` zero point, unpacked.
  compressed-tensors infers ``pack-quantized`` for a model that quantizes only its weights (so
  does its checkpoint dequantizer): ``int-quantized`` is for readers that load it into the model,
  as ``transformers`` does.
* ``sparse-bitmask`` (unstructured sparsity) and ``sparse-24-bitmask`` (2:4): the nonzero values
  and a bitmask (:mod:`prunekit.export.layouts`). compressed-tensors read these up to release
  0.14 (``transformers`` with it; vLLM 2:4 only, until it dropped them); compressed-tensors 0.15
  and later has no sparse compressor, and the ``transformers`` releases that need it fail on such
  a directory. For today's readers save a sparse model with ``format="dense"``.
* ``dense``: every tensor as it is, no ``quantization_config``.

The quantization grids come from the report (``report.grids``): codes ``c`` and zero ``z`` in
``[0, 2^b − 1]`` become compressed-tensors' signed codes ``c − 2^(b−1)`` and zero point
``z − 2^(b−1)``, exactly (see :mod:`~prunekit.export.layouts`). Every weight written is decoded
again before anything is written and must equal the model's weight (``torch.equal``), so a file
holds the model exactly or is not written. The scales keep the grid's dtype: float32 for a
half-precision model (prunekit computes its grids in float32), which compressed-tensors'
checkpoint dequantizer reads back exactly; a reader that first casts the scales to the model's
dtype (``transformers`` loading a bfloat16 model, vLLM) rounds them, and its weights differ by one
bfloat16 step in about one weight in eight (measured on a tiny Llama).

Which layers: compressed-tensors compresses ``nn.Linear`` weights, stored ``(out, in)``. The
layers of the report that are not ``nn.Linear`` are written dense and listed with the reason in
:attr:`CompressedExport.dense` (and logged): ``transformers``' ``Conv1D`` (GPT-2), whose weight is
stored ``(in, out)`` (a ``(out, in)`` layout would not fit the module that loads it), convolutions,
weights tied to another. The ``quantization_config`` targets ``"Linear"`` and ignores, by name,
every module with a weight matrix that is not written compressed (the head, the embeddings, those
layers); a layer with fewer inputs than ``group_size`` (one grid per row) gets a per-channel
config group of its own. Tied weights are stored once (the first name of the state dict), as
``transformers`` saves them; :func:`~prunekit.export.reader.load_compressed` restores the
other names.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.core.targets import is_transposed_linear
from prunekit.export import layouts
from prunekit.export.directory import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    json_writer,
    safetensors_writer,
    write_directory,
)
from prunekit.export.quantization_config import (
    FORMATS,
    QUANTIZED_FORMATS,
    SPARSE_FORMATS,
    model_config,
    quantization_config,
)
from prunekit.posttrain.report import CompressionReport, QuantGrid

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "CompressedExport", "save_compressed"]

#: safetensors metadata key of the tied names (``{alias: stored name}``)
TIED_KEY = "prunekit_tied"


@dataclass(frozen=True)
class CompressedExport:
    """What :func:`save_compressed` wrote.

    Attributes:
        directory: the model directory.
        format: the format of the compressed layers (``"dense"`` when none could be stored
            compressed).
        files: bytes on disk of each file, by name.
        layers: the weights written in ``format``.
        dense: the report's layers written dense, with the reason.
    """

    directory: Path
    format: str
    files: dict[str, int]
    layers: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for a run's record)."""
        return {
            "directory": str(self.directory),
            "format": self.format,
            "files": dict(self.files),
            "total_bytes": self.total_bytes,
            "layers": list(self.layers),
            "dense": dict(self.dense),
        }


def save_compressed(
    model: nn.Module,
    report: CompressionReport,
    directory: str | Path,
    *,
    format: str | None = None,
    overwrite: bool = False,
) -> CompressedExport:
    """Write ``model``, compressed by :func:`prunekit.compress` with ``report``, as a
    compressed-tensors model directory (see the module docstring). The model is not changed.

    Args:
        model: the compressed model.
        report: what :func:`prunekit.compress` returned for it.
        directory: a new directory.
        format: one of :data:`FORMATS`; ``None``: ``pack-quantized`` for a quantized model,
            ``sparse-24-bitmask`` for 2:4, ``sparse-bitmask`` for other sparsity.
        overwrite: replace ``directory`` (and everything in it) if it exists.

    Returns:
        The sizes on disk and which layers were written how (:class:`CompressedExport`).

    Raises:
        FileExistsError: ``directory`` exists and ``overwrite`` is not set.
        ValueError: a format the report cannot give (quantized without grids, sparse with them,
            2:4 for weights that are not 2:4), a weight that is no longer what the report says
            (changed after compression), or a report of another model. Nothing is written.
    """
    fmt = _choose_format(report, format)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tied = _untie(state)
    chosen, dense = _split_layers(model, report, fmt, state, tied)
    entries = {name.rpartition(".")[0]: _encode(name, state[name], fmt, report) for name in chosen}
    tensors = {k: v for k, v in state.items() if k not in chosen}
    for module_name, entry in entries.items():
        tensors.update({f"{module_name}.{k}": v for k, v in entry.items()})
    if dense:
        logger.info(
            "%d compressed layers written dense: %s",
            len(dense),
            "; ".join(f"{k} ({v})" for k, v in list(dense.items())[:3])
            + ("; ..." if len(dense) > 3 else ""),
        )
    if fmt != "dense" and not chosen:
        logger.warning("no layer can be stored as %s: the model is written dense", fmt)
        fmt = "dense"
    qconfig = None if fmt == "dense" else quantization_config(model, fmt, chosen, state, report)
    metadata = {"format": "pt"} | ({TIED_KEY: json.dumps(tied, sort_keys=True)} if tied else {})
    files = {
        WEIGHTS_NAME: safetensors_writer(_unshared(tensors), metadata),
        CONFIG_NAME: json_writer(model_config(model, state, qconfig)),
    }
    generation: Any = getattr(model, "generation_config", None)
    if callable(getattr(generation, "to_json_string", None)):
        files["generation_config.json"] = json_writer(json.loads(generation.to_json_string()))
    sizes = write_directory(directory, files, overwrite=overwrite)
    return CompressedExport(Path(directory), fmt, sizes, sorted(chosen), dense)


def _choose_format(report: CompressionReport, fmt: str | None) -> str:
    quantized = bool(report.grids)
    if fmt is None:
        if quantized:
            return "pack-quantized"
        if report.config.get("pattern") == "2:4":
            return "sparse-24-bitmask"
        if any(r.sparsity > 0 for r in report.layers):
            return "sparse-bitmask"
        raise ValueError(
            f"the report of {report.method!r} records neither sparsity nor quantization grids: "
            "nothing to store compressed (format='dense' writes the model as it is)"
        )
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    if fmt in QUANTIZED_FORMATS and not quantized:
        raise ValueError(
            f"{fmt} stores quantization grids and the report of {report.method!r} holds none "
            "(compress with bits=... to quantize); a sparse model saves as 'sparse-bitmask' or "
            "'sparse-24-bitmask'"
        )
    if fmt in SPARSE_FORMATS and quantized:
        raise ValueError(
            f"{fmt} stores float values and this model is quantized: compressed-tensors has no "
            "layout for sparse and quantized weights together; save with format="
            "'pack-quantized', which keeps every zero exactly"
        )
    return fmt


def _untie(state: dict[str, Tensor]) -> dict[str, str]:
    """Remove the names that alias an earlier tensor of ``state``; returns ``{alias: kept}``."""
    first: dict[tuple[Any, ...], str] = {}
    tied: dict[str, str] = {}
    for name, t in list(state.items()):
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in first:
            tied[name] = first[key]
            del state[name]
        else:
            first.setdefault(key, name)
    return tied


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors that share no memory (a copy where they would), as safetensors needs."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        shared = t.numel() > 0 and ptr in seen
        seen.add(ptr)
        out[name] = t.clone() if shared or not t.is_contiguous() else t
    return out


def _split_layers(
    model: nn.Module,
    report: CompressionReport,
    fmt: str,
    state: dict[str, Tensor],
    tied: dict[str, str],
) -> tuple[list[str], dict[str, str]]:
    """The report's weights to write in ``fmt``, and those to write dense with the reason."""
    if fmt in QUANTIZED_FORMATS:
        names = list(report.grids)
    elif fmt in SPARSE_FORMATS:
        names = [r.name for r in report.layers]
    else:
        return [], {}
    modules = dict(model.named_modules())
    tied_to = {**tied, **{kept: alias for alias, kept in tied.items()}}
    chosen, dense = [], {}
    for name in names:
        module_name, _, param = name.rpartition(".")
        module = modules.get(module_name)
        if module is None or (name not in state and name not in tied):
            raise ValueError(
                f"the report's layer {name} is not in the model; pass the model it was made for"
            )
        if is_transposed_linear(module):
            dense[name] = (
                "transformers Conv1D, weight stored (in, out); compressed-tensors compresses "
                "nn.Linear (out, in) weights"
            )
        elif not isinstance(module, nn.Linear) or param != "weight":
            dense[name] = (
                f"{type(module).__name__}; compressed-tensors compresses nn.Linear weights"
            )
        elif name in tied_to:
            dense[name] = f"tied to {tied_to[name]}"
        else:
            chosen.append(name)
    return chosen, dense


def _encode(name: str, weight: Tensor, fmt: str, report: CompressionReport) -> dict[str, Tensor]:
    """The tensors of one weight in ``fmt``, decoded again and checked equal to ``weight``."""
    try:
        if fmt == "sparse-bitmask":
            entry = layouts.bitmask_encode(weight)
            decoded = layouts.bitmask_decode(entry)
        elif fmt == "sparse-24-bitmask":
            entry = layouts.sparse24_encode(weight)
            decoded = layouts.sparse24_decode(entry)
        else:
            entry, decoded = _encode_quantized(weight, report.grids[name], fmt, report.config)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    if not torch.equal(decoded.to(weight.dtype), weight):
        raise ValueError(
            f"{name} is no longer what the report recorded (changed after compression, e.g. by "
            "fine-tuning); compress again before exporting"
        )
    return entry


def _strategy(d_in: int, n_groups: int, group_size: int | None) -> str:
    """``"channel"`` or ``"group"`` for a grid of ``n_groups`` per row."""
    if group_size is not None and d_in % group_size == 0 and n_groups == d_in // group_size:
        return "group"
    if n_groups == 1 and (group_size is None or d_in < group_size):
        return "channel"
    raise ValueError(
        f"{d_in} inputs in {n_groups} groups of {group_size} leave a shorter last group, which "
        "compressed-tensors cannot store; leave the layer out with ignore=[...]"
    )


def _encode_quantized(
    weight: Tensor, grids: list[QuantGrid], fmt: str, config: dict[str, Any]
) -> tuple[dict[str, Tensor], Tensor]:
    (grid,) = grids  # a Linear layer is one matrix
    bits, group_size = int(config["bits"]), config.get("group_size")
    strategy = _strategy(weight.shape[1], grid.scale.shape[1], group_size)
    symmetric, packed = bool(config.get("sym", False)), fmt == "pack-quantized"
    entry = layouts.quantized_encode(
        grid.codes, grid.scale, grid.zero, bits, symmetric=symmetric, packed=packed
    )
    decoded = layouts.quantized_decode(
        entry,
        bits,
        symmetric=symmetric,
        packed=packed,
        strategy=strategy,
        group_size=group_size if strategy == "group" else None,
    )
    return entry, decoded
