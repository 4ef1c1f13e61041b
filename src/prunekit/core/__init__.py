"""The sparsity engine shared by every method: targets, masks, allocation, patterns, reports."""

from prunekit.core.allocation import ALLOCATIONS, compute_masks, erk_densities, random_masks
from prunekit.core.batchnorm import recalibrate_batchnorm_
from prunekit.core.cost import count_macs, count_params, module_macs
from prunekit.core.masks import Masker, MaskMode
from prunekit.core.patterns import NMPattern, nm_mask, parse_pattern, topk_mask
from prunekit.core.report import format_report, sparsity_report
from prunekit.core.targets import DEFAULT_TYPES, NoPrunableLayersError, Target, select_targets

__all__ = [
    "ALLOCATIONS",
    "DEFAULT_TYPES",
    "MaskMode",
    "Masker",
    "NMPattern",
    "NoPrunableLayersError",
    "Target",
    "compute_masks",
    "count_macs",
    "count_params",
    "erk_densities",
    "format_report",
    "module_macs",
    "nm_mask",
    "parse_pattern",
    "random_masks",
    "recalibrate_batchnorm_",
    "select_targets",
    "sparsity_report",
    "topk_mask",
]
