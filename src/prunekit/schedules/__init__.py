"""Schedules as pure functions of the step counter (no hidden call counting, so resumable).

* :func:`constant`
* :func:`polynomial` — the cubic ramp of gradual magnitude pruning (Zhu & Gupta 2017):
  ``s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(t1 − t0))^3`` for ``t0 ≤ t ≤ t1``.
* :func:`cosine` — RigL's drop fraction ``α_t = α/2 · (1 + cos(π t / T_end))`` and cosine learning rates.
* :func:`linear` — linear interpolation (LLR retraining learning rate).
* :func:`alternating_phase` — AC/DC's compressed/decompressed phases.
"""

from __future__ import annotations

import math


def constant(step: int, value: float) -> float:
    """``value`` at every step."""
    del step
    return value


def polynomial(
    step: int, initial: float, final: float, start: int, end: int, power: float = 3.0
) -> float:
    """Polynomial ramp from ``initial`` at ``start`` to ``final`` at ``end`` (cubic by default).

    Before ``start`` the value is ``initial``; from ``end`` on it is ``final``.
    """
    if end <= start:
        return final if step >= start else initial
    if step <= start:
        return initial
    if step >= end:
        return final
    frac = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - frac) ** power


def cosine(step: int, initial: float, end: int, final: float = 0.0) -> float:
    """Cosine decay from ``initial`` at step 0 to ``final`` at ``end`` (held afterwards)."""
    if end <= 0 or step >= end:
        return final
    return final + 0.5 * (initial - final) * (1.0 + math.cos(math.pi * max(step, 0) / end))


def linear(step: int, initial: float, end: int, final: float = 0.0) -> float:
    """Linear interpolation from ``initial`` at step 0 to ``final`` at ``end`` (held afterwards)."""
    if end <= 0 or step >= end:
        return final
    return initial + (final - initial) * max(step, 0) / end


def alternating_phase(
    step: int, warmup: int, period: int, alternate_end: int, final_start: int
) -> bool:
    """AC/DC (Peste et al., NeurIPS 2021): is ``step`` in a compressed phase?

    Dense for ``step < warmup``; then compressed and decompressed phases of ``period`` steps alternate,
    starting compressed, until ``alternate_end``; dense from ``alternate_end`` to ``final_start`` (the
    dense model of the pair is taken at its end); compressed from ``final_start`` to the end.
    """
    if step >= final_start:
        return True
    if step < warmup or step >= alternate_end:
        return False
    return ((step - warmup) // max(period, 1)) % 2 == 0


__all__ = ["alternating_phase", "constant", "cosine", "linear", "polynomial"]
