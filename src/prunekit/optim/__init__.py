"""Optimizers: M-FAC (matrix-free inverse-Fisher preconditioning)."""

from prunekit.optim.mfac import MFAC

__all__ = ["MFAC"]
