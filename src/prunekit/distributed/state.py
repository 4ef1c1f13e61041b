"""The state every gradient compression method keeps between hook calls: config, byte counters,
generator, and the non-finite contract every method follows.

Randomness: one ``torch.Generator`` per state, created on the gradient's device at the first
call and seeded ``seed + rank`` (independent noise per rank); its state is part of
:meth:`CommState.state_dict`, so a resumed run draws the same noise as an uninterrupted one.

Non-finite gradients, the same contract for every method and summation mode (the rule of
``torch.amp.GradScaler``: a step with a NaN/±Inf gradient is skipped on every rank):

* Before anything is encoded the ranks agree whether some rank's bucket holds a NaN or ±Inf (for
  QSGD also: a chunk norm that overflows float32, entries from about 10¹⁹ up): one all-reduce MAX
  of a 1-element flag per bucket (:func:`~prunekit.distributed.exchange.any_nonfinite`; in QSGD's
  ``allreduce`` mode the flag rides on the MAX-reduced norms). If it is set, every rank
  skips the exchange of that bucket and its hook returns the bucket filled with NaN — the same on
  every rank; no rank raises, so DDP and the next step carry on.
* A bucket whose *average* is non-finite is also filled with NaN: a float32 overflow of finite
  values, or, for ``none`` (which exchanges no flag: the fp32 sum carries any rank's NaN/±Inf to
  every rank), any non-finite input. The average is bitwise identical on every rank, so the ranks
  agree without communicating.
* :attr:`CommState.skipped_steps` counts the backward passes that had at least one such bucket —
  once per backward, however many buckets — and is saved by :meth:`CommState.state_dict`;
  :attr:`CommState.last_step_skipped` tells whether the latest backward was one (reset by the
  first bucket of the next backward); one warning is logged per skipped step.
* A backward in which a bucket was skipped before its exchange leaves the codec state as it was
  before that backward: once its last bucket is done, the top-k residuals and the generator are
  restored (buckets exchanged earlier in that backward had already advanced them), so the next step
  is exactly the one a run without the skipped step would take. A step found non-finite only
  after the exchange (overflow) keeps its state updates: they are found in the completion
  callbacks, after the hook returned.

Other buckets of a skipped step hold ordinary averages, so a training loop skips the whole step,
on every rank alike::

    loss.backward()
    if state.last_step_skipped:  # or: some p.grad is not torch.isfinite everywhere
        optimizer.zero_grad()
    else:
        optimizer.step()
"""

import logging
import math
import threading
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import distributed_c10d

from prunekit.config import Config, ConfigError
from prunekit.distributed import exchange
from prunekit.distributed.exchange import Codec, Traffic

__all__ = ["CommState", "Future", "completed"]

logger = logging.getLogger(__name__)

Future = torch.futures.Future


def _default_group() -> Any:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call dist.init_process_group first "
            "(or prunekit.distributed.run_workers)"
        )
    return distributed_c10d._get_default_group()


class CommState:
    """What a compression hook keeps between calls: config, byte counters, generator.

    Attributes:
        process_group: the group gradients are averaged over (``None``: the default group).
        config: the method's config dataclass.
        mode: how compressed values are summed, resolved for this world size.
        calls: number of buckets this state has exchanged.
        skipped_steps: backward passes in which some bucket was non-finite on some rank, so that
            every rank got it as NaN (see the module docstring); once per backward.
        last_step_skipped: whether the latest backward was such a step; set during it, reset by
            the first bucket of the next one.
    """

    method: ClassVar[str] = ""
    config_class: ClassVar[type[Config]] = Config

    def __init__(self, process_group: Any = None, **config: Any) -> None:
        self.config: Any = self.config_class.from_dict(config)
        self.process_group = process_group
        self.traffic = Traffic()
        self.calls = 0
        self.skipped_steps = 0
        self.last_step_skipped = False
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._reset_step()
        self.mode = self._resolve_mode()

    def _reset_step(self) -> None:
        """The per-backward bookkeeping of the non-finite contract (not persisted)."""
        self._step = 0  # backward passes seen: a bucket of index 0 starts one
        self._skipped_at = -1  # the backward last counted in skipped_steps
        self._aborted = False  # this backward skipped a bucket before exchanging it
        self._saved: dict[str, Any] | None = None  # the codec state when this backward began
        self._lock = threading.Lock()  # completion callbacks may run on the backend's threads

    @classmethod
    def from_config(cls, config: Config, process_group: Any = None) -> "CommState":
        """A state for an already validated config dataclass."""
        return cls(process_group, **config.to_dict())

    def bind(self, module: torch.nn.Module) -> None:
        """Called with the DDP model's ``.module`` when the hook is registered on it; a method
        that keeps per-parameter state names it after ``module.named_parameters()`` here."""
        del module

    # -- group and mode -----------------------------------------------------------------------
    @property
    def group(self) -> Any:
        return self.process_group if self.process_group is not None else _default_group()

    @property
    def world_size(self) -> int:
        return int(self.group.size())

    @property
    def rank(self) -> int:
        return int(dist.get_rank(self.group))

    def codec(self) -> Codec | None:
        """The wire format (``None``: values travel as fp32)."""
        return None

    def _resolve_mode(self) -> str:
        codec = self.codec()
        if codec is None:
            return "allreduce"
        try:
            return exchange.select_mode(
                codec, self.world_size, getattr(self.config, "mode", "auto")
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    # -- counters -----------------------------------------------------------------------------
    @property
    def bytes_sent(self) -> float:
        """Payload bytes this rank handed to collectives, times each collective's ring factor."""
        return self.traffic.bytes_sent

    @property
    def bytes_dense(self) -> float:
        """Bytes an fp32 ring all-reduce of the same buckets would send: ``Σ 2(W−1)/W·4n``."""
        return self.traffic.bytes_dense

    @property
    def compression(self) -> float:
        """``bytes_dense / bytes_sent``: how many times fewer bytes than fp32 all-reduce (1.0 while
        nothing was sent). Not top-k's ``ratio``, which is the fraction of values sent."""
        return self.bytes_dense / self.bytes_sent if self.bytes_sent else 1.0

    @property
    def ratio(self) -> float:
        """Deprecated name of :attr:`compression` (it read as top-k's ``ratio``)."""
        warnings.warn(
            "CommState.ratio is deprecated (top-k's config uses 'ratio' for the fraction sent); "
            "use CommState.compression",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.compression

    def generator(self, device: torch.device) -> torch.Generator:
        """This rank's generator on ``device`` (seeded ``seed + rank`` on first use)."""
        if self._generator is None or self._generator.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(int(getattr(self.config, "seed", 0)) + self.rank)
            if self._generator_state is not None:
                gen.set_state(self._generator_state)
                self._generator_state = None
            self._generator = gen
        return self._generator

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, config and generator state (CPU tensors), for resuming."""
        gen = self._generator.get_state() if self._generator is not None else self._generator_state
        return {
            "method": self.method,
            "config": self.config.to_dict(),
            "bytes_sent": self.traffic.bytes_sent,
            "bytes_dense": self.traffic.bytes_dense,
            "calls": self.calls,
            "skipped_steps": self.skipped_steps,
            "generator": None if gen is None else gen.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the method must match; one saved before ``skipped_steps``
        existed restores it as 0)."""
        if state.get("method") != self.method:
            raise ValueError(f"state_dict is for {state.get('method')!r}, not {self.method!r}")
        self.config = self.config_class.from_dict(state["config"])
        self.mode = self._resolve_mode()
        self.traffic.bytes_sent = float(state["bytes_sent"])
        self.traffic.bytes_dense = float(state["bytes_dense"])
        self.calls = int(state["calls"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._generator = None
        self._generator_state = state["generator"]

    _UNPICKLED: ClassVar[tuple[str, ...]] = ("process_group", "_generator", "_lock", "_saved")

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the process group (not picklable, as torch's ``PowerSGDState``), the
        lock and the per-backward bookkeeping."""
        out = {k: v for k, v in self.__dict__.items() if k not in self._UNPICKLED}
        if self._generator is not None:
            out["_generator_state"] = self._generator.get_state()
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore; the process group becomes the default group."""
        self.__dict__.update(state)
        self.__dict__.setdefault("skipped_steps", 0)  # pickled before the counter existed
        self.__dict__.setdefault("last_step_skipped", False)
        self._reset_step()
        self._generator = None
        self.process_group = None
        logger.info("%s restored on the default process group", type(self).__name__)
        if dist.is_available() and dist.is_initialized():
            self.mode = self._resolve_mode()

    # -- one bucket inside the non-finite contract ----------------------------------------------
    def _run(
        self, bucket: dist.GradBucket, average: Callable[[Tensor], Future[Tensor] | None]
    ) -> Future[Tensor]:
        """Average ``bucket`` with ``average(buffer)`` under the non-finite contract.

        ``average`` returns the future of the averaged buffer, or ``None`` when the ranks agreed
        that some rank's bucket is non-finite (then no rank exchanged anything): the bucket becomes
        NaN, the step is counted, and the backward's state changes are undone at its last bucket.
        """
        buffer = self._begin(bucket)
        step, index = self._step, bucket.index()
        try:
            fut = average(buffer)
            if fut is None:
                self._aborted = True
                self._note_skipped(step, index)
                return completed(buffer.fill_(math.nan))
            return fut.then(lambda f: self._finish(f.value(), step, index))
        finally:
            if bucket.is_last():
                self._close_step()

    def _begin(self, bucket: dist.GradBucket) -> Tensor:
        buffer = bucket.buffer()
        if bucket.index() == 0:  # DDP hands buckets over in index order: a new backward
            self._open_step()
        self.calls += 1
        self.traffic.dense(buffer.numel(), self.world_size)
        return buffer

    def _open_step(self) -> None:
        self._step += 1
        self._aborted = False
        self.last_step_skipped = False
        self._saved = self._save_step()

    def _close_step(self) -> None:
        """After the backward's last bucket: undo its state changes if a bucket was skipped."""
        if self._aborted and self._saved is not None:
            self._restore_step(self._saved)
        self._saved = None

    def _save_step(self) -> dict[str, Any]:
        """What a skipped backward leaves unchanged: the generator (subclasses add theirs)."""
        gen = self._generator.get_state() if self._generator is not None else self._generator_state
        return {"generator": gen}

    def _restore_step(self, saved: dict[str, Any]) -> None:
        self._generator = None  # recreated from the saved state at its next use
        self._generator_state = saved["generator"]

    def _finish(self, result: Tensor, step: int, index: int) -> Tensor:
        """The averaged bucket, or all NaN when the average is non-finite (it is bitwise the same
        on every rank, so every rank decides alike without communicating)."""
        if not bool(torch.isfinite(result).all()):
            self._note_skipped(step, index)
            result.fill_(math.nan)
        return result

    def _note_skipped(self, step: int, index: int) -> None:
        """Count backward ``step`` as skipped (once, whichever bucket comes first) and warn."""
        with self._lock:
            if self._skipped_at == step:
                return
            self._skipped_at = step
            self.skipped_steps += 1
            self.last_step_skipped = True
            count = self.skipped_steps
        logger.warning(
            "%s gradient exchange: a rank's gradients are NaN/Inf, or their average overflows "
            "(bucket %d): every rank gets that bucket as NaN; skip optimizer.step() on every rank "
            "for this step (%d skipped so far)",
            self.method or type(self).__name__,
            index,
            count,
        )


def completed(buffer: Tensor) -> Future[Tensor]:
    fut: Future[Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    return fut
