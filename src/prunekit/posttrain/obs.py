"""The layer-wise optimal-brain-surgeon (OBS) core: Hessians, OBS removal, SparseGPT, Wanda.

Pure tensor maths, no hooks and no model traversal. A linear layer ``y = W x`` with
``W`` of shape ``(d_out, d_in)`` is compressed to ``Ŵ`` by minimising, row by row, the
reconstruction error on calibration inputs ``X`` (``n`` samples, shape ``(n, d_in)``)::

    E(Ŵ) = (1/n) Σ_k ||W x_k - Ŵ x_k||²  =  Σ_rows ½ (w - ŵ) H (w - ŵ)ᵀ,   H = (2/n) Xᵀ X.

Convention: ``H`` is the Hessian of the *mean* squared error per sample, ``H = 2 XᵀX / n``
(the ``2`` of OBS/OBC/SparseGPT, the ``1/n`` of a running average). With this ``H`` every
loss returned here is a mean squared error per calibration sample.

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
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
from torch import Tensor

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


class HessianError(ValueError):
    """A layer Hessian that cannot be made positive definite by bounded damping."""


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    if not t.is_floating_point():
        raise TypeError(
            f"expected a floating-point tensor, got {t.dtype}; convert it with .float()"
        )
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def layer_hessian(inputs: Tensor) -> Tensor:
    """Layer Hessian ``H = 2 XᵀX / n`` of the mean squared reconstruction error.

    Args:
        inputs: calibration inputs of the layer, shape ``(n, d_in)`` (one sample per row).

    Returns:
        ``H`` of shape ``(d_in, d_in)``, in float64 for float64 inputs, float32 otherwise.
    """
    if inputs.dim() != 2 or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs must have shape (n, d_in) with n >= 1, got {tuple(inputs.shape)}; "
            "flatten batch and sequence dimensions first"
        )
    x = inputs.to(_compute_dtype(inputs))
    return (2.0 / x.shape[0]) * (x.T @ x)


class HessianAccumulator:
    """Running average of ``H = 2 XᵀX / n`` over calibration batches.

    After batches ``X_1 .. X_k`` with ``n = Σ n_i`` samples, ``hessian`` equals
    ``layer_hessian(cat(X_1 .. X_k))``: each ``add`` rescales the old average by
    ``n_old / n_new`` and adds ``(2 / n_new) X_iᵀ X_i``.

    Args:
        d_in: input dimension of the layer.
        dtype: accumulation dtype (float32 or float64).
        device: device of the accumulator; batches are moved to it.
    """

    def __init__(
        self,
        d_in: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.d_in = d_in
        self.n_samples = 0
        self._h = torch.zeros(d_in, d_in, dtype=dtype, device=device)

    def add(self, x: Tensor) -> None:
        """Add a batch of inputs of shape ``(..., d_in)``; leading dimensions are samples."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"last dimension of the batch must be d_in={self.d_in}, got {x.shape}")
        x2 = x.reshape(-1, self.d_in).to(dtype=self._h.dtype, device=self._h.device)
        m = x2.shape[0]
        if m == 0:
            return
        n_new = self.n_samples + m
        self._h.mul_(self.n_samples / n_new)
        self._h.addmm_(x2.T, x2, alpha=2.0 / n_new)
        self.n_samples = n_new

    def is_finite(self) -> bool:
        """Whether the running ``2 XᵀX / n`` holds no NaN or inf (false as soon as one input
        did, or the products overflowed); checked once, not per batch, to keep ``add`` free of
        host synchronisation."""
        return bool(torch.isfinite(self._h).all())

    @property
    def hessian(self) -> Tensor:
        """The current average ``2 XᵀX / n`` (a copy)."""
        if self.n_samples == 0:
            raise ValueError("no inputs were added; call add() with calibration batches first")
        return self._h.clone()


@dataclass
class HessianInfo:
    """What :func:`prepare_hessian` did.

    Attributes:
        dead: indices of dead inputs (``H_ii == 0``: the input is zero on every sample).
        damp: the relative damping ``λ`` finally used (``H + λ·mean(diag H)·I``).
        damp_history: every ``λ`` tried, in order; more than one entry means escalation.
        tries: number of factorisations attempted.
    """

    dead: Tensor
    damp: float
    damp_history: list[float] = field(default_factory=list)
    tries: int = 0


def prepare_hessian(
    H: Tensor,
    damp: float = 0.01,
    max_tries: int = 5,
    min_damp: float = 1e-6,
) -> tuple[Tensor, HessianInfo]:
    """Dead-input fix and damping of a layer Hessian, with bounded damping escalation.

    Steps (SparseGPT/OBC recipe): dead inputs (``H_ii = 0``) get ``H_ii = 1`` (their weights
    must be zeroed by the caller); then ``H ← H + λ·mean(diag H)·I``. The Cholesky factor
    ``L`` is accepted only if it exists and its smallest pivot satisfies
    ``min L_ii² ≥ d·eps·mean(diag H)`` (a numerically singular factor is refused). Otherwise
    ``λ`` is multiplied by 10 (``λ = 0`` becomes ``min_damp``), a warning is logged, and the
    factorisation is retried, at most ``max_tries`` times in all. There is no identity fallback.

    Args:
        H: symmetric ``(d, d)`` Hessian, e.g. from :func:`layer_hessian`.
        damp: initial relative damping ``λ`` (``≥ 0``).
        max_tries: number of factorisations attempted before giving up (``≥ 1``).
        min_damp: the ``λ`` tried after a failure at ``λ = 0``.

    Returns:
        ``(H_damped, info)``: the damped Hessian (a new tensor, computation dtype) and a
        :class:`HessianInfo`.

    Raises:
        HessianError: ``H`` is not finite, or no ``λ`` up to ``damp·10^(max_tries-1)`` gave an
            acceptable factor (``H`` is far from positive semi-definite).
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix, got shape {tuple(H.shape)}")
    if damp < 0 or not math.isfinite(damp):
        raise ValueError(f"damp must be a finite number >= 0, got {damp}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    h = H.to(_compute_dtype(H)).clone()
    if not torch.isfinite(h).all():
        raise HessianError("H contains NaN or inf; check the calibration inputs")
    d = h.shape[0]
    diag = torch.diagonal(h)
    dead = torch.nonzero(diag == 0).flatten()
    if dead.numel() > 0:
        logger.info("%d dead input(s) (H_ii = 0) set to H_ii = 1", dead.numel())
        diag[dead] = 1.0
    mean_diag = float(diag.mean())
    tol = d * torch.finfo(h.dtype).eps * abs(mean_diag)
    eye = torch.eye(d, dtype=h.dtype, device=h.device)
    info = HessianInfo(dead=dead, damp=damp)
    lam = damp
    for attempt in range(max_tries):
        info.damp_history.append(lam)
        info.tries = attempt + 1
        h_d = h + (lam * mean_diag) * eye
        L, err = torch.linalg.cholesky_ex(h_d)
        if int(err) == 0 and float(torch.diagonal(L).square().min()) >= tol:
            info.damp = lam
            return h_d, info
        next_lam = lam * 10.0 if lam > 0 else min_damp
        if attempt + 1 < max_tries:
            logger.warning(
                "Cholesky of the damped Hessian %s at damp=%g; retrying with damp=%g",
                "failed" if int(err) else "is numerically singular",
                lam,
                next_lam,
            )
        lam = next_lam
    raise HessianError(
        f"H is not positive definite even with damp={info.damp_history[-1]:g} after "
        f"{max_tries} tries (tried {info.damp_history}); H must be a PSD matrix such as "
        "2 XᵀX / n: check the inputs, or pass a larger damp / max_tries"
    )


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
    dtype = _compute_dtype(w)
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


def _prune_mask(scores: Tensor, sparsity: float, nm: tuple[int, int] | None) -> Tensor:
    """Boolean mask (True = pruned) of the lowest scores, per row or per N:M group.

    Unstructured: the ``round(sparsity·d_in)`` lowest scores of every row. N:M (``n`` nonzeros
    kept out of every ``m`` consecutive inputs): the ``m - n`` lowest scores of every group.
    """
    d_out, d_in = scores.shape
    _check_sparsity(sparsity, nm, d_in)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        groups = scores.reshape(d_out, d_in // m, m)
        idx = torch.topk(groups, m - n, dim=2, largest=False).indices
        return mask.reshape(d_out, d_in // m, m).scatter_(2, idx, True).reshape(d_out, d_in)
    k = _n_pruned(sparsity, d_in)
    idx = torch.topk(scores, k, dim=1, largest=False).indices
    return mask.scatter_(1, idx, True)


def magnitude_prune(W: Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> Tensor:
    """Magnitude pruning per output row, score ``|W_ij|``, no update.

    Args:
        W: weights, shape ``(d_out, d_in)``.
        sparsity: fraction pruned in every row (``round(sparsity·d_in)`` weights); ignored for N:M.
        nm: ``(n, m)``: keep at most ``n`` nonzeros in each ``m`` consecutive inputs.

    Returns:
        The pruned weights (a new tensor).
    """
    if W.dim() != 2:
        raise ValueError(f"W must have shape (d_out, d_in), got {tuple(W.shape)}")
    mask = _prune_mask(W.abs(), sparsity, nm)
    return W.masked_fill(mask, 0.0)


def wanda_prune(
    W: Tensor, input_norms: Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> Tensor:
    """Wanda (Sun et al., ICLR 2024): score ``S_ij = |W_ij| · ||X_j||₂``, per output row, no update.

    Args:
        W: weights, shape ``(d_out, d_in)``.
        input_norms: ``||X_j||₂`` over the calibration samples, shape ``(d_in,)``
            (e.g. ``sqrt(n · diag(H) / 2)`` for ``H = 2XᵀX/n``; any positive scale gives the
            same mask).
        sparsity: fraction pruned in every row; ignored for N:M.
        nm: ``(n, m)``: keep at most ``n`` nonzeros in each ``m`` consecutive inputs.

    Returns:
        The pruned weights (a new tensor).
    """
    if W.dim() != 2 or input_norms.shape != (W.shape[1],):
        raise ValueError(
            f"W must be (d_out, d_in) and input_norms (d_in,), got {tuple(W.shape)} and "
            f"{tuple(input_norms.shape)}"
        )
    scores = W.abs().to(_compute_dtype(W)) * input_norms.to(_compute_dtype(W)).unsqueeze(0)
    mask = _prune_mask(scores, sparsity, nm)
    return W.masked_fill(mask, 0.0)


def inverse_hessian_cholesky(h_damped: Tensor) -> Tensor:
    """The upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) from a damped Hessian.

    Row ``j`` of ``U`` is the OBS update of column ``j`` restricted to the columns after it,
    which is what a fixed-order sweep (:func:`obs_sweep_`) needs.

    Raises:
        HessianError: the factorisation fails (pass a larger ``damp``).
    """
    L, err = torch.linalg.cholesky_ex(h_damped)
    if int(err) == 0:
        U, err = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(err) != 0:
        raise HessianError("Cholesky of H⁻¹ failed; pass a larger damp")
    return U


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

    * Unstructured: per output row, ``round(sparsity · n_live)`` of the ``n_live`` live inputs
      are pruned in total; the count is split over the blocks by cumulative rounding, and
      inside a block each row prunes its lowest scores. Dead inputs (``H_jj = 0``) are not
      counted: their weights are zeroed *in addition*. With ``mask_scope="block"`` (the
      reference implementation's choice) the lowest ``d_out · k_block`` scores of the whole
      block are pruned instead, so rows may end with different sparsities; the layer total
      is still ``d_out · round(sparsity · n_live)``.
    * N:M (``nm=(n, m)``): in each group of ``m`` consecutive inputs at most ``n`` nonzeros
      remain; the ``m - n`` lowest scores are chosen when the group is reached. Dead inputs
      are zeros and count toward the pattern (they are picked first).

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
        sparsity: fraction of live weights pruned per row (ignored for N:M).
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
    d_in = W.shape[1]
    _check_sparsity(sparsity, nm, d_in)
    if mask_scope not in ("row", "block"):
        raise ValueError(f"mask_scope must be 'row' or 'block', got {mask_scope!r}")
    if block_size < 1 or (nm is not None and block_size % nm[1] != 0):
        raise ValueError(f"block_size must be >= 1 (and a multiple of m for N:M), got {block_size}")
    if bits is None and (group_size is not None or return_grid):
        raise ValueError("group_size and return_grid need bits (joint pruning + quantization)")
    dtype = _compute_dtype(W)
    h_d, info = prepare_hessian(H.to(dtype), damp=damp)
    Wc = W.to(dtype).clone()
    dead = torch.zeros(d_in, dtype=torch.bool, device=W.device)
    dead[info.dead] = True
    Wc[:, dead] = 0.0

    U = inverse_hessian_cholesky(h_d)
    u_diag = torch.diagonal(U)
    live_before = torch.cat(
        [torch.zeros(1, dtype=torch.long, device=W.device), torch.cumsum(~dead, 0)]
    ).tolist()
    mask = torch.zeros_like(Wc, dtype=torch.bool)  # pruned weights, chosen as the sweep goes

    def choose_unstructured(W1: Tensor, i1: int, i2: int) -> None:
        dead1 = dead[i1:i2]
        k = _n_pruned(sparsity, live_before[i2]) - _n_pruned(sparsity, live_before[i1])
        k = max(0, min(k, int((~dead1).sum())))
        scores = W1.square() / u_diag[i1:i2].square().unsqueeze(0)
        scores[:, dead1] = math.inf
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if mask_scope == "row":
            mask1.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
        else:
            flat = torch.topk(scores.flatten(), k * W1.shape[0], largest=False).indices
            mask1.view(-1)[flat] = True
        mask[:, i1:i2] = mask1 | dead1

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
            g = W1[:, i : i + m].square() / u_diag[j : j + m].square().unsqueeze(0)
            g[:, dead[j : j + m]] = -math.inf
            idx = torch.topk(g, m - n, dim=1, largest=False).indices
            mask.scatter_(1, j + idx, True)
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
        from prunekit.posttrain.quant import _check_bits, _check_group_size, minmax_grid

        _check_bits(bits)
        _check_group_size(group_size)
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
        from prunekit.posttrain.quant import _minmax, _quantize

        g = 0
        if self.group_size is not None:
            g = j // self.group_size
            if j % self.group_size == 0:
                gs = self.group_size
                cur = W1[:, i : i + gs].masked_fill(self.mask[:, j : j + gs], 0.0)
                self.scale[:, g], self.zero[:, g] = _minmax(cur, self.maxq)
        return _quantize(q, self.scale[:, g], self.zero[:, g], self.maxq)
