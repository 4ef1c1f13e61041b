"""What post-training compression did to each layer: :class:`CompressionReport`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["CompressionReport", "LayerReport", "QuantGrid"]


@dataclass
class LayerReport:
    """One compressed layer.

    Attributes:
        name: fully qualified parameter name.
        shape: weight shape.
        sparsity: fraction of zero weights after compression (measured from the values).
        bits: bits per weight on the quantization grid, ``None`` if not quantized.
        rel_error: relative reconstruction error ``‖WX − ŴX‖² / ‖WX‖²`` on the calibration inputs
            the layer saw (its compressed predecessors' outputs in sequential mode).
        damp: relative damping finally used (``None`` for methods without a Hessian inverse);
            larger than the configured value when it was escalated.
        damp_escalated: whether the damping had to be raised.
        dead_inputs: inputs that were zero on every calibration sample (their weights are zeroed
            and count, like the layer's other existing zeros, toward the requested sparsity).
        seconds: wall time of this layer's compression (Hessian collection excluded).
    """

    name: str
    shape: list[int]
    sparsity: float
    bits: int | None
    rel_error: float
    damp: float | None
    damp_escalated: bool
    dead_inputs: int
    seconds: float


@dataclass
class QuantGrid:
    """The grid of one quantized matrix: ``W = scale · (codes − zero)`` (expanded per group).

    Attributes:
        scale: ``(d_out, n_groups)`` grid steps (float32).
        zero: ``(d_out, n_groups)`` zero points (uint8).
        codes: ``(d_out, d_in)`` integer codes (uint8).
    """

    scale: Tensor
    zero: Tensor
    codes: Tensor


@dataclass
class CompressionReport:
    """Per-layer results of :func:`prunekit.compress`, printable as a table.

    Attributes:
        method: the method's registered name.
        config: the method's config as a dict.
        layers: one :class:`LayerReport` per compressed layer, in compression order.
        skipped: ``{layer: reason}`` for targets left unchanged (never run by the calibration
            forward, or incompatible with the N:M pattern).
        seconds: total wall time, calibration forwards included.
        batchnorm_batches: calibration batches used to re-estimate batch-norm statistics after
            compression (0: no batch norm, or ``recalibrate_batchnorm=False``).
        extras: method-specific results (e.g. OBC's per-layer database of sparsity levels).
        grids: ``{layer: [QuantGrid per group]}``: the quantization grids and the integer codes,
            recorded at compression time in the computation dtype (a float16 weight cannot give
            its codes back exactly), for :func:`~prunekit.posttrain.export.save_quantized`.
    """

    method: str
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    batchnorm_batches: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    grids: dict[str, list[QuantGrid]] = field(default_factory=dict)

    @property
    def global_sparsity(self) -> float:
        """Zeros over weights, across the compressed layers."""
        total = sum(_numel(r.shape) for r in self.layers)
        zeros = sum(r.sparsity * _numel(r.shape) for r in self.layers)
        return zeros / total if total else 0.0

    def layer(self, name: str) -> LayerReport:
        """The report of one layer, by parameter or module name."""
        for r in self.layers:
            if name in (r.name, r.name.rsplit(".", 1)[0]):
                return r
        raise KeyError(f"no compressed layer {name!r}; layers: {[r.name for r in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``extras`` and ``grids`` are left out: they hold tensors)."""
        return {
            "method": self.method,
            "config": self.config,
            "layers": [asdict(r) for r in self.layers],
            "skipped": dict(self.skipped),
            "seconds": self.seconds,
            "global_sparsity": self.global_sparsity,
            "batchnorm_batches": self.batchnorm_batches,
        }

    def table(self) -> str:
        """A markdown table, one row per layer."""
        lines = [
            f"{self.method}: {len(self.layers)} layers, global sparsity "
            f"{self.global_sparsity:.2%}, {self.seconds:.1f} s"
            + (
                f", batch norm re-estimated on {self.batchnorm_batches} batches"
                if self.batchnorm_batches
                else ""
            ),
            "",
            "| layer | shape | sparsity | bits | rel. error | damp | dead inputs | s |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.layers:
            shape = "×".join(str(s) for s in r.shape)
            damp = "—" if r.damp is None else f"{r.damp:g}{' ↑' if r.damp_escalated else ''}"
            bits = "—" if r.bits is None else str(r.bits)
            lines.append(
                f"| {r.name} | {shape} | {r.sparsity:.2%} | {bits} | {r.rel_error:.3g} | {damp} "
                f"| {r.dead_inputs} | {r.seconds:.2f} |"
            )
        for name, why in self.skipped.items():
            lines.append(f"| {name} | skipped: {why} | | | | | | |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
