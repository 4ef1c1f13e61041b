"""OBC and OBQ: exact greedy OBS per row (Frantar & Alistarh, NeurIPS 2022).

Pure tensor maths, same conventions as :mod:`prunekit.posttrain.hessian`: a layer ``W`` of shape
``(d_out, d_in)``, ``H = 2 XᵀX / n`` (losses are mean squared errors per calibration sample).

Every row is compressed on its own, greedily and exactly. With ``H⁻¹`` the inverse of the
damped Hessian restricted to the row's weights that are still free, one step

1. picks the free weight ``p`` with the smallest OBS cost — pruning (OBC):
   ``w_p² / [H⁻¹]_pp``, a weight that is already 0 first (so the zeros a row has count toward
   its target, see :func:`obc_database`); quantization (OBQ): ``(q(w_p) - w_p)² / [H⁻¹]_pp``;
2. fixes it (``w_p ← 0`` or ``q(w_p)``) and updates the free weights optimally,
   ``δ = -((w_p - target_p) / [H⁻¹]_pp) · H⁻¹[:, p]``; the step's loss is
   ``(w_p - target_p)² / (2 [H⁻¹]_pp)``;
3. eliminates ``p`` from the inverse by a rank-1 downdate (one Gauss-Jordan step),
   ``H⁻¹ ← H⁻¹ - H⁻¹[:, p] H⁻¹[p, :] / [H⁻¹]_pp``, which is exactly the inverse of ``H`` with
   row and column ``p`` removed (padded with zeros).

Because each step is the exact OBS optimum, the weights after ``k`` removals are the
least-squares optimum on the support that is left (for the damped ``H``). Cost per row
``O(k · d_in²)``, i.e. ``O(d_out · d_in³)`` for a whole trace (about a third of that, since
eliminated columns are dropped from the stored inverses as they accumulate): rows are
processed ``row_batch`` at a time (memory ``row_batch · d_in²``). Measured on a shared
2-core CPU, one thread, for a 300×784 layer (LeNet-300 fc1): OBC at 50% ≈ 40 s, at 90%
≈ 55 s, ``mask_scope="layer"`` ≈ 95 s, OBQ 4 bits ≈ 50 s (SparseGPT/GPTQ: 0.2 s). Layers up
to ``d_in ≈ 1000`` are practical on a CPU; use SparseGPT/GPTQ beyond.

Reference: Frantar & Alistarh, "Optimal Brain Compression: A Framework for Accurate Post-Training
Quantization and Pruning", NeurIPS 2022 (reference code github.com/IST-DASLab/OBC).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch import Tensor

from prunekit.posttrain.grid import (
    check_bits,
    compute_dtype,
    expand_grid,
    fake_quantize,
    minmax_grid,
)
from prunekit.posttrain.hessian import HessianError, prepare_hessian
from prunekit.posttrain.obs import _check_sparsity, _n_pruned

logger = logging.getLogger(__name__)

__all__ = ["ObcDatabase", "obc_database", "obc_prune", "obq_quantize"]

#: Default bound on the batched inverses, ``row_batch · d_in² · element size`` (256 MiB).
_BATCH_BYTES = 2**28


@dataclass
class ObcDatabase:
    """OBC results of one layer at several sparsity levels, from one greedy pass per row.

    This is the per-layer "database" of the OBC paper: a speed-aware allocator (SPDY, Frantar &
    Alistarh, ICML 2022) picks one level per layer from ``levels``/``losses`` and the measured
    layer times, then stitches ``weights_at(level)`` of every layer into the model.

    Attributes:
        levels: the requested sparsity levels, in the order given (for N:M, one level
            ``(m - n) / m``).
        weights: compressed weights per level, each ``(d_out, d_in)`` in the dtype of ``W``.
        losses: per level, the layer's error ``½ Σ_rows (w - ŵ) H (w - ŵ)ᵀ`` for the given
            (undamped) ``H = 2XᵀX/n``, i.e. ``||X Wᵀ - X Ŵᵀ||² / n``, the mean squared error
            per calibration sample. With ``damp = 0`` it equals the sum of the OBS step losses.
        order: ``(d_out, d_in)`` int64, ``order[r, t]`` the input removed from row ``r`` at
            step ``t``; ``-1`` after the last step run (dead inputs never appear). Rows run in
            lockstep, so a row whose count is below the batch's largest has steps past it.
        step_losses: ``(d_out, d_in)``, the OBS loss of each step under the damped ``H``
            (``w_p² / (2 [H⁻¹]_pp)``), ``nan`` after the last step run.
        counts: ``(d_out, n_levels)`` int64, greedy steps of each row at each level: the live
            weights it fixes at 0, its existing zero weights first (free steps).
        dead: indices of dead inputs (``H_jj = 0``): zeroed in every level, and counted as
            zeros of every row.
    """

    levels: list[float]
    weights: list[Tensor]
    losses: Tensor
    order: Tensor
    step_losses: Tensor
    counts: Tensor
    dead: Tensor

    def weights_at(self, level: float) -> Tensor:
        """The weights of the stored level equal to ``level`` (within 1e-9)."""
        for lv, w in zip(self.levels, self.weights, strict=True):
            if abs(lv - level) <= 1e-9:
                return w
        raise KeyError(f"level {level} is not in the database; stored levels: {self.levels}")


def _row_batch(row_batch: int | None, d_out: int, d: int, dtype: torch.dtype) -> int:
    if row_batch is None:
        elem = torch.finfo(dtype).bits // 8
        return max(1, min(d_out, _BATCH_BYTES // (d * d * elem)))
    if isinstance(row_batch, bool) or not isinstance(row_batch, int) or row_batch < 1:
        raise ValueError(f"row_batch must be None or an integer >= 1, got {row_batch!r}")
    return row_batch


def _check_layer(W: Tensor, H: Tensor) -> None:
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"W must be (d_out, d_in) and H (d_in, d_in), got {tuple(W.shape)} and {tuple(H.shape)}"
        )


def _prepare(W: Tensor, H: Tensor, damp: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(W with dead columns zeroed, H⁻¹ of the damped H, dead bool mask, dead indices)``."""
    dtype = compute_dtype(W)
    h_d, info = prepare_hessian(H.to(dtype), damp=damp)
    L, err = torch.linalg.cholesky_ex(h_d)
    if int(err) != 0:
        raise HessianError("Cholesky of the damped Hessian failed; pass a larger damp")
    hinv = torch.cholesky_inverse(L)
    dead = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    dead[info.dead] = True
    Wc = W.to(dtype).clone(memory_format=torch.contiguous_format)  # any strides in
    Wc[:, dead] = 0.0
    return Wc, hinv, dead, info.dead


class _FreeSet:
    """The free (not yet fixed) weights of a batch of rows, in compacted coordinates.

    Every row of a batch fixes one weight per step, so all rows hold the same number ``f`` of
    stored columns: ``cols`` ``(b, f)`` their input indices, ``w`` ``(b, f)`` their current
    values, ``hinv`` ``(b, f, f)`` the inverse Hessian restricted to them, ``fixed`` ``(b, f)``
    which of them are already eliminated. Eliminated columns are dropped from storage whenever
    they make up an eighth of it, so a step costs ``O(b · f²)`` with ``f`` shrinking: a full
    trace costs about a third of the uncompacted ``O(b · d³)``.
    """

    def __init__(self, w: Tensor, hinv0: Tensor, dead: Tensor) -> None:
        b, d = w.shape
        self.cols = torch.arange(d, device=w.device).unsqueeze(0).repeat(b, 1)
        self.w = w.clone()
        self.hinv = hinv0.unsqueeze(0).repeat(b, 1, 1)
        self.fixed = dead.unsqueeze(0).repeat(b, 1)
        self.ar = torch.arange(b, device=w.device)
        self.compact()

    def compact(self) -> None:
        """Drop the eliminated columns (every row has the same number of them)."""
        b, f = self.w.shape
        n_keep = f - int(self.fixed[0].sum())
        idx = torch.nonzero(~self.fixed)[:, 1].reshape(b, n_keep)
        self.cols = self.cols.gather(1, idx)
        self.w = self.w.gather(1, idx)
        rows = self.hinv.gather(1, idx.unsqueeze(2).expand(b, n_keep, f))
        self.hinv = rows.gather(2, idx.unsqueeze(1).expand(b, n_keep, n_keep))
        self.fixed = torch.zeros_like(self.w, dtype=torch.bool)

    def eliminate_(self, p: Tensor, target: Tensor, last: bool) -> tuple[Tensor, Tensor]:
        """Fix local column ``p`` of every row to ``target``: OBS update, rank-1 downdate.

        Returns ``(w_p, [H⁻¹]_pp)`` before the step.
        """
        ar = self.ar
        d_p = self.hinv[ar, p, p]
        w_p = self.w[ar, p]
        col = self.hinv[ar, :, p]
        self.w.sub_(((w_p - target) / d_p).unsqueeze(1) * col)
        self.fixed[ar, p] = True
        if not last:
            c = col / d_p.sqrt().unsqueeze(1)
            self.hinv.baddbmm_(c.unsqueeze(2), c.unsqueeze(1), alpha=-1.0)
            if int(self.fixed[0].sum()) >= max(1, self.w.shape[1] // 8):
                self.compact()
        return w_p, d_p

    def scatter(self, out: Tensor, rows: Tensor | None = None) -> None:
        """Write the current free values into ``out`` (``(b, d)``, input coordinates)."""
        vals = self.w.masked_fill(self.fixed, 0.0)
        if rows is None:
            out.scatter_(1, self.cols, vals)
        else:
            out[rows] = out[rows].scatter(1, self.cols[rows], vals[rows])


def _greedy_prune_rows(
    w: Tensor,
    hinv0: Tensor,
    dead: Tensor,
    n_steps: int,
    snap_counts: Tensor | None,
    nm: tuple[int, int] | None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Greedy OBS removal for a batch of rows ``w`` (``(b, d)``, dead columns already 0).

    Returns ``(order (b, n_steps), step_losses (b, n_steps), snapshots)`` where
    ``snapshots[l]`` is ``(b, d)``: row ``r`` as it was after ``snap_counts[r, l]`` steps.
    """
    b, d = w.shape
    free = _FreeSet(w, hinv0, dead)
    ar = free.ar
    order = torch.full((b, n_steps), -1, dtype=torch.long, device=w.device)
    losses = torch.zeros(b, n_steps, dtype=w.dtype, device=w.device)
    n_levels = 0 if snap_counts is None else snap_counts.shape[1]
    snaps = [w.clone() for _ in range(n_levels)]  # count 0 = the dense row
    if nm is not None:
        n, m = nm
        zeros_in_group = dead.reshape(d // m, m).sum(1).unsqueeze(0).repeat(b, 1)
        # a row past its last count goes on over all its free weights (never a full group's
        # weight before that), so that every row of the batch eliminates one weight per step
        last = None if snap_counts is None else snap_counts.max(dim=1).values
    for t in range(n_steps):
        diag = torch.diagonal(free.hinv, dim1=1, dim2=2)
        # a weight that is exactly 0 (an existing zero) is taken first, at no cost: δ = 0
        zero = free.w == 0
        blocked = free.fixed
        if nm is not None:
            full = zeros_in_group.gather(1, free.cols // m) >= m - n
            if last is not None:
                full &= (last > t).unsqueeze(1)
            blocked = blocked | (full & ~zero)
        score = (free.w.square() / diag).masked_fill(zero, -1.0)
        p = score.masked_fill(blocked, math.inf).argmin(dim=1)
        q = free.cols[ar, p]
        order[:, t] = q
        if nm is not None:
            zeros_in_group[ar, q // m] += 1
        w_p, d_p = free.eliminate_(p, torch.zeros_like(p, dtype=w.dtype), t + 1 == n_steps)
        losses[:, t] = w_p.square() / (2.0 * d_p)
        if snap_counts is not None:
            hit = snap_counts == t + 1
            for lv in range(n_levels):
                if bool(hit[:, lv].any()):
                    snaps[lv][hit[:, lv]] = 0.0
                    free.scatter(snaps[lv], hit[:, lv])
    return order, losses, snaps


def _layer_loss(W0: Tensor, W1: Tensor, H: Tensor) -> Tensor:
    """``½ Σ_rows (w0 - w1) H (w0 - w1)ᵀ`` = ``||X W0ᵀ - X W1ᵀ||² / n`` for ``H = 2XᵀX/n``."""
    D = W0 - W1
    return 0.5 * ((D @ H) * D).sum()


def obc_database(
    W: Tensor,
    H: Tensor,
    levels: Sequence[float],
    damp: float = 0.01,
    nm: tuple[int, int] | None = None,
    row_batch: int | None = None,
    mask_scope: Literal["row", "layer"] = "row",
) -> ObcDatabase:
    """OBC pruning of one layer at several sparsity levels from one greedy pass per row.

    Each row is pruned greedily, one weight at a time (see the module docstring: smallest
    ``w_p² / [H⁻¹]_pp``, OBS update ``δ = -(w_p / [H⁻¹]_pp) H⁻¹[:, p]``, exact rank-1
    elimination of ``p`` from ``H⁻¹``), and the row is snapshotted whenever its number of
    steps reaches the count of a level.

    Existing zeros count toward a level, as in the OBC reference (whose greedy score puts them
    first): dead inputs (``H_jj = 0``, ``n_dead`` of them) are zeroed up front, and a weight
    that is exactly 0 is always the next step (its OBS update is ``δ = 0``: it changes
    nothing but ``H⁻¹``). A level ``s`` takes ``k = min(n_live, max(0, round(s · d_in) −
    n_dead))`` steps per row, so a row with ``z_r`` zeros (dead inputs included) ends with
    ``max(z_r, round(s · d_in))`` zeros: its zero weights go first, and a row that already
    has more zeros than the level only eliminates zeros (its weights are unchanged).

    Allocation across rows (``mask_scope``):

    * ``"row"`` (default): every row takes exactly ``k`` steps; one pass up to the largest
      count gives every level.
    * ``"layer"``: as in the OBC reference code (``prune_blocked``), the per-step losses of all
      rows are sorted together and the ``d_out · k`` smallest are taken; a row's count is the
      number of its steps among them, so rows may differ but the layer total is exact. The
      steps of existing zero weights (cost 0) come first, so with ``Z`` zeros in all the
      layer ends with ``max(Z, d_out · round(s · d_in))`` zeros. This needs
      every row's full trace first, so it runs a full pass for the losses and a second pass
      (identical arithmetic, hence identical order) that snapshots each row at its own count.

    N:M (``nm=(n, m)``, groups of ``m`` consecutive inputs): the greedy step only considers
    groups that still have fewer than ``m - n`` zeros (dead inputs count as zeros), and the
    existing zero weights, which are eliminated in any group; a row takes
    ``Σ_groups max(m − n − dead_g, zeros_g)`` steps, so every group has at least ``m − n``
    zeros and keeps all it had. ``levels`` is then ignored and the database holds the one
    level ``(m - n) / m``.

    Args:
        W: weights, shape ``(d_out, d_in)``; not modified.
        H: layer Hessian ``2 XᵀX / n``, shape ``(d_in, d_in)``.
        levels: sparsity levels in ``[0, 1]``: target fractions of zeros per row (per layer
            with ``mask_scope="layer"``), existing zeros included.
        damp: relative damping, see :func:`~prunekit.posttrain.hessian.prepare_hessian`.
        nm: ``(n, m)`` semi-structured pattern, e.g. ``(2, 4)``.
        row_batch: rows processed together (memory ``row_batch · d_in²`` floats); ``None``
            picks a batch of at most 256 MiB.
        mask_scope: ``"row"`` or ``"layer"`` (see above; unstructured only).

    Returns:
        An :class:`ObcDatabase`.

    Raises:
        HessianError: the Hessian cannot be factorised (see ``prepare_hessian``).
    """
    _check_layer(W, H)
    d_out, d_in = W.shape
    if mask_scope not in ("row", "layer"):
        raise ValueError(f"mask_scope must be 'row' or 'layer', got {mask_scope!r}")
    if nm is not None:
        _check_sparsity(0.0, nm, d_in)
        if mask_scope != "row":
            raise ValueError("mask_scope='layer' applies to unstructured sparsity only, not N:M")
        levels = [(nm[1] - nm[0]) / nm[1]]
    else:
        levels = [float(s) for s in levels]
        if not levels:
            raise ValueError("levels must hold at least one sparsity level")
        for s in levels:
            _check_sparsity(s, None, d_in)
    Wc, hinv0, dead, dead_idx = _prepare(W, H, damp)
    dtype = Wc.dtype
    n_dead = int(dead.sum())
    n_live = d_in - n_dead
    batch = _row_batch(row_batch, d_out, d_in, dtype)
    dev = W.device

    if nm is not None:
        n, m = nm
        dead_per_group = dead.reshape(d_in // m, m).sum(1)
        zero_per_group = ((Wc == 0) & ~dead).reshape(d_out, d_in // m, m).sum(2)
        need = (m - n - dead_per_group).clamp(min=0).unsqueeze(0)
        counts = torch.maximum(need, zero_per_group).sum(1, keepdim=True)
        n_steps = int(counts.max())
    else:
        per_row = torch.tensor(
            [min(n_live, max(0, _n_pruned(s, d_in) - n_dead)) for s in levels],
            dtype=torch.long,
            device=dev,
        )
        counts = per_row.unsqueeze(0).repeat(d_out, 1)
        n_steps = int(per_row.max())
        if mask_scope == "layer":
            counts = _layer_counts(Wc, hinv0, dead, n_live, per_row, batch)
            n_steps = int(counts.max())

    order = torch.full((d_out, d_in), -1, dtype=torch.long, device=dev)
    step_losses = torch.full((d_out, d_in), math.nan, dtype=dtype, device=dev)
    snaps = [torch.empty_like(Wc) for _ in levels]
    for r1 in range(0, d_out, batch):
        r2 = min(r1 + batch, d_out)
        o, lo, rows = _greedy_prune_rows(Wc[r1:r2].clone(), hinv0, dead, n_steps, counts[r1:r2], nm)
        order[r1:r2, :n_steps] = o
        step_losses[r1:r2, :n_steps] = lo
        for lv in range(len(levels)):
            snaps[lv][r1:r2] = rows[lv]
        logger.debug("OBC rows %d..%d of %d done", r1, r2, d_out)

    h = H.to(dtype)
    W0 = W.to(dtype)
    losses = torch.stack([_layer_loss(W0, snap, h) for snap in snaps])
    return ObcDatabase(
        levels=list(levels),
        weights=[s.to(W.dtype) for s in snaps],
        losses=losses,
        order=order,
        step_losses=step_losses,
        counts=counts,
        dead=dead_idx,
    )


def _layer_counts(
    Wc: Tensor, hinv0: Tensor, dead: Tensor, n_live: int, per_row: Tensor, batch: int
) -> Tensor:
    """Per-row counts of ``mask_scope="layer"``: global selection of the smallest step losses.

    The steps of existing zero weights (a row's first steps) come first whatever their loss (0,
    as a weight whose loss underflows to 0 may also have)."""
    d_out = Wc.shape[0]
    trace = torch.empty(d_out, n_live, dtype=Wc.dtype, device=Wc.device)
    for r1 in range(0, d_out, batch):
        r2 = min(r1 + batch, d_out)
        _, trace[r1:r2], _ = _greedy_prune_rows(Wc[r1:r2].clone(), hinv0, dead, n_live, None, None)
    zero_steps = ((Wc == 0) & ~dead).sum(dim=1)
    first = torch.arange(n_live, device=Wc.device).unsqueeze(0) < zero_steps.unsqueeze(1)
    ranked = torch.argsort(trace.masked_fill(first, -1.0).flatten(), stable=True)
    row_of = ranked // max(n_live, 1)
    counts = torch.zeros(d_out, per_row.numel(), dtype=torch.long, device=Wc.device)
    for lv, k in enumerate(per_row.tolist()):
        counts[:, lv] = torch.bincount(row_of[: k * d_out], minlength=d_out)
    return counts


def obc_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    damp: float = 0.01,
    nm: tuple[int, int] | None = None,
    row_batch: int | None = None,
    mask_scope: Literal["row", "layer"] = "row",
) -> Tensor:
    """OBC pruning at one sparsity level: :func:`obc_database` with ``levels=[sparsity]``.

    Args:
        W: weights, shape ``(d_out, d_in)``; not modified.
        H: layer Hessian ``2 XᵀX / n``.
        sparsity: target fraction of zeros per row (``"row"``) or per layer (``"layer"``),
            existing zeros and dead inputs included (see :func:`obc_database`); ignored for N:M.
        damp, nm, row_batch, mask_scope: see :func:`obc_database`.

    Returns:
        The pruned and compensated weights (new tensor, dtype of ``W``).
    """
    return obc_database(W, H, [sparsity], damp, nm, row_batch, mask_scope).weights[0]


@overload
def obq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int | None = ...,
    damp: float = ...,
    row_batch: int | None = ...,
    *,
    sym: bool = ...,
    mse: bool = ...,
    return_grid: Literal[False] = ...,
) -> Tensor: ...


@overload
def obq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int | None = ...,
    damp: float = ...,
    row_batch: int | None = ...,
    *,
    sym: bool = ...,
    mse: bool = ...,
    return_grid: Literal[True],
) -> tuple[Tensor, Tensor, Tensor]: ...


def obq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int | None = None,
    damp: float = 0.01,
    row_batch: int | None = None,
    *,
    sym: bool = False,
    mse: bool = False,
    return_grid: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """OBQ (Optimal Brain Quantizer, OBC paper): greedy OBS quantization of every row.

    The grid is fixed up front from the original weights (dead inputs zeroed):
    :func:`~prunekit.posttrain.quant.minmax_grid` (asymmetric min-max, or ``sym``/``mse``) per
    row or per group of ``group_size`` consecutive inputs. Then, per row, until every weight is on the grid: among the weights not
    yet quantized pick ``p`` minimising ``(q(w_p) - w_p)² / [H⁻¹]_pp``, set ``w_p = q(w_p)``,
    update the others by ``δ = -((w_p - q(w_p)) / [H⁻¹]_pp) H⁻¹[:, p]`` and eliminate ``p``
    from ``H⁻¹`` (rank-1 downdate).

    Outliers, as in the OBC reference code: the updates can push a weight outside its grid's
    range, where its rounding error exceeds half a step. Whenever a row has such a weight
    (``(q(w) - w)² > scale² / 4``), the one with the largest error is quantized first, while
    many free weights remain to absorb its error. (The reference additionally skips this rule
    when the score-minimal weight is exactly 0; that detail is not reproduced.)

    Args:
        W: weights, shape ``(d_out, d_in)``; not modified.
        H: layer Hessian ``2 XᵀX / n``.
        bits: bits per weight (``1..16``).
        group_size: ``None`` (per-row grid) or the number of consecutive inputs sharing a grid.
        damp: relative damping, see :func:`~prunekit.posttrain.hessian.prepare_hessian`.
        row_batch: rows processed together; ``None`` picks a batch of at most 256 MiB.
        sym: symmetric grid.
        mse: grid clipped to the least rounding error.
        return_grid: also return the grid's ``(scale, zero)``, each ``(d_out, n_groups)``.

    Returns:
        The quantized weights (dequantized values on the grid of
        ``minmax_grid(W with dead columns zeroed, bits, group_size, sym=sym, mse=mse)``; new
        tensor, dtype of ``W``), or ``(weights, scale, zero)`` with ``return_grid``. Dead
        inputs get 0.
    """
    _check_layer(W, H)
    check_bits(bits)
    d_out, d_in = W.shape
    Wc, hinv0, dead, _ = _prepare(W, H, damp)
    scale_g, zero_g = minmax_grid(Wc, bits, group_size, sym=sym, mse=mse)
    scale = expand_grid(scale_g, d_in, group_size)
    zero = expand_grid(zero_g, d_in, group_size)
    maxq = 2**bits - 1
    batch = _row_batch(row_batch, d_out, d_in, Wc.dtype)
    n_steps = d_in - int(dead.sum())
    for r1 in range(0, d_out, batch):
        r2 = min(r1 + batch, d_out)
        _greedy_quantize_rows_(Wc[r1:r2], hinv0, dead, n_steps, scale[r1:r2], zero[r1:r2], maxq)
    if return_grid:
        return Wc.to(W.dtype), scale_g, zero_g
    return Wc.to(W.dtype)


def _greedy_quantize_rows_(
    w: Tensor,
    hinv0: Tensor,
    dead: Tensor,
    n_steps: int,
    scale: Tensor,
    zero: Tensor,
    maxq: int,
) -> None:
    """Greedy OBQ on a batch of rows ``w`` (``(b, d)``, a view quantized in place)."""
    free = _FreeSet(w, hinv0, dead)
    ar = free.ar
    fixed = torch.zeros_like(w)  # the grid values chosen so far (dead inputs: 0)
    for t in range(n_steps):
        s = scale.gather(1, free.cols)
        z = zero.gather(1, free.cols)
        q = fake_quantize(free.w, s, z, maxq)
        err = (q - free.w).square().masked_fill(free.fixed, 0.0)
        diag = torch.diagonal(free.hinv, dim1=1, dim2=2)
        p = (err / diag).masked_fill(free.fixed, math.inf).argmin(dim=1)
        out = err > 0.25 * s.square() * (1.0 + 1e-6)  # off the grid's range
        has_out = out.any(dim=1)
        if bool(has_out.any()):
            p = torch.where(has_out, err.argmax(dim=1), p)
        q_p = q[ar, p]
        fixed[ar, free.cols[ar, p]] = q_p
        free.eliminate_(p, q_p, t + 1 == n_steps)
    w.copy_(fixed)
