"""Test oracles: ports of the reference implementations of SparseGPT, GPTQ and OBQ, written
independently of :mod:`prunekit.posttrain`, in plain torch, step by step as the reference code
does them.

* :func:`sparsegpt_reference`: ``SparseGPT.fasterprune`` of github.com/IST-DASLab/sparsegpt
  (``sparsegpt.py``), unstructured (``prunen = 0``), without quantization.
* :func:`gptq_reference`: ``GPTQ.fasterquant`` of github.com/IST-DASLab/gptq (``gptq.py``) with
  the per-channel asymmetric min-max ``Quantizer`` of its ``quant.py`` (``groupsize = -1``, no
  act-order).
* :func:`obq_reference`: ``TrueOBS.quantize`` of github.com/IST-DASLab/OBC (``trueobs.py``), for
  rows without zero weights.

The layer Hessian ``hessian(X) = 2 XᵀX / n`` is the references' (their ``add_batch``). Only the
choices the reference code leaves open are parameters, each said where it is used.
"""

import math

import torch

from tests.posttrain.layer_data import correlated, low_rank


def hessian(X):
    """``2 XᵀX / n`` of inputs ``X`` of shape ``(n, d_in)``, as the references' ``add_batch``."""
    return (2.0 / X.shape[0]) * (X.T @ X)


def reference_layer(kind, d_out, d_in, seed):
    """A float64 layer ``(W, H)`` for the comparisons: ``kind`` ``"random"`` (independent
    inputs), ``"correlated"`` or ``"low_rank"`` (rank ``d_in / 4``) inputs, their scales spread
    over two decades (so an OBS score is not a rescaled magnitude), ``4·d_in`` samples."""
    n = 4 * d_in
    if kind == "random":
        X = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    elif kind == "correlated":
        X = correlated(n, d_in, seed=seed)
    else:
        X = low_rank(n, d_in, rank=d_in // 4, seed=seed).double()
    X = X * torch.logspace(-1, 1, d_in, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(d_out, d_in, generator=g, dtype=torch.float64), hessian(X)


def _inverse_cholesky(H, percdamp):
    """The references' preparation: dead inputs (``H_jj = 0``) get ``H_jj = 1``, the diagonal
    gains ``percdamp · mean(diag H)``, then ``Hinv`` = the upper Cholesky factor of ``H⁻¹``.
    Returns ``(Hinv, dead)``."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    return H, dead


def _round_half_up(x):
    return math.floor(x + 0.5)


def _block_mask(tmp, sparsity):
    """The reference's mask of one block, over all rows at once, with its count aligned.

    The reference writes ``thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]``
    and ``mask1 = tmp <= thresh``: with ``k = int(tmp.numel() * sparsity)`` the threshold is the
    ``(k + 1)``-th smallest score and ``<=`` keeps it, so the reference prunes ``k + 1`` weights
    per block (one more than its own sparsity: 8·64 + 1 of a 8×128 block at 50%). prunekit
    prunes ``k``. Aligned here by indexing the sorted scores at ``k - 1`` instead of ``k``
    (``k = 0``: nothing), so ``tmp <= thresh`` marks exactly the ``k`` smallest. (Scores are
    distinct but for the zeros, score 0, of weights that are 0 when the block starts: all of
    them are marked, also beyond ``k``, where the threshold is 0. The tests keep them within
    ``k``: at most one dead input per block.)

    The count itself is the reference's ``int(numel · sparsity)`` per block. prunekit's is
    ``d_out · (round(s · i2) − round(s · i1))`` for the block ``[i1, i2)`` of a layer without
    zeros (a multiple of ``d_out``, rounded cumulatively), which is the same number exactly
    when ``s · (i2 − i1)`` is an integer for every block: the tests choose such layers.
    """
    k = int(tmp.numel() * sparsity)
    if k == 0:
        return torch.zeros_like(tmp, dtype=torch.bool)
    thresh = torch.sort(tmp.flatten())[0][k - 1]  # reference: [k]
    return tmp <= thresh


def _row_masks(tmp, zeros, rate, before1, before2):
    """prunekit's ``mask_scope="row"`` (no reference code has it; ported from its docstring):
    row ``r`` prunes, in the block, its ``R(s_r · x_r(i2)) − R(s_r · x_r(i1))`` lowest scores
    among its nonzero weights, plus all its zeros. ``x_r(i)`` is the number of nonzero weights
    (before the sweep) of row ``r`` among the columns before ``i``, ``s_r = s − z_r (1 − s) /
    (d_in − z_r)`` for its ``z_r`` zeros (``s`` for a dense row, which then prunes
    ``R(s · i2) − R(s · i1)``), and ``R`` rounds halves up."""
    mask1 = zeros.clone()
    for r in range(tmp.shape[0]):
        k = _round_half_up(rate[r] * before2[r]) - _round_half_up(rate[r] * before1[r])
        free = [j for j in range(tmp.shape[1]) if not zeros[r, j]]
        free.sort(key=lambda j: float(tmp[r, j]))
        for j in free[:k]:
            mask1[r, j] = True
    return mask1


def sparsegpt_reference(
    W, H, sparsity, blocksize=128, percdamp=0.01, scope="block", scores_of="updated"
):
    """SparseGPT's ``fasterprune`` (unstructured), step by step.

    Dead inputs zeroed, ``Hinv`` as :func:`_inverse_cholesky`; then per block of ``blocksize``
    columns ``[i1, i2)``: ``W1`` (the block's weights, *already updated by the blocks before*),
    the score ``tmp = W1² / diag(Hinv1)²``, the block's mask from it (``scope="block"``: the
    reference's threshold over the whole block, see :func:`_block_mask`; ``scope="row"``:
    prunekit's per-row rule, see :func:`_row_masks`), then column by column ``q = w`` with the
    masked entries 0, ``err1 = (w − q) / d`` and ``W1[:, i:] −= err1 ⊗ Hinv1[i, i:]``; after the
    block ``W[:, i1:i2] = Q1`` and the lazy update ``W[:, i2:] −= Err1 · Hinv[i1:i2, i2:]``.

    ``scores_of="original"`` is not the reference but the look-alike a test must tell apart from
    it: every block's mask scored on the weights before the sweep (dead inputs zeroed).

    Returns ``(weights, mask)`` (``mask``: True where pruned).
    """
    W = W.clone()
    columns = W.shape[1]
    Hinv, dead = _inverse_cholesky(H, percdamp)
    W[:, dead] = 0
    zeros = W == 0
    original = W.clone()
    nonzero = (~zeros).sum(1).tolist()
    rate = [sparsity - (columns - c) * (1 - sparsity) / c if c > 0 else 0.0 for c in nonzero]
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        scored = W1 if scores_of == "updated" else original[:, i1:i2]
        tmp = scored**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        if scope == "block":
            mask1 = _block_mask(tmp, sparsity)
        else:
            before1 = (~zeros[:, :i1]).sum(1).tolist()
            before2 = (~zeros[:, :i2]).sum(1).tolist()
            mask1 = _row_masks(tmp, zeros[:, i1:i2], rate, before1, before2)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, mask


def minmax_quantizer(W, bits):
    """The references' ``Quantizer.find_params(W, weight=True)``, per channel, asymmetric:
    ``(scale, zero, maxq)`` with ``scale``/``zero`` of shape ``(rows, 1)``."""
    maxq = 2**bits - 1
    tmp = torch.zeros(W.shape[0], dtype=W.dtype)
    xmin = torch.minimum(W.min(1)[0], tmp)
    xmax = torch.maximum(W.max(1)[0], tmp)
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale.reshape(-1, 1), zero.reshape(-1, 1), maxq


def quantize(x, scale, zero, maxq):
    """The references' ``quantize``."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def gptq_reference(W, H, bits, blocksize=128, percdamp=0.01, grid_before_dead=True):
    """GPTQ's ``fasterquant`` (per-channel grid, no groups, no act-order), step by step.

    The grid is found first (``grid_before_dead=True``, as the reference: ``find_params`` runs
    before ``W[:, dead] = 0``, so a dead input's weight still widens its row's range); prunekit
    finds it after zeroing them (``grid_before_dead=False``). Then ``Hinv`` as
    :func:`_inverse_cholesky` and per block: column by column ``q = quantize(w)``,
    ``err1 = (w − q) / d``, ``W1[:, i:] −= err1 ⊗ Hinv1[i, i:]``; after the block
    ``Q[:, i1:i2] = Q1`` and the lazy update ``W[:, i2:] −= Err1 · Hinv[i1:i2, i2:]``.

    Returns ``(Q, scale, zero)``.
    """
    W = W.clone()
    columns = W.shape[1]
    if grid_before_dead:
        scale, zero, maxq = minmax_quantizer(W, bits)
    Hinv, dead = _inverse_cholesky(H, percdamp)
    W[:, dead] = 0
    if not grid_before_dead:
        scale, zero, maxq = minmax_quantizer(W, bits)
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize(w.unsqueeze(1), scale, zero, maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q, scale, zero


def obq_reference(W, H, bits, rel_damp=0.01):
    """OBC's ``TrueOBS.quantize`` for rows without zero weights and a Hessian without dead
    inputs (so its ``prepare_sparse`` leaves every row's inverse ``H⁻¹`` and starts at step 1).

    ``H += rel_damp · mean(diag H) · I``; ``Hinv = H⁻¹`` per row; the grid of the original
    weights. Each step: ``q = quantize(w)``, ``err = (w − q)²``, ``scores = err / diag(Hinv)``
    (fixed weights ``inf``); ``j = argmin scores``, except in a row with an outlier
    (``err > scale² / 4`` for a free weight) whose ``w_j`` is not 0: ``j = argmax err``. Then
    ``w −= Hinv[j, :] · (w_j − q_j) / Hinv_jj``, ``Q[j] = q_j`` and the rank-1 downdate
    ``Hinv −= Hinv[j, :]ᵀ Hinv[j, :] / Hinv_jj``.
    """
    rows, columns = W.shape
    H = H.clone()
    H += rel_damp * torch.diag(H).mean() * torch.eye(columns, dtype=H.dtype)
    Hinv1 = torch.cholesky_inverse(torch.linalg.cholesky(H))
    scale, zero, maxq = minmax_quantizer(W, bits)
    w = W.clone()
    Q = torch.zeros_like(W)
    Hinv = Hinv1.unsqueeze(0).repeat((rows, 1, 1))
    mask = torch.zeros_like(w, dtype=torch.bool)
    rangecount = torch.arange(rows)
    outlier = 0.25 * scale**2
    for step in range(1, columns + 1):
        q = quantize(w, scale, zero, maxq)
        err = (w - q) ** 2
        diag = torch.diagonal(Hinv, dim1=1, dim2=2)
        scores = err / diag
        scores[mask] = float("inf")
        err[mask] = 0
        j = torch.argmin(scores, 1)
        sel = torch.any(err > outlier, 1)
        sel &= w[rangecount, j] != 0
        if torch.any(sel):
            j[sel] = torch.argmax(err[sel, :], 1)
        q1 = q[rangecount, j]
        Q[rangecount, j] = q1
        row = Hinv[rangecount, j, :]
        d = diag[rangecount, j]
        w -= row * ((w[rangecount, j] - q1) / d).unsqueeze(1)
        mask[rangecount, j] = True
        if step == columns:
            break
        row /= torch.sqrt(d).unsqueeze(1)
        Hinv -= torch.bmm(row.unsqueeze(2), row.unsqueeze(1))
    return Q
