"""M-FAC pruning of a whole model: global OBS with the inverse empirical Fisher of ``m`` gradients.

Unlike the layer-wise methods, M-FAC looks at the loss: ``m`` gradients of the loss, one per
calibration micro-batch, give ``F = λI + (1/m) Σ g gᵀ`` over all target weights (block-diagonal,
blocks of ``fisher_block`` consecutive live weights), and the weights of smallest OBS saliency
``w_q² / (2[F⁻¹]_qq)`` across *all* layers are removed with the joint OBS compensation
(:func:`~prunekit.posttrain.mfac.mfac_prune_step`). As in the paper's code, pruning is gradual:
``steps`` steps (16 by default) to the target, each one recomputing the ``m`` gradients at the
current (pruned and compensated) weights and re-forming the Fisher blocks over the weights still
alive (:func:`~prunekit.posttrain.mfac.mfac_prune_live_step`), with the density (fraction of
non-zero weights) falling geometrically (:func:`mfac_schedule`)::

    density_k = ρ_0 · (ρ_T / ρ_0)^(k / steps),   k = 1 … steps,

from ``ρ_0 = 1 − E/d`` (the existing zeros, below) to ``ρ_T = 1 − sparsity``: every step removes
the same fraction of the weights still alive, so the later steps, on a sparser model, remove
fewer weights than the first ones.

Existing zeros count toward the target: the zero weights of the targets, and the weights of their
dead inputs (zero on every calibration sample; they are zeroed first), ``E`` of the ``d`` target
weights in all, are pruned from the start (frozen at 0, their gradients dropped from the Fisher),
and the targets end with ``max(E, round(sparsity · d))`` zeros: ``max(0, round(sparsity · d) −
E)`` new ones, chosen globally, so a layer may end above or below ``sparsity`` but never loses a
zero it had.

Labels: with ``labels`` (one tensor per calibration item) the loss is the cross-entropy with them
(the empirical Fisher); without, with the model's own predictions (argmax pseudo-labels), which
needs an output of shape ``(N, C)``.

Reference: Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information", NeurIPS 2021.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.config import ConfigError
from prunekit.core.targets import Target
from prunekit.posttrain.calibration import Call, batch_size, token_mask
from prunekit.posttrain.layers import LayerView, matrices_to_weight
from prunekit.posttrain.mfac import mfac_prune_live_step
from prunekit.posttrain.report import CompressionReport, LayerReport
from prunekit.posttrain.sequential import HookSet

logger = logging.getLogger(__name__)

__all__ = ["mfac_prune_model", "mfac_schedule", "split_calls"]


def _slice(obj: Any, sl: slice) -> Any:
    return obj[sl] if isinstance(obj, Tensor) and obj.dim() > 0 else obj


def split_calls(
    calls: Sequence[Call], labels: Sequence[Tensor] | None, m: int
) -> tuple[list[Call], list[Tensor] | None]:
    """Split calibration calls (and their labels) into at least ``m`` micro-batches along dim 0
    when there are fewer than ``m`` calls (each gradient of the Fisher is one micro-batch).

    Raises:
        ValueError: too few calls and they cannot be split (no common batch dimension), or the
            calibration set holds fewer than ``m`` samples.
    """
    if len(calls) >= m:
        return list(calls), None if labels is None else list(labels)
    pieces = math.ceil(m / len(calls))
    out: list[Call] = []
    out_labels: list[Tensor] = []
    for i, call in enumerate(calls):
        n = batch_size(call)
        if n is None:
            raise ValueError(
                f"mfac needs {m} gradients (ngrads) but got {len(calls)} calibration items whose "
                "inputs have no common batch dimension to split; pass more items or lower ngrads"
            )
        size = max(1, math.ceil(n / pieces))
        for start in range(0, n, size):
            sl = slice(start, start + size)
            out.append(
                (
                    tuple(_slice(a, sl) for a in call[0]),
                    {k: _slice(v, sl) for k, v in call[1].items()},
                )
            )
            if labels is not None:
                out_labels.append(labels[i][sl])
    if len(out) < m:
        raise ValueError(
            f"mfac needs {m} gradients (ngrads) but the calibration set splits into only "
            f"{len(out)} micro-batches (samples); pass more data or lower ngrads"
        )
    return out, out_labels if labels is not None else None


def _logits(output: Any) -> Any:
    """The logits in a model output: the tensor itself, the first element of a tuple, a mapping's
    ``"logits"`` or an object's ``.logits`` (a Hugging Face ``ModelOutput``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, tuple | list) and output:
        return output[0]
    return output


def _loss(output: Any, label: Tensor | None, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy of the logits ``(N, ..., C)`` against ``label`` ``(N, ...)`` or, without
    labels, against the model's own argmax predictions; with a token ``mask`` ``(N, T)`` (the
    item's attention mask) over logits ``(N, T, C)``, only the unpadded positions count."""
    logits = _logits(output)
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        raise ValueError(
            "mfac needs class logits of shape (N, ..., classes) as the model's output (a tensor, "
            "a tuple's first element, or 'logits'); got "
            f"{getattr(logits, 'shape', type(logits).__name__)}"
        )
    flat = logits.reshape(-1, logits.shape[-1])
    keep = None
    if mask is not None and logits.dim() == 3 and logits.shape[:2] == mask.shape:
        keep = mask.to(flat.device).reshape(-1)
    if label is None:
        rows = flat if keep is None else flat[keep]
        return F.cross_entropy(rows, rows.detach().argmax(1))
    target = label.to(flat.device).reshape(-1)
    if target.numel() != flat.shape[0]:
        raise ConfigError(
            f"labels of shape {tuple(label.shape)} do not match the model's logits of shape "
            f"{tuple(logits.shape)} (one class index per row of logits)"
        )
    out_of_range = (target >= flat.shape[1]) | ((target < 0) & (target != -100))
    if bool(out_of_range.any()):
        raise ConfigError(
            f"labels hold class {int(target[out_of_range][0])} but the model's logits have "
            f"{flat.shape[1]} classes (0 … {flat.shape[1] - 1}; -100 is ignored)"
        )
    if keep is not None:
        flat, target = flat[keep], target[keep]
    return F.cross_entropy(flat, target)


def _gradients(
    model: nn.Module,
    targets: Sequence[Target],
    calls: Sequence[Call],
    labels: Sequence[Tensor] | None,
    m: int,
) -> Tensor:
    """``(m, d)``: one flattened gradient of the targets per micro-batch, at the current weights
    (the columns of pruned weights included; the caller drops them)."""
    params = [t.param for t in targets]
    sizes = [p.numel() for p in params]
    G = torch.empty(m, sum(sizes), dtype=torch.float32, device=params[0].device)
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:  # the Fisher needs their gradients even if the user froze them
        p.requires_grad_(True)
    try:
        for i in range(m):
            args, kwargs = calls[i]
            with torch.enable_grad():
                label = None if labels is None else labels[i]
                loss = _loss(model(*args, **kwargs), label, token_mask(calls[i]))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for row, g in zip(torch.split(G[i], sizes), grads, strict=True):
                if g is None:
                    row.zero_()
                else:
                    row.copy_(g.reshape(-1))
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return G


def mfac_schedule(d: int, existing: int, sparsity: float, steps: int) -> list[int]:
    """The number of zeros after each of the ``steps`` gradual M-FAC steps.

    The density falls geometrically, as in the paper's code: after step ``k`` the
    ``(d − E) · ((1 − sparsity) d / (d − E))^(k / steps)`` weights still alive are kept (rounded
    to the nearest count; the paper's code truncates), where ``E`` = ``existing`` zeros. The last
    step reaches ``max(E, round(sparsity · d))`` exactly; with ``E`` at or above it nothing is
    pruned.

    Args:
        d: number of weights.
        existing: weights already zero (``0 ≤ existing ≤ d``).
        sparsity: target fraction of zeros in ``[0, 1]``.
        steps: number of steps, ``≥ 1``.

    Returns:
        ``steps`` non-decreasing counts, each between ``existing`` and the final one.
    """
    total = max(existing, math.floor(sparsity * d + 0.5))
    alive = d - existing
    if total == existing:
        return [existing] * steps
    ratio = (1.0 - sparsity) * d / alive
    counts = [
        min(total, max(existing, d - math.floor(alive * ratio ** (k / steps) + 0.5)))
        for k in range(1, steps)
    ]
    return [*counts, total]


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
    """Prune ``targets`` jointly to ``sparsity`` with M-FAC (see the module docstring), in place;
    one row per target is appended to ``report``."""
    if labels is not None and len(labels) != len(calls):
        raise ValueError(f"labels: {len(labels)} tensors for {len(calls)} calibration items")
    micro, micro_labels = split_calls(calls, labels, ngrads)
    params = [t.param for t in targets]
    sizes = [p.numel() for p in params]
    d = sum(sizes)
    dense = [p.detach().clone() for p in params]
    dead_inputs, dead = _dead_inputs(model, targets, views, calls)
    with torch.no_grad():  # their weights multiply inputs that are always 0
        for p, mask in zip(params, dead, strict=True):
            p.masked_fill_(mask, 0.0)
    # existing zeros (zero weights, dead inputs) stay zero and count toward the target
    pruned = torch.cat([p.detach().reshape(-1) == 0 for p in params])
    schedule = mfac_schedule(d, int(pruned.sum()), sparsity, steps)
    for step, goal in enumerate(schedule, start=1):
        n_prune = goal - int(pruned.sum())
        if n_prune <= 0:
            continue
        G = _gradients(model, targets, micro, micro_labels, ngrads)
        w = torch.cat([p.detach().reshape(-1).float() for p in params])
        w, pruned = mfac_prune_live_step(w, G, pruned, n_prune, fisher_block, damp)
        with torch.no_grad():
            for p, chunk in zip(params, torch.split(w, sizes), strict=True):
                p.copy_(chunk.view_as(p))
        logger.info("mfac step %d/%d: %d of %d weights pruned", step, steps, int(pruned.sum()), d)
    errors = _relative_errors(model, targets, views, dense, calls)
    for t, err, n_dead in zip(targets, errors, dead_inputs, strict=True):
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
                dead_inputs=n_dead,
                seconds=0.0,
            )
        )


def _dead_inputs(
    model: nn.Module,
    targets: Sequence[Target],
    views: dict[str, LayerView],
    calls: Sequence[Call],
) -> tuple[list[int], list[Tensor]]:
    """Per target: the number of its dead inputs (zero on every calibration sample, summed over
    the groups of a grouped convolution) and the bool mask, shaped like the weight, of the
    weights that multiply them."""
    seen: list[Tensor | None] = [None] * len(targets)  # (groups, d_in): nonzero somewhere
    with HookSet() as hooks:
        for i, t in enumerate(targets):

            def record(m: nn.Module, args: Any, i: int = i, v: LayerView = views[t.name]) -> None:
                nz = (v.inputs(args[0].detach()) != 0).any(dim=1)
                prev = seen[i]
                seen[i] = nz if prev is None else prev | nz

            hooks.pre(t.module, record)
        with torch.no_grad():
            for args, kwargs in calls:
                model(*args, **kwargs)
    counts, masks = [], []
    for t, nz in zip(targets, seen, strict=True):
        w = t.param
        if nz is None:  # not reached by the forward: nothing is known to be dead
            counts.append(0)
            masks.append(torch.zeros_like(w, dtype=torch.bool))
            continue
        dead = ~nz.to(w.device)
        mats = views[t.name].matrices(w)
        counts.append(int(dead.sum()))
        masks.append(
            matrices_to_weight(dead.unsqueeze(1).expand(mats.shape).contiguous(), tuple(w.shape))
        )
    return counts, masks


def _relative_errors(
    model: nn.Module,
    targets: Sequence[Target],
    views: dict[str, LayerView],
    dense: Sequence[Tensor],
    calls: Sequence[Call],
) -> list[float]:
    """``‖(W − Ŵ)X‖² / ‖WX‖²`` of every target on the inputs it sees in the pruned model."""
    num = [0.0] * len(targets)
    den = [0.0] * len(targets)
    with HookSet() as hooks:
        for i, t in enumerate(targets):
            view = views[t.name]
            w_dense, w_new = view.matrices(dense[i]), view.matrices()

            def measure(
                m: nn.Module,
                args: Any,
                i: int = i,
                v: LayerView = view,
                wd: Tensor = w_dense,
                wn: Tensor = w_new,
            ) -> None:
                x = v.inputs(args[0].detach()).to(wd.dtype)
                y = torch.bmm(x, wd.transpose(1, 2))
                num[i] += float((y - torch.bmm(x, wn.transpose(1, 2))).square().sum())
                den[i] += float(y.square().sum())

            hooks.pre(t.module, measure)
        with torch.no_grad():
            for args, kwargs in calls:
                model(*args, **kwargs)
    return [n / dd if dd > 0 else 0.0 for n, dd in zip(num, den, strict=True)]
