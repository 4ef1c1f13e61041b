"""Gradient codecs: the pure tensor maths of compressed gradient exchange.

Two unbiased stochastic quantizers and their wire formats, free of any process group:

* **QSGD** (Alistarh, Grubic, Li, Tomioka, Vojnovic, NeurIPS 2017). A vector is cut into chunks
  ``v`` of ``d = bucket_size`` coordinates; each chunk is sent as its norm ``‖v‖₂`` (float32) and
  one signed integer level per coordinate, ``ℓ_i ∈ [−s, s]``::

      r_i = s·|v_i| / ‖v‖,   |ℓ_i| = ⌊r_i⌋ + Bernoulli(r_i − ⌊r_i⌋),   ℓ_i = sign(v_i)·|ℓ_i|
      Q(v)_i = ‖v‖ · ℓ_i / s

  so ``E[Q(v)_i] = v_i`` and ``Var[Q(v)_i] = (‖v‖/s)² p_i(1 − p_i)`` with ``p_i = r_i − ⌊r_i⌋``;
  in total ``E‖Q(v) − v‖² ≤ min(d/s², √d/s)·‖v‖²``. The levels travel as ``ℓ_i + s`` in
  ``⌈log₂(2s + 1)⌉`` bits each (:func:`pack_bits`), after the ``4·⌈n/d⌉`` bytes of norms
  (the paper's Elias coding is not used: fixed-width fields keep decoding vectorised).

* **Natural compression** (Horváth, Ho, Horváth, Sahu, Canini, Richtárik 2019). Every entry is
  rounded to one of the two nearest powers of two::

      |x| ∈ [2^e, 2^(e+1)):  C(x) = sign(x)·2^(e+1) with probability (|x| − 2^e)/2^e, else sign(x)·2^e

  which is unbiased with ``E‖C(x) − x‖² ≤ ⅛‖x‖²``. On float32 this is "drop the mantissa": with
  ``m`` the 23-bit mantissa field, the 8-bit exponent field ``E`` becomes ``E + 1`` with
  probability ``m / 2²³`` (an exact integer comparison against a uniform 23-bit draw). A code is
  9 bits, ``sign·2⁸ + E``. Edge cases: ``±0`` stays 0 (code ``E = 0`` decodes to zero);
  subnormals ``m·2⁻¹⁴⁹`` round between 0 and the smallest normal ``2⁻¹²⁶`` with probability
  ``m/2²³`` of going up — the same rule, still unbiased; at the top of the range, an entry in
  ``[2¹²⁷, 2¹²⁸)`` would round up to ``2¹²⁸`` (not a float32) and is **saturated to 2¹²⁷**
  instead (biased downwards, by design: only entries of magnitude ≥ 1.7·10³⁸ are affected);
  NaN and ±Inf raise :class:`NonFiniteGradientError`.

Randomness comes only from the ``generator`` argument, so a caller that owns one generator per
rank gets reproducible, independent noise per rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "NonFiniteGradientError",
    "level_bits",
    "natural_decode",
    "natural_encode",
    "natural_payload_bytes",
    "natural_round",
    "pack_bits",
    "qsgd_decode",
    "qsgd_dequantize",
    "qsgd_encode",
    "qsgd_norms",
    "qsgd_payload_bytes",
    "qsgd_quantize",
    "unpack_bits",
]

_MANTISSA_BITS = 23
_MANTISSA_MASK = (1 << _MANTISSA_BITS) - 1
_MAX_FINITE_EXPONENT = 254
NATURAL_BITS = 9


class NonFiniteGradientError(ValueError):
    """A gradient to be compressed holds NaN or ±Inf."""


def _check_finite(x: Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteGradientError(
            f"{what}: {bad} of {x.numel()} gradient entries are NaN or Inf; refusing to compress "
            "them (check the loss scale / learning rate, or skip this step)"
        )


# ---------------------------------------------------------------------------------------------
# bit packing


def level_bits(levels: int) -> int:
    """Bits for one signed QSGD level ``ℓ ∈ [−s, s]``: ``⌈log₂(2s + 1)⌉``."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    return math.ceil(math.log2(2 * levels + 1))


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack non-negative integers ``< 2**bits`` into a ``uint8`` tensor, ``bits`` bits each.

    Little-endian bit order: bit ``j`` of value ``i`` is bit ``(i·bits + j) mod 8`` of byte
    ``⌊(i·bits + j)/8⌋``. The result has ``⌈len·bits/8⌉`` bytes (the tail of the last byte is 0).
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    flat = values.reshape(-1).to(torch.int64)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(
            f"values must be integers in [0, 2**{bits}); got [{int(flat.min())}, {int(flat.max())}]"
        )
    nbytes = (n * bits + 7) // 8
    stream = torch.zeros(nbytes * 8, dtype=torch.uint8, device=flat.device)  # one bit a byte
    bitmat = stream[: n * bits].view(n, bits)
    for j in range(bits):  # least significant bit first
        bitmat[:, j] = ((flat >> j) & 1).to(torch.uint8)
    grid = stream.view(nbytes, 8)
    out = grid[:, 0].clone()
    for k in range(1, 8):
        out |= grid[:, k] << k
    return out


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` values (``int64``)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    if packed.numel() * 8 < n * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {n} values of {bits} bits")
    grid = torch.empty(packed.numel(), 8, dtype=torch.uint8, device=packed.device)
    for k in range(8):
        grid[:, k] = (packed >> k) & 1
    bitmat = grid.view(-1)[: n * bits].view(n, bits)
    out = torch.zeros(n, dtype=torch.int64, device=packed.device)
    for j in range(bits):
        out |= bitmat[:, j].to(torch.int64) << j
    return out


def _bytes_of(t: Tensor) -> Tensor:
    return t.contiguous().view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# QSGD


def _chunks(v: Tensor, bucket_size: int) -> Tensor:
    n = v.numel()
    padded = -(-n // bucket_size) * bucket_size
    flat = v.reshape(-1).to(torch.float32)
    if padded != n:
        flat = torch.cat([flat, flat.new_zeros(padded - n)])
    return flat.view(-1, bucket_size)


def qsgd_norms(v: Tensor, bucket_size: int) -> Tensor:
    """Per-chunk Euclidean norms (float32) of ``v`` cut into chunks of ``bucket_size``."""
    return torch.linalg.vector_norm(_chunks(v, bucket_size), dim=1)


def qsgd_quantize(
    v: Tensor,
    levels: int,
    bucket_size: int,
    generator: torch.Generator | None,
    norms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """QSGD levels of ``v``: ``(norms, ℓ)`` with ``ℓ`` int64 in ``[−s, s]``, ``len(ℓ) = v.numel()``.

    ``norms`` (one per chunk) overrides the chunk norms: any scale ``N ≥ ‖v‖`` keeps the code
    unbiased (``r_i = s|v_i|/N ≤ s``); the shared-scale all-reduce passes the maximum over ranks.
    """
    _check_finite(v, "QSGD")
    n = v.numel()
    c = _chunks(v, bucket_size)
    if norms is None:
        norms = torch.linalg.vector_norm(c, dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    r = (c.abs() * levels / safe.unsqueeze(1)).clamp_(max=levels)
    low = r.floor()
    u = torch.rand(r.shape, generator=generator, device=r.device, dtype=r.dtype)
    mag = (low + (u < r - low).to(r.dtype)).clamp_(max=levels)
    lv = (mag * c.sign()).to(torch.int64).reshape(-1)[:n]
    return norms, lv


def qsgd_dequantize(norms: Tensor, lv: Tensor, levels: int, bucket_size: int) -> Tensor:
    """``Q(v)_i = ‖v‖·ℓ_i/s`` (float32, ``len(ℓ)`` entries)."""
    n = lv.numel()
    padded = -(-n // bucket_size) * bucket_size
    full = torch.zeros(padded, dtype=torch.float32, device=lv.device)
    full[:n] = lv.to(torch.float32)
    scale = norms.to(torch.float32) / levels
    return (full.view(-1, bucket_size) * scale.unsqueeze(1)).reshape(-1)[:n]


def qsgd_payload_bytes(n: int, levels: int, bucket_size: int) -> int:
    """Wire size of :func:`qsgd_encode`: ``4·⌈n/d⌉ + ⌈n·⌈log₂(2s+1)⌉/8⌉`` bytes."""
    return 4 * -(-n // bucket_size) + (n * level_bits(levels) + 7) // 8


def qsgd_encode(
    v: Tensor, levels: int, bucket_size: int, generator: torch.Generator | None
) -> Tensor:
    """QSGD payload of ``v`` as ``uint8``: float32 chunk norms, then the levels ``ℓ + s`` packed."""
    norms, lv = qsgd_quantize(v, levels, bucket_size, generator)
    packed = pack_bits(lv + levels, level_bits(levels))
    return torch.cat([_bytes_of(norms.to(torch.float32)), packed])


def qsgd_decode(payload: Tensor, n: int, levels: int, bucket_size: int) -> Tensor:
    """Values (float32, ``n`` entries) of a :func:`qsgd_encode` payload."""
    n_chunks = -(-n // bucket_size)
    norms = payload[: 4 * n_chunks].clone().view(torch.float32)  # aligned copy
    lv = unpack_bits(payload[4 * n_chunks :], level_bits(levels), n) - levels
    return qsgd_dequantize(norms, lv, levels, bucket_size)


# ---------------------------------------------------------------------------------------------
# natural compression


def _natural_fields(x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(sign bit, rounded exponent field) of every entry of ``x`` (both int64)."""
    _check_finite(x, "natural compression")
    bits = x.reshape(-1).to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    sign = (bits >> 31) & 1
    exponent = (bits >> _MANTISSA_BITS) & 0xFF
    mantissa = bits & _MANTISSA_MASK
    draw = torch.randint(
        0, 1 << _MANTISSA_BITS, mantissa.shape, generator=generator, device=x.device
    )
    up = (draw < mantissa).to(torch.int64)  # P(up) = m / 2^23, also for subnormals (E = 0)
    exponent = (exponent + up).clamp_(max=_MAX_FINITE_EXPONENT)  # saturate at 2^127
    return sign, exponent


def _natural_values(sign: Tensor, exponent: Tensor) -> Tensor:
    word = (exponent << _MANTISSA_BITS) - (sign << 31)  # the int32 whose bits are the float32
    return word.to(torch.int32).view(torch.float32)


def natural_round(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``C(x)``: every entry stochastically rounded to a neighbouring power of two (float32)."""
    sign, exponent = _natural_fields(x, generator)
    return _natural_values(sign, exponent).view(x.shape)


def natural_payload_bytes(n: int) -> int:
    """Wire size of :func:`natural_encode`: ``⌈9n/8⌉`` bytes."""
    return (NATURAL_BITS * n + 7) // 8


def natural_encode(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Natural-compression payload of ``x``: 9-bit codes ``sign·2⁸ + exponent``, packed."""
    sign, exponent = _natural_fields(x, generator)
    return pack_bits((sign << 8) | exponent, NATURAL_BITS)


def natural_decode(payload: Tensor, n: int) -> Tensor:
    """Values (float32, ``n`` entries) of a :func:`natural_encode` payload."""
    codes = unpack_bits(payload, NATURAL_BITS, n)
    return _natural_values(codes >> 8, codes & 0xFF)
