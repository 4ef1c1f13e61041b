"""GPTQ: layer-wise OBS quantization in a fixed column order (Frantar et al., ICLR 2023).

Same Hessian convention as :mod:`prunekit.posttrain.obs` (``H = 2 XᵀX / n``). Pure tensor maths.

Reference: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023; OBQ in Frantar & Alistarh, "Optimal Brain
Compression", NeurIPS 2022.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.posttrain.obs import (
    _compute_dtype,
    inverse_hessian_cholesky,
    obs_sweep_,
    prepare_hessian,
)

__all__ = ["gptq_quantize", "minmax_grid", "quantize_rtn"]


def minmax_grid(W: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Asymmetric per-row uniform grid from the row range (which is widened to contain 0).

    ``scale = (max - min) / (2^bits - 1)``, ``zero = round(-min / scale)``; a row of zeros
    gets the range ``[-1, 1]``.

    Args:
        W: weights, shape ``(d_out, d_in)``.
        bits: bits per weight, ``1 ≤ bits ≤ 16``.

    Returns:
        ``(scale, zero)``, each of shape ``(d_out, 1)``.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    maxq = 2**bits - 1
    w = W.to(_compute_dtype(W))
    xmin = w.min(dim=1, keepdim=True).values.clamp(max=0.0)
    xmax = w.max(dim=1, keepdim=True).values.clamp(min=0.0)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale, zero


def _quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """``q(w) = scale · (clamp(round(w / scale) + zero, 0, maxq) - zero)``."""
    return scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)


def quantize_rtn(W: Tensor, bits: int) -> Tensor:
    """Round-to-nearest on the per-row min-max grid of :func:`minmax_grid` (no update)."""
    scale, zero = minmax_grid(W, bits)
    return _quantize(W.to(scale.dtype), scale, zero, 2**bits - 1).to(W.dtype)


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    block_size: int = 128,
    damp: float = 0.01,
) -> Tensor:
    """GPTQ: quantize columns in order, spreading each error with the Cholesky rows of ``H⁻¹``.

    With ``U`` the upper Cholesky factor of ``H⁻¹``, column ``j`` is rounded to ``q_j`` and the
    not-yet-quantized columns absorb the OBS correction
    ``W[:, j:] -= ((w_j - q_j) / U_jj) · U[j, j:]``; updates are lazy inside blocks of
    ``block_size`` columns, as in :func:`~prunekit.posttrain.obs.sparsegpt_prune`. The grid
    (per-row min-max, :func:`minmax_grid`) is fixed from the original weights. Dead inputs
    (``H_jj = 0``) get weight 0 (0 is always on the grid).

    Args:
        W: weights, shape ``(d_out, d_in)``; not modified.
        H: layer Hessian ``2 XᵀX / n``, shape ``(d_in, d_in)``.
        bits: bits per weight.
        block_size: columns per lazy-update block.
        damp: relative damping, see :func:`~prunekit.posttrain.obs.prepare_hessian`.

    Returns:
        The quantized weights (dequantized values on the grid; new tensor, dtype of ``W``).
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"W must be (d_out, d_in) and H (d_in, d_in), got {tuple(W.shape)} and {tuple(H.shape)}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    dtype = _compute_dtype(W)
    maxq = 2**bits - 1
    Wc = W.to(dtype).clone()
    scale, zero = minmax_grid(Wc, bits)
    h_d, info = prepare_hessian(H.to(dtype), damp=damp)
    Wc[:, info.dead] = 0.0
    U = inverse_hessian_cholesky(h_d)
    obs_sweep_(
        Wc, U, block_size, lambda W1, i: _quantize(W1[:, i : i + 1], scale, zero, maxq).squeeze(1)
    )
    return Wc.to(W.dtype)
