"""Post-training compression methods: one config dataclass each, a registry, the layer rule.

A method is a :class:`Compressor` subclass registered with :func:`register_compressor`; its
:meth:`Compressor.compress_matrix` turns one weight matrix ``W (d_out, d_in)`` and its layer
Hessian ``H = 2XᵀX/n`` into the compressed matrix. The model-level walk (calibration, hooks,
sequential order, report) is :func:`prunekit.posttrain.pipeline.compress`; the maths lives in
:mod:`~prunekit.posttrain.obs`, :mod:`~prunekit.posttrain.quant` and
:mod:`~prunekit.posttrain.obc`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from prunekit.config import ConfigError, check_fraction, check_int, check_range
from prunekit.core.sparsity import SparsitySpec
from prunekit.core.targets import Target
from prunekit.posttrain import obc, obs, quant
from prunekit.posttrain.calibration import Call
from prunekit.posttrain.layers import LayerView
from prunekit.posttrain.mfac_model import mfac_prune_model
from prunekit.posttrain.report import CompressionReport
from prunekit.posttrain.sequential import check_layer_inputs
from prunekit.registry import Registry

__all__ = [
    "CompressConfig",
    "Compressor",
    "available_compressors",
    "get_compressor",
    "register_compressor",
]

NM = tuple[int, int] | None


@dataclass(kw_only=True)
class CompressConfig(SparsitySpec):
    """Fields shared by every post-training method (``sparsity``, ``pattern``, ``targets`` and
    ``ignore`` are :class:`~prunekit.core.sparsity.SparsitySpec`'s, as in sparse training).

    Attributes:
        sparsity: target fraction of zeros in every target layer, in ``[0, 1)``, counting the
            zeros it already has (zero weights, and the weights of dead inputs, inputs that are
            zero on every calibration sample, which are zeroed): a unit with ``z`` of its ``d``
            weights already zero gets ``max(0, round(sparsity·d) − z)`` new zeros, so it ends
            with ``max(z, round(sparsity·d))`` and never loses one. The unit is an output row
            for magnitude, Wanda, SparseGPT and OBC (``mask_scope="row"``), the layer for
            SparseGPT ``mask_scope="block"`` and OBC ``mask_scope="layer"``, and all targets
            together for M-FAC. ``0`` (the default) for a method that only quantizes.
        bits: bits per weight of a uniform grid (asymmetric min-max unless ``sym``/``mse``), 2–8;
            ``None`` = no quantization.
        group_size: quantization grid per group of this many consecutive inputs (``None`` = one
            grid per output channel). It must divide the inputs of every target layer that has
            more inputs than ``group_size`` (a layer with fewer has one group per row): a
            ragged last group is refused with a :class:`~prunekit.ConfigError` naming the layer,
            before the layer changes (leave such a layer out with ``ignore``).
        sym: symmetric grids, zero point at the mid code, ``scale = max|w| / ((2^bits − 1)/2)``
            (see :func:`~prunekit.posttrain.grid.minmax_grid`); needs ``bits``.
        mse: grids clipped to the least rounding error (the range shrunk by the factor, from 1
            down to 0.21 in steps of 0.01, whose ``Σ|q(w) − w|^2.4`` is smallest per row or
            group); needs ``bits``.
        overrides: per-layer sparsity, ``{name or re:pattern: sparsity}`` (first match wins).
        sequential: compress blocks in forward order, each seeing the outputs of the already
            compressed ones (``False``: every layer sees the dense model's activations).
        recalibrate_batchnorm: after compression, re-estimate the running statistics of the
            model's batch-norm layers on the calibration inputs (the compressed layers change
            the activation statistics; without this a ResNet pruned one-shot can fall to chance
            accuracy with its reconstruction error small). No effect without batch norm.
    """

    sparsity: float = 0.0
    bits: int | None = None
    group_size: int | None = None
    sym: bool = False
    mse: bool = False
    overrides: dict[str, float] = field(default_factory=dict)
    sequential: bool = True
    recalibrate_batchnorm: bool = True

    #: the method removes weights
    prunes: ClassVar[bool] = True
    #: the method puts weights on a grid
    quantizes: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        where = self.method_name or type(self).__name__
        for pat, s in self.overrides.items():
            check_fraction(f"overrides[{pat!r}]", s)
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as exc:
                    raise ConfigError(
                        f"overrides key {pat!r} is not a valid regex: {exc}"
                    ) from None
        if self.nm_pattern is not None and self.overrides:
            raise ConfigError("overrides (per-layer sparsity) need pattern='unstructured'")
        if self.bits is not None:
            check_range("bits", self.bits, 2, 8, integer=True)
        if self.group_size is not None:
            if self.bits is None:
                raise ConfigError("group_size sets the quantization grid: it needs bits")
            check_int("group_size", self.group_size, 1)
        for name in ("sym", "mse"):
            if getattr(self, name) and self.bits is None:
                raise ConfigError(f"{name} sets the quantization grid: it needs bits")
        prunes = self.sparsity > 0 or bool(self.overrides)
        if prunes and not self.prunes:
            raise ConfigError(f"{where} quantizes only: sparsity/pattern/overrides are not allowed")
        if self.bits is not None and not self.quantizes:
            raise ConfigError(
                f"{where} does not quantize: bits is not allowed (joint pruning + quantization: "
                "method='sparsegpt' with bits, or 'magnitude'/'wanda' with bits for prune-then-RTN)"
            )
        if not prunes and self.bits is None:
            raise ConfigError(
                f"{where}: nothing to do; give sparsity (in (0, 1)), pattern='N:M'"
                + (" or bits" if self.quantizes else "")
            )

    @property
    def nm(self) -> NM:
        p = self.nm_pattern
        return None if p is None else (p.n, p.m)

    def layer_sparsity(self, name: str) -> float:
        """The sparsity of the layer whose parameter is ``name`` (first matching override)."""
        module = name.rsplit(".", 1)[0] if "." in name else name
        for pat, s in self.overrides.items():
            if pat.startswith("re:"):
                if re.fullmatch(pat[3:], name):
                    return s
            elif pat in (name, module):
                return s
        return self.sparsity


def _check_damp(damp: float) -> None:
    if not (math.isfinite(damp) and damp >= 0):
        raise ConfigError(f"damp must be a finite number >= 0, got {damp!r}")


class Compressor:
    """A registered post-training method: its config class and its per-matrix rule."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[CompressConfig]] = CompressConfig
    #: whether :meth:`compress_matrix` uses ``H`` (or just ``W``)
    uses_hessian: ClassVar[bool] = True
    #: whether :meth:`compress_matrix` inverts ``H`` (then damping is escalated and reported)
    inverts_hessian: ClassVar[bool] = False
    #: ``True`` for a method that compresses all targets at once from the loss (M-FAC):
    #: the walk calls :meth:`compress_model` instead of :meth:`compress_matrix` per layer
    global_method: ClassVar[bool] = False

    def __init__(self, config: CompressConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} needs a {self.config_class.__name__}")
        self.config = config
        #: name of the layer being compressed (set by the model-level walk)
        self.current_layer = ""
        #: ``(scale, zero)`` of the grid of the last quantized matrix, each ``(d_out, n_groups)``
        self.grid: tuple[Tensor, Tensor] | None = None

    def extras(self) -> dict[str, Any]:
        """Method-specific results for :attr:`CompressionReport.extras`."""
        return {}

    @property
    def damp(self) -> float | None:
        return getattr(self.config, "damp", None)

    def compress_matrix(self, W: Tensor, H: Tensor, sparsity: float, damp: float) -> Tensor:
        """Compressed ``W`` for one layer (``damp`` is the checked, possibly escalated damping).

        A quantizing method also sets :attr:`grid` to the grid it used."""
        raise NotImplementedError(f"{type(self).__name__} compresses the whole model at once")

    def compress_model(
        self,
        model: nn.Module,
        targets: list[Target],
        views: dict[str, LayerView],
        calls: list[Call],
        report: CompressionReport,
        labels: list[Tensor] | None,
    ) -> None:
        """A global method (:attr:`global_method`) compresses all ``targets`` of ``model`` in
        place here, from the calibration ``calls`` (and ``labels``), and adds one
        :class:`~prunekit.posttrain.report.LayerReport` per target to ``report``. The pipeline
        restores the weights if it raises."""
        raise NotImplementedError(f"{type(self).__name__} compresses one layer at a time")

    def _gptq(
        self,
        W: Tensor,
        H: Tensor,
        bits: int,
        block_size: int,
        damp: float,
        group: int | None,
        *,
        act_order: bool = False,
        static_groups: bool = False,
    ) -> Tensor:
        _check_groups(self, W)
        cfg = self.config
        out, scale, zero = quant.gptq_quantize(
            W,
            H,
            bits,
            block_size,
            damp,
            group_size=group,
            return_grid=True,
            sym=cfg.sym,
            mse=cfg.mse,
            act_order=act_order,
            static_groups=static_groups,
        )
        self.grid = (scale, zero)
        return out


_COMPRESSORS: Registry[type[Compressor]] = Registry("post-training method")


def register_compressor(name: str) -> Callable[[type[Compressor]], type[Compressor]]:
    """Class decorator registering a post-training method under ``name``."""

    def prepare(cls: type[Compressor]) -> None:
        cls.name = name
        cls.config_class.method_name = name

    return _COMPRESSORS.decorator(name, prepare)


def available_compressors() -> list[str]:
    """Names of the registered post-training methods, sorted."""
    return _COMPRESSORS.names()


def get_compressor(name: str) -> type[Compressor]:
    """The method registered under ``name``.

    Raises:
        ConfigError: ``name`` is not a registered name (the message lists them).
    """
    return _COMPRESSORS.get(name)


def _check_groups(compressor: Compressor, W: Tensor) -> None:
    """Refuse a ``group_size`` that leaves ``W`` (``(d_out, d_in)``) a ragged last group (see
    :attr:`CompressConfig.group_size`), naming the layer being compressed."""
    group, d_in = compressor.config.group_size, W.shape[1]
    if compressor.config.bits is not None and group is not None and group < d_in and d_in % group:
        raise ConfigError(
            f"{compressor.current_layer or 'the layer'} has {d_in} inputs per output, which "
            f"group_size={group} does not divide (its last group would hold {d_in % group}); "
            "choose a group_size that divides it, or leave the layer out with ignore"
        )


def _rtn_kept(compressor: Compressor, W: Tensor) -> Tensor:
    """Round the weights to their grid (min-max, ``sym`` or ``mse`` as configured; zeros stay
    exactly 0: 0 is always on the grid); the grid is recorded on the compressor for the integer
    export."""
    cfg = compressor.config
    if cfg.bits is None:
        return W
    _check_groups(compressor, W)
    scale, zero = quant.minmax_grid(W, cfg.bits, cfg.group_size, sym=cfg.sym, mse=cfg.mse)
    compressor.grid = (scale, zero)
    return quant.round_to_grid(W, scale, zero, cfg.bits, cfg.group_size)


# --- magnitude, Wanda ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class MagnitudeConfig(CompressConfig):
    """Magnitude pruning per output row (``|W_ij|``), optionally followed by RTN of the rest."""

    quantizes: ClassVar[bool] = True


@register_compressor("magnitude")
class Magnitude(Compressor):
    """Per-row magnitude pruning, no update: the baseline every second-order method must beat.

    The data enter only through the dead inputs (``H_jj = 0``), whose weights are zeroed and
    counted toward the row's target like any other existing zero."""

    config_class = MagnitudeConfig
    uses_hessian = False

    def compress_matrix(self, W: Tensor, H: Tensor, sparsity: float, damp: float) -> Tensor:
        cfg = self.config
        if sparsity > 0:  # dead inputs (H_jj = 0): zeroed, counted as zeros of the row
            W = obs.magnitude_prune(W, sparsity, cfg.nm, dead=H.diagonal() == 0)
        return _rtn_kept(self, W)


@dataclass(kw_only=True)
class WandaConfig(CompressConfig):
    """Wanda: score ``|W_ij|·‖X_j‖₂`` per output row, no update; optionally RTN of the rest."""

    quantizes: ClassVar[bool] = True


@register_compressor("wanda")
class Wanda(Compressor):
    """Wanda (Sun et al., ICLR 2024). ``‖X_j‖₂ ∝ sqrt(H_jj)`` for ``H = 2XᵀX/n``."""

    config_class = WandaConfig

    def compress_matrix(self, W: Tensor, H: Tensor, sparsity: float, damp: float) -> Tensor:
        cfg = self.config
        if sparsity > 0:
            norms = H.diagonal().clamp(min=0).sqrt()
            W = obs.wanda_prune(W, norms, sparsity, cfg.nm)
        return _rtn_kept(self, W)


# --- SparseGPT, OBC -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class SparseGPTConfig(CompressConfig):
    """SparseGPT (Frantar & Alistarh, ICML 2023); with ``bits`` it quantizes the kept weights in
    the same sweep (joint sparse + quantized).

    Attributes:
        block_size: columns per lazy-update block (SparseGPT: 128).
        damp: relative damping ``λ`` of ``H + λ·mean(diag H)·I`` (SparseGPT: 0.01).
        mask_scope: ``"row"`` (every row the same sparsity) or ``"block"`` (one threshold per
            column block, as the reference code). Chosen by measurement, it depends on the model:
            on all-MiniLM-L6-v2 (an encoder) ``"row"`` keeps the embeddings closer at every
            sparsity (mean cosine to dense 0.9239 vs 0.9195 at 50%, 0.7637 vs 0.7505 at 70%,
            0.6180 vs 0.6106 at 80%), as on the CNNs, so it is the default; on decoder language
            models ``"block"`` gives the lower perplexity at 70% on all four families of
            ``benchmarks/posttrain_lm.py`` (by 0.3–1.7%) and at 50% on two of four (0.03–0.26%;
            the other two within 0.03%), so ``prunekit compress --model`` (a causal LM) uses it
            unless told otherwise.
    """

    block_size: int = 128
    damp: float = 0.01
    mask_scope: str = "row"
    quantizes: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_damp(self.damp)
        check_int("block_size", self.block_size, 1)
        nm = self.nm
        if nm is not None and self.block_size % nm[1]:
            raise ConfigError(f"block_size must be a multiple of M={nm[1]} for N:M")
        if self.mask_scope not in ("row", "block"):
            raise ConfigError(f"mask_scope must be 'row' or 'block', got {self.mask_scope!r}")
        if (self.sym or self.mse) and (self.sparsity > 0 or self.overrides or self.nm):
            raise ConfigError(
                "sparsegpt quantizes the weights it keeps on the asymmetric min-max grid only: "
                "sym/mse need sparsity=0 (plain GPTQ); or prune, then quantize with method='gptq'"
            )


@register_compressor("sparsegpt")
class SparseGPT(Compressor):
    """SparseGPT: fixed column order, one Cholesky factor of ``H⁻¹``, lazy batched updates."""

    config_class = SparseGPTConfig
    inverts_hessian = True

    def compress_matrix(self, W: Tensor, H: Tensor, sparsity: float, damp: float) -> Tensor:
        cfg = self.config
        assert isinstance(cfg, SparseGPTConfig)
        if sparsity == 0:
            if cfg.bits is None:
                return W
            return self._gptq(W, H, cfg.bits, cfg.block_size, damp, cfg.group_size)
        if cfg.bits is not None:
            _check_groups(self, W)
            out, scale, zero = obs.sparsegpt_prune(
                W,
                H,
                sparsity,
                block_size=cfg.block_size,
                nm=cfg.nm,
                damp=damp,
                mask_scope="row" if cfg.mask_scope == "row" else "block",
                bits=cfg.bits,
                group_size=cfg.group_size,
                return_grid=True,
            )
            self.grid = (scale, zero)
            return out
        return obs.sparsegpt_prune(
            W,
            H,
            sparsity,
            block_size=cfg.block_size,
            nm=cfg.nm,
            damp=damp,
            mask_scope="row" if cfg.mask_scope == "row" else "block",
            bits=cfg.bits,
            group_size=cfg.group_size,
        )


@dataclass(kw_only=True)
class OBCConfig(CompressConfig):
    """OBC (Frantar & Alistarh, NeurIPS 2022): exact greedy OBS per row.

    Attributes:
        damp: relative damping.
        mask_scope: ``"row"`` (every row the same sparsity) or ``"layer"`` (the layer's count
            spread over rows by the per-row loss traces).
        database_levels: also return, per layer, the weights at each of these sparsities (one
            pass; in ``report.extras["obc_database"]``), for a later speed-aware allocation.
    """

    damp: float = 0.01
    mask_scope: str = "row"
    database_levels: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_damp(self.damp)
        if self.mask_scope not in ("row", "layer"):
            raise ConfigError(f"mask_scope must be 'row' or 'layer', got {self.mask_scope!r}")
        for s in self.database_levels or []:
            check_fraction("database_levels entry", s)
        if self.database_levels and self.nm is not None:
            raise ConfigError("database_levels need pattern='unstructured' (N:M has one level)")


@register_compressor("obc")
class OBC(Compressor):
    """OBC: exact greedy OBS per row with rank-1 downdates of ``H⁻¹`` (``O(d_out·d_in³)``)."""

    config_class = OBCConfig
    inverts_hessian = True

    def __init__(self, config: CompressConfig):
        super().__init__(config)
        #: ``{layer name: [ObcDatabase per group]}`` when ``database_levels`` is set
        self.databases: dict[str, list[obc.ObcDatabase]] = {}

    def compress_matrix(self, W: Tensor, H: Tensor, sparsity: float, damp: float) -> Tensor:
        cfg = self.config
        assert isinstance(cfg, OBCConfig)
        scope: Literal["row", "layer"] = "layer" if cfg.mask_scope == "layer" else "row"
        levels = sorted({sparsity, *(cfg.database_levels or [])})
        db = obc.obc_database(W, H, levels, damp=damp, nm=cfg.nm, mask_scope=scope)
        if cfg.database_levels:
            self.databases.setdefault(self.current_layer, []).append(db)
        return db.weights_at(sparsity)

    def extras(self) -> dict[str, Any]:
        return {"obc_database": self.databases} if self.databases else {}


# --- quantization -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RTNConfig(CompressConfig):
    """Round-to-nearest on a uniform grid (per output channel or per group; asymmetric min-max,
    or ``sym``/``mse``)."""

    prunes: ClassVar[bool] = False
    quantizes: ClassVar[bool] = True


@register_compressor("rtn")
class RTN(Compressor):
    """Round-to-nearest: the quantization baseline."""

    config_class = RTNConfig
    uses_hessian = False

    def compress_matrix(self, W: Tensor, H: Tensor, sparsity: float, damp: float) -> Tensor:
        return _rtn_kept(self, W)


@dataclass(kw_only=True)
class GPTQConfig(CompressConfig):
    """GPTQ (Frantar et al., ICLR 2023); see :func:`~prunekit.posttrain.quant.gptq_quantize`.

    Attributes:
        block_size: columns per lazy-update block (GPTQ: 128).
        damp: relative damping (GPTQ: 0.01).
        act_order: quantize the input columns by decreasing ``H_jj`` instead of in order
            (GPTQ's "act-order"); the result is permuted back, and with ``group_size`` the
            groups stay consecutive original inputs.
        static_groups: with ``group_size``, compute every group's grid up front from the
            original weights instead of when the sweep reaches the group; needs
            ``group_size``.
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    prunes: ClassVar[bool] = False
    quantizes: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_damp(self.damp)
        check_int("block_size", self.block_size, 1)
        if self.static_groups and self.group_size is None:
            raise ConfigError("static_groups fixes the grids of groups: it needs group_size")


@register_compressor("gptq")
class GPTQ(Compressor):
    """GPTQ: OBS quantization in a fixed column order with lazy batched updates."""

    config_class = GPTQConfig
    inverts_hessian = True

    def compress_matrix(self, W: Tensor, H: Tensor, sparsity: float, damp: float) -> Tensor:
        cfg = self.config
        assert isinstance(cfg, GPTQConfig) and cfg.bits is not None
        return self._gptq(
            W,
            H,
            cfg.bits,
            cfg.block_size,
            damp,
            cfg.group_size,
            act_order=cfg.act_order,
            static_groups=cfg.static_groups,
        )


@dataclass(kw_only=True)
class OBQConfig(CompressConfig):
    """OBQ (Frantar & Alistarh, NeurIPS 2022): greedy OBS quantization, one weight at a time.

    Attributes:
        damp: relative damping.
    """

    damp: float = 0.01
    prunes: ClassVar[bool] = False
    quantizes: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_damp(self.damp)


@register_compressor("obq")
class OBQ(Compressor):
    """OBQ: greedy OBS quantization per row (the OBC loop with the quantization error)."""

    config_class = OBQConfig
    inverts_hessian = True

    def compress_matrix(self, W: Tensor, H: Tensor, sparsity: float, damp: float) -> Tensor:
        cfg = self.config
        assert isinstance(cfg, OBQConfig) and cfg.bits is not None
        _check_groups(self, W)
        out, scale, zero = obc.obq_quantize(
            W,
            H,
            cfg.bits,
            group_size=cfg.group_size,
            damp=damp,
            sym=cfg.sym,
            mse=cfg.mse,
            return_grid=True,
        )
        self.grid = (scale, zero)
        return out


@dataclass(kw_only=True)
class MFACConfig(CompressConfig):
    """M-FAC pruning (Frantar, Kurtic & Alistarh, NeurIPS 2021): global OBS across all targets
    with the inverse empirical Fisher of ``ngrads`` gradients of the loss.

    Attributes:
        ngrads: gradients ``m`` (one per calibration micro-batch; batches are split if needed).
        fisher_block: consecutive live (not yet pruned) weights per diagonal block of ``F``.
        damp: absolute damping ``λ`` of ``F = λI + (1/m) Σ g gᵀ`` (reference: 1e-5).
        steps: pruning steps to the target (the reference's 16 recomputations), the density
            falling geometrically; before each, the gradients are recomputed at the current
            weights and the Fisher blocks re-formed over the weights still alive.
    """

    ngrads: int = 64
    fisher_block: int = 128
    damp: float = 1e-5
    steps: int = 16
    sequential: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.damp) and self.damp > 0):
            raise ConfigError(f"damp must be a finite number > 0, got {self.damp!r}")
        for name in ("ngrads", "fisher_block", "steps"):
            check_int(name, getattr(self, name), 1)
        if self.nm is not None or self.overrides:
            raise ConfigError("mfac prunes globally: pattern N:M and overrides are not supported")
        if self.sequential:
            raise ConfigError("mfac prunes all targets at once from the loss: sequential=False")


@register_compressor("mfac")
class MFAC(Compressor):
    """M-FAC: global gradual OBS pruning with a blocked inverse empirical Fisher."""

    config_class = MFACConfig
    uses_hessian = False
    global_method = True

    def compress_model(
        self,
        model: nn.Module,
        targets: list[Target],
        views: dict[str, LayerView],
        calls: list[Call],
        report: CompressionReport,
        labels: list[Tensor] | None,
    ) -> None:
        cfg = self.config
        assert isinstance(cfg, MFACConfig)
        check_layer_inputs(model, targets, calls)
        mfac_prune_model(
            model,
            targets,
            views,
            calls,
            report,
            sparsity=cfg.sparsity,
            ngrads=cfg.ngrads,
            fisher_block=cfg.fisher_block,
            damp=cfg.damp,
            steps=cfg.steps,
            labels=labels,
        )
