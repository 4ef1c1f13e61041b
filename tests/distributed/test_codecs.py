"""The gradient codecs as pure maths: bit packing, QSGD and natural compression (one process).

Expected values are computed here from the definitions: per-coordinate Bernoulli variances
(QSGD: ``(‖v‖/s)² p(1−p)``; natural: ``4^e p(1−p)``), the papers' bounds, and the wire-size
formulas.
"""

from __future__ import annotations

import math

import pytest
import torch

from prunekit.distributed import codecs, exchange

N_DRAWS = 3000


def _reference_pack(values: list[int], bits: int) -> list[int]:
    """Little-endian bit stream, written with Python integers."""
    stream = 0
    for i, v in enumerate(values):
        stream |= v << (i * bits)
    nbytes = (len(values) * bits + 7) // 8
    return [(stream >> (8 * b)) & 0xFF for b in range(nbytes)]


@pytest.mark.parametrize("bits", range(1, 10))
@pytest.mark.parametrize("n", [1, 3, 7, 8, 13, 101])
def test_pack_unpack_round_trip(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    values = torch.randint(0, 2**bits, (n,), generator=g)
    values[0] = 2**bits - 1  # the largest value must survive
    packed = codecs.pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * bits / 8)
    assert packed.tolist() == _reference_pack(values.tolist(), bits)
    assert torch.equal(codecs.unpack_bits(packed, bits, n), values)
    with pytest.raises(ValueError, match="values must be integers"):
        codecs.pack_bits(torch.tensor([2**bits]), bits)


def _vector(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(3) * 10  # heavy tails
    v[5] = 0.0
    return v


def _qsgd_exact(v: torch.Tensor, s: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate variance of QSGD, and each chunk's norm, in float64 from the definition."""
    v64 = v.double()
    var = torch.zeros_like(v64)
    norms = []
    for start in range(0, v.numel(), d):
        c = v64[start : start + d]
        norm = float(c.norm())
        norms.append(norm)
        if norm == 0:
            continue
        r = s * c.abs() / norm
        p = r - r.floor()
        var[start : start + d] = (norm / s) ** 2 * p * (1 - p)
    return var, torch.tensor(norms, dtype=torch.float64)


def _draws(fn, n_draws: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.stack([fn() for _ in range(n_draws)]).double()


@pytest.mark.parametrize(("s", "d"), [(1, 64), (4, 100), (16, 512)])
def test_qsgd_unbiased_and_exact_variance(s: int, d: int) -> None:
    n = 300  # chunks of d, the last one partial (padded)
    v = _vector(n, seed=s)
    g = torch.Generator().manual_seed(1)

    def draw() -> torch.Tensor:
        norms, lv = codecs.qsgd_quantize(v, s, d, g)
        assert int(lv.abs().max()) <= s
        return codecs.qsgd_dequantize(norms, lv, s, d)

    q = _draws(draw, N_DRAWS)
    var, norms = _qsgd_exact(v, s, d)
    # unbiased: the mean of N draws is within 5 standard errors of v (1e-6: float32 scale)
    err = (q.mean(0) - v.double()).abs()
    assert bool((err <= 5 * (var / N_DRAWS).sqrt() + 1e-6 * v.abs().max()).all()), float(
        (err / (var / N_DRAWS).sqrt().clamp_min(1e-12)).max()
    )
    # empirical E‖Q(v) − v‖² equals Σ p(1−p)(‖v‖/s)² within sampling error ...
    sq = (q - v.double()).pow(2).sum(1)
    exact = float(var.sum())
    assert abs(float(sq.mean()) - exact) <= 5 * float(sq.std()) / math.sqrt(N_DRAWS) + 1e-9
    # ... and obeys the paper's bound per chunk, summed: min(d/s², √d/s)‖v‖²
    sizes = [min(d, n - start) for start in range(0, n, d)]
    bound = sum(
        min(m / s**2, math.sqrt(m) / s) * float(nrm) ** 2
        for m, nrm in zip(sizes, norms, strict=True)
    )
    assert float(sq.mean()) <= bound


def test_qsgd_zero_chunk_and_shared_scale() -> None:
    v = torch.zeros(10)
    norms, lv = codecs.qsgd_quantize(v, 4, 5, torch.Generator().manual_seed(0))
    assert torch.equal(lv, torch.zeros(10, dtype=torch.int64)) and torch.equal(
        norms, torch.zeros(2)
    )
    # a larger shared scale N keeps the code unbiased: E = N·E[ℓ]/s = v
    v = torch.tensor([0.3, -0.2, 0.1, 0.0])
    big = torch.tensor([2.0])
    g = torch.Generator().manual_seed(0)
    q = _draws(
        lambda: codecs.qsgd_dequantize(big, codecs.qsgd_quantize(v, 2, 4, g, big)[1], 2, 4), 4000
    )
    r = 2 * v.double().abs() / 2.0
    sd = (2.0 / 2 * ((r - r.floor()) * (1 - r + r.floor())).sqrt()) / math.sqrt(4000)
    assert bool(((q.mean(0) - v.double()).abs() <= 5 * sd + 1e-7).all())


def _natural_exact(x: torch.Tensor) -> torch.Tensor:
    """Variance of natural rounding per entry: ``p(1−p)·4^e`` for ``|x| ∈ [2^e, 2^(e+1))``."""
    out = []
    for val in x.double().tolist():
        a = abs(val)
        if a == 0:
            out.append(0.0)
            continue
        if a < 2.0**-126:  # subnormal: rounds between 0 and 2^-126
            low = 0.0
            high = 2.0**-126
        else:
            _m, e = math.frexp(a)  # a = m·2^e, m in [0.5, 1)
            low = 2.0 ** (e - 1)
            high = 2 * low
        p = (a - low) / (high - low)
        out.append(p * (1 - p) * (high - low) ** 2)
    return torch.tensor(out, dtype=torch.float64)


def test_natural_unbiased_exact_variance_and_powers_of_two() -> None:
    x = _vector(200, seed=3)
    x[7] = 0.75
    x[8] = -1.0  # exact power of two: no noise
    x[9] = 1e-40  # subnormal
    x[10] = -3e-39  # subnormal
    g = torch.Generator().manual_seed(2)
    c = _draws(lambda: codecs.natural_round(x, g), N_DRAWS)
    var = _natural_exact(x)
    err = (c.mean(0) - x.double()).abs()
    assert bool((err <= 5 * (var / N_DRAWS).sqrt() + 1e-7 * x.double().abs()).all())
    sq = (c - x.double()).pow(2).sum(1)
    assert abs(float(sq.mean()) - float(var.sum())) <= 5 * float(sq.std()) / math.sqrt(N_DRAWS)
    assert float(sq.mean()) <= float(x.double().pow(2).sum()) / 8
    # every output is 0 or ± a power of two, on the right side of x
    flat = c.reshape(-1)
    nonzero = flat[flat != 0]
    mantissas = torch.tensor([math.frexp(a)[0] for a in nonzero.abs().tolist()])
    assert bool((mantissas == 0.5).all())
    assert bool(((c.sign() == x.double().sign()) | (c == 0)).all())
    assert bool((c[:, 5] == 0).all()) and bool((c[:, 8] == -1.0).all())
    assert set(c[:, 9].tolist()) <= {0.0, 2.0**-126}


def test_natural_edges() -> None:
    g = torch.Generator().manual_seed(0)
    # [2^127, 2^128): rounding up would leave float32; saturated at 2^127 instead (64 draws)
    top = torch.tensor([1.5 * 2.0**127] * 32 + [-1.9 * 2.0**127] * 32 + [-(2.0**127)])
    assert codecs.natural_round(top, g).tolist() == [2.0**127] * 32 + [-(2.0**127)] * 33
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(codecs.NonFiniteGradientError, match="NaN or Inf"):
            codecs.natural_encode(torch.tensor([1.0, bad]), g)
        with pytest.raises(codecs.NonFiniteGradientError):
            codecs.qsgd_encode(torch.tensor([1.0, bad]), 4, 2, g)


@pytest.mark.parametrize("n", [1, 9, 511, 512, 513, 2000])
def test_payload_sizes_and_round_trip(n: int) -> None:
    v = _vector(max(n, 6), seed=n)[:n]
    for s in (1, 3, 16, 127):
        bits = math.ceil(math.log2(2 * s + 1))
        payload = codecs.qsgd_encode(v, s, 512, torch.Generator().manual_seed(5))
        assert payload.numel() == 4 * math.ceil(n / 512) + math.ceil(n * bits / 8)
        norms, lv = codecs.qsgd_quantize(v, s, 512, torch.Generator().manual_seed(5))
        assert torch.equal(
            codecs.qsgd_decode(payload, n, s, 512), codecs.qsgd_dequantize(norms, lv, s, 512)
        )
    payload = codecs.natural_encode(v, torch.Generator().manual_seed(5))
    assert payload.numel() == math.ceil(9 * n / 8)
    expected = codecs.natural_round(v, torch.Generator().manual_seed(5))
    assert torch.equal(codecs.natural_decode(payload, n), expected)


def _costs(world: int, s: int | None, d: int, payload: int, slice_payload: int, n: int):  # type: ignore[no-untyped-def]
    out = {"allgather": (world - 1) * payload, "reduce_scatter": 2 * (world - 1) * slice_payload}
    if s is not None and world * s <= 127:
        out["allreduce"] = 2 * (world - 1) / world * (4 * math.ceil(n / d) + n)
    return out


@pytest.mark.parametrize("world", [2, 3, 4, 9])
def test_auto_mode_is_the_cheapest(world: int) -> None:
    s, d = 16, 512
    n = 64 * world * d
    qsgd_bytes = lambda m: 4 * math.ceil(m / d) + math.ceil(m * 6 / 8)  # noqa: E731
    nat_bytes = lambda m: math.ceil(9 * m / 8)  # noqa: E731
    for codec, costs in (
        (exchange.qsgd_codec(s, d), _costs(world, s, d, qsgd_bytes(n), qsgd_bytes(n // world), n)),
        (exchange.natural_codec(), _costs(world, None, 1, nat_bytes(n), nat_bytes(n // world), n)),
    ):
        assert exchange.mode_bytes(codec, n, world) == pytest.approx(costs)
        best = min(costs.values())
        want = "allgather" if costs["allgather"] == best else min(costs, key=costs.__getitem__)
        assert exchange.select_mode(codec, world) == want
    assert exchange.select_mode(exchange.qsgd_codec(s, d), 2) == "allgather"
    with pytest.raises(ValueError, match="127"):
        exchange.select_mode(exchange.qsgd_codec(64, d), 2, "allreduce")
