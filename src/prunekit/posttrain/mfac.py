"""M-FAC static algorithm: inverse empirical Fisher from m gradients, and OBS pruning with it.

Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021. From ``m`` gradients ``g_1 .. g_m`` (rows of ``G``, shape ``(m, d)``)
and a damping ``λ > 0`` (absolute, as in the paper; the reference code uses ``1e-5``)::

    F = λ I + (1/m) Σ_i g_i g_iᵀ = λ I + (1/m) GᵀG.

The paper precomputes ``F⁻¹`` with the Woodbury (Sherman–Morrison) recursion
``F_i⁻¹ = F_{i-1}⁻¹ − u_i u_iᵀ``, ``u_i = F_{i-1}⁻¹ g_i / sqrt(m + g_iᵀ F_{i-1}⁻¹ g_i)``, so that
``F⁻¹ = (1/λ) I − Σ_i u_i u_iᵀ``. Here the same factorisation is computed in one batched
(BLAS-3) step: with the lower Cholesky factor ``L Lᵀ = λm I + GGᵀ`` (an ``m × m`` matrix) and
``V = L⁻¹ G`` (``m × d``), the push-through identity gives::

    F⁻¹ = (1/λ) (I − Vᵀ V),        (λ^{-1/2} V_i is the recursion's u_i)

in ``O(d·m²)`` (the Gram matrix and one triangular solve). Then ``F⁻¹ v = (v − Vᵀ(V v))/λ``
costs ``O(d·m)``, ``diag(F⁻¹) = (1 − Σ_i V_i²)/λ`` costs ``O(d·m)``, and one entry costs ``O(m)``.

Blocked variant (the paper's choice for large ``d``): ``F`` is approximated block-diagonally over
consecutive blocks of ``block_size`` coordinates, each block with its own ``m × m`` factor; all
blocks are processed as one batch.

Precision: float64 gradients are computed in float64, every other floating dtype in float32;
the ``m × m`` Gram matrices are factorised in float64 whatever the input dtype. With a very small
``λ`` the diagonal ``(1 − Σ V_i²)/λ`` loses relative accuracy in float32 for coordinates that
the gradients span almost completely (``m ≳ d``); pass float64 gradients there.

Pruning (:func:`mfac_prune_step`) removes the weights with the smallest OBS saliency
``ρ_q = w_q² / (2 [F⁻¹]_qq)`` and applies the exact joint OBS compensation. The paper prunes
*gradually*: several steps, each with gradients recomputed at the current (pruned, compensated)
weights; the model-level caller loops "gradients at the current weights → one step"
(:func:`mfac_prune_live_step`: the blocks of the Fisher are re-formed over the weights still
alive at each step, as in the paper's code).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from prunekit.posttrain.grid import compute_dtype
from prunekit.posttrain.hessian import HessianError

logger = logging.getLogger(__name__)

__all__ = ["BlockFisherInverse", "FisherInverse", "mfac_prune_live_step", "mfac_prune_step"]

#: Elements of the per-chunk ``(blocks, m, m)`` float64 work arrays (bounds memory to ~128 MiB).
_CHUNK_ELEMS = 1 << 24


def _chunks(n_blocks: int, m: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMS // (m * m))
    return [slice(i, min(i + step, n_blocks)) for i in range(0, n_blocks, step)]


def _damped_cholesky(gb: Tensor, shift: float) -> Tensor:
    """Batched lower Cholesky factors of ``G_b G_bᵀ + shift·I`` in float64, ``gb``: (n, m, B)."""
    g64 = gb.to(torch.float64)
    K = torch.bmm(g64, g64.transpose(1, 2))
    K.diagonal(dim1=1, dim2=2).add_(shift)
    L, info = torch.linalg.cholesky_ex(K)
    if bool((info != 0).any()):
        raise HessianError(
            f"Cholesky of λm·I + GGᵀ failed (λm={shift:g}); the gradients are not finite or the "
            "damping is too small for their scale: pass a larger damp"
        )
    return L


class BlockFisherInverse:
    """Inverse of the block-diagonal damped empirical Fisher (M-FAC static algorithm, blocked).

    The ``d`` coordinates are split into consecutive blocks of ``block_size`` (the last one may be
    shorter); on block ``b`` with gradient columns ``G_b`` (``m × B``)::

        F_b = λ I + (1/m) G_bᵀ G_b,     F_b⁻¹ = (1/λ)(I − V_bᵀ V_b),   V_b = L_b⁻¹ G_b,
        L_b L_bᵀ = λm I + G_b G_bᵀ.

    Building costs ``O(d·m²)`` (batched over blocks, in chunks that bound the memory of the
    ``m × m`` float64 factors); :meth:`mul` and :meth:`diag` cost ``O(d·m)``. Memory: ``G`` and
    ``V``, ``2·m·d`` numbers. :class:`FisherInverse` is the unblocked case (one block of ``d``).

    Args:
        grads: gradients, shape ``(m, d)``, one per row (e.g. of ``m`` mini-batches).
        block_size: coordinates per block, ``1 ≤ block_size``; ``≥ d`` means one block.
        damp: absolute damping ``λ > 0``.
    """

    def __init__(self, grads: Tensor, block_size: int, damp: float = 1e-5) -> None:
        if grads.dim() != 2 or grads.shape[0] == 0 or grads.shape[1] == 0:
            raise ValueError(
                f"grads must have shape (m, d) with m, d >= 1, got {tuple(grads.shape)}; "
                "stack flattened gradients as rows"
            )
        if not (isinstance(block_size, int) and block_size >= 1):
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if not (damp > 0 and math.isfinite(damp)):
            raise ValueError(f"damp must be a finite number > 0, got {damp}")
        dtype = compute_dtype(grads)
        m, d = grads.shape
        B = min(block_size, d)
        nb = -(-d // B)
        self.m, self.d, self.block_size, self.n_blocks = m, d, B, nb
        self.damp = float(damp)
        self.dtype = dtype
        self.device = grads.device
        # (nb, m, B): gradient columns of every block, copied once; the short last block is
        # padded with zero columns (decoupled coordinates, F = λI there)
        full = d // B
        self._G = grads.new_empty((nb, m, B), dtype=dtype)
        self._G[:full].transpose(0, 1).copy_(grads[:, : full * B].reshape(m, full, B))
        if full < nb:
            self._G[full].zero_()
            self._G[full, :, : d - full * B].copy_(grads[:, full * B :])
        self._V = torch.empty_like(self._G)
        for sl in _chunks(nb, m):
            L = _damped_cholesky(self._G[sl], self.damp * m).to(dtype)
            # V = L⁻¹G as Vᵀ = Gᵀ L⁻ᵀ: the same solve, about twice as fast on CPU in this layout
            self._V[sl] = torch.linalg.solve_triangular(
                L.mT, self._G[sl].mT, upper=True, left=False
            ).mT

    @property
    def grads(self) -> Tensor:
        """The gradients ``G``, shape ``(m, d)`` (a view when unblocked, otherwise a copy)."""
        return self._G.transpose(0, 1).reshape(self.m, -1)[:, : self.d]

    def _blocks(self, v: Tensor) -> Tensor:
        if v.shape != (self.d,):
            raise ValueError(f"expected a vector of shape ({self.d},), got {tuple(v.shape)}")
        x = v.to(device=self.device, dtype=self.dtype)
        pad = self.n_blocks * self.block_size - self.d
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.reshape(self.n_blocks, self.block_size)

    def _flat(self, xb: Tensor) -> Tensor:
        return xb.reshape(-1)[: self.d]

    def mul(self, v: Tensor) -> Tensor:
        """``F⁻¹ v = (v − Vᵀ(V v)) / λ`` per block, ``O(d·m)``; ``v`` of shape ``(d,)``."""
        x = self._blocks(v)
        t = torch.bmm(self._V, x.unsqueeze(2))
        r = x - torch.bmm(self._V.transpose(1, 2), t).squeeze(2)
        return self._flat(r / self.damp)

    def diag(self) -> Tensor:
        """``diag(F⁻¹) = (1 − Σ_i V_i²) / λ``, shape ``(d,)``, ``O(d·m)``."""
        return self._flat((1.0 - self._V.square().sum(dim=1)) / self.damp)

    def entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        """The sub-matrix ``F⁻¹[rows, cols]``, ``O(|rows|·|cols|·m)``.

        Args:
            rows: integer indices in ``[0, d)``.
            cols: integer indices in ``[0, d)``.

        Returns:
            Shape ``(len(rows), len(cols))``; zero between different blocks.
        """
        r = torch.as_tensor(rows, device=self.device).long().reshape(-1)
        c = torch.as_tensor(cols, device=self.device).long().reshape(-1)
        for name, idx in (("rows", r), ("cols", c)):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.d):
                raise IndexError(f"{name} must lie in [0, {self.d}), got {idx.tolist()[:8]}...")
        B = self.block_size
        vr = self._V[r // B, :, r % B]  # (|r|, m)
        vc = self._V[c // B, :, c % B]
        same = (r // B).unsqueeze(1) == (c // B).unsqueeze(0)
        eye = (r.unsqueeze(1) == c.unsqueeze(0)).to(self.dtype)
        return (eye - same.to(self.dtype) * (vr @ vc.T)) / self.damp

    def removal_update(self, w: Tensor, remove: Tensor) -> Tensor:
        """Exact joint OBS update: ``argmin ½ δᵀFδ`` subject to ``(w + δ)_S = 0``.

        With ``S`` = ``remove`` and ``R`` its complement the solution is ``δ_S = −w_S`` and
        ``δ_R = F_RR⁻¹ F_RS w_S``, which equals ``−F⁻¹[:,S] (F⁻¹[S,S])⁻¹ w_S``. Per block, one
        of two forms, equal in exact arithmetic, is evaluated:

        - many removals (``|S_b| > m/4``): Woodbury on ``F_RR = λI + (1/m) G_Rᵀ G_R`` gives
          ``δ_R = G_Rᵀ (λm I + G_R G_Rᵀ)⁻¹ G_S w_S``, an ``m × m`` positive definite solve with
          no cancellation, ``O(B·m²)``;
        - few removals (``|S_b| ≤ m/4``, the gradual steps): with ``F⁻¹ = (I − VᵀV)/λ``,
          ``δ = Vᵀ(V_S c) − E_S c`` where ``(I − V_SᵀV_S) c = w_S``, an ``|S_b| × |S_b|``
          solve (float64) and ``O(B·m)``. ``I − V_SᵀV_S`` is ``λ F⁻¹[S,S]``, formed with the
          same cancellation as :meth:`diag`, which the saliency already relies on; a block
          where it is close to singular (a Cholesky pivot below ``√eps``) takes the first form.

        Cost over the blocks that hold a removed coordinate.

        Args:
            w: weights, shape ``(d,)``.
            remove: boolean mask ``S``, shape ``(d,)``.

        Returns:
            ``δ`` in the computation dtype, with ``δ_S = −w_S`` exactly.
        """
        if remove.shape != (self.d,) or remove.dtype != torch.bool:
            raise ValueError(f"remove must be a bool mask of shape ({self.d},)")
        wb = self._blocks(w)
        sb = self._blocks(remove.to(self.dtype)) > 0
        delta = torch.zeros_like(wb)
        counts = sb.sum(dim=1)
        few = max(1, self.m // 4)
        many = torch.nonzero(counts > few).flatten()
        for sl in _chunks(int(many.numel()), self.m):
            delta[many[sl]] = self._many_removed(many[sl], wb, sb)
        small = torch.nonzero((counts > 0) & (counts <= few)).flatten()
        for sl in _chunks(int(small.numel()), self.m):
            idx = small[sl]
            delta[idx], ok = self._few_removed(idx, wb, sb, counts)
            if not bool(ok.all()):  # I − V_SᵀV_S lost to rounding: the stable form instead
                logger.debug("M-FAC removal: %d blocks take the m × m form", int((~ok).sum()))
                delta[idx[~ok]] = self._many_removed(idx[~ok], wb, sb)
        return self._flat(delta)

    def _many_removed(self, idx: Tensor, wb: Tensor, sb: Tensor) -> Tensor:
        """``δ`` of the blocks ``idx`` by the ``m × m`` Woodbury form of :meth:`removal_update`."""
        G = self._G[idx]  # (n, m, B)
        s = sb[idx]
        ws = torch.where(s, wb[idx], 0.0)
        a = torch.bmm(G, ws.unsqueeze(2)).to(torch.float64)  # G_S w_S, (n, m, 1)
        GR = G.masked_fill(s.unsqueeze(1), 0.0)
        L = _damped_cholesky(GR, self.damp * self.m)
        c = torch.cholesky_solve(a, L).to(self.dtype)
        return torch.bmm(GR.transpose(1, 2), c).squeeze(2) - ws

    def _few_removed(
        self, idx: Tensor, wb: Tensor, sb: Tensor, counts: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``δ`` of the blocks ``idx`` by the ``|S_b| × |S_b|`` form of :meth:`removal_update`
        (the removed coordinates of each block padded to the largest count with decoupled
        dummies: identity rows, zero weight), and per block whether it is valid: ``I − V_SᵀV_S``
        has no Cholesky pivot below ``√eps`` of the computation dtype (a smaller one would
        amplify the rounding of ``V``)."""
        s = sb[idx]
        k = int(counts[idx].max())
        pos = torch.topk(s.to(torch.int8), k, dim=1, sorted=False).indices  # (n, k): S first
        valid = torch.gather(s, 1, pos)  # False only on the padding
        V = self._V[idx]  # (n, m, B)
        VS = torch.gather(V, 2, pos.unsqueeze(1).expand(-1, self.m, -1)).to(torch.float64)
        VS = VS.masked_fill(~valid.unsqueeze(1), 0.0)
        M = -torch.bmm(VS.transpose(1, 2), VS)  # I − V_SᵀV_S = λ F⁻¹[S,S]
        M.diagonal(dim1=1, dim2=2).add_(1.0)
        L, info = torch.linalg.cholesky_ex(M)
        # a pivot below √eps: I − V_SᵀV_S is too close to singular for the precision of V
        pivots = L.diagonal(dim1=1, dim2=2).amin(dim=1).square()
        ok = (info == 0) & (pivots > torch.finfo(self.dtype).eps ** 0.5)
        ws = torch.gather(wb[idx], 1, pos).to(torch.float64).masked_fill(~valid, 0.0)
        c = torch.cholesky_solve(ws.unsqueeze(2), L).masked_fill(~ok.view(-1, 1, 1), 0.0)
        delta = torch.bmm(V.transpose(1, 2), torch.bmm(VS, c).to(self.dtype)).squeeze(2)
        return torch.where(s, -wb[idx], delta), ok  # δ_S = V_SᵀV_S c − c = −w_S, exactly


class FisherInverse(BlockFisherInverse):
    """Inverse of the damped empirical Fisher ``F = λI + (1/m) GᵀG`` (M-FAC static algorithm).

    The unblocked case of :class:`BlockFisherInverse`: ``F⁻¹ = (1/λ)(I − VᵀV)`` with
    ``V = L⁻¹G`` and ``LLᵀ = λm I + GGᵀ``; building ``O(d·m²)``, :meth:`mul` and :meth:`diag`
    ``O(d·m)``, :meth:`entries` ``O(m)`` per entry.

    Args:
        grads: gradients, shape ``(m, d)``.
        damp: absolute damping ``λ > 0``.
    """

    def __init__(self, grads: Tensor, damp: float = 1e-5) -> None:
        if grads.dim() != 2:
            raise ValueError(f"grads must have shape (m, d), got {tuple(grads.shape)}")
        super().__init__(grads, block_size=max(1, grads.shape[1]), damp=damp)


def mfac_prune_step(
    w: Tensor,
    finv: BlockFisherInverse,
    n_prune: int,
    already_pruned_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One M-FAC OBS pruning step (Frantar, Kurtic & Alistarh 2021).

    Saliency of a live weight: ``ρ_q = w_q² / (2 [F⁻¹]_qq)``. The ``n_prune`` live weights of
    lowest ``ρ`` form ``S``; all weights pruned so far, ``P = S ∪ already_pruned``, are then
    removed jointly and optimally::

        δ = argmin ½ δᵀ F δ  s.t. (w + δ)_P = 0
          = −F⁻¹[:,P] (F⁻¹[P,P])⁻¹ w_P      (exact within every block of a blocked ``F``)

    (:meth:`BlockFisherInverse.removal_update`). The reference code instead adds the *independent*
    single-weight OBS updates, ``δ = F⁻¹ z`` with ``z_q = −w_q/[F⁻¹]_qq`` on ``S``, and then
    zeroes ``w_S``; that ignores the correlation between weights removed together. The joint
    update is the true minimiser, zeroes ``w_P`` exactly, and costs the same order.

    ``finv`` must describe the Fisher of the *live* weights: build it from gradients whose
    already-pruned columns are zero (``G[:, pruned] = 0``), so that pruned coordinates are
    decoupled. Unblocked, this equals building ``F`` over the live coordinates only; blocked, the
    blocks stay where they were over all ``d`` coordinates, whereas
    :func:`mfac_prune_live_step` re-forms them over the live ones, as the paper's code does.

    The paper prunes gradually: the caller repeats "gradients at the current weights →
    :func:`mfac_prune_live_step`" several times towards the target sparsity.

    Args:
        w: flattened weights, shape ``(d,)``.
        finv: a :class:`FisherInverse` or :class:`BlockFisherInverse` of dimension ``d``.
        n_prune: number of live weights to prune in this step.
        already_pruned_mask: bool ``(d,)``, True = already pruned (their weights are zeroed).

    Returns:
        ``(w_new, pruned_mask)``: compensated weights (dtype of ``w``; pruned entries exactly
        0) and the cumulative mask (True = pruned).
    """
    d = finv.d
    if w.shape != (d,):
        raise ValueError(f"w must have shape ({d},) to match finv, got {tuple(w.shape)}")
    if already_pruned_mask is None:
        old = torch.zeros(d, dtype=torch.bool, device=w.device)
    else:
        if already_pruned_mask.shape != (d,) or already_pruned_mask.dtype != torch.bool:
            raise ValueError(f"already_pruned_mask must be a bool mask of shape ({d},)")
        old = already_pruned_mask.to(w.device)
    n_live = d - int(old.sum())
    if not (isinstance(n_prune, int) and 0 <= n_prune <= n_live):
        raise ValueError(
            f"n_prune must be an integer in [0, {n_live}] (live weights), got {n_prune}"
        )
    if bool(old.any()):
        leak = finv.grads[:, old.to(finv.device)]
        if bool((leak != 0).any()):
            raise ValueError(
                "finv has nonzero gradients at already-pruned coordinates; zero those columns "
                "(G[:, already_pruned_mask] = 0) before building the Fisher inverse"
            )
    w_c = w.to(device=finv.device, dtype=finv.dtype).masked_fill(old.to(finv.device), 0.0)
    old_f = old.to(finv.device)
    rho = w_c.square() / (2.0 * finv.diag())
    rho = rho.masked_fill(old_f, math.inf)
    new = torch.zeros_like(old_f)
    new[torch.topk(rho, n_prune, largest=False).indices] = True
    pruned = old_f | new
    w_new = w_c + finv.removal_update(w_c, pruned)
    w_new = w_new.masked_fill(pruned, 0.0)
    logger.debug("M-FAC step: pruned %d, total %d of %d", n_prune, int(pruned.sum()), d)
    return w_new.to(device=w.device, dtype=w.dtype), pruned.to(w.device)


def mfac_prune_live_step(
    w: Tensor,
    grads: Tensor,
    pruned: Tensor,
    n_prune: int,
    block_size: int,
    damp: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """One gradual M-FAC step with the blocks formed over the *live* weights.

    The live (not yet pruned) coordinates ``L`` are gathered in their order, the Fisher is the
    block-diagonal one over runs of ``block_size`` consecutive *live* coordinates, built from the
    gradient columns ``grads[:, L]`` (the last block may be shorter), and
    :func:`mfac_prune_step` removes ``n_prune`` of them; the result is scattered back::

        F_L = blockdiag_b(λ I + (1/m) G_{L_b}ᵀ G_{L_b}),   L = L_1 ∪ L_2 ∪ …,  |L_b| = block_size.

    This is how the paper's code prunes gradually: each step rebuilds the Fisher over the
    remaining non-zero weights, so every block keeps ``block_size`` live weights. Blocks fixed
    over all ``d`` coordinates (pruned columns zeroed) would instead shrink with the density:
    at 90% sparsity a block of 128 holds about 13 live weights, and correlations between weights
    of neighbouring blocks are lost although they would fit in one block.

    Args:
        w: flattened weights, shape ``(d,)``.
        grads: gradients at ``w``, shape ``(m, d)``; the columns of pruned coordinates are
            ignored.
        pruned: bool ``(d,)``, True = already pruned (those weights stay exactly 0).
        n_prune: live weights to prune in this step, ``0 ≤ n_prune ≤ |L|``.
        block_size: live coordinates per diagonal block of the Fisher.
        damp: absolute damping ``λ > 0``.

    Returns:
        ``(w_new, pruned_new)``: weights of shape ``(d,)`` in the dtype of ``w`` (pruned entries
        exactly 0) and the cumulative mask.
    """
    d = w.numel()
    if w.shape != (d,) or grads.dim() != 2 or grads.shape[1] != d:
        raise ValueError(
            f"w must have shape (d,) and grads (m, d); got {tuple(w.shape)} and "
            f"{tuple(grads.shape)}"
        )
    if pruned.shape != (d,) or pruned.dtype != torch.bool:
        raise ValueError(f"pruned must be a bool mask of shape ({d},)")
    pruned = pruned.to(w.device)
    live = torch.nonzero(~pruned).flatten()
    if not (isinstance(n_prune, int) and 0 <= n_prune <= live.numel()):
        raise ValueError(
            f"n_prune must be an integer in [0, {live.numel()}] (live weights), got {n_prune}"
        )
    w_out = w.masked_fill(pruned, 0.0)
    if n_prune == 0:
        return w_out, pruned.clone()
    finv = BlockFisherInverse(grads.index_select(1, live.to(grads.device)), block_size, damp)
    w_live, removed = mfac_prune_step(w_out[live], finv, n_prune)
    w_out[live] = w_live
    pruned_out = pruned.clone()
    pruned_out[live] = removed
    return w_out, pruned_out
