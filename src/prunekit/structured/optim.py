"""Optimizers that drive whole zero-invariant groups to exactly zero during ordinary training.

* :class:`~prunekit.structured.hspg.HSPG` — OTOv1 (Chen et al., NeurIPS 2021): ``λ``-driven
  group lasso with a subgradient phase and half-space projections.
* :class:`~prunekit.structured.dhspg.DHSPG` — OTOv2 (Chen et al., ICLR 2023): a target group
  sparsity through per-group adaptive ``λ_g`` on a redundant set and half-space projections.
* :class:`~prunekit.structured.hesso.HESSO` — OTOv3 (Chen et al. 2023): no ``λ``; the least
  important groups decay linearly to exactly zero over pruning periods.

All three are ``torch.optim.Optimizer`` subclasses with SGD (momentum, weight decay, Nesterov) or
Adam/AdamW updates (:class:`~prunekit.structured.base.GroupSparseOptimizer`), run on the device
of the parameters, and keep zero groups exactly zero (their gradient, momentum and Adam moments
are zeroed too). The per-group maths lives in :mod:`prunekit.structured.selection`. Each has a
config dataclass (:class:`HSPGConfig`, :class:`DHSPGConfig`, :class:`HESSOConfig`) and is
registered by name (:mod:`prunekit.structured.registry`). This module re-exports them.
"""

from prunekit.structured.base import VARIANTS, GroupSparseOptimizer, unit_directions
from prunekit.structured.dhspg import DHSPG, DHSPGConfig
from prunekit.structured.hesso import HESSO, HESSO_CRITERIA, HESSOConfig
from prunekit.structured.hspg import HSPG, HSPGConfig
from prunekit.structured.registry import (
    available_structured,
    build_structured,
    config_from_section,
    get_structured,
    register_structured,
)

__all__ = [
    "DHSPG",
    "HESSO",
    "HESSO_CRITERIA",
    "HSPG",
    "VARIANTS",
    "DHSPGConfig",
    "GroupSparseOptimizer",
    "HESSOConfig",
    "HSPGConfig",
    "available_structured",
    "build_structured",
    "config_from_section",
    "get_structured",
    "register_structured",
    "unit_directions",
]
