"""Uniform min-max grids: the pure maths every quantizer of :mod:`prunekit.posttrain` shares.

A weight ``w`` with ``scale`` and integer ``zero`` is stored as the code
``c = clamp(round(w / scale) + zero, 0, 2^bits - 1)`` and read back as ``q(w) = scale · (c - zero)``
(:func:`fake_quantize`). A grid is per output row or per group of consecutive input columns
(:func:`minmax_grid`, :func:`expand_grid`); its range always contains 0, so a pruned weight stays
exactly 0. This module imports nothing else from the package: the layer Hessian
(:mod:`~prunekit.posttrain.hessian`), the OBS sweeps (:mod:`~prunekit.posttrain.obs`) and the
quantizers (:mod:`~prunekit.posttrain.quant`) build on it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "check_bits",
    "check_group_size",
    "compute_dtype",
    "expand_grid",
    "fake_quantize",
    "minmax_grid",
    "minmax_range",
]


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    if not t.is_floating_point():
        raise TypeError(
            f"expected a floating-point tensor, got {t.dtype}; convert it with .float()"
        )
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")


def check_group_size(group_size: int | None) -> None:
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
    ):
        raise ValueError(f"group_size must be None or an integer >= 1, got {group_size!r}")


def minmax_range(w: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """Grid of the last dimension of ``w`` (range widened to contain 0; all-zero → [-1, 1])."""
    xmin = w.amin(dim=-1).clamp(max=0.0)
    xmax = w.amax(dim=-1).clamp(min=0.0)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale, zero


def minmax_grid(W: Tensor, bits: int, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Asymmetric uniform grid per row, or per group of ``group_size`` consecutive inputs.

    For the weights ``v`` of a row (or group), with the range widened to contain 0,
    ``lo = min(min v, 0)``, ``hi = max(max v, 0)``::

        scale = (hi - lo) / (2^bits - 1),   zero = round(-lo / scale)

    An all-zero row or group gets the range ``[-1, 1]``. Because ``lo ≤ 0 ≤ hi``, ``zero`` lies
    in ``[0, 2^bits - 1]`` and ``q(0) = 0`` exactly.

    Args:
        W: weights, shape ``(d_out, d_in)``.
        bits: bits per weight, ``1 ≤ bits ≤ 16``.
        group_size: ``None`` for one grid per row; otherwise columns ``[g·group_size,
            (g+1)·group_size)`` share a grid (the last group may be shorter).

    Returns:
        ``(scale, zero)``, each of shape ``(d_out, n_groups)``: ``(d_out, 1)`` per row,
        ``(d_out, ceil(d_in / group_size))`` per group. See :func:`expand_grid`.
    """
    check_bits(bits)
    check_group_size(group_size)
    if W.dim() != 2:
        raise ValueError(f"W must have shape (d_out, d_in), got {tuple(W.shape)}")
    maxq = 2**bits - 1
    w = W.to(compute_dtype(W))
    if group_size is None or group_size >= w.shape[1]:
        scale, zero = minmax_range(w, maxq)
        return scale.unsqueeze(1), zero.unsqueeze(1)
    grids = [minmax_range(w[:, i : i + group_size], maxq) for i in range(0, w.shape[1], group_size)]
    return torch.stack([s for s, _ in grids], 1), torch.stack([z for _, z in grids], 1)


def expand_grid(t: Tensor, d_in: int, group_size: int | None = None) -> Tensor:
    """Repeat a per-group ``scale`` or ``zero`` of shape ``(d_out, n_groups)`` to ``(d_out, d_in)``.

    Group ``k`` covers inputs ``[k·group_size, (k+1)·group_size)`` (the last group may be
    shorter). ``group_size=None`` means one value per row (``n_groups = 1``). The group size
    cannot be inferred from ``n_groups`` (``d_in = 18`` in groups of 8 and of 6 both give 3
    groups), so it must be given whenever there are several groups.

    Raises:
        ValueError: several groups and no ``group_size``, or a ``group_size`` inconsistent with
            ``n_groups``.
    """
    n_groups = t.shape[1]
    if group_size is None:
        if n_groups != 1:
            raise ValueError(f"a grid of {n_groups} groups per row needs its group_size")
        group_size = d_in
    if math.ceil(d_in / group_size) != n_groups:
        raise ValueError(
            f"group_size={group_size} gives {math.ceil(d_in / group_size)} groups for d_in={d_in}, "
            f"but the grid has {n_groups}"
        )
    return t.repeat_interleave(group_size, dim=1)[:, :d_in]


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """``q(w) = scale · (clamp(round(w / scale) + zero, 0, maxq) - zero)``."""
    return scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
