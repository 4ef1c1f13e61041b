"""Summing compressed gradients across ranks, and counting the bytes that costs.

Quantized values cannot be added in compressed form unless every rank uses the same scale, so
a codec's payloads are summed in one of three ways (``W`` ranks, ``P`` = payload bytes of a whole
bucket of ``n`` values):

* ``allgather`` — every rank all-gathers every rank's payload (``all_gather_single``), decodes the
  ``W`` payloads in rank order, sums and divides by ``W``. Quantizes once. Ring cost per rank
  ``(W − 1)·P``.
* ``allreduce`` — QSGD only, a shared scale: all-reduce MAX of the float32 chunk norms, quantize
  against the shared norms to int8 levels, all-reduce SUM of the int8 levels (exact while
  ``W·s ≤ 127``). Cost ``2(W − 1)/W·(4⌈n/d⌉ + n)``.
* ``reduce_scatter`` — the buffer is padded to ``W`` equal slices (aligned to the codec's chunk),
  every slice is compressed, ``all_to_all_single`` hands rank ``j`` everybody's slice ``j``; rank
  ``j`` decodes and sums them in rank order, re-compresses the sum (unbiased again) and the
  compressed slices are all-gathered. Cost ``(W − 1)·P_slice`` per stage, two stages
  (≈ ``2(W − 1)/W·P``).

Every rank decodes the same bytes with the same arithmetic in the same order, so the averaged
gradients are bitwise identical on all ranks in every mode.

Non-finite buckets: a codec cannot encode NaN or ±Inf, and a rank that raised inside a hook would
leave the others averaging garbage (or waiting). So before anything is encoded all ranks agree on
one flag, "this rank's bucket cannot be encoded" (:attr:`Codec.rejects`: a NaN/±Inf entry; for
QSGD also a chunk norm that overflows float32, as entries from about 10¹⁹ up make it, which would
turn into NaN levels), by an all-reduce MAX of one float32 (:func:`any_nonfinite`; in
``allreduce`` mode it travels as one more entry of the MAX-reduced chunk norms). When it is set
on any rank, every rank skips the exchange (nothing is quantized, no random number is drawn) and
the hook decides what the bucket becomes (:mod:`prunekit.distributed.hooks`). The flag costs
``2(W − 1)/W · 4`` bytes per bucket in every mode, so it is left out of :func:`mode_bytes`, whose
comparison it cannot change. In ``reduce_scatter`` the decoded sum of finite slices can still
overflow float32; it is saturated at ``±(2 − 2⁻²³)·2¹²⁷`` before it is re-compressed (as natural
compression saturates at ``2¹²⁷``), so no rank raises while the others wait.

The last collective of each mode is asynchronous (the hook returns its future, decoded in a
``then`` callback); the first stage of ``allreduce`` (norms) and of ``reduce_scatter``
(``all_to_all_single``) runs synchronously inside the hook, because its result is needed to
build the second message.

Byte accounting (:class:`Traffic`), the same rule for every hook: each tensor handed to a
collective is counted with the ring factor of that collective, padding included —
``all_reduce``: ``2(W − 1)/W × nbytes``; ``all_gather_single``: ``(W − 1) × nbytes`` of the local
input; ``all_to_all_single`` with equal splits: ``(W − 1)/W × nbytes`` (the slices that leave the
rank). The fp32 reference a bucket of ``n`` values would cost with DDP's ring all-reduce is
``bytes_dense += 2(W − 1)/W · 4n``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from prunekit.distributed import codecs

__all__ = [
    "MODES",
    "Codec",
    "Traffic",
    "allgather_mean",
    "allreduce_qsgd_mean",
    "any_nonfinite",
    "mode_bytes",
    "reduce_scatter_mean",
    "select_mode",
]

#: ways of summing compressed values (``"none"``: one rank, nothing is exchanged)
MODES = ("allgather", "allreduce", "reduce_scatter", "none")

Future = torch.futures.Future


def _nonfinite_flag(t: Tensor) -> Tensor:
    """``[1.0]`` when ``t`` holds a NaN or ±Inf, else ``[0.0]`` (float32, on ``t``'s device)."""
    return torch.isfinite(t).all().logical_not().to(torch.float32).reshape(1)


@dataclass(frozen=True)
class Codec:
    """A wire format: ``encode(v, generator) -> uint8``, ``decode(payload, n) -> float32``.

    ``decode`` also takes a stack of payloads (``(R, P)``) and returns ``(R, n)``.

    ``align``: slices for ``reduce_scatter`` are multiples of this many values (QSGD's chunk).
    ``levels``: QSGD's ``s`` when the codec supports the shared-scale all-reduce, else ``None``.
    ``rejects(v)``: ``[1.0]`` (float32) when ``v`` cannot be encoded, else ``[0.0]``; by default
    when ``v`` holds a NaN or ±Inf.
    """

    encode: Callable[[Tensor, torch.Generator | None], Tensor]
    decode: Callable[[Tensor, int], Tensor]
    payload_bytes: Callable[[int], int]
    align: int = 1
    levels: int | None = None
    rejects: Callable[[Tensor], Tensor] = _nonfinite_flag


def qsgd_codec(levels: int, bucket_size: int) -> Codec:
    """The QSGD wire format (:func:`~prunekit.distributed.codecs.qsgd_encode`)."""
    return Codec(
        encode=lambda v, g: codecs.qsgd_encode(v, levels, bucket_size, g),
        decode=lambda p, n: codecs.qsgd_decode(p, n, levels, bucket_size),
        payload_bytes=lambda n: codecs.qsgd_payload_bytes(n, levels, bucket_size),
        align=bucket_size,
        levels=levels,
        rejects=lambda v: _nonfinite_flag(codecs.qsgd_norms(v, bucket_size)),
    )


def natural_codec() -> Codec:
    """The natural-compression wire format (9 bits per value)."""
    return Codec(
        encode=codecs.natural_encode,
        decode=codecs.natural_decode,
        payload_bytes=codecs.natural_payload_bytes,
    )


class Traffic:
    """Cumulative bytes this rank sent, and what fp32 ring all-reduce would have sent."""

    def __init__(self) -> None:
        self.bytes_sent = 0.0
        self.bytes_dense = 0.0

    def dense(self, n: int, world_size: int) -> None:
        self.bytes_dense += 2 * (world_size - 1) / world_size * 4 * n

    def all_reduce(self, t: Tensor, world_size: int) -> None:
        self.bytes_sent += 2 * (world_size - 1) / world_size * t.numel() * t.element_size()

    def all_gather(self, t: Tensor, world_size: int) -> None:
        self.bytes_sent += (world_size - 1) * t.numel() * t.element_size()

    def all_to_all(self, t: Tensor, world_size: int) -> None:
        self.bytes_sent += (world_size - 1) / world_size * t.numel() * t.element_size()


def _slice_len(n: int, world_size: int, align: int) -> int:
    return -(-n // (world_size * align)) * align


def mode_bytes(codec: Codec, n: int, world_size: int) -> dict[str, float]:
    """Bytes one rank sends for a bucket of ``n`` values in each mode available to ``codec``
    (payloads; the non-finite flag, the same ``2(W − 1)/W · 4`` bytes in every mode, is left out)."""
    w = world_size
    out = {
        "allgather": float((w - 1) * codec.payload_bytes(n)),
        "reduce_scatter": float(2 * (w - 1) * codec.payload_bytes(_slice_len(n, w, codec.align))),
    }
    if allreduce_available(codec, w):
        chunks = -(-n // codec.align)
        out["allreduce"] = 2 * (w - 1) / w * (4 * chunks + n)
    return out


def allreduce_available(codec: Codec, world_size: int) -> bool:
    """The int8 shared-scale sum is exact: QSGD with ``W·s ≤ 127``."""
    return codec.levels is not None and world_size * codec.levels <= 127


def select_mode(codec: Codec, world_size: int, mode: str = "auto") -> str:
    """Resolve ``mode``: ``"auto"`` picks the cheapest (ties → ``allgather``); one rank → ``none``.

    The comparison uses ``n = 64·W·align`` values, where no mode pads, so it is the per-value
    cost of large buckets.
    """
    if mode not in ("auto", *MODES[:3]):
        raise ValueError(f"unknown mode {mode!r}; valid: auto, {', '.join(MODES[:3])}")
    if mode == "allreduce" and not allreduce_available(codec, world_size):
        raise ValueError(
            "mode='allreduce' needs a shared-scale QSGD code with world_size·levels <= 127 "
            f"(int8 sums); got world_size={world_size}, levels={codec.levels}"
        )
    if world_size == 1:
        return "none"
    if mode != "auto":
        return mode
    costs = mode_bytes(codec, 64 * world_size * codec.align, world_size)
    best = min(costs.values())
    return next(m for m in MODES if m in costs and costs[m] == best)  # allgather first


#: largest finite float32, where a decoded sum that overflowed is saturated before re-encoding
_FLOAT32_MAX = torch.finfo(torch.float32).max


def any_nonfinite(
    buffer: Tensor,
    group: Any,
    traffic: Traffic,
    rejects: Callable[[Tensor], Tensor] = _nonfinite_flag,
) -> bool:
    """Whether any rank's ``buffer`` holds a NaN or ±Inf (or whatever ``rejects`` flags, e.g. a
    codec's :attr:`Codec.rejects`): all-reduce MAX of the 1-element flag ``rejects(buffer)``.

    Every rank of ``group`` must call it for the same bucket (it is a collective); all get the
    same answer. One rank: no collective, the local answer.
    """
    flag = rejects(buffer)
    w = group.size()
    if w > 1:
        traffic.all_reduce(flag, w)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)


def _decode_sum(codec: Codec, parts: Tensor, n: int) -> Tensor:
    """Decode the ``W`` stacked payloads in one call, then sum them in rank order."""
    values = codec.decode(parts, n)
    total = values[0].clone()
    for r in range(1, parts.shape[0]):
        total += values[r]
    return total


def _all_gather_async(payload: Tensor, group: Any, traffic: Traffic) -> tuple[Tensor, Future[Any]]:
    """Start the all-gather of every rank's ``payload`` (counted in ``traffic`` as it is sent);
    returns the ``(W · len(payload),)`` output, filled once the future completes."""
    w = group.size()
    out = payload.new_empty(w * payload.numel())
    traffic.all_gather(payload, w)
    return out, dist.all_gather_single(out, payload, group=group, async_op=True).get_future()


def allgather_mean(
    buffer: Tensor,
    codec: Codec,
    generator: torch.Generator | None,
    group: Any,
    traffic: Traffic,
) -> Future[Tensor] | None:
    """Average ``buffer`` over ranks by all-gathering every rank's payload (written in place);
    ``None``, having encoded nothing, when any rank's buffer is rejected (:func:`any_nonfinite`)."""
    if any_nonfinite(buffer, group, traffic, codec.rejects):
        return None
    w = group.size()
    n = buffer.numel()
    payload = codec.encode(buffer, generator)
    out, fut = _all_gather_async(payload, group, traffic)

    def done(_: Future[Any]) -> Tensor:
        mean = _decode_sum(codec, out.view(w, -1), n).div_(w)
        return buffer.copy_(mean)

    return fut.then(done)


def allreduce_qsgd_mean(
    buffer: Tensor,
    codec: Codec,
    bucket_size: int,
    generator: torch.Generator | None,
    group: Any,
    traffic: Traffic,
) -> Future[Tensor] | None:
    """Shared-scale QSGD: MAX-reduce the chunk norms, SUM-reduce the int8 levels.

    The non-finite flag rides on the norms: the MAX-reduced message is ``[‖v₁‖, …, ‖v_C‖, flag]``
    with ``flag = 1`` when one of this rank's chunk norms is NaN/±Inf (the codec's
    :attr:`Codec.rejects`). Returns ``None``, having quantized nothing, when any rank's flag is set.
    """
    levels = codec.levels
    w = group.size()
    if levels is None or not allreduce_available(codec, w):
        raise ValueError(f"shared-scale all-reduce needs QSGD with W·s <= 127 (W={w})")
    own = codecs.qsgd_norms(buffer, bucket_size)
    message = torch.cat([own, _nonfinite_flag(own)])
    traffic.all_reduce(message, w)
    dist.all_reduce(message, op=dist.ReduceOp.MAX, group=group)
    if bool(message[-1] > 0):
        return None
    norms = message[:-1]
    _, lv8 = codecs.qsgd_quantize(
        buffer, levels, bucket_size, generator, norms=norms, dtype=torch.int8
    )
    traffic.all_reduce(lv8, w)
    fut = dist.all_reduce(lv8, group=group, async_op=True).get_future()

    def done(_: Future[Any]) -> Tensor:
        mean = codecs.qsgd_dequantize(norms, lv8, levels, bucket_size).div_(w)
        return buffer.copy_(mean)

    return fut.then(done)


def reduce_scatter_mean(
    buffer: Tensor,
    codec: Codec,
    generator: torch.Generator | None,
    group: Any,
    traffic: Traffic,
) -> Future[Tensor] | None:
    """Compressed reduce-scatter (``all_to_all_single``) then compressed all-gather; ``None``,
    having encoded nothing, when any rank's buffer is rejected (:func:`any_nonfinite`)."""
    if any_nonfinite(buffer, group, traffic, codec.rejects):
        return None
    w = group.size()
    n = buffer.numel()
    length = _slice_len(n, w, codec.align)
    padded = buffer.new_zeros(w * length, dtype=torch.float32)
    padded[:n] = buffer.reshape(-1)
    send = torch.cat([codec.encode(s, generator) for s in padded.view(w, length)])
    recv = torch.empty_like(send)
    traffic.all_to_all(send, w)
    dist.all_to_all_single(recv, send, group=group)
    mine = _decode_sum(codec, recv.view(w, -1), length)  # everyone's copy of my slice, summed
    mine.clamp_(-_FLOAT32_MAX, _FLOAT32_MAX)  # a sum of finite values that overflowed → ±max
    out, fut = _all_gather_async(codec.encode(mine, generator), group, traffic)

    def done(_: Future[Any]) -> Tensor:
        parts = out.view(w, -1)
        full = codec.decode(parts, length).reshape(-1)  # the slices in rank order
        return buffer.copy_(full[:n].div_(w).view_as(buffer))

    return fut.then(done)
