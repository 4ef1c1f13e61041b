"""When a training run has diverged: a batch loss that is not finite, or above
``DIVERGENCE_FACTOR × max(1, L0)`` with ``L0`` the run's first batch loss.

A cross-entropy of 1000 × ln(10) ≈ 2300 on a 10-class task needs logits thousands apart: the run has
exploded even if no value has overflowed yet, and that epoch must not be checkpointed. The loop
(:mod:`prunekit.app.loop`) stops with :class:`DivergenceError` / :class:`NonFiniteLossError` before
the epoch is checkpointed, so the last good checkpoint stays untouched.
"""

from __future__ import annotations

import math

__all__ = ["DIVERGENCE_FACTOR", "DivergenceError", "NonFiniteLossError", "divergence"]

#: a batch loss above ``DIVERGENCE_FACTOR × max(1, first batch loss)`` counts as divergence
DIVERGENCE_FACTOR = 1000.0


class DivergenceError(RuntimeError):
    """The loss exploded (above ``DIVERGENCE_FACTOR`` × the initial loss); the last good checkpoint
    is left intact."""


class NonFiniteLossError(DivergenceError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


def divergence(loss: float, reference: float) -> str | None:
    """Why ``loss`` means the run diverged, or ``None`` if it did not.

    Diverged: ``loss`` is not finite, or ``loss > DIVERGENCE_FACTOR × max(1, reference)`` with
    ``reference`` the loss of the run's first batch.
    """
    if not math.isfinite(loss):
        return f"loss is {loss}"
    limit = DIVERGENCE_FACTOR * max(1.0, reference)
    if loss > limit:
        return (
            f"loss is {loss:.4g}, above the limit {limit:.4g} = {DIVERGENCE_FACTOR:g} x max(1, "
            f"first batch loss {reference:.4g}): the run diverged"
        )
    return None
