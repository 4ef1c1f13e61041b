"""Frozen copy of the selection code before existing zeros were counted (commit 9f3de63).

Only for the regression test in ``test_existing_zeros.py``: on a dense layer (no zero weight, no
dead input) every method must give bitwise the output of this code. Docstrings were stripped and
the code re-printed with ``ast.unparse``; the helpers that did not change are imported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from prunekit.core.targets import Target
from prunekit.posttrain.calibration import Call
from prunekit.posttrain.grid import compute_dtype as _compute_dtype
from prunekit.posttrain.layers import LayerView
from prunekit.posttrain.mfac import BlockFisherInverse, mfac_prune_step
from prunekit.posttrain.mfac_model import _gradients, _relative_errors, split_calls
from prunekit.posttrain.obc import (
    ObcDatabase,
    _check_layer,
    _FreeSet,
    _layer_loss,
    _prepare,
    _row_batch,
)
from prunekit.posttrain.obs import (
    _check_sparsity,
    _JointGrid,
    _n_pruned,
    inverse_hessian_cholesky,
    obs_sweep_,
    prepare_hessian,
)
from prunekit.posttrain.report import CompressionReport, LayerReport

logger = logging.getLogger(__name__)


def _prune_mask(scores: Tensor, sparsity: float, nm: tuple[int, int] | None) -> Tensor:
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
    if W.dim() != 2:
        raise ValueError(f"W must have shape (d_out, d_in), got {tuple(W.shape)}")
    mask = _prune_mask(W.abs(), sparsity, nm)
    return W.masked_fill(mask, 0.0)


def wanda_prune(
    W: Tensor, input_norms: Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> Tensor:
    if W.dim() != 2 or input_norms.shape != (W.shape[1],):
        raise ValueError(
            f"W must be (d_out, d_in) and input_norms (d_in,), got {tuple(W.shape)} and {tuple(input_norms.shape)}"
        )
    scores = W.abs().to(_compute_dtype(W)) * input_norms.to(_compute_dtype(W)).unsqueeze(0)
    mask = _prune_mask(scores, sparsity, nm)
    return W.masked_fill(mask, 0.0)


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
    mask = torch.zeros_like(Wc, dtype=torch.bool)

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
        return (Wc.to(W.dtype), quant.scale, quant.zero)
    return Wc.to(W.dtype)


def _greedy_prune_rows(
    w: Tensor,
    hinv0: Tensor,
    dead: Tensor,
    n_steps: int,
    snap_counts: Tensor | None,
    nm: tuple[int, int] | None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    b, d = w.shape
    free = _FreeSet(w, hinv0, dead)
    ar = free.ar
    order = torch.full((b, n_steps), -1, dtype=torch.long, device=w.device)
    losses = torch.zeros(b, n_steps, dtype=w.dtype, device=w.device)
    n_levels = 0 if snap_counts is None else snap_counts.shape[1]
    snaps = [w.clone() for _ in range(n_levels)]
    if nm is not None:
        n, m = nm
        zeros_in_group = dead.reshape(d // m, m).sum(1).unsqueeze(0).repeat(b, 1)
    for t in range(n_steps):
        diag = torch.diagonal(free.hinv, dim1=1, dim2=2)
        blocked = free.fixed
        if nm is not None:
            blocked = blocked | (zeros_in_group.gather(1, free.cols // m) >= m - n)
        p = (free.w.square() / diag).masked_fill(blocked, math.inf).argmin(dim=1)
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
    return (order, losses, snaps)


def obc_database(
    W: Tensor,
    H: Tensor,
    levels: Sequence[float],
    damp: float = 0.01,
    nm: tuple[int, int] | None = None,
    row_batch: int | None = None,
    mask_scope: Literal["row", "layer"] = "row",
) -> ObcDatabase:
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
    n_live = d_in - int(dead.sum())
    batch = _row_batch(row_batch, d_out, d_in, dtype)
    dev = W.device
    if nm is not None:
        n, m = nm
        dead_per_group = dead.reshape(d_in // m, m).sum(1)
        n_steps = int((m - n - dead_per_group).clamp(min=0).sum())
        counts = torch.full((d_out, 1), n_steps, dtype=torch.long, device=dev)
    else:
        per_row = torch.tensor([_n_pruned(s, n_live) for s in levels], dtype=torch.long, device=dev)
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
    d_out = Wc.shape[0]
    trace = torch.empty(d_out, n_live, dtype=Wc.dtype, device=Wc.device)
    for r1 in range(0, d_out, batch):
        r2 = min(r1 + batch, d_out)
        _, trace[r1:r2], _ = _greedy_prune_rows(Wc[r1:r2].clone(), hinv0, dead, n_live, None, None)
    ranked = torch.argsort(trace.flatten(), stable=True)
    row_of = ranked // max(n_live, 1)
    counts = torch.zeros(d_out, per_row.numel(), dtype=torch.long, device=Wc.device)
    for lv, k in enumerate(per_row.tolist()):
        counts[:, lv] = torch.bincount(row_of[: k * d_out], minlength=d_out)
    return counts


def mfac_prune_model(
    model: nn.Module,
    targets: Sequence[Target],
    views: dict[str, LayerView],
    calls: Sequence[Call],
    report: CompressionReport,
    *,
    sparsity: float,
    ngrads: int,
    fisher_block: int,
    damp: float,
    steps: int,
    labels: Sequence[Tensor] | None = None,
) -> None:
    if labels is not None and len(labels) != len(calls):
        raise ValueError(f"labels: {len(labels)} tensors for {len(calls)} calibration items")
    micro, micro_labels = split_calls(calls, labels, ngrads)
    params = [t.param for t in targets]
    sizes = [p.numel() for p in params]
    d = sum(sizes)
    dense = [p.detach().clone() for p in params]
    pruned = torch.zeros(d, dtype=torch.bool, device=params[0].device)
    total = math.floor(sparsity * d + 0.5)
    for step in range(1, steps + 1):
        goal = math.floor(sparsity * step / steps * d + 0.5) if step < steps else total
        n_prune = goal - int(pruned.sum())
        if n_prune <= 0:
            continue
        G = _gradients(model, targets, micro, micro_labels, ngrads)
        G[:, pruned] = 0.0
        finv = BlockFisherInverse(G, fisher_block, damp)
        w = torch.cat([p.detach().reshape(-1).float() for p in params])
        w, pruned = mfac_prune_step(w, finv, n_prune, pruned)
        with torch.no_grad():
            for p, chunk in zip(params, torch.split(w, sizes), strict=True):
                p.copy_(chunk.view_as(p))
        logger.info("mfac step %d/%d: %d of %d weights pruned", step, steps, int(pruned.sum()), d)
    errors = _relative_errors(model, targets, views, dense, calls)
    for t, err in zip(targets, errors, strict=True):
        w = t.param.detach()
        report.layers.append(
            LayerReport(
                name=t.name,
                shape=list(w.shape),
                sparsity=1.0 - int(torch.count_nonzero(w)) / w.numel(),
                bits=None,
                rel_error=err,
                damp=damp,
                damp_escalated=False,
                dead_inputs=0,
                seconds=0.0,
            )
        )
