"""DDP communication hooks for unbiased compressed gradient exchange: ``none``, QSGD, natural.

Each method is a config dataclass (validated strictly), a picklable ``*State`` and a ``*_hook``
function with DDP's hook signature, usable by hand::

    ddp.register_comm_hook(QSGDState(levels=16, bucket_size=512), qsgd_hook)

or through :func:`prunekit.distributed.compress_gradients`. A hook returns a future holding the
bucket's flat buffer overwritten with the average over ranks of the decoded gradients; how the
compressed values are summed (``state.mode``) and how bytes are counted is described in
:mod:`prunekit.distributed.exchange`; the maths (QSGD of Alistarh et al. 2017, natural compression
of Horváth et al. 2019) is in :mod:`prunekit.distributed.codecs`.

The state every method keeps, its randomness and the non-finite contract are
:class:`~prunekit.distributed.state.CommState`'s (:mod:`prunekit.distributed.state`).
"""

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch.distributed as dist
from torch import Tensor

from prunekit.config import Config, check_choice, check_int
from prunekit.distributed import exchange
from prunekit.distributed.exchange import Codec
from prunekit.distributed.state import CommState, Future, completed

__all__ = [
    "CommState",
    "NaturalConfig",
    "NaturalState",
    "NoneConfig",
    "NoneState",
    "QSGDConfig",
    "QSGDState",
    "natural_hook",
    "none_hook",
    "qsgd_hook",
]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class NoneConfig(Config):
    """No compression: DDP's own fp32 all-reduce (for byte counts and as a reference)."""

    method_name: ClassVar[str] = "none"


@dataclass(kw_only=True)
class QSGDConfig(Config):
    """QSGD (Alistarh et al. 2017): ``Q(v)_i = ‖v‖·sign(v_i)·ξ_i/s``, ``E[ξ_i] = s|v_i|/‖v‖``.

    Attributes:
        levels: ``s ≥ 1``, quantization levels per sign (``⌈log₂(2s+1)⌉`` bits per value).
        bucket_size: ``d``, values sharing one norm (variance ``≤ min(d/s², √d/s)‖v‖²``).
        seed: noise seed; rank ``r`` draws from ``seed + r``.
        mode: ``auto`` (fewest bytes), ``allgather``, ``allreduce`` (shared scale, needs
            ``W·s ≤ 127``) or ``reduce_scatter``.
    """

    levels: int = 16
    bucket_size: int = 512
    seed: int = 0
    mode: str = "auto"

    method_name: ClassVar[str] = "qsgd"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("levels", self.levels, 1)
        check_int("bucket_size", self.bucket_size, 1)
        check_int("seed", self.seed, 0)
        check_choice("mode", self.mode, ("auto", "allgather", "allreduce", "reduce_scatter"))


@dataclass(kw_only=True)
class NaturalConfig(Config):
    """Natural compression (Horváth et al. 2019): stochastic rounding to powers of two.

    Attributes:
        seed: noise seed; rank ``r`` draws from ``seed + r``.
        mode: ``auto``, ``allgather`` or ``reduce_scatter`` (no shared scale exists).
    """

    seed: int = 0
    mode: str = "auto"

    method_name: ClassVar[str] = "natural"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("seed", self.seed, 0)
        check_choice("mode", self.mode, ("auto", "allgather", "reduce_scatter"))


class NoneState(CommState):
    """State of :func:`none_hook` (counters only)."""

    method = "none"
    config_class = NoneConfig

    def _all_reduce(self, buffer: Tensor) -> Future[Tensor]:
        w = self.world_size
        buffer.mul_(1.0 / w)
        self.traffic.all_reduce(buffer, w)
        fut = dist.all_reduce(buffer, group=self.group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])


def none_hook(state: NoneState, bucket: dist.GradBucket) -> Future[Tensor]:
    """DDP's default exchange: ``buffer ·= 1/W`` then all-reduce SUM, bitwise equal to no hook.

    DDP without a hook multiplies each gradient by the reciprocal ``1/W`` as it copies it into the
    bucket (``Reducer::mark_variable_ready_dense``); torch's ``allreduce_hook`` divides by ``W``
    instead, which differs in the last bit when ``W`` is not a power of two. This hook multiplies.

    No non-finite flag is exchanged: a NaN/±Inf on any rank makes the fp32 sum non-finite on every
    rank, so the summed bucket is checked instead (all NaN, counted in ``skipped_steps``).
    """
    return state._run(bucket, state._all_reduce)


class _CodecState(CommState):
    def _exchange(self, bucket: dist.GradBucket) -> Future[Tensor]:
        return self._run(bucket, self._average)

    def _average(self, buffer: Tensor) -> Future[Tensor] | None:
        """The future of the bucket averaged in ``self.mode``; ``None`` when some rank's bucket is
        non-finite (agreed by every rank; nothing was encoded)."""
        if self.mode == "none":  # one rank: nothing to exchange (a NaN is found in _finish)
            return completed(buffer)
        codec = self.codec()
        if codec is None:  # pragma: no cover - subclasses define a codec
            raise TypeError(f"{type(self).__name__} has no codec")
        gen = self.generator(buffer.device)
        if self.mode == "allgather":
            return exchange.allgather_mean(buffer, codec, gen, self.group, self.traffic)
        if self.mode == "reduce_scatter":
            return exchange.reduce_scatter_mean(buffer, codec, gen, self.group, self.traffic)
        return exchange.allreduce_qsgd_mean(
            buffer, codec, self.config.bucket_size, gen, self.group, self.traffic
        )


class QSGDState(_CodecState):
    """State of :func:`qsgd_hook`: ``QSGDState(process_group=None, levels=16, bucket_size=512,
    seed=0, mode="auto")``."""

    method = "qsgd"
    config_class = QSGDConfig
    config: QSGDConfig

    def codec(self) -> Codec:
        return exchange.qsgd_codec(self.config.levels, self.config.bucket_size)


def qsgd_hook(state: QSGDState, bucket: dist.GradBucket) -> Future[Tensor]:
    """Average the bucket with QSGD-compressed payloads (see :class:`QSGDConfig`)."""
    return state._exchange(bucket)


class NaturalState(_CodecState):
    """State of :func:`natural_hook`: ``NaturalState(process_group=None, seed=0, mode="auto")``."""

    method = "natural"
    config_class = NaturalConfig
    config: NaturalConfig

    def codec(self) -> Codec:
        return exchange.natural_codec()


def natural_hook(state: NaturalState, bucket: dist.GradBucket) -> Future[Tensor]:
    """Average the bucket with natural-compression payloads (9 bits per value)."""
    return state._exchange(bucket)
