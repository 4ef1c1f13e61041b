"""Post-training compression: the layer-wise OBS family (SparseGPT, Wanda, magnitude)."""

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

__all__ = [
    "HessianAccumulator",
    "HessianError",
    "HessianInfo",
    "layer_hessian",
    "magnitude_prune",
    "obs_remove_one",
    "prepare_hessian",
    "sparsegpt_prune",
    "wanda_prune",
]
