"""Synthetic layers for the layer-wise tests: correlated and low-rank inputs, the relative
reconstruction error, and a min-max grid computed independently of
:mod:`prunekit.posttrain.grid`."""

import torch


def correlated(n, d, seed=0, dtype=torch.float64):
    """Inputs X = Z Aᵀ with a random mixing A: strongly correlated features."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=dtype)
    a = torch.randn(d, d, generator=g, dtype=dtype) + 2.0 * torch.eye(d, dtype=dtype)
    return z @ a.T


def low_rank(n, d, rank, seed):
    """Inputs on a rank-``rank`` subspace plus 10% noise: a few latent factors drive all inputs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)
    return z + 0.1 * torch.randn(n, d, generator=g)


def rel_err(W, W_hat, X):
    return float((X @ (W - W_hat).T).square().sum() / (X @ W.T).square().sum())


def reference_grid(W, bits):
    """Independent per-row min-max grid (range widened to contain 0)."""
    lo = W.min(dim=1, keepdim=True).values.clamp(max=0)
    hi = W.max(dim=1, keepdim=True).values.clamp(min=0)
    scale = (hi - lo) / (2**bits - 1)
    return scale, torch.round(-lo / scale)
