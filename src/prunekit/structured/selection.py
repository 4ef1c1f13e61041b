"""Pure per-group maths of HSPG, DHSPG and HESSO: the half-space projection rule, DHSPG's adaptive
``λ_g`` and redundancy score, and HESSO's importance terms.

Every function takes per-group reductions (one entry per group: norms, inner products, sizes), so
it can be checked by hand on a few numbers; the optimizers compute the reductions with
:class:`~prunekit.structured.group_index.GroupIndex`.
"""

from __future__ import annotations

import torch
from torch import Tensor

TINY = 1e-30


def half_space_mask(trial_dot_x: Tensor, sq_norms: Tensor, epsilon: float) -> Tensor:
    """Groups the half-space step projects to zero (OTOv1, Chen et al. 2021, eq. 6).

    ``x̂_g ← 0`` iff ``<x̂_g, x_g> < ε ||x_g||²`` — the trial point ``x̂`` left the half-space
    around ``x``; ``ε = 0`` projects only groups whose trial step crossed zero. Groups already
    zero are never selected.

    Args:
        trial_dot_x: ``<x̂_g, x_g>`` per group.
        sq_norms: ``||x_g||²`` per group (of the point before the step).
        epsilon: ``ε >= 0``.
    """
    return (trial_dot_x < epsilon * sq_norms) & (sq_norms > 0)


def adaptive_lambda(
    inner: Tensor,
    x_norm: Tensor,
    d_norm: Tensor,
    lambda_: float,
    amplify: float,
    hat_coeff: float,
) -> Tensor:
    """DHSPG's per-group ``λ_g`` for the redundant groups (OTOv2, Chen et al. 2023, Alg. 2).

    With ``d_g`` the group's step direction (gradient with momentum or Adam's), the group grows
    under ``d`` alone when ``<d_g, x_g> < 0``. Then ``λ_g`` must exceed
    ``λ_lo = −<d_g, x_g>/||x_g||`` for ``d_g + λ_g x_g/||x_g||`` to shrink the group, and stay
    below ``λ_hi = −||d_g||² ||x_g|| / <d_g, x_g>`` so the combined direction keeps descending::

        λ_g = clip(amplify · λ_lo, λ, hat_coeff · λ)    if <d_g, x_g> < 0
        λ_g = (λ_lo + λ_hi) / 2                          if that reaches λ_hi
        λ_g = λ                                          otherwise

    Args:
        inner: ``<d_g, x_g>`` per group.
        x_norm: ``||x_g||`` per group.
        d_norm: ``||d_g||`` per group.
        lambda_: the base ``λ``.
        amplify: the factor on ``λ_lo``.
        hat_coeff: ``λ_g <= hat_coeff · λ`` (before the ``λ_hi`` fallback).
    """
    base = torch.full_like(inner, lambda_)
    grows = (inner < 0) & (x_norm > 0)
    lower = -inner / x_norm.clamp_min(TINY)
    upper = -(d_norm**2) * x_norm / inner.clamp_max(-TINY)
    adjusted = (amplify * lower).clamp(min=lambda_, max=lambda_ * hat_coeff)
    adjusted = torch.where(adjusted >= upper, (lower + upper) / 2, adjusted)
    return torch.where(grows, adjusted, base)


def l2_normalised(t: Tensor) -> Tensor:
    """``t / ||t||₂`` over all groups (a zero vector stays zero)."""
    return t / t.norm().clamp_min(TINY)


def redundancy_score(inner: Tensor, x_norm: Tensor, d_norm: Tensor, sizes: Tensor) -> Tensor:
    """DHSPG's ranking of groups by redundancy (higher = more redundant), as OTOv2's reference.

    ``0.5 · cos(x_g, d_g)/||cos||₂ + 0.5 · a_g/||a||₂`` with ``a_g = 1 / (||x_g||/n_g + 1e-6)``:
    a group whose step direction points along it (the step shrinks it) and whose entries are
    small on average is redundant.

    Args:
        inner: ``<d_g, x_g>`` per group.
        x_norm: ``||x_g||``.
        d_norm: ``||d_g||``.
        sizes: ``n_g``, the number of entries of each group.
    """
    cos = inner / (x_norm * d_norm).clamp_min(TINY)
    inverse_avg = 1.0 / (x_norm / sizes.clamp_min(1) + 1e-6)
    return 0.5 * l2_normalised(cos) + 0.5 * l2_normalised(inverse_avg)


def importance_terms(
    x_norm: Tensor, sizes: Tensor, inner: Tensor, g_norm: Tensor
) -> dict[str, Tensor]:
    """HESSO's importance terms per group (higher = keep), as OTOv3's reference computes them.

    * ``magnitude``: ``||x_g||``;
    * ``avg_magnitude``: ``||x_g|| / √n_g`` (the root mean square entry);
    * ``cosine``: ``cos(x_g, ∇f_g) + 1``: a group whose gradient points along it — the loss
      would shrink it further — scores high, one the loss wants to grow scores low;
    * ``taylor_first``: ``|<x_g, ∇f_g>|``, the first-order loss change of removing ``x_g``;
    * ``taylor_second``: ``½ <x_g, ∇f_g>²``, the second-order term with the Hessian
      approximated by the rank-one Fisher ``∇f ∇fᵀ``.

    Args:
        x_norm: ``||x_g||``.
        sizes: ``n_g``.
        inner: ``<x_g, ∇f_g>``.
        g_norm: ``||∇f_g||``.
    """
    return {
        "magnitude": x_norm,
        "avg_magnitude": x_norm / sizes.clamp_min(1).sqrt(),
        "cosine": inner / (x_norm * g_norm).clamp_min(TINY) + 1.0,
        "taylor_first": inner.abs(),
        "taylor_second": 0.5 * inner**2,
    }


def combine_terms(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """``Σ_c w_c · t_c / ||t_c||₂``: each term scaled to unit L2 norm across the groups, then
    weighted (OTOv3's reference normalisation)."""
    score = torch.zeros_like(next(iter(terms.values())))
    for name, weight in weights.items():
        score = score + weight * l2_normalised(terms[name])
    return score
