"""Top-k sparsification with error feedback as a DDP communication hook.

Each rank sends the ``k = ⌈ratio·n⌉`` largest-magnitude entries of ``a = g + e`` (gradient plus
its residual) as int32 indices and float32 values (one all-gather), and keeps the rest as its new
residual (error feedback; Seide et al. 2014, Stich, Cordonnier & Jaggi 2018 "Sparsified SGD with
memory")::

    a = g + e,   S = top_k(|a|),   sent = a[S],   e ← a with a[S] = 0,   ĝ = (1/W) Σ_r scatter(sent_r)

so ``e_new + scatter(sent) = g + e_old`` exactly. The code is biased; the residual is what makes
SGD converge. Residuals are kept per parameter (by name), not per bucket: after its first
iteration DDP rebuilds its buckets, and bucket ``i`` may then hold other parameters.

Bytes (see :mod:`prunekit.distributed.exchange`): ``(W − 1)·8k`` per bucket, plus the non-finite
flag's ``2(W − 1)/W · 4``.

Non-finite gradients (:mod:`prunekit.distributed.hooks`): the flag is agreed before ``a`` is formed,
so a bucket that is non-finite on some rank touches no residual, and a backward with such a bucket
gets back the residuals it started with. Residuals are replaced, never written in place, so the
dict of them saved at the first bucket is enough; but it keeps the old residual tensors alive until
the last bucket, up to one more residual-sized buffer during the backward.
"""

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from prunekit.config import Config, ConfigError, check_range
from prunekit.distributed import exchange
from prunekit.distributed.state import CommState, Future, completed

__all__ = ["TopKConfig", "TopKState", "topk_hook"]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TopKConfig(Config):
    """Top-k sparsification.

    Attributes:
        ratio: fraction of each bucket's entries sent, in ``(0, 1]`` (at least one entry).
        error_feedback: keep the unsent part as a residual added to the next gradient.
    """

    ratio: float = 0.01
    error_feedback: bool = True

    method_name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("ratio", self.ratio, 0.0, 1.0, low_open=True)
        if not isinstance(self.error_feedback, bool):
            raise ConfigError(f"error_feedback must be a bool, got {self.error_feedback!r}")


class TopKState(CommState):
    """State of :func:`topk_hook`: ``TopKState(process_group=None, ratio=0.01,
    error_feedback=True, module=None)``.

    Residuals are stored by parameter name. Pass the model (``module``, or call :meth:`bind`) so
    the names are its ``named_parameters()`` names, stable across processes; unbound, a
    parameter is named ``param<k>`` in the order the hook first sees it (stable for one model,
    since DDP's first buckets follow the parameter order).
    """

    method = "topk"
    config_class = TopKConfig
    config: TopKConfig

    def __init__(
        self, process_group: Any = None, *, module: nn.Module | None = None, **config: Any
    ):
        super().__init__(process_group, **config)
        self.residuals: dict[str, Tensor] = {}
        self._names: dict[int, str] = {}
        if module is not None:
            self.bind(module)

    def _resolve_mode(self) -> str:
        return "allgather" if self.world_size > 1 else "none"

    def bind(self, module: nn.Module) -> None:
        """Name residuals after ``module.named_parameters()`` (a DDP model's ``.module``)."""
        self._names = {id(p): name for name, p in module.named_parameters()}

    def name_of(self, param: Tensor) -> str:
        """The residual key of ``param``."""
        key = self._names.get(id(param))
        if key is None:
            key = f"param{len(self._names)}"
            self._names[id(param)] = key
            logger.debug("TopKState not bound to a module: residual key %s", key)
        return key

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["residuals"] = {k: v.detach().cpu().clone() for k, v in self.residuals.items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.residuals = {k: v.clone() for k, v in state.get("residuals", {}).items()}

    def __getstate__(self) -> dict[str, Any]:
        out = super().__getstate__()
        out.pop("_names", None)  # object ids mean nothing in another process: bind again
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._names = {}

    def _save_step(self) -> dict[str, Any]:
        return {**super()._save_step(), "residuals": dict(self.residuals)}

    def _restore_step(self, saved: dict[str, Any]) -> None:
        super()._restore_step(saved)
        self.residuals = saved["residuals"]


def _views(bucket: dist.GradBucket, buffer: Tensor) -> list[tuple[Tensor, int, int]]:
    """``(parameter, offset, numel)`` of each gradient view in the flat buffer."""
    out = []
    running = 0
    for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
        shared = g.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        offset = int(g.storage_offset() - buffer.storage_offset()) if shared else running
        out.append((p, offset, int(g.numel())))
        running = offset + int(g.numel())
    return out


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> Future[Tensor]:
    """Average the bucket from every rank's top-k entries of gradient + residual."""
    return state._run(bucket, lambda buffer: _topk_mean(state, bucket, buffer))


def _topk_mean(state: TopKState, bucket: dist.GradBucket, buffer: Tensor) -> Future[Tensor] | None:
    """The future of the averaged bucket; ``None``, residuals untouched, when some rank's bucket
    is non-finite."""
    if state.mode == "none":  # one rank: nothing to exchange (a NaN is found in _finish)
        return completed(buffer)
    if exchange.any_nonfinite(buffer, state.group, state.traffic):
        return None
    w = state.world_size
    n = buffer.numel()
    acc = buffer.detach().reshape(-1).to(torch.float32, copy=True)
    views = _views(bucket, buffer) if state.config.error_feedback else []
    for p, off, size in views:
        residual = state.residuals.get(state.name_of(p))
        if residual is not None:
            acc[off : off + size] += residual.to(acc.device).reshape(-1)
    k = min(n, max(1, math.ceil(state.config.ratio * n)))
    idx = acc.abs().topk(k, sorted=False).indices
    values = acc[idx]  # a copy: acc becomes the residual in place
    if views:
        acc[idx] = 0
        for p, off, size in views:
            state.residuals[state.name_of(p)] = acc[off : off + size].view(p.shape)  # views
    message = torch.cat([idx.to(torch.int32), values.view(torch.int32)])
    out = message.new_empty(w * message.numel())
    state.traffic.all_gather(message, w)
    fut = dist.all_gather_single(out, message, group=state.group, async_op=True).get_future()

    def done(_: Future[Any]) -> Tensor:
        parts = out.view(w, 2 * k)
        total = torch.zeros(n, dtype=torch.float32, device=buffer.device)
        for r in range(w):
            total.index_add_(0, parts[r, :k].to(torch.int64), parts[r, k:].view(torch.float32))
        return buffer.copy_(total.div_(w).view_as(buffer))

    return fut.then(done)
