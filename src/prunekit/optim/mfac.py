"""The M-FAC optimizer: SGD preconditioned by the inverse empirical Fisher of recent gradients.

Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021 (the *dynamic* algorithm). A ring buffer holds the last ``m``
gradients ``G`` (``m × d``, all parameters of all groups flattened into one vector, as in the
reference code) together with their Gram matrix ``K = GGᵀ``. With ``k`` gradients in the window
and damping ``λ``::

    F = λ I + (1/k) GᵀG,      F⁻¹ x = (1/λ) (x − Gᵀ (λk I + K)⁻¹ G x).

Each step inserts the new gradient ``g = G_j`` (replacing the oldest one), updates row and
column ``j`` of ``K`` with one product ``G g`` (``O(d·m)``), and, because ``g`` is itself in the
window, computes the preconditioned direction without the ``1/λ`` cancellation of the formula
above::

    F⁻¹ g = k · Gᵀ (λk I + K)⁻¹ e_j        (one more ``O(d·m)`` product).

The ``m × m`` system is refactorised (Cholesky, float64) at every step, as the reference code
refactorises its ``m × m`` matrices on every replacement: ``O(m³)``, negligible next to
``O(d·m)`` for the window sizes used in practice. A step costs ``O(d·m + m³)`` time and the
buffer ``m·d`` numbers. When ``λk`` is below the float precision of ``K`` (tiny damping, nearly
repeated gradients) the solve switches to an eigendecomposition that drops the unresolvable
directions (see :meth:`MFAC._solve_unit`); the reference code has no such guard.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["MFAC"]


class MFAC(torch.optim.Optimizer):
    """M-FAC: ``p ← p − lr · F⁻¹ g`` with the empirical Fisher of the last ``ngrads`` gradients.

    Update, per step (``g`` is the flattened gradient of all parameters)::

        g ← g + weight_decay · p                  (per group; enters the window as is)
        window ← window with g replacing the oldest gradient
        u = F⁻¹ g,    F = damp·I + (1/k) Σ_{window} g_i g_iᵀ
        v ← momentum · v + (1 − momentum) · u     (only when momentum > 0; as the reference)
        p ← p − lr · v

    Warm-up: while the window holds ``k < ngrads`` gradients, ``F`` is the empirical Fisher of
    those ``k`` (normalised by ``1/k``). The reference code instead starts from ``ngrads`` zero
    gradients and always divides by ``ngrads``, which makes its first steps ``ngrads/k`` times
    longer along the gradients' span.

    All parameters of all groups form one vector and share one Fisher; ``lr`` and
    ``weight_decay`` may differ per group, ``ngrads``, ``damp`` and ``momentum`` are global.
    Parameters without a gradient contribute zeros (and no weight decay). Computation is in
    float64 when every parameter is float64, otherwise float32, on the device of the first
    parameter. ``state_dict()`` holds the window, so save → load → continue is bit-identical.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        ngrads: window size ``m`` (the reference's default, 1024; the buffer is ``m × d``).
        damp: absolute damping ``λ > 0`` of the Fisher.
        momentum: coefficient in ``[0, 1)`` of the moving average of preconditioned steps.
        weight_decay: L2 coefficient added to the gradient before preconditioning.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        ngrads: int = 1024,
        damp: float = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if not (isinstance(ngrads, int) and ngrads >= 1):
            raise ValueError(f"ngrads must be an integer >= 1, got {ngrads!r}")
        if not (damp > 0 and math.isfinite(damp)):
            raise ValueError(f"damp must be a finite number > 0, got {damp}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.ngrads = ngrads
        self.damp = float(damp)
        self.momentum = float(momentum)
        self._window: dict[str, Any] = {}
        self._warned = False

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _allocate(self, params: list[Tensor]) -> dict[str, Any]:
        d = sum(p.numel() for p in params)
        w = self._window
        if w:
            if w["grads"].shape[1] != d:
                raise ValueError(
                    f"the parameters now have {d} elements, the window was built for "
                    f"{w['grads'].shape[1]}; create a new MFAC after changing the parameters"
                )
            return w
        dtype = torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32
        dev = params[0].device
        w["grads"] = torch.zeros(self.ngrads, d, dtype=dtype, device=dev)
        w["gram"] = torch.zeros(self.ngrads, self.ngrads, dtype=torch.float64, device=dev)
        w["count"] = 0
        if self.momentum > 0:
            w["momentum_buffer"] = torch.zeros(d, dtype=dtype, device=dev)
        return w

    def _flat_grad(self, dtype: torch.dtype, dev: torch.device) -> Tensor:
        parts = []
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    parts.append(torch.zeros(p.numel(), dtype=dtype, device=dev))
                    continue
                if p.grad.is_sparse:
                    raise ValueError("MFAC does not support sparse gradients")
                g = p.grad.reshape(-1).to(device=dev, dtype=dtype)
                if wd != 0:
                    g = g + wd * p.detach().reshape(-1).to(device=dev, dtype=dtype)
                parts.append(g)
        return torch.cat(parts)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One preconditioned step; ``closure`` (optional) re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        win = self._allocate(params)
        G: Tensor = win["grads"]
        K: Tensor = win["gram"]
        m = self.ngrads
        j = win["count"] % m
        k = min(win["count"] + 1, m)  # the window fills rows 0..k-1 first, then wraps
        g = self._flat_grad(G.dtype, G.device)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("non-finite gradient; MFAC's window would be corrupted (step skipped)")
        G[j] = g
        row = (G[:k] @ g).to(torch.float64)
        K[j, :k] = row
        K[:k, j] = row
        c = self._solve_unit(K[:k, :k], j, G.dtype).to(G.dtype)
        direction = (G[:k].T @ c) * k  # = F⁻¹ g
        win["count"] += 1
        if self.momentum > 0:
            v: Tensor = win["momentum_buffer"]
            v.mul_(self.momentum).add_(direction, alpha=1.0 - self.momentum)
            direction = v
        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                n = p.numel()
                upd = direction[offset : offset + n].reshape(p.shape)
                p.add_(upd.to(device=p.device, dtype=p.dtype), alpha=-group["lr"])
                offset += n
        return loss

    def _solve_unit(self, K: Tensor, j: int, dtype: torch.dtype) -> Tensor:
        """``c = (λk I + K)⁻¹ e_j`` in float64, guarded against an unresolvable damping.

        The Gram matrix ``K`` is only as accurate as its ``dtype`` products,
        ``tol = 64·eps·max diag K``. When ``λk ≥ tol`` a Cholesky solve is exact enough. Below
        that (a tiny ``damp`` next to large gradients, or nearly repeated gradients) the
        eigen-directions of ``K`` with eigenvalues under ``tol`` cannot be told from zero; they
        are dropped, as in a pseudo-inverse (their true contribution ``Gᵀu`` is below the
        precision of ``G`` anyway), and a warning is logged once.
        """
        k = K.shape[0]
        shift = self.damp * k
        tol = 64.0 * torch.finfo(dtype).eps * float(K.diagonal().max())
        if shift >= tol:
            A = K.clone()
            A.diagonal().add_(shift)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) == 0:
                e = torch.zeros(k, 1, dtype=K.dtype, device=K.device)
                e[j, 0] = 1.0
                return torch.cholesky_solve(e, L).squeeze(1)
        if not self._warned:
            logger.warning(
                "MFAC: damp·k = %.3g is below the resolution %.3g of the gradient Gram matrix; "
                "directions under it are dropped (pseudo-inverse). Pass a larger damp (or "
                "float64 parameters) to avoid this.",
                shift,
                tol,
            )
            self._warned = True
        evals, U = torch.linalg.eigh(K)
        inv = torch.where(evals >= tol, 1.0 / (shift + evals.clamp_min(0.0)), 0.0)
        return U @ (inv * U[j])

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer state plus ``"mfac"``: window, Gram matrix, counter, momentum."""
        sd = super().state_dict()
        sd["mfac"] = {
            "ngrads": self.ngrads,
            "damp": self.damp,
            "momentum": self.momentum,
            "window": dict(self._window),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (tensors are copied to the first parameter's device)."""
        sd = dict(state_dict)
        if "mfac" not in sd:
            raise ValueError("not an MFAC state_dict: the 'mfac' entry is missing")
        extra = sd.pop("mfac")
        super().load_state_dict(sd)
        self.ngrads = int(extra["ngrads"])
        self.damp = float(extra["damp"])
        self.momentum = float(extra["momentum"])
        dev = self._params()[0].device
        self._window = {
            key: val.to(dev, copy=True) if isinstance(val, Tensor) else val
            for key, val in extra["window"].items()
        }
