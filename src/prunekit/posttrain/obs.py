"""Layer-wise pruning rules on the layer Hessian: OBS removal, SparseGPT, Wanda, magnitude.

Pure tensor maths, no hooks and no model traversal. A linear layer ``y = W x`` with ``W`` of shape
``(d_out, d_in)`` is compressed to ``Ŵ`` by minimising, row by row, the reconstruction error on
calibration inputs ``X``, ``Σ_rows ½ (w - ŵ) H (w - ŵ)ᵀ`` with the layer Hessian ``H = 2 XᵀX / n``
of :mod:`prunekit.posttrain.hessian` (made, damped and factorised there; its names are re-exported
here). With this ``H`` every loss returned here is a mean squared error per calibration sample.

Here: :func:`obs_remove_one` (one weight of one row), :func:`obs_sweep_` (the fixed-order sweep
that SparseGPT and GPTQ share), :func:`sparsegpt_prune` (optionally with joint quantization),
:func:`wanda_prune` and :func:`magnitude_prune` (no update).

References:
    Hassibi & Stork, "Second order derivatives for network pruning: Optimal Brain Surgeon",
    NeurIPS 1992. Frantar & Alistarh, "Optimal Brain Compression" (OBC), NeurIPS 2022.
    Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot", ICML 2023. Sun et al., "A Simple and Effective Pruning Approach for Large
    Language Models" (Wanda), ICLR 2024.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import Tensor

from prunekit.posttrain.grid import (
    check_bits,
    check_group_size,
    compute_dtype,
    fake_quantize,
    minmax_grid,
    minmax_range,
)
from prunekit.posttrain.hessian import (
    HessianAccumulator,
    HessianError,
    HessianInfo,
    inverse_hessian_cholesky,
    layer_hessian,
    prepare_hessian,
)

logger = logging.getLogger(__name__)

__all__ = [
    "HessianAccumulator",
    "HessianError",
    "HessianInfo",
    "inverse_hessian_cholesky",
    "layer_hessian",
    "magnitude_prune",
    "obs_remove_one",
    "obs_sweep_",
    "prepare_hessian",
    "sparsegpt_prune",
    "wanda_prune",
]


def obs_remove_one(w: Tensor, H_inv: Tensor, p: int) -> tuple[Tensor, float]:
    """Optimal Brain Surgeon removal of weight ``p`` of one row (Hassibi & Stork 1992).

    Minimising ``½ δ H δᵀ`` subject to ``(w + δ)_p = 0`` gives::

        δ = -(w_p / [H⁻¹]_pp) · H⁻¹[:, p],     ΔE = w_p² / (2 [H⁻¹]_pp).

    With ``H = 2 XᵀX / n`` (module convention), ``ΔE = ||X w - X ŵ||² / n``: the mean squared
    error per sample that the removal adds. (OBC/SparseGPT write the score ``w_p²/[H⁻¹]_pp``,
    which drops the constant ``½``.)

    Args:
        w: the row, shape ``(d,)``.
        H_inv: inverse of the (damped) Hessian, shape ``(d, d)``.
        p: index of the weight to remove.

    Returns:
        ``(ŵ, ΔE)``: the compensated row (``ŵ_p = 0`` exactly; a new tensor) and the loss increase.
    """
    if w.dim() != 1 or H_inv.shape != (w.shape[0], w.shape[0]):
        raise ValueError(
            f"w must be (d,) and H_inv (d, d), got {tuple(w.shape)} and {tuple(H_inv.shape)}"
        )
    if not 0 <= p < w.shape[0]:
        raise IndexError(f"p={p} is out of range for a row of length {w.shape[0]}")
    dtype = compute_dtype(w)
    w64 = w.to(dtype)
    hinv = H_inv.to(dtype)
    d_pp = hinv[p, p]
    if float(d_pp) <= 0:
        raise HessianError(f"[H⁻¹]_pp = {float(d_pp):g} <= 0: H_inv is not positive definite")
    w_p = w64[p]
    new = w64 - (w_p / d_pp) * hinv[:, p]
    new[p] = 0.0
    loss = float(w_p * w_p / (2.0 * d_pp))
    return new.to(w.dtype), loss


def _n_pruned(sparsity: float, d: int) -> int:
    """Number of weights to prune among ``d``: ``round(sparsity·d)``, halves rounded up."""
    return min(d, math.floor(sparsity * d + 0.5))


def _check_sparsity(sparsity: float, nm: tuple[int, int] | None, d_in: int) -> None:
    if nm is not None:
        n, m = nm
        if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
            raise ValueError(f"nm must be (n, m) with 0 <= n <= m, m >= 1, got {nm}")
        if d_in % m != 0:
            raise ValueError(f"N:M with m={m} needs d_in divisible by m, got d_in={d_in}")
    elif not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")


def _lowest(scores: Tensor, k: Tensor | int) -> Tensor:
    """Boolean mask of the ``k`` lowest scores along the last dimension.

    ``k`` is one count for every slice, or a tensor of counts of shape ``scores.shape[:-1]``;
    a count must not exceed the slice length. Equal counts take the plain ``topk`` path.
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if isinstance(k, Tensor):
        if k.numel() == 0:
            return mask
        k_max = int(k.max())
        if int(k.min()) != k_max:
            idx = torch.topk(scores, k_max, dim=-1, largest=False).indices  # ascending
            take = torch.arange(k_max, device=scores.device) < k.unsqueeze(-1)
            return mask.scatter_(-1, idx, take)
        k = k_max
    return mask.scatter_(-1, torch.topk(scores, k, dim=-1, largest=False).indices, True)


def _existing_zeros(W: Tensor, dead: Tensor | None) -> Tensor:
    """``(d_out, d_in)`` bool: the zeros a layer already has, zero weights and the weights of
    dead inputs (``dead``: bool ``(d_in,)``; those weights multiply inputs that are always 0)."""
    zeros = W == 0
    return zeros if dead is None else zeros | dead.to(W.device).unsqueeze(0)


def _prune_mask(
    scores: Tensor, sparsity: float, nm: tuple[int, int] | None, zeros: Tensor | None = None
) -> Tensor:
    """Boolean mask (True = zero) of a row-wise method, counting the zeros already there.

    ``zeros`` (bool, like ``scores``) are the row's existing zeros: always in the mask, and
    counted. Unstructured: row ``r`` with ``z_r`` of them gets ``max(0, round(sparsity·d_in) −
    z_r)`` more, its lowest other scores, so it ends with ``max(z_r, round(sparsity·d_in))``
    zeros. N:M (``n`` nonzeros kept out of every ``m`` consecutive inputs): a group with ``z``
    existing zeros gets its ``max(0, m − n − z)`` lowest other scores.
    """
    d_out, d_in = scores.shape
    _check_sparsity(sparsity, nm, d_in)
    if zeros is None:
        zeros = torch.zeros_like(scores, dtype=torch.bool)
    free = scores.masked_fill(zeros, math.inf)
    if nm is not None:
        n, m = nm
        shape = (d_out, d_in // m, m)
        zg = zeros.reshape(shape)
        k = (m - n - zg.sum(dim=2)).clamp(min=0)
        return (_lowest(free.reshape(shape), k) | zg).reshape(d_out, d_in)
    k = (_n_pruned(sparsity, d_in) - zeros.sum(dim=1)).clamp(min=0)
    return _lowest(free, k) | zeros


def magnitude_prune(
    W: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    dead: Tensor | None = None,
) -> Tensor:
    """Magnitude pruning per output row, score ``|W_ij|``, no update.

    Existing zeros count toward the target (see :func:`_prune_mask`): a row with ``z_r`` zeros
    (zero weights, and the weights of ``dead`` inputs, which are zeroed) ends with
    ``max(z_r, round(sparsity·d_in))`` zeros; with N:M, every group of ``m`` keeps at most
    ``n`` nonzeros and all the zeros it had.

    Args:
        W: weights, shape ``(d_out, d_in)``.
        sparsity: target fraction of zeros in every row, existing zeros included; ignored for N:M.
        nm: ``(n, m)``: keep at most ``n`` nonzeros in each ``m`` consecutive inputs.
        dead: bool ``(d_in,)``, inputs that are zero on every calibration sample (e.g.
            ``diag(H) == 0``); ``None``: no input is known to be dead.

    Returns:
        The pruned weights (a new tensor).
    """
    if W.dim() != 2:
        raise ValueError(f"W must have shape (d_out, d_in), got {tuple(W.shape)}")
    if dead is not None and dead.shape != (W.shape[1],):
        raise ValueError(f"dead must be a bool mask of shape ({W.shape[1]},), got {dead.shape}")
    mask = _prune_mask(W.abs(), sparsity, nm, _existing_zeros(W, dead))
    return W.masked_fill(mask, 0.0)


def wanda_prune(
    W: Tensor, input_norms: Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> Tensor:
    """Wanda (Sun et al., ICLR 2024): score ``S_ij = |W_ij| · ||X_j||₂``, per output row, no update.

    Existing zeros count toward the target (see :func:`_prune_mask`): a row with ``z_r`` zeros
    (zero weights, and the weights of dead inputs, ``||X_j||₂ = 0``, which are zeroed) ends with
    ``max(z_r, round(sparsity·d_in))`` zeros; with N:M, every group of ``m`` keeps at most
    ``n`` nonzeros and all the zeros it had.

    Args:
        W: weights, shape ``(d_out, d_in)``.
        input_norms: ``||X_j||₂`` over the calibration samples, shape ``(d_in,)``
            (e.g. ``sqrt(n · diag(H) / 2)`` for ``H = 2XᵀX/n``; any positive scale gives the
            same mask).
        sparsity: target fraction of zeros in every row, existing zeros included; ignored for N:M.
        nm: ``(n, m)``: keep at most ``n`` nonzeros in each ``m`` consecutive inputs.

    Returns:
        The pruned weights (a new tensor).
    """
    if W.dim() != 2 or input_norms.shape != (W.shape[1],):
        raise ValueError(
            f"W must be (d_out, d_in) and input_norms (d_in,), got {tuple(W.shape)} and "
            f"{tuple(input_norms.shape)}"
        )
    scores = W.abs().to(compute_dtype(W)) * input_norms.to(compute_dtype(W)).unsqueeze(0)
    mask = _prune_mask(scores, sparsity, nm, _existing_zeros(W, input_norms == 0))
    return W.masked_fill(mask, 0.0)


def _rate(sparsity: float, zeros: Tensor, d: Tensor | int) -> Tensor:
    """``s' = s − z(1 − s)/(d − z)``: the fraction of the ``d − z`` nonzero weights to prune
    so that ``z`` existing zeros plus them make ``s·d`` (``s' = s`` exactly for ``z = 0``;
    ``0`` where ``d = z``)."""
    z = zeros.to(torch.float64)
    c = (torch.as_tensor(d, device=zeros.device) - zeros).to(torch.float64)
    return torch.where(c > 0, sparsity - z * (1.0 - sparsity) / c.clamp(min=1.0), 0.0)


def _schedule(rate: Tensor, extra: Tensor, cand: Tensor, before: Tensor, unit: int = 1) -> Tensor:
    """How many of ``extra`` new zeros should be chosen among the first ``before`` of ``cand``
    candidates: ``unit · round(rate · before / unit)``, kept within
    ``[max(0, extra − (cand − before)), min(extra, before)]`` (so the rest always fits, and it
    reaches ``extra`` at ``before = cand``). With no existing zero (``rate = s``) and
    ``unit = 1`` this is ``round(s · before)``, the split of dense layers."""
    b = before.to(torch.float64)
    g = unit * torch.floor(rate * (b / unit) + 0.5).to(torch.long)
    lo = (extra - (cand - before)).clamp(min=0)
    return torch.maximum(lo, torch.minimum(g, torch.minimum(extra, before)))


#: ``compress(W1, i)``: the compressed value of column ``i`` of the current block ``W1`` (its
#: other columns already hold the OBS-updated weights; a compressor may read them, e.g. to
#: choose an N:M group when it reaches the group's first column).
ColumnCompressor = Callable[[Tensor, int], Tensor]
#: ``start(W1, i1, i2)``: called when the block of columns ``[i1, i2)`` starts.
BlockStart = Callable[[Tensor, int, int], None]


def obs_sweep_(
    Wc: Tensor,
    U: Tensor,
    block_size: int,
    compress: ColumnCompressor,
    start_block: BlockStart | None = None,
) -> None:
    """The fixed-order OBS sweep shared by SparseGPT and GPTQ, in place on ``Wc``.

    Column ``j`` is replaced by ``q_j = compress(...)`` and the columns after it absorb the OBS
    correction ``W[:, j:] -= ((w_j − q_j) / U_jj) · U[j, j:]``. Updates are lazy: inside a
    block of ``block_size`` columns they are applied to the block only, and the block's
    accumulated errors ``E`` update the rest in one product ``W[:, i2:] -= E · U[i1:i2, i2:]``
    (Frantar & Alistarh 2023). Pruning is ``q_j`` with zeros, quantization ``q_j`` on a grid,
    and both at once compose the two.
    """
    d_in = Wc.shape[1]
    for i1 in range(0, d_in, block_size):
        i2 = min(i1 + block_size, d_in)
        W1 = Wc[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        if start_block is not None:
            start_block(W1, i1, i2)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = compress(W1, i)
            Q1[:, i] = q
            e = (w - q) / U1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = e
        Wc[:, i1:i2] = Q1
        Wc[:, i2:] -= E1 @ U[i1:i2, i2:]


@overload
def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    block_size: int = ...,
    nm: tuple[int, int] | None = ...,
    damp: float = ...,
    mask_scope: Literal["row", "block"] = ...,
    bits: int | None = ...,
    group_size: int | None = ...,
    *,
    return_grid: Literal[False] = ...,
) -> Tensor: ...


@overload
def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    block_size: int = ...,
    nm: tuple[int, int] | None = ...,
    damp: float = ...,
    mask_scope: Literal["row", "block"] = ...,
    bits: int | None = ...,
    group_size: int | None = ...,
    *,
    return_grid: Literal[True],
) -> tuple[Tensor, Tensor, Tensor]: ...


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    block_size: int = 128,
    nm: tuple[int, int] | None = None,
    damp: float = 0.01,
    mask_scope: Literal["row", "block"] = "row",
    bits: int | None = None,
    group_size: int | None = None,
    *,
    return_grid: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """SparseGPT (Frantar & Alistarh, ICML 2023): OBS pruning in a fixed column order.

    With ``U`` the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), column ``j`` is visited in
    order; its row ``j`` of ``U`` is the OBS update restricted to the columns not yet visited.
    For every pruned weight the error ``e = w_j / U_jj`` is spread over the later columns,
    ``W[:, j:] -= e · U[j, j:]``. Updates are lazy: inside a block of ``block_size`` columns they
    are applied at once to the block, and the accumulated errors ``E`` of the block update the
    rest of the matrix in one product ``W[:, i2:] -= E · U[i1:i2, i2:]``.

    Mask selection is adaptive (per block, from the already-updated weights) with the OBS
    score ``w_j² / U_jj²`` (= ``w_j² / [H_F⁻¹]_jj`` for the columns ``F`` not yet visited).

    Existing zeros count toward the target, as in the SparseGPT reference (whose score puts them
    first): a row's zeros ``Z_r`` are its zero weights and the weights of dead inputs
    (``H_jj = 0``, zeroed first since they multiply inputs that are always 0). They are always
    in the mask, and only the rest of the target is pruned among the nonzero weights:

    * Unstructured, ``mask_scope="row"``: row ``r`` with ``z_r = |Z_r|`` gets
      ``a_r = max(0, round(sparsity · d_in) − z_r)`` new zeros, so it ends with
      ``max(z_r, round(sparsity · d_in))`` zeros (a row already sparser than the target keeps
      its zeros and loses nothing more). ``a_r`` is split over the blocks by cumulative
      rounding over the row's ``c_r = d_in − z_r`` nonzero weights at the rate
      ``s_r = s − z_r (1 − s) / c_r`` (``round(s_r · x)`` by the ``x``-th of them; ``s_r = s``
      for a dense row, the split ``round(s · column)`` of a layer without zeros), and inside a
      block each row prunes its lowest scores.
    * Unstructured, ``mask_scope="block"`` (the reference implementation's choice): the same
      count for the whole layer, ``max(0, d_out · round(sparsity · d_in) − Σ_r z_r)`` new
      zeros, the lowest scores of each block over all rows, so rows may end with different
      sparsities; the layer ends with ``max(Σ_r z_r, d_out · round(sparsity · d_in))`` zeros.
    * N:M (``nm=(n, m)``): in each group of ``m`` consecutive inputs at most ``n`` nonzeros
      remain; a group with ``z`` existing zeros keeps them all and gets ``max(0, m − n − z)``
      more, its lowest scores when the group is reached.

    (The reference counts the zeros within each block's share of the budget only, so zeros in
    excess of a share are left free, absorb OBS updates and become nonzero; here every existing
    zero stays zero.)

    Joint pruning and quantization (``bits`` given), as in the SparseGPT reference: the column
    compressor returns the *quantized* value of every kept weight and 0 for a pruned one, so
    the OBS update of the later columns absorbs both errors in the same sweep. Grid (min-max,
    widened to contain 0, see :func:`~prunekit.posttrain.quant.minmax_grid`): per row, from the
    row's weights before the sweep (dead inputs zeroed); per group of ``group_size``
    consecutive inputs, from the group's OBS-updated weights when the sweep reaches its first
    column, with the weights already chosen for pruning counted as 0 (the block size is then
    rounded to a multiple of ``group_size``, and of ``m`` for N:M, so a group never straddles a
    lazy block). Every row (or group) holds at most ``2^bits`` distinct values, 0 included.

    Args:
        W: weights, shape ``(d_out, d_in)``; not modified.
        H: layer Hessian ``2 XᵀX / n``, shape ``(d_in, d_in)``.
        sparsity: target fraction of zeros per row (per layer with ``mask_scope="block"``),
            existing zeros included (ignored for N:M).
        block_size: columns per lazy-update block (a multiple of ``m`` for N:M).
        nm: ``(n, m)`` semi-structured pattern, e.g. ``(2, 4)``.
        damp: relative damping, see :func:`prepare_hessian`.
        mask_scope: ``"row"`` (every row exactly the same sparsity) or ``"block"`` (one
            threshold per column block over all rows, as in the SparseGPT reference code).
        bits: ``None`` (pruning only) or the bits of the grid of the kept weights (``1..16``).
        group_size: with ``bits``: ``None`` (per-row grid) or inputs per grid group.
        return_grid: with ``bits``: also return ``(scale, zero)`` of shape
            ``(d_out, n_groups)``, for :func:`~prunekit.posttrain.quant.quantize_to_ints`.

    Returns:
        The pruned and compensated weights (new tensor, dtype of ``W``), or
        ``(weights, scale, zero)`` with ``return_grid=True``.

    Raises:
        HessianError: the Hessian cannot be factorised (see :func:`prepare_hessian`).
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"W must be (d_out, d_in) and H (d_in, d_in), got {tuple(W.shape)} and {tuple(H.shape)}"
        )
    d_out, d_in = W.shape
    _check_sparsity(sparsity, nm, d_in)
    if mask_scope not in ("row", "block"):
        raise ValueError(f"mask_scope must be 'row' or 'block', got {mask_scope!r}")
    if block_size < 1 or (nm is not None and block_size % nm[1] != 0):
        raise ValueError(f"block_size must be >= 1 (and a multiple of m for N:M), got {block_size}")
    if bits is None and (group_size is not None or return_grid):
        raise ValueError("group_size and return_grid need bits (joint pruning + quantization)")
    dtype = compute_dtype(W)
    h_d, info = prepare_hessian(H.to(dtype), damp=damp)
    Wc = W.to(dtype).clone(memory_format=torch.contiguous_format)  # any strides in
    dead = torch.zeros(d_in, dtype=torch.bool, device=W.device)
    dead[info.dead] = True
    Wc[:, dead] = 0.0

    U = inverse_hessian_cholesky(h_d)
    u_diag = torch.diagonal(U)
    # existing zeros (zero weights, dead inputs): always pruned, and counted toward the target
    zeros = Wc == 0
    cand_before = torch.cat(  # nonzero weights of each row before every column
        [torch.zeros(d_out, 1, dtype=torch.long, device=W.device), torch.cumsum(~zeros, 1)], 1
    )
    cand = cand_before[:, -1]
    if mask_scope == "row":  # per row: max(0, round(s·d_in) − z_r) new zeros
        extra = (_n_pruned(sparsity, d_in) - (d_in - cand)).clamp(min=0)
        rate = _rate(sparsity, d_in - cand, d_in)
    else:  # per layer: max(0, d_out·round(s·d_in) − Z) new zeros
        layer_zeros = d_out * d_in - cand.sum()
        extra = (d_out * _n_pruned(sparsity, d_in) - layer_zeros).clamp(min=0)
        rate = _rate(sparsity, layer_zeros, d_out * d_in)
    chosen = torch.zeros_like(extra)  # new zeros chosen so far (per row, or for the layer)
    mask = torch.zeros_like(Wc, dtype=torch.bool)  # pruned weights, chosen as the sweep goes

    def choose_unstructured(W1: Tensor, i1: int, i2: int) -> None:
        zeros1 = zeros[:, i1:i2]
        scores = W1.square() / u_diag[i1:i2].square().unsqueeze(0)
        scores.masked_fill_(zeros1, math.inf)
        if mask_scope == "row":
            room = cand_before[:, i2] - cand_before[:, i1]
            goal = _schedule(rate, extra, cand, cand_before[:, i2])
            k = torch.minimum(goal - chosen, room).clamp(min=0)
            mask1 = _lowest(scores, k)
        else:
            room = cand_before[:, i2].sum() - cand_before[:, i1].sum()
            goal = _schedule(rate, extra, cand.sum(), cand_before[:, i2].sum(), unit=d_out)
            k = torch.minimum(goal - chosen, room).clamp(min=0)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            flat = torch.topk(scores.flatten(), int(k), largest=False).indices
            mask1.view(-1)[flat] = True
        chosen.add_(k)
        mask[:, i1:i2] = mask1 | zeros1

    i_block = [0]

    def start(W1: Tensor, i1: int, i2: int) -> None:
        i_block[0] = i1
        if nm is None:
            choose_unstructured(W1, i1, i2)

    quant = None if bits is None else _JointGrid(Wc, bits, group_size, mask)
    if quant is not None and quant.group_size is not None:
        unit = math.lcm(quant.group_size, nm[1] if nm is not None else 1)
        aligned = unit * max(1, block_size // unit)
        if aligned != block_size:
            logger.info("block_size %d -> %d so grid groups align with blocks", block_size, aligned)
        block_size = aligned

    def compress(W1: Tensor, i: int) -> Tensor:
        j = i_block[0] + i
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            zeros1 = zeros[:, j : j + m]
            g = W1[:, i : i + m].square() / u_diag[j : j + m].square().unsqueeze(0)
            g.masked_fill_(zeros1, math.inf)
            k = (m - n - zeros1.sum(dim=1)).clamp(min=0)
            mask[:, j : j + m] = _lowest(g, k) | zeros1
        q = W1[:, i].masked_fill(mask[:, j], 0.0)
        return q if quant is None else quant(W1, i, j, q)

    obs_sweep_(Wc, U, block_size, compress, start)
    Wc[:, dead] = 0.0
    if quant is not None and return_grid:
        return Wc.to(W.dtype), quant.scale, quant.zero
    return Wc.to(W.dtype)


class _JointGrid:
    """The quantizer of joint SparseGPT: per-row grid up front, or per group when reached."""

    def __init__(self, Wc: Tensor, bits: int, group_size: int | None, mask: Tensor) -> None:
        check_bits(bits)
        check_group_size(group_size)
        d_out, d_in = Wc.shape
        self.maxq = 2**bits - 1
        self.mask = mask
        self.group_size = None if group_size is None or group_size >= d_in else group_size
        if self.group_size is None:
            self.scale, self.zero = minmax_grid(Wc, bits)
        else:
            n_groups = math.ceil(d_in / self.group_size)
            self.scale = torch.empty(d_out, n_groups, dtype=Wc.dtype, device=Wc.device)
            self.zero = torch.empty_like(self.scale)

    def __call__(self, W1: Tensor, i: int, j: int, q: Tensor) -> Tensor:
        g = 0
        if self.group_size is not None:
            g = j // self.group_size
            if j % self.group_size == 0:
                gs = self.group_size
                cur = W1[:, i : i + gs].masked_fill(self.mask[:, j : j + gs], 0.0)
                self.scale[:, g], self.zero[:, g] = minmax_range(cur, self.maxq)
        return fake_quantize(q, self.scale[:, g], self.zero[:, g], self.maxq)
