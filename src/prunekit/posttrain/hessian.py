"""The layer Hessian of layer-wise compression: accumulation, damping, the inverse's factor.

Pure tensor maths, no hooks and no model traversal. For a linear layer ``y = W x`` with ``W`` of
shape ``(d_out, d_in)`` and calibration inputs ``X`` (``n`` samples, shape ``(n, d_in)``), the
reconstruction error of a compressed ``Ŵ`` is, row by row, a quadratic form in ``H``::

    E(Ŵ) = (1/n) Σ_k ||W x_k - Ŵ x_k||²  =  Σ_rows ½ (w - ŵ) H (w - ŵ)ᵀ,   H = (2/n) Xᵀ X.

Convention: ``H`` is the Hessian of the *mean* squared error per sample, ``H = 2 XᵀX / n``
(the ``2`` of OBS/OBC/SparseGPT, the ``1/n`` of a running average), the one of
:mod:`~prunekit.posttrain.obs`, :mod:`~prunekit.posttrain.obc` and
:mod:`~prunekit.posttrain.quant`. Here: :func:`layer_hessian` and :class:`HessianAccumulator`
(running average over batches) make it, :func:`prepare_hessian` fixes dead inputs and damps it
(:class:`HessianInfo` says what it did, :class:`HessianError` when no damping helps), and
:func:`inverse_hessian_cholesky` gives the factor of ``H⁻¹`` that the OBS sweeps need.

References:
    Frantar & Alistarh, "Optimal Brain Compression" (OBC), NeurIPS 2022. Frantar & Alistarh,
    "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from prunekit.posttrain.grid import compute_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "HessianAccumulator",
    "HessianError",
    "HessianInfo",
    "inverse_hessian_cholesky",
    "layer_hessian",
    "prepare_hessian",
]


class HessianError(ValueError):
    """A layer Hessian that cannot be made positive definite by bounded damping."""


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
    x = inputs.to(compute_dtype(inputs))
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
    h = H.to(compute_dtype(H)).clone()
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


def inverse_hessian_cholesky(h_damped: Tensor) -> Tensor:
    """The upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) from a damped Hessian.

    Row ``j`` of ``U`` is the OBS update of column ``j`` restricted to the columns after it,
    which is what a fixed-order sweep (:func:`~prunekit.posttrain.obs.obs_sweep_`) needs.

    Raises:
        HessianError: the factorisation fails (pass a larger ``damp``).
    """
    L, err = torch.linalg.cholesky_ex(h_damped)
    if int(err) == 0:
        U, err = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(err) != 0:
        raise HessianError("Cholesky of H⁻¹ failed; pass a larger damp")
    return U
