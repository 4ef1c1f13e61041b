"""Uniform grids: the pure maths every quantizer of :mod:`prunekit.posttrain` shares.

A weight ``w`` with ``scale`` and integer ``zero`` is stored as the code
``c = clamp(round(w / scale) + zero, 0, 2^bits - 1)`` and read back as ``q(w) = scale · (c - zero)``
(:func:`fake_quantize`). A grid is per output row or per group of consecutive input columns
(:func:`minmax_grid`, :func:`expand_grid`); its range always contains 0, so a pruned weight stays
exactly 0. Three ways to place it (:func:`minmax_range`): asymmetric min-max (the default),
symmetric (``sym``: zero point at the mid code) and MSE-clipped (``mse``: the range shrunk to
the factor whose rounding error is smallest), as the quantizer of the GPTQ and OBC papers' code.
This module imports nothing else from the package: the layer Hessian
(:mod:`~prunekit.posttrain.hessian`), the OBS sweeps (:mod:`~prunekit.posttrain.obs`) and the
quantizers (:mod:`~prunekit.posttrain.quant`) build on it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "MSE_GRID",
    "MSE_MAXSHRINK",
    "MSE_NORM",
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


#: the MSE search of :func:`minmax_range` tries the shrink factors ``1 - i / MSE_GRID`` for
#: ``0 ≤ i < MSE_MAXSHRINK · MSE_GRID`` (1, 0.99, …, 0.21) and scores each by the sum of
#: ``|q(w) - w|^MSE_NORM`` (the defaults of the GPTQ/OBC papers' quantizer)
MSE_GRID = 100
MSE_MAXSHRINK = 0.8
MSE_NORM = 2.4


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")


def check_group_size(group_size: int | None) -> None:
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
    ):
        raise ValueError(f"group_size must be None or an integer >= 1, got {group_size!r}")


def minmax_range(
    w: Tensor, maxq: int, *, sym: bool = False, mse: bool = False
) -> tuple[Tensor, Tensor]:
    """Grid of the last dimension of ``w`` with codes ``0..maxq`` (see :func:`minmax_grid`).

    Returns:
        ``(scale, zero)``, each of the shape of ``w`` without its last dimension.
    """
    xmin = w.amin(dim=-1).clamp(max=0.0)
    xmax = w.amax(dim=-1).clamp(min=0.0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale)
    if mse:
        scale, zero = _shrink_to_least_error(w, xmin, xmax, scale, zero, maxq, sym)
    return scale, zero


def _shrink_to_least_error(
    w: Tensor, xmin: Tensor, xmax: Tensor, scale: Tensor, zero: Tensor, maxq: int, sym: bool
) -> tuple[Tensor, Tensor]:
    """Per slice, the range ``[p·xmin, p·xmax]`` (``p`` = 1, 0.99, …, see :data:`MSE_GRID`)
    whose grid rounds ``w`` with the smallest ``Σ |q(w) - w|^MSE_NORM``; the first on ties.
    ``p = 1`` is the unshrunk grid, so the result never rounds worse than it."""
    best = torch.full_like(scale, math.inf)
    for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        lo, hi = p * xmin, p * xmax
        s = (hi - lo) / maxq
        z = zero if sym else torch.round(-lo / s)
        q = fake_quantize(w, s.unsqueeze(-1), z.unsqueeze(-1), maxq)
        err = (q - w).abs().pow(MSE_NORM).sum(dim=-1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def minmax_grid(
    W: Tensor,
    bits: int,
    group_size: int | None = None,
    *,
    sym: bool = False,
    mse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Uniform grid per row, or per group of ``group_size`` consecutive inputs.

    For the weights ``v`` of a row (or group), with the range widened to contain 0,
    ``lo = min(min v, 0)``, ``hi = max(max v, 0)`` and ``maxq = 2^bits - 1``:

    * asymmetric (default): ``scale = (hi - lo) / maxq``, ``zero = round(-lo / scale)``;
    * ``sym``: ``scale = 2·max(|lo|, hi) / maxq`` and ``zero = 2^(bits-1)`` (the mid code), so
      the grid is ``scale·{-2^(bits-1), …, 2^(bits-1) - 1}``, the same for every row. (The
      GPTQ/OBC papers' quantizer keeps ``lo = 0`` for a row with no negative weight, which
      halves the positive range it can hold; here every row uses ``max |v|``.)
    * ``mse`` (either of the two): the range ``[lo, hi]`` is shrunk to ``[p·lo, p·hi]`` for
      ``p = 1, 0.99, …, 0.21`` and the ``p`` with the smallest ``Σ |q(v) - v|^2.4`` over the
      row (or group) is kept (``zero`` recomputed for each ``p``, or the mid code with ``sym``;
      see :data:`MSE_GRID`). Clipping a few outliers buys a finer step for all the others.

    An all-zero row or group gets the range ``[-1, 1]``. ``zero`` lies in ``[0, 2^bits - 1]``,
    so ``q(0) = 0`` exactly.

    Args:
        W: weights, shape ``(d_out, d_in)``.
        bits: bits per weight, ``1 ≤ bits ≤ 16``.
        group_size: ``None`` for one grid per row; otherwise columns ``[g·group_size,
            (g+1)·group_size)`` share a grid (the last group may be shorter).
        sym: symmetric grid (see above).
        mse: shrink the range to the least rounding error (see above).

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
        scale, zero = minmax_range(w, maxq, sym=sym, mse=mse)
        return scale.unsqueeze(1), zero.unsqueeze(1)
    grids = [
        minmax_range(w[:, i : i + group_size], maxq, sym=sym, mse=mse)
        for i in range(0, w.shape[1], group_size)
    ]
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
