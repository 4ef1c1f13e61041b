"""Post-training compression: the layer-wise OBS family (SparseGPT, GPTQ, Wanda, magnitude)."""

from prunekit.posttrain.obs import (
    HessianAccumulator,
    HessianError,
    HessianInfo,
    layer_hessian,
    magnitude_prune,
    obs_remove_one,
    prepare_hessian,
    sparsegpt_prune,
    wanda_prune,
)
from prunekit.posttrain.quant import gptq_quantize, minmax_grid, quantize_rtn

__all__ = [
    "HessianAccumulator",
    "HessianError",
    "HessianInfo",
    "gptq_quantize",
    "layer_hessian",
    "magnitude_prune",
    "minmax_grid",
    "obs_remove_one",
    "prepare_hessian",
    "quantize_rtn",
    "sparsegpt_prune",
    "wanda_prune",
]
