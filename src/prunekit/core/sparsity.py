"""The config fields sparse training and post-training share: how sparse, in which pattern, which
weights.

:class:`SparsitySpec` is the base of :class:`~prunekit.methods.base.SparsityConfig` (sparse
training) and :class:`~prunekit.posttrain.methods.CompressConfig` (post-training compression), so
``sparsity``, ``pattern``, ``targets`` and ``ignore`` mean the same and are checked the same in
both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prunekit.config import Config, ConfigError, check_fraction
from prunekit.core.patterns import NMPattern, parse_pattern

__all__ = ["SparsitySpec"]


@dataclass(kw_only=True)
class SparsitySpec(Config):
    """How sparse, in which pattern, which weights.

    Attributes:
        sparsity: fraction of zero weights among the targets, in ``[0, 1)``.
        pattern: ``"unstructured"`` or ``"N:M"`` (keep N of every M consecutive inputs). An N:M
            pattern fixes the sparsity at ``1 − N/M``: a sparsity of 0 (not given) takes it, any
            other must equal it.
        targets: module/parameter names or ``re:`` patterns to prune; ``None`` = every
            Linear/Conv layer.
        ignore: names or ``re:`` patterns to leave unchanged.
    """

    sparsity: float
    pattern: str = "unstructured"
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("sparsity", self.sparsity)
        nm = self.nm_pattern
        if nm is not None:
            if self.sparsity != 0.0 and not math.isclose(self.sparsity, nm.sparsity, abs_tol=1e-9):
                raise ConfigError(
                    f"pattern {self.pattern} fixes the sparsity at {nm.sparsity}, "
                    f"got sparsity={self.sparsity}"
                )
            self.sparsity = nm.sparsity

    @property
    def nm_pattern(self) -> NMPattern | None:
        """The parsed N:M pattern (``None`` for unstructured)."""
        try:
            return parse_pattern(self.pattern)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
