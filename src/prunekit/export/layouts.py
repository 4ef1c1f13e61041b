"""The tensor layouts of the compressed-tensors formats, for one weight matrix: pure tensor maths.

Every function takes and returns the tensors of one ``(d_out, d_in)`` weight; the names are the
suffixes the checkpoint gives them after the module's name.

* Packed integers (``pack-quantized``): the ``b``-bit unsigned values of a row form one bit
  stream, value ``i`` in bits ``[i·b, (i+1)·b)``, cut into little-endian 32-bit words stored as
  ``int32`` (:func:`pack_int32`). A value may straddle two words when ``b`` does not divide 32.
* Quantized weights: compressed-tensors stores signed codes ``q ∈ [−2^(b−1), 2^(b−1) − 1]`` and a
  signed zero point ``zp`` and reads ``w = (q − zp) · scale``; prunekit's codes ``c ∈ [0, 2^b − 1]``
  and zero ``z`` (``w = scale · (c − z)``) are the same numbers shifted by ``2^(b−1)``:
  ``q = c − 2^(b−1)``, ``zp = z − 2^(b−1)``, so ``q − zp = c − z`` exactly. A symmetric grid
  (``z = 2^(b−1)`` everywhere) has ``zp = 0`` and stores no zero point. Packing adds ``2^(b−1)``
  back, so ``weight_packed`` holds prunekit's codes ``c`` and a packed ``weight_zero_point`` its
  ``z`` (packed along the output dimension).
* Bitmasks (``sparse-bitmask``, ``sparse-24-bitmask``): one bit per weight, row by row, ``d_in``
  bits per row padded to whole bytes, weight ``j`` of a row in bit ``j % 8`` of byte ``j // 8``
  (``uint8``, shape ``(d_out, ceil(d_in / 8))``). The nonzero values follow in row-major order:
  flat, with each row's start in ``row_offsets`` (``sparse-bitmask``), or as ``(d_out, d_in / 2)``,
  exactly two values for every four weights, zeros included where a group has fewer than two
  nonzeros (``sparse-24-bitmask``).

The decoders check what they read and raise :class:`ValueError` with the reason.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "bitmask_decode",
    "bitmask_encode",
    "dequantize",
    "pack_bitmask_rows",
    "pack_int32",
    "quantized_decode",
    "quantized_encode",
    "sparse24_decode",
    "sparse24_encode",
    "unpack_bitmask_rows",
    "unpack_int32",
]

_BYTE_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_int32(values: Tensor, bits: int) -> Tensor:
    """Pack each row of unsigned ``bits``-bit integers into ``ceil(cols·bits / 32)`` int32 words."""
    if values.dim() != 2 or not 1 <= bits <= 8:
        raise ValueError(f"expected a 2-D tensor and 1 <= bits <= 8, got {values.dim()}-D, {bits}")
    rows, cols = values.shape
    n_words = math.ceil(cols * bits / 32)
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values outside [0, {(1 << bits) - 1}] cannot be packed in {bits} bits")
    start = torch.arange(cols, device=v.device) * bits  # each value's first bit in its row
    word, offset = start // 32, start % 32
    words = torch.zeros(rows, n_words + 1, dtype=torch.int64, device=v.device)
    words.index_add_(1, word, v << offset)  # the low part, in the value's first word
    spill = offset + bits > 32  # the high part of a value that straddles two words
    words.index_add_(1, word[spill] + 1, v[:, spill] >> (32 - offset[spill]))
    words = words[:, :n_words] & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_int32(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`pack_int32`: the first ``cols`` values of each row (``int64``)."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed values must be a 2-D int32 tensor, got {packed.dtype}")
    if packed.shape[1] != math.ceil(cols * bits / 32):
        raise ValueError(
            f"{packed.shape[1]} words per row cannot hold {cols} values of {bits} bits "
            f"(expected {math.ceil(cols * bits / 32)})"
        )
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, words.new_zeros(len(words), 1)], 1)  # a word past the end
    start = torch.arange(cols, device=words.device) * bits
    word, offset = start // 32, start % 32
    mask = (1 << bits) - 1
    low = words[:, word] >> offset
    high = words[:, word + 1] << (32 - offset)  # bits of the next word, for straddling values
    return (low | torch.where(offset + bits > 32, high, 0)) & mask


def pack_bitmask_rows(mask: Tensor) -> Tensor:
    """A ``(rows, cols)`` bool mask as ``(rows, ceil(cols / 8))`` bytes, little-endian bit order."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, math.ceil(cols / 8) * 8, dtype=torch.uint8)
    padded[:, :cols] = mask
    return (padded.view(rows, -1, 8) * _BYTE_BITS).sum(-1, dtype=torch.uint8)


def unpack_bitmask_rows(packed: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`pack_bitmask_rows`: the ``(rows, cols)`` bool mask."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != math.ceil(cols / 8):
        raise ValueError(
            f"bitmask must be uint8 of shape (rows, {math.ceil(cols / 8)}), got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    bits = packed.unsqueeze(-1).bitwise_and(_BYTE_BITS).ne(0)
    return bits.reshape(len(packed), -1)[:, :cols]


def _shape_of(entry: dict[str, Tensor]) -> tuple[int, int]:
    shape = entry["shape"].flatten().tolist()
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"shape must be [rows, cols], got {shape}")
    return int(shape[0]), int(shape[1])


def bitmask_encode(weight: Tensor) -> dict[str, Tensor]:
    """``sparse-bitmask``: the nonzeros (flat), the bitmask, each row's first value, the shape."""
    nonzero = weight != 0
    counts = nonzero.sum(1)
    return {
        "shape": torch.tensor(list(weight.shape)),
        "compressed": weight[nonzero],
        "bitmask": pack_bitmask_rows(nonzero),
        "row_offsets": torch.cumsum(counts, 0) - counts,
    }


def bitmask_decode(entry: dict[str, Tensor]) -> Tensor:
    """The dense weight of a ``sparse-bitmask`` entry (see :func:`bitmask_encode`)."""
    rows, cols = _shape_of(entry)
    mask = unpack_bitmask_rows(entry["bitmask"], cols)
    values, offsets = entry["compressed"], entry["row_offsets"]
    if len(mask) != rows or values.dim() != 1 or int(mask.sum()) != values.numel():
        raise ValueError(
            f"{int(mask.sum())} bits set in {len(mask)} rows for {values.numel()} values and "
            f"{rows} rows"
        )
    counts = mask.sum(1)
    if not torch.equal(offsets.flatten().to(torch.int64), torch.cumsum(counts, 0) - counts):
        raise ValueError("row_offsets do not match the bitmask")
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[mask] = values
    return dense


def sparse24_encode(weight: Tensor) -> dict[str, Tensor]:
    """``sparse-24-bitmask``: two values for every four consecutive weights of a row (the
    nonzeros, then the first zeros of the group), the bitmask of their places, the shape.

    Raises:
        ValueError: ``d_in`` is not a multiple of 4, or a group of four has three nonzeros or more
            (the message says how many groups).
    """
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"{cols} inputs per row is not a multiple of 4")
    nonzero = (weight != 0).view(rows, cols // 4, 4)
    over = int((nonzero.sum(-1) > 2).sum())
    if over:
        raise ValueError(f"{over} groups of 4 consecutive inputs hold more than 2 nonzeros")
    rank = nonzero.to(torch.int64) * 4 + torch.arange(3, -1, -1)  # nonzeros first, then in order
    keep = torch.zeros_like(nonzero)
    keep.scatter_(-1, rank.topk(2, dim=-1).indices, True)
    keep = keep.view(rows, cols)
    return {
        "shape": torch.tensor([rows, cols]).reshape(-1, 1),
        "compressed": weight[keep].view(rows, cols // 2),
        "bitmask": pack_bitmask_rows(keep),
    }


def sparse24_decode(entry: dict[str, Tensor]) -> Tensor:
    """The dense weight of a ``sparse-24-bitmask`` entry (see :func:`sparse24_encode`)."""
    rows, cols = _shape_of(entry)
    mask = unpack_bitmask_rows(entry["bitmask"], cols)
    values = entry["compressed"]
    if values.shape != (rows, cols // 2) or len(mask) != rows or int(mask.sum()) != values.numel():
        raise ValueError(
            f"values {tuple(values.shape)} and {int(mask.sum())} bits set do not fit the shape "
            f"({rows}, {cols}), two values in every four"
        )
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[mask] = values.flatten()
    return dense


def quantized_encode(
    codes: Tensor, scale: Tensor, zero: Tensor, bits: int, *, symmetric: bool, packed: bool
) -> dict[str, Tensor]:
    """One quantized weight from prunekit's grid (``codes`` ``(d_out, d_in)`` and ``zero``
    ``(d_out, n_groups)`` in ``[0, 2^bits − 1]``, ``scale`` ``(d_out, n_groups)``).

    ``packed`` gives ``pack-quantized`` (``weight_packed``, ``weight_shape``, a zero point packed
    along the outputs), otherwise ``int-quantized`` (``weight`` and the zero point as ``int8``).
    ``symmetric`` grids store no zero point.

    Raises:
        ValueError: ``symmetric`` and a zero point other than ``2^(bits−1)``.
    """
    mid = 1 << (bits - 1)
    if symmetric and not bool((zero == mid).all()):
        raise ValueError(f"the grid is not symmetric: zero points other than {mid}")
    out: dict[str, Tensor] = {"weight_scale": scale.clone()}
    if packed:
        out["weight_packed"] = pack_int32(codes, bits)
        out["weight_shape"] = torch.tensor(list(codes.shape))
        if not symmetric:
            out["weight_zero_point"] = pack_int32(zero.t(), bits).t().contiguous()
    else:
        out["weight"] = (codes.to(torch.int16) - mid).to(torch.int8)
        if not symmetric:
            out["weight_zero_point"] = (zero.to(torch.int16) - mid).to(torch.int8)
    return out


def quantized_decode(
    entry: dict[str, Tensor],
    bits: int,
    *,
    symmetric: bool,
    packed: bool,
    strategy: str,
    group_size: int | None = None,
) -> Tensor:
    """The dequantized weight of an entry of :func:`quantized_encode` (or of compressed-tensors),
    in the dtype of its scale; ``strategy`` is ``"tensor"``, ``"channel"`` or ``"group"`` (with
    ``group_size``). A packed weight's zero point is packed too, except per tensor."""
    mid = 1 << (bits - 1)
    zp = entry.get("weight_zero_point")
    if symmetric != (zp is None):
        raise ValueError(
            f"a {'symmetric' if symmetric else 'asymmetric'} scheme "
            f"{'with' if zp is not None else 'without'} a zero point"
        )
    if packed:
        d_out, d_in = (int(d) for d in entry["weight_shape"].flatten().tolist())
        packed_codes = entry["weight_packed"]
        if len(packed_codes) != d_out:
            raise ValueError(f"weight_packed has {len(packed_codes)} rows, shape says {d_out}")
        q = unpack_int32(packed_codes, bits, d_in) - mid
        if zp is not None and strategy != "tensor":
            zp = unpack_int32(zp.t().contiguous(), bits, d_out).t() - mid
    else:
        q = entry["weight"]
        if q.dtype not in (torch.int8, torch.int16, torch.int32) or q.dim() != 2:
            raise ValueError(f"weight must be a 2-D integer tensor, got {q.dtype}")
        if q.numel() and (int(q.min()) < -mid or int(q.max()) >= mid):
            raise ValueError(f"weight holds values outside the {bits}-bit range")
    return dequantize(q, entry["weight_scale"], zp, strategy, group_size)


def dequantize(
    q: Tensor, scale: Tensor, zp: Tensor | None, strategy: str, group_size: int | None = None
) -> Tensor:
    """``(q − zp) · scale`` computed in the dtype of ``scale``, with ``scale`` and ``zp`` one
    value (``"tensor"``), one per row (``"channel"``, ``(d_out, 1)``) or one per group of
    ``group_size`` consecutive inputs (``"group"``, ``(d_out, d_in / group_size)``)."""
    d_out, d_in = q.shape
    if strategy == "tensor":
        expected: tuple[int, ...] = (1,)
    elif strategy == "channel":
        expected = (d_out, 1)
    elif strategy == "group" and group_size and d_in % group_size == 0:
        expected = (d_out, d_in // group_size)
    else:
        raise ValueError(
            f"strategy {strategy!r} with group_size {group_size} does not fit {d_in} inputs"
        )

    def expand(t: Tensor, name: str) -> Tensor:
        if tuple(t.shape) != expected and not (strategy == "tensor" and t.numel() == 1):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {expected} for a {strategy} "
                f"grid of a ({d_out}, {d_in}) weight"
            )
        if strategy == "group":
            return t.repeat_interleave(d_in // expected[1], dim=1)
        return t.reshape(-1, 1)

    out = q.to(scale.dtype)
    if zp is not None:
        out = out - expand(zp, "zero point").to(scale.dtype)
    return out * expand(scale, "scale")
