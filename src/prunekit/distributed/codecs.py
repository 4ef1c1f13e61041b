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

Speed: everything is a handful of whole-tensor operations. Fields of ≤ 16 bits are packed 8 at a
time into one ``8·b``-bit little-endian word (two int64 halves), natural compression works on the
int32 bit pattern of the floats, and a stack of ``R`` payloads decodes in one call. One thread,
median of 21 runs, 266,610 values (1,000,000 in brackets), ms, before → after this layout:
``qsgd_encode`` (s = 16) 10.2 → 3.0 (39 → 12), ``qsgd_decode`` 5.6 → 0.9 (20 → 2.9), decode and
sum of 2 payloads 11.4 → 2.0 (43 → 7.1), ``natural_encode`` 14 → 3.1 (61 → 14),
``natural_decode`` 8.8 → 1.3 (42 → 4.7), ``pack_bits`` (6 bits) 7.9 → 1.6, ``unpack_bits``
8.3 → 0.8 (on a shared 2-core machine; ratios are steadier than absolute times).
"""

from __future__ import annotations

import math
import sys

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
_SIGN_BIT = -(1 << 31)  # the int32 0x80000000
_UNIFORM_SCALE = 1 << 24  # QSGD's uniform draws: k/2²⁴, as torch.rand's float32 grid
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


_GROUP = 8  # values per group: 8 values of b bits fill exactly b bytes
_MAX_GROUP_BITS = 16  # a group of 8·b <= 128 bits fits two int64 words
_LITTLE_ENDIAN = sys.byteorder == "little"


def _group_layout(bits: int) -> tuple[list[int], int, int | None]:
    """Bit offsets ``j·b`` of a group's 8 values; how many lie wholly in bits 0–63; the straddler.

    The values ``j < a`` lie in the low word, ``j = a`` straddles bit 64 when ``a·b < 64``, the
    rest lie in the high word.
    """
    offs = [j * bits for j in range(_GROUP)]
    a = sum(1 for o in offs if o + bits <= 64)
    straddle = a if a < _GROUP and offs[a] < 64 else None
    return offs, a, straddle


def _word_bytes(word: Tensor, count: int) -> Tensor:
    """The ``count`` low bytes (little-endian) of each int64 of ``word``: ``(m, count)`` uint8."""
    if _LITTLE_ENDIAN:
        return word.view(torch.uint8).view(-1, 8)[:, :count]
    shifts = torch.arange(0, 8 * count, 8, dtype=torch.int64, device=word.device)
    return ((word.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8)


def _pack_groups(groups: Tensor, bits: int, out: Tensor) -> None:
    """Write ``groups`` (``(m, 8)`` int64 in ``[0, 2**bits)``, ``bits ≤ 16``) to ``out`` (``(m, bits)``).

    The 8 values of a group form one ``8·b``-bit little-endian word, value ``j`` at bit ``j·b``,
    held in two int64 halves (``lo``: bits 0–63, ``hi``: bits 64–127); the fields do not overlap,
    so the sum of the shifted values is their bitwise OR (int64 addition wraps like the bits).
    """
    offs, a, straddle = _group_layout(bits)
    shifts = torch.tensor(offs, dtype=torch.int64, device=groups.device)
    lo = (groups[:, :a] << shifts[:a]).sum(1)
    if straddle is not None:
        lo += groups[:, straddle] << offs[straddle]  # its bits past 63 fall off here ...
    out[:, : min(bits, 8)] = _word_bytes(lo, min(bits, 8))
    if bits <= 8:
        return
    first_hi = a if straddle is None else a + 1
    hi = (groups[:, first_hi:] << (shifts[first_hi:] - 64)).sum(1)
    if straddle is not None:
        hi += groups[:, straddle] >> (64 - offs[straddle])  # ... and land in the high word
    out[:, 8:] = _word_bytes(hi, bits - 8)


def _unpack_groups(words: Tensor, bits: int, out: Tensor) -> None:
    """Inverse of :func:`_pack_groups`: ``words`` (``(m, 1 or 2)`` int64) → ``out`` (``(m, 8)``)."""
    offs, a, straddle = _group_layout(bits)
    shifts = torch.tensor(offs, dtype=torch.int64, device=words.device)
    mask = (1 << bits) - 1
    lo = words[:, :1]
    torch.bitwise_and(lo >> shifts[:a], mask, out=out[:, :a])
    if a == _GROUP:
        return
    hi = words[:, 1:2]
    first_hi = a
    if straddle is not None:
        o = offs[straddle]
        low_part = (lo[:, 0] >> o) & ((1 << (64 - o)) - 1)  # >> is arithmetic: mask the sign
        out[:, straddle] = low_part | ((hi[:, 0] << (64 - o)) & mask)
        first_hi += 1
    torch.bitwise_and(hi >> (shifts[first_hi:] - 64), mask, out=out[:, first_hi:])


def _pack_into(codes: Tensor, bits: int, out: Tensor) -> None:
    """Pack ``codes`` (int64, a multiple of 8 values, in range) into ``out`` (uint8, ``n·b/8``)."""
    if bits <= _MAX_GROUP_BITS:
        _pack_groups(codes.view(-1, _GROUP), bits, out.view(-1, bits))
        return
    n = codes.numel()  # wide fields: one byte per bit
    stream = torch.empty(n * bits, dtype=torch.uint8, device=codes.device)
    bitmat = stream.view(n, bits)
    for j in range(bits):  # least significant bit first
        bitmat[:, j] = ((codes >> j) & 1).to(torch.uint8)
    grid = stream.view(-1, 8)
    out.copy_(grid[:, 0])
    for k in range(1, 8):
        out |= grid[:, k] << k


def _unpack_rows(packed: Tensor, bits: int, n: int) -> Tensor:
    """Codes of every row of ``packed`` (``(R, ≥ ⌈n·b/8⌉)`` uint8): ``(R, 8·⌈n/8⌉)`` int64.

    Entries past ``n`` in each row are unspecified.
    """
    rows = packed.shape[0]
    groups = -(-n // _GROUP)
    nbytes = (n * bits + 7) // 8
    full = (n // _GROUP) * bits  # bytes of the whole groups
    dev = packed.device
    if bits <= _MAX_GROUP_BITS:
        width = 8 if bits <= 8 else 16
        buf = torch.zeros(rows, groups, width, dtype=torch.uint8, device=dev)
        buf[:, : n // _GROUP, :bits] = packed[:, :full].view(rows, -1, bits)
        if nbytes > full:  # the last, partial group
            buf[:, -1, : nbytes - full] = packed[:, full:nbytes]
        if not _LITTLE_ENDIAN:  # pragma: no cover - big-endian hosts
            buf = buf.flip(-1).view(rows, groups, width // 8, 8).flip(-2)
        words = buf.view(torch.int64).view(rows * groups, width // 8)
        out = torch.empty(rows * groups, _GROUP, dtype=torch.int64, device=dev)
        _unpack_groups(words, bits, out)
        return out.view(rows, groups * _GROUP)
    grid = torch.empty(rows, groups * bits, 8, dtype=torch.uint8, device=dev)  # wide fields
    grid[:, nbytes:] = 0
    for k in range(8):
        grid[:, :nbytes, k] = (packed[:, :nbytes] >> k) & 1
    bitmat = grid.view(rows, groups * _GROUP, bits)
    out = torch.zeros(rows, groups * _GROUP, dtype=torch.int64, device=dev)
    for j in range(bits):
        out |= bitmat[:, :, j].to(torch.int64) << j
    return out


def _padded_codes(n: int, device: torch.device) -> Tensor:
    """An int64 buffer of ``8·⌈n/8⌉`` codes whose tail past ``n`` is 0."""
    buf = torch.empty(-(-n // _GROUP) * _GROUP, dtype=torch.int64, device=device)
    buf[n:] = 0
    return buf


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack non-negative integers ``< 2**bits`` into a ``uint8`` tensor, ``bits`` bits each.

    Little-endian bit order: bit ``j`` of value ``i`` is bit ``(i·bits + j) mod 8`` of byte
    ``⌊(i·bits + j)/8⌋``. The result has ``⌈len·bits/8⌉`` bytes (the tail of the last byte is 0).
    Up to 16 bits, each group of 8 values is assembled as one ``8·bits``-bit word in two int64
    halves (``O(n)``, a few tensor operations on ``n/8`` rows); wider fields go through a bit
    stream of one byte per bit.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    flat = values.reshape(-1)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(
            f"values must be integers in [0, 2**{bits}); got [{int(flat.min())}, {int(flat.max())}]"
        )
    codes = _padded_codes(n, flat.device)
    codes[:n] = flat
    out = torch.empty(codes.numel() // _GROUP * bits, dtype=torch.uint8, device=flat.device)
    _pack_into(codes, bits, out)
    return out[: (n * bits + 7) // 8]


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` values (``int64``)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    if packed.numel() * 8 < n * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {n} values of {bits} bits")
    return _unpack_rows(packed.reshape(1, -1), bits, n)[0, :n]


# ---------------------------------------------------------------------------------------------
# QSGD


def _chunks(v: Tensor, bucket_size: int) -> Tensor:
    """``v`` as float32 rows of ``bucket_size`` (a view when no padding is needed)."""
    n = v.numel()
    padded = -(-n // bucket_size) * bucket_size
    flat = v.reshape(-1).to(torch.float32)
    if padded != n:
        flat = torch.cat([flat, flat.new_zeros(padded - n)])
    return flat.view(-1, bucket_size)


def qsgd_norms(v: Tensor, bucket_size: int) -> Tensor:
    """Per-chunk Euclidean norms (float32) of ``v`` cut into chunks of ``bucket_size``."""
    return torch.linalg.vector_norm(_chunks(v, bucket_size), dim=1)


def _qsgd_levels(
    v: Tensor,
    levels: int,
    bucket_size: int,
    generator: torch.Generator | None,
    norms: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(norms, ℓ)`` with the levels as float32 chunk rows (padding rows hold level 0)."""
    c = _chunks(v, bucket_size)
    own = torch.linalg.vector_norm(c, dim=1)
    if not bool(torch.isfinite(own.sum())):  # NaN/Inf entries, or a norm overflowing float32
        _check_finite(v, "QSGD")
    if norms is None:
        norms = own
    scale = levels / torch.where(norms > 0, norms, torch.ones_like(norms))
    r = (c.abs() * scale.unsqueeze(1)).clamp_(max=levels)  # r_i = s|v_i|/‖v‖ ∈ [0, s]
    low = r.floor()
    frac = r.sub_(low).mul_(_UNIFORM_SCALE)  # 2²⁴(r − ⌊r⌋), exact in float32
    k = torch.empty(frac.shape, dtype=torch.int32, device=frac.device)
    k.random_(generator=generator).bitwise_and_(_UNIFORM_SCALE - 1)  # uniform in [0, 2²⁴)
    mag = low.add_(k < frac)  # ⌊r⌋ + Bernoulli(⌈2²⁴(r − ⌊r⌋)⌉/2²⁴), at most s
    return norms, mag.copysign_(c)


def qsgd_quantize(
    v: Tensor,
    levels: int,
    bucket_size: int,
    generator: torch.Generator | None,
    norms: Tensor | None = None,
    dtype: torch.dtype = torch.int64,
) -> tuple[Tensor, Tensor]:
    """QSGD levels of ``v``: ``(norms, ℓ)`` with ``ℓ`` in ``[−s, s]``, ``len(ℓ) = v.numel()``.

    ``ℓ`` has ``dtype`` (int64 by default). ``norms`` (one per chunk) overrides the chunk norms:
    any scale ``N ≥ ‖v‖`` keeps the code unbiased (``r_i = s|v_i|/N ≤ s``); the shared-scale
    all-reduce passes the maximum over ranks.
    """
    norms, lv = _qsgd_levels(v, levels, bucket_size, generator, norms)
    return norms, lv.view(-1)[: v.numel()].to(dtype)


def _dequantize_rows(norms: Tensor, lv: Tensor, levels: int, d: int, n: int) -> Tensor:
    """``lv`` (float32 ``(R, ≥ C·d)`` rows, modified) times ``‖v‖/s`` per chunk: ``(R, n)``."""
    rows, chunks = norms.shape
    scale = norms.to(torch.float32) / levels
    values = lv[:, : chunks * d].view(rows, chunks, d).mul_(scale.unsqueeze(2))
    return values.view(rows, chunks * d)[:, :n]


def _float_rows(codes: Tensor, n: int, width: int, offset: int) -> Tensor:
    """``codes[:, :n] − offset`` as float32 rows of ``max(width, codes.shape[1])`` (tail 0)."""
    rows, have = codes.shape
    out = torch.empty(rows, max(width, have), dtype=torch.float32, device=codes.device)
    out[:, :n] = codes[:, :n]
    out[:, n:] = offset
    return out.sub_(offset)


def qsgd_dequantize(norms: Tensor, lv: Tensor, levels: int, bucket_size: int) -> Tensor:
    """``Q(v)_i = ‖v‖·ℓ_i/s`` (float32, ``len(ℓ)`` entries)."""
    n = lv.numel()
    chunks = -(-n // bucket_size)
    full = _float_rows(lv.reshape(1, -1), n, chunks * bucket_size, 0)
    return _dequantize_rows(norms.reshape(1, -1), full, levels, bucket_size, n)[0]


def qsgd_payload_bytes(n: int, levels: int, bucket_size: int) -> int:
    """Wire size of :func:`qsgd_encode`: ``4·⌈n/d⌉ + ⌈n·⌈log₂(2s+1)⌉/8⌉`` bytes."""
    return 4 * -(-n // bucket_size) + (n * level_bits(levels) + 7) // 8


def qsgd_encode(
    v: Tensor, levels: int, bucket_size: int, generator: torch.Generator | None
) -> Tensor:
    """QSGD payload of ``v`` as ``uint8``: float32 chunk norms, then the levels ``ℓ + s`` packed."""
    n = v.numel()
    bits = level_bits(levels)
    norms, lv = _qsgd_levels(v, levels, bucket_size, generator, None)
    codes = _padded_codes(n, v.device)
    codes[:n] = lv.view(-1)[:n].add_(levels)  # exact small integers in float32
    head = 4 * norms.numel()
    payload = torch.empty(head + codes.numel() // _GROUP * bits, dtype=torch.uint8, device=v.device)
    payload[:head] = _bytes_of(norms.to(torch.float32))
    _pack_into(codes, bits, payload[head:])
    return payload[: head + (n * bits + 7) // 8]


def qsgd_decode(payload: Tensor, n: int, levels: int, bucket_size: int) -> Tensor:
    """Values (float32) of a :func:`qsgd_encode` payload: ``(n,)``, or ``(R, n)`` for a stack
    of ``R`` payloads (``(R, P)``, decoded in one pass)."""
    rows = payload.reshape(-1, payload.shape[-1])
    chunks = -(-n // bucket_size)
    head = torch.empty(rows.shape[0], 4 * chunks, dtype=torch.uint8, device=payload.device)
    norms = head.copy_(rows[:, : 4 * chunks]).view(torch.float32)  # an aligned copy
    codes = _unpack_rows(rows[:, 4 * chunks :], level_bits(levels), n)
    lv = _float_rows(codes, n, chunks * bucket_size, levels)
    out = _dequantize_rows(norms, lv, levels, bucket_size, n)
    return out[0] if payload.dim() == 1 else out


# ---------------------------------------------------------------------------------------------
# natural compression


def _natural_words(x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(sign word ``bits & 2³¹``, rounded exponent field) of every entry of ``x`` (int32).

    The up-move is ``draw < m`` for a uniform 23-bit ``draw`` (the low 23 bits of a uniform
    draw in ``[0, 2³¹)``): ``P(up) = m/2²³`` exactly, also for subnormals (``E = 0``).
    """
    bits = x.reshape(-1).to(torch.float32).contiguous().view(torch.int32)
    exponent = (bits >> _MANTISSA_BITS) & 0xFF
    if bits.numel() and int(exponent.max()) == 0xFF:  # NaN or ±Inf
        _check_finite(x, "natural compression")
    draw = torch.empty_like(bits).random_(generator=generator).bitwise_and_(_MANTISSA_MASK)
    up = draw < (bits & _MANTISSA_MASK)
    exponent = exponent.add_(up).clamp_(max=_MAX_FINITE_EXPONENT)  # saturate at 2^127
    return bits & _SIGN_BIT, exponent


def natural_round(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``C(x)``: every entry stochastically rounded to a neighbouring power of two (float32)."""
    sign, exponent = _natural_words(x, generator)
    return (sign | (exponent << _MANTISSA_BITS)).view(torch.float32).view(x.shape)


def natural_payload_bytes(n: int) -> int:
    """Wire size of :func:`natural_encode`: ``⌈9n/8⌉`` bytes."""
    return (NATURAL_BITS * n + 7) // 8


def natural_encode(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Natural-compression payload of ``x``: 9-bit codes ``sign·2⁸ + exponent``, packed."""
    n = x.numel()
    sign, exponent = _natural_words(x, generator)
    codes = _padded_codes(n, x.device)
    codes[:n] = (sign >> (31 - 8)) & 0x100 | exponent  # >> is arithmetic: mask the sign run
    out = torch.empty(codes.numel() // _GROUP * NATURAL_BITS, dtype=torch.uint8, device=x.device)
    _pack_into(codes, NATURAL_BITS, out)
    return out[: natural_payload_bytes(n)]


def natural_decode(payload: Tensor, n: int) -> Tensor:
    """Values (float32) of a :func:`natural_encode` payload: ``(n,)``, or ``(R, n)`` for a stack
    of ``R`` payloads (``(R, P)``, decoded in one pass)."""
    rows = payload.reshape(-1, payload.shape[-1])
    codes = _unpack_rows(rows, NATURAL_BITS, n).to(torch.int32)
    # a 9-bit code shifted by 23 is the float32 word: sign at bit 31, E at bits 23–30, mantissa 0
    out = codes.bitwise_left_shift_(_MANTISSA_BITS).view(torch.float32)[:, :n]  # E = 0 → ±0
    return out[0] if payload.dim() == 1 else out


def _bytes_of(t: Tensor) -> Tensor:
    return t.contiguous().view(torch.uint8)
