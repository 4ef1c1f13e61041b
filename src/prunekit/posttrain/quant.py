"""Uniform min-max grids, round-to-nearest and GPTQ (Frantar et al., ICLR 2023).

Same Hessian convention as :mod:`prunekit.posttrain.hessian` (``H = 2 XᵀX / n``). Pure tensor
maths.

Grids are asymmetric and uniform: a weight ``w`` with ``scale`` and integer ``zero`` is stored as
the code ``c = clamp(round(w / scale) + zero, 0, 2^bits - 1)`` and read back as
``q(w) = scale · (c - zero)``. A grid is either per output row (``group_size=None``) or per
group of ``group_size`` consecutive input columns of a row (the last group may be shorter).
``scale`` and ``zero`` have shape ``(d_out, n_groups)`` (``n_groups = 1`` per row,
``ceil(d_in / group_size)`` per group); :func:`expand_grid` repeats them to ``(d_out, d_in)``.
The range of every grid is widened to contain 0, so 0 (a pruned or dead weight) is always
representable exactly and a row (or group) holds at most ``2^bits`` distinct values, 0 included.

Reference: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023; OBQ in Frantar & Alistarh, "Optimal Brain
Compression", NeurIPS 2022 (see :mod:`prunekit.posttrain.obc`).
"""

from __future__ import annotations

import logging
import math
from typing import Literal, overload

import torch
from torch import Tensor

from prunekit.posttrain.grid import (
    check_bits,
    check_group_size,
    compute_dtype,
    expand_grid,
    fake_quantize,
    minmax_grid,
    minmax_range,
)
from prunekit.posttrain.hessian import inverse_hessian_cholesky, prepare_hessian
from prunekit.posttrain.obs import obs_sweep_

logger = logging.getLogger(__name__)

__all__ = [
    "expand_grid",
    "gptq_quantize",
    "minmax_grid",
    "quantize_rtn",
    "quantize_to_ints",
]


def quantize_rtn(W: Tensor, bits: int, group_size: int | None = None) -> Tensor:
    """Round-to-nearest on the min-max grid of :func:`minmax_grid` (per row or group; no update)."""
    scale, zero = minmax_grid(W, bits, group_size)
    d_in = W.shape[1]
    q = fake_quantize(
        W.to(scale.dtype),
        expand_grid(scale, d_in, group_size),
        expand_grid(zero, d_in, group_size),
        2**bits - 1,
    )
    return q.to(W.dtype)


def quantize_to_ints(
    W_dequantized: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Integer codes of weights that already lie on a grid, for export.

    ``codes = clamp(round(W / scale) + zero, 0, 2^bits - 1)`` with ``scale``/``zero`` expanded
    to ``(d_out, d_in)``. For ``W_dequantized`` produced by this module with the same grid
    (:func:`quantize_rtn`, :func:`gptq_quantize` with ``return_grid=True``, OBQ, joint
    SparseGPT), ``(scale · (codes - zero)).to(W_dequantized.dtype)`` reproduces
    ``W_dequantized`` exactly: use :func:`expand_grid` on ``scale``/``zero`` and compute in
    the dtype of ``scale``.

    Args:
        W_dequantized: weights on the grid, shape ``(d_out, d_in)``.
        scale: ``(d_out, n_groups)`` grid step, from :func:`minmax_grid` or a ``return_grid``.
        zero: ``(d_out, n_groups)`` integer zero point (stored as floats).
        bits: bits of the grid, ``1 ≤ bits ≤ 8`` (codes are ``uint8``).
        group_size: the group size of the grid (``None``: one grid per row); needed to
            expand a grid of several groups (see :func:`expand_grid`).

    Returns:
        ``(codes, scale, zero)``: ``codes`` of dtype ``uint8`` and shape ``(d_out, d_in)``;
        ``scale`` unchanged; ``zero`` as ``uint8``.

    Raises:
        ValueError: ``W_dequantized`` is not on the grid (a code off by more than 1e-3 of a step).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8] for uint8 codes, got {bits!r}")
    if (
        W_dequantized.dim() != 2
        or scale.shape != zero.shape
        or scale.shape[0] != W_dequantized.shape[0]
    ):
        raise ValueError(
            f"W must be (d_out, d_in) and scale/zero (d_out, n_groups), got "
            f"{tuple(W_dequantized.shape)}, {tuple(scale.shape)}, {tuple(zero.shape)}"
        )
    d_in = W_dequantized.shape[1]
    s = expand_grid(scale, d_in, group_size)
    z = expand_grid(zero, d_in, group_size)
    exact = W_dequantized.to(s.dtype) / s + z
    codes = torch.round(exact)
    if (codes - exact).abs().max() > 1e-3 or codes.min() < 0 or codes.max() > 2**bits - 1:
        raise ValueError(
            "W_dequantized is not on the given grid; pass the scale/zero that produced it"
        )
    return codes.to(torch.uint8), scale, zero.to(torch.uint8)


def _aligned_block_size(block_size: int, unit: int) -> int:
    """The largest multiple of ``unit`` that is ``≤ block_size`` (at least ``unit``)."""
    return unit * max(1, block_size // unit)


@overload
def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    block_size: int = ...,
    damp: float = ...,
    group_size: int | None = ...,
    *,
    return_grid: Literal[False] = ...,
) -> Tensor: ...


@overload
def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    block_size: int = ...,
    damp: float = ...,
    group_size: int | None = ...,
    *,
    return_grid: Literal[True],
) -> tuple[Tensor, Tensor, Tensor]: ...


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    block_size: int = 128,
    damp: float = 0.01,
    group_size: int | None = None,
    *,
    return_grid: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """GPTQ: quantize columns in order, spreading each error with the Cholesky rows of ``H⁻¹``.

    With ``U`` the upper Cholesky factor of ``H⁻¹``, column ``j`` is rounded to ``q_j`` and the
    not-yet-quantized columns absorb the OBS correction
    ``W[:, j:] -= ((w_j - q_j) / U_jj) · U[j, j:]``; updates are lazy inside blocks of
    ``block_size`` columns, as in :func:`~prunekit.posttrain.obs.sparsegpt_prune`. Dead inputs
    (``H_jj = 0``) get weight 0 (0 is always on the grid).

    Grid: per row (``group_size=None``), min-max of the original weights, fixed up front. Per
    group, as in the GPTQ reference: the grid of a group is the min-max of the group's
    *OBS-updated* weights at the moment the sweep reaches the group's first column (so it
    already absorbs the errors of the earlier groups). To read those weights exactly under
    lazy updates, the block size is rounded to a multiple of ``group_size`` (groups never
    straddle blocks; the result in exact arithmetic does not depend on the block size).

    Args:
        W: weights, shape ``(d_out, d_in)``; not modified.
        H: layer Hessian ``2 XᵀX / n``, shape ``(d_in, d_in)``.
        bits: bits per weight (``1..16``).
        block_size: columns per lazy-update block.
        damp: relative damping, see :func:`~prunekit.posttrain.hessian.prepare_hessian`.
        group_size: ``None`` (per-row grid) or the number of consecutive inputs sharing a grid.
        return_grid: also return ``(scale, zero)`` of shape ``(d_out, n_groups)``, for
            :func:`quantize_to_ints`.

    Returns:
        The quantized weights (dequantized values on the grid; new tensor, dtype of ``W``), or
        ``(weights, scale, zero)`` with ``return_grid=True``.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"W must be (d_out, d_in) and H (d_in, d_in), got {tuple(W.shape)} and {tuple(H.shape)}"
        )
    check_bits(bits)
    check_group_size(group_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    dtype = compute_dtype(W)
    maxq = 2**bits - 1
    d_in = W.shape[1]
    Wc = W.to(dtype).clone()
    h_d, info = prepare_hessian(H.to(dtype), damp=damp)
    Wc[:, info.dead] = 0.0
    U = inverse_hessian_cholesky(h_d)
    if group_size is None or group_size >= d_in:
        scale, zero = minmax_grid(Wc, bits)
        obs_sweep_(
            Wc,
            U,
            block_size,
            lambda W1, i: fake_quantize(W1[:, i : i + 1], scale, zero, maxq).squeeze(1),
        )
    else:
        n_groups = math.ceil(d_in / group_size)
        scale = torch.empty(W.shape[0], n_groups, dtype=dtype, device=W.device)
        zero = torch.empty_like(scale)
        i_block = [0]

        def start(W1: Tensor, i1: int, i2: int) -> None:
            i_block[0] = i1

        def compress(W1: Tensor, i: int) -> Tensor:
            j = i_block[0] + i
            g = j // group_size
            if j % group_size == 0:
                scale[:, g], zero[:, g] = minmax_range(W1[:, i : i + group_size], maxq)
            return fake_quantize(W1[:, i], scale[:, g], zero[:, g], maxq)

        obs_sweep_(Wc, U, _aligned_block_size(block_size, group_size), compress, start)
    Wq = Wc.to(W.dtype)
    if return_grid:
        return Wq, scale, zero
    return Wq
