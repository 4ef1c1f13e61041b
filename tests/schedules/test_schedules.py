from itertools import pairwise

import pytest

from prunekit.schedules import alternating_phase, constant, cosine, linear, polynomial


def test_polynomial_endpoints_and_monotone():
    values = [polynomial(t, 0.0, 0.9, 10, 110) for t in range(0, 130)]
    assert values[0] == 0.0 and values[10] == 0.0
    assert values[110] == 0.9 and values[129] == 0.9
    assert all(b >= a for a, b in pairwise(values))
    # cubic: most of the pruning happens early
    assert polynomial(35, 0.0, 0.9, 10, 110) > 0.9 * 0.5


def test_polynomial_matches_zhu_gupta_formula():
    s_i, s_f, t0, n = 0.1, 0.8, 5, 50
    for t in (5, 20, 40, 55):
        assert polynomial(t, s_i, s_f, t0, t0 + n) == pytest.approx(
            s_f + (s_i - s_f) * (1 - (t - t0) / n) ** 3
        )


def test_cosine_endpoints_and_monotone():
    values = [cosine(t, 0.3, 100) for t in range(120)]
    assert values[0] == pytest.approx(0.3) and values[50] == pytest.approx(0.15)
    assert values[100] == 0.0 and values[119] == 0.0
    assert all(b <= a for a, b in pairwise(values))


def test_linear_and_constant():
    assert linear(0, 1.0, 10) == 1.0 and linear(5, 1.0, 10) == 0.5 and linear(10, 1.0, 10) == 0.0
    assert constant(123, 0.7) == 0.7


def test_alternating_phase_acdc_imagenet_schedule():
    # 100 "epochs": dense 0-9, alternating 5-epoch phases to 75, dense 75-84, compressed 85-99
    phases = [alternating_phase(e, 10, 5, 75, 85) for e in range(100)]
    assert not any(phases[0:10])
    assert all(phases[10:15]) and not any(phases[15:20]) and all(phases[20:25])
    assert all(phases[70:75]) and not any(phases[75:85]) and all(phases[85:100])
