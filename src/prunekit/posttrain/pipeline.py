"""The post-training pipeline, ``prunekit.compress``: compression of a trained model, in place.

The walk of a layer-wise method: choose the targets (same rules as :func:`prunekit.sparsify`), find the order the model
calls them in, group them into units (:mod:`~prunekit.posttrain.sequential`), and for each unit
in forward order collect the layer Hessians ``H = 2XᵀX/n`` from the calibration inputs the unit
sees, compress each target matrix with the method's rule, and move on. Hessians live for one
unit only. A global method (``Compressor.global_method``, M-FAC) compresses every target at once
in its :meth:`~prunekit.posttrain.methods.Compressor.compress_model` instead. If anything fails,
every target weight is restored and every hook removed.

Bad input fails with one line before any work where it can be seen up front (the model: not a
module, already quantized, NaN/inf weights; the calibration set: one batch instead of an iterable,
empty, NaN; the labels), and otherwise names the calibration item and the layer it failed on (an
item the model cannot consume, NaN or inf reaching a layer): see :mod:`.checks` and
:func:`~prunekit.posttrain.sequential.blame_item`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.config import ConfigError
from prunekit.core.batchnorm import recalibrate_batchnorm_, tracked_batchnorms
from prunekit.core.targets import Target, require_values, select_targets
from prunekit.posttrain.calibration import (
    Call,
    batch_size,
    model_device,
    prepare_calibration,
    token_mask,
)
from prunekit.posttrain.checks import check_model, check_target_weights
from prunekit.posttrain.layers import LayerView, view_of
from prunekit.posttrain.methods import Compressor, get_compressor
from prunekit.posttrain.obs import HessianAccumulator, HessianError, prepare_hessian
from prunekit.posttrain.quant import quantize_to_ints
from prunekit.posttrain.report import CompressionReport, LayerReport, QuantGrid
from prunekit.posttrain.scope import check_coverage, inside_blocks
from prunekit.posttrain.sequential import (
    HookSet,
    Unit,
    blame_item,
    capture_inputs,
    check_layer_inputs,
    eval_mode,
    execution_order,
    feed_unit,
    fresh,
    plan_units,
    run_block,
    run_call,
)

logger = logging.getLogger(__name__)

__all__ = ["compress"]


def compress(
    model: nn.Module,
    calibration: Iterable[Any],
    method: str = "sparsegpt",
    *,
    progress: bool | None = None,
    labels: Sequence[Tensor] | None = None,
    **config: Any,
) -> CompressionReport:
    """Compress a trained model in place from calibration inputs, with no retraining.

    Example::

        report = prunekit.compress(model, batches, method="sparsegpt", sparsity=0.5)
        prunekit.compress(model, batches, method="gptq", bits=4, group_size=128)
        print(report)

    Args:
        model: any ``nn.Module`` on any device; its Linear/Conv1d/Conv2d weights are compressed.
        calibration: model inputs; each item is a tensor (one positional input), a tuple
            (positional inputs) or a dict (keyword inputs, e.g. a tokenizer's output).
        method: a registered name (:func:`~prunekit.posttrain.methods.available_compressors`).
        progress: show a progress bar over units (default: when stderr is a terminal).
        labels: for ``method="mfac"`` only: one label tensor per calibration item, for the
            loss whose gradients form the Fisher (default: the model's argmax predictions).
        **config: fields of the method's config dataclass (``sparsity``, ``pattern``, ``bits``,
            ``group_size``, ``targets``, ``ignore``, ``overrides``, ``sequential``, and the
            method's own); an unknown name is an error listing the valid ones.

    Returns:
        A :class:`~prunekit.posttrain.report.CompressionReport` (``print`` it for a table).

    Raises:
        prunekit.ConfigError: invalid config; a model that is not a module, already quantized or
            has NaN/inf weights; calibration that is one batch instead of an iterable of batches,
            empty, holds NaN, or that the model cannot consume (the message names the item);
            labels that do not match the calibration items.
        prunekit.NoPrunableLayersError: no target.
        HessianError: a layer's Hessian stayed singular under the maximal damping, or a layer's
            input holds NaN or inf (the message names the layer and the item).
        TypeError: a calibration item is none of tensor, tuple/list or mapping.

    On any error the model is left exactly as it was.
    """
    cls = get_compressor(method)
    compressor = cls(cls.config_class.from_dict(config))
    cfg = compressor.config
    check_model(model)
    if labels is not None and not cls.global_method:
        raise ConfigError(f"labels are used by method='mfac' only, not by {method!r}")
    targets = select_targets(model, cfg.targets, cfg.ignore)
    require_values(targets, f"compress(method={method!r})")
    check_target_weights(targets)
    report = CompressionReport(method=method, config=cfg.to_dict())
    if cfg.targets is None:
        targets = inside_blocks(model, targets, report)
        check_coverage(model, targets, report)
    _check_overrides(cfg.overrides, targets)
    targets, views = _usable(model, targets, report)
    calls = prepare_calibration(calibration, model_device(model))
    label_list = None if labels is None else _check_labels(labels, calls)
    # the backup lives on the CPU: no second copy of the weights on an accelerator
    backup = {t.name: t.param.detach().to("cpu", copy=True) for t in targets}
    backup_bn = _batchnorm_state(model) if cfg.recalibrate_batchnorm else None
    start = time.perf_counter()
    try:
        with eval_mode(model), _no_kv_cache(model):
            if cls.global_method:
                compressor.compress_model(model, targets, views, calls, report, label_list)
            else:
                _run(model, compressor, targets, views, calls, report, progress)
        if cfg.recalibrate_batchnorm:
            with _no_kv_cache(model):
                report.batchnorm_batches = recalibrate_batchnorm_(
                    _Caller(model), [(call,) for call in calls]
                )
    except BaseException:
        if backup_bn is not None:
            model.load_state_dict(backup_bn, strict=False)
        with torch.no_grad():
            for t in targets:
                t.param.copy_(backup[t.name])
        raise
    report.seconds = time.perf_counter() - start
    report.extras.update(compressor.extras())
    logger.info("%s", report.table())
    return report


class _Caller(nn.Module):
    """Calls the wrapped model on a prepared ``(args, kwargs)`` calibration call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, call: Call) -> Any:
        args, kwargs = call
        return self.model(*args, **kwargs)


def _batchnorm_state(model: nn.Module) -> dict[str, Tensor] | None:
    """A CPU copy of the running statistics of the batch-norm layers (``None`` if none)."""
    state = {}
    for name, m in tracked_batchnorms(model):
        for key, buf in m.named_buffers(recurse=False):
            state[f"{name}.{key}" if name else key] = buf.detach().to("cpu", copy=True)
    return state or None


def _check_overrides(overrides: dict[str, float], targets: list[Target]) -> None:
    """An ``overrides`` key that matches no target is an error (a typo would silently apply the
    default sparsity)."""
    from prunekit.core.targets import _matches

    unused = [
        p for p in overrides if not any(_matches(p, t.module_name, t.param_name) for t in targets)
    ]
    if unused:
        names = [t.name for t in targets]
        raise ConfigError(f"overrides keys matched no target: {unused}; targets: {names}")


def _check_labels(labels: Any, calls: Sequence[Call]) -> list[Tensor]:
    """The M-FAC labels as a list, one integer tensor per calibration item, each with the item's
    batch size.

    Raises:
        ConfigError: a single tensor instead of a sequence, a count, dtype or batch size that
            does not match the calibration items.
    """
    if isinstance(labels, Tensor) or not isinstance(labels, Sequence):
        raise ConfigError(
            "labels must be a sequence of tensors, one per calibration item, got "
            f"{type(labels).__name__}; wrap a single batch's labels as [y]"
        )
    if len(labels) != len(calls):
        raise ConfigError(f"labels: {len(labels)} tensors for {len(calls)} calibration items")
    for i, (y, call) in enumerate(zip(labels, calls, strict=True)):
        if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex():
            what = f"dtype {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
            raise ConfigError(f"labels[{i}] must be a tensor of class indices (int64), got {what}")
        n = batch_size(call)
        if n is not None and (y.dim() == 0 or y.shape[0] != n):
            raise ConfigError(
                f"labels[{i}] has shape {tuple(y.shape)} but calibration item {i} has batch size {n}"
            )
    return list(labels)


def _usable(
    model: nn.Module, targets: list[Target], report: CompressionReport
) -> tuple[list[Target], dict[str, LayerView]]:
    """Targets that can be compressed, with their matrix views; the others are skipped with a
    reason (a layer type without a view, a weight tied to an embedding)."""
    shared: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            shared[id(module.weight)] = name
    kept, views = [], {}
    for t in targets:
        why = None
        if id(t.param) in shared:
            why = f"weight tied to the embedding {shared[id(t.param)]!r} (it would be pruned too)"
        else:
            try:
                views[t.name] = view_of(t.module, t.name)
            except (TypeError, ValueError) as exc:
                why = str(exc)
        if why is None:
            kept.append(t)
        else:
            report.skipped[t.name] = why
            logger.warning("%s left unchanged: %s", t.name, why)
    if not kept:
        raise ConfigError(f"no target can be compressed: {report.skipped}")
    return kept, views


@contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """``config.use_cache = False`` for the duration (Hugging Face models): a key/value cache is
    state the calibration forwards must not build up."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if old:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        if old:
            config.use_cache = old  # type: ignore[union-attr]


def _run(
    model: nn.Module,
    compressor: Compressor,
    targets: list[Target],
    views: dict[str, LayerView],
    calls: Sequence[Call],
    report: CompressionReport,
    progress: bool | None,
) -> None:
    cfg = compressor.config
    ordered, never = execution_order(model, targets, calls)
    for t in never:
        report.skipped[t.name] = "not called by the model's forward"
        logger.warning("%s is not called by the model's forward: left unchanged", t.name)
    nm = cfg.nm
    if nm is not None:
        for t in ordered:
            if views[t.name].channels % nm[1]:
                report.skipped[t.name] = (
                    f"{views[t.name].channels} input channels (per kernel position and group) "
                    f"are not a multiple of M={nm[1]}"
                )
                logger.warning("%s: N:M needs a multiple of %d inputs; left dense", t.name, nm[1])
        ordered = [t for t in ordered if t.name not in report.skipped]
    if not ordered:
        return
    if cfg.sequential:
        units = plan_units(model, ordered, calls[0])
    else:  # one unit holding every target, fed by full forwards of the dense model
        units = [Unit("<model>", model, list(ordered))]
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    cache: list[Call] | None = None
    # with batch norm, the statistics follow the compressed units as the walk goes: every unit is
    # fitted to the activations the final (re-estimated) model will produce, not to activations
    # normalised with the dense model's statistics
    bn_between = (
        cfg.sequential and cfg.recalibrate_batchnorm and _batchnorm_state(model) is not None
    )
    if bn_between:
        for u in units:
            u.chained = False  # statistics change between units: cached activations go stale
    current = _TokenMask(calls)  # the calibration items' attention masks, once
    for i, unit in enumerate(tqdm(units, desc=f"compress:{compressor.name}", disable=not show)):
        chain_next = i + 1 < len(units) and units[i + 1].chained
        accs = _hessians(unit, views)
        with HookSet() as hooks:
            _collect(hooks, unit, views, accs, current)
            if unit.module is model:
                for j, call in enumerate(calls):
                    current.select(j)
                    run_call(model, call, j)
            elif unit.chained or chain_next:
                if cache is None:
                    cache = capture_inputs(model, unit.module, calls)
                for j, (args, kwargs) in enumerate(cache):
                    current.select(j)
                    with blame_item(j, calls[j]):
                        unit.module(*fresh(args), **kwargs)
            else:
                feed_unit(model, unit, calls, before=current.select)
        _check_unit_inputs(model, unit, accs, calls)
        for t in unit.targets:
            grids: list[QuantGrid] = []
            report.layers.append(
                _compress_target(compressor, t, views[t.name], accs[t.name], grids)
            )
            if grids:
                report.grids[t.name] = grids
        del accs
        cache = run_block(unit, cache, calls) if chain_next and cache is not None else None
        if bn_between and i + 1 < len(units):
            recalibrate_batchnorm_(_Caller(model), [(call,) for call in calls])


def _hessians(unit: Unit, views: dict[str, LayerView]) -> dict[str, list[HessianAccumulator]]:
    out = {}
    for t in unit.targets:
        v = views[t.name]
        w = t.param
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        out[t.name] = [
            HessianAccumulator(v.d_in, dtype=dtype, device=w.device) for _ in range(v.groups)
        ]
    return out


class _TokenMask:
    """The attention mask of the calibration item being run (see :func:`token_mask`)."""

    def __init__(self, calls: Sequence[Call]) -> None:
        self.masks = [token_mask(call) for call in calls]
        self.current: Tensor | None = None

    def select(self, index: int) -> None:
        self.current = self.masks[index]

    def rows(self, view: LayerView, x: Tensor) -> Tensor:
        """``x`` without its padded token positions, for a per-token layer input shaped
        ``(batch, sequence, ...)`` like the mask; ``x`` itself otherwise."""
        mask = self.current
        if mask is None or not view.per_token or x.dim() < 3 or x.shape[:2] != mask.shape:
            return x
        return x[mask.to(x.device)]


def _collect(
    hooks: HookSet,
    unit: Unit,
    views: dict[str, LayerView],
    accs: dict[str, list[HessianAccumulator]],
    current: _TokenMask,
) -> None:
    """Hooks adding each target's inputs to its Hessians; padded token positions (an
    ``attention_mask`` of the calibration item) are not counted."""
    for t in unit.targets:

        def add(module: nn.Module, args: Any, t: Target = t) -> None:
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(f"{t.name}: expected a tensor as the layer's first input")
            view = views[t.name]
            try:
                x = view.inputs(current.rows(view, args[0].detach()))
            except ValueError as exc:
                raise ValueError(f"{t.name} {exc}") from None
            for g, acc in enumerate(accs[t.name]):
                acc.add(x[g])

        hooks.pre(t.module, add)


def _check_unit_inputs(
    model: nn.Module,
    unit: Unit,
    accs: dict[str, list[HessianAccumulator]],
    calls: Sequence[Call],
) -> None:
    """Refuse, before any target of ``unit`` is compressed, a target that received no samples or
    NaN/inf, whatever the method. A non-finite input shows in the Hessian (one check per target,
    no per-batch synchronisation); only then does a diagnostic forward find the item.

    Raises:
        ConfigError: the calibration items gave a target no samples (batches of size 0).
        NonFiniteInput: a target received NaN or inf (naming it and the item).
        HessianError: ``2XᵀX/n`` overflowed although every input was finite.
    """
    for t in unit.targets:
        for acc in accs[t.name]:
            if acc.n_samples == 0:
                raise ConfigError(
                    f"{t.name}: the calibration items gave this layer no input samples (batches "
                    "of size 0?); pass non-empty batches"
                )
            if not acc.is_finite():
                check_layer_inputs(model, [t], calls)
                raise HessianError(
                    f"{t.name}: its Hessian 2XᵀX/n overflowed to inf although its inputs are "
                    "finite; scale the calibration inputs down"
                    + (
                        " (or compress the model in float64)"
                        if t.param.dtype != torch.float64
                        else ""
                    )
                )


def _compress_target(
    compressor: Compressor,
    t: Target,
    view: LayerView,
    accs: list[HessianAccumulator],
    grids: list[QuantGrid],
) -> LayerReport:
    cfg = compressor.config
    compressor.current_layer = t.name
    sparsity = cfg.layer_sparsity(t.name)
    W = view.matrices()
    out = torch.empty_like(W)
    err = ref = 0.0
    damp_used: float | None = None
    escalated = False
    dead = 0
    start = time.perf_counter()
    for g, acc in enumerate(accs):
        H = acc.hessian
        damp = compressor.damp
        if compressor.inverts_hessian and damp is not None:
            try:
                _, info = prepare_hessian(H, damp=damp)
            except HessianError as exc:
                raise HessianError(f"{t.name}: {exc}") from None
            damp = info.damp
            escalated = escalated or len(info.damp_history) > 1
            damp_used = damp if damp_used is None else max(damp_used, damp)
            dead += int(info.dead.numel())
        else:
            dead += int((H.diagonal() == 0).sum())
        Wg = W[g].to(H.dtype)
        compressor.grid = None
        new = compressor.compress_matrix(Wg, H, sparsity, 0.0 if damp is None else damp)
        if cfg.bits is not None and compressor.grid is not None:
            scale, zero = compressor.grid
            codes, scale, zero = quantize_to_ints(new, scale, zero, cfg.bits, cfg.group_size)
            grids.append(QuantGrid(scale.cpu(), zero.cpu(), codes.cpu()))
        delta = Wg - new.to(H.dtype)
        err += float(((delta @ H) * delta).sum())
        ref += float(((Wg @ H) * Wg).sum())
        out[g] = new.to(W.dtype)
    seconds = time.perf_counter() - start
    view.write_(out)
    w = t.param.detach()
    return LayerReport(
        name=t.name,
        shape=list(w.shape),
        sparsity=1.0 - int(torch.count_nonzero(w)) / w.numel(),
        bits=cfg.bits,
        rel_error=err / ref if ref > 0 else 0.0,
        damp=damp_used,
        damp_escalated=escalated,
        dead_inputs=dead,
        seconds=seconds,
    )
