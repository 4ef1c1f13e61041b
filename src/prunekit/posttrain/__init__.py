"""Post-training compression: the layer-wise OBS family (OBC/OBQ, SparseGPT, GPTQ), Wanda,
magnitude, RTN and M-FAC, and the model-level :func:`compress` that drives them.

``compress(model, calibration, method=..., sparsity=..., bits=...)`` walks the model block by
block; the per-layer maths are pure tensor functions (:mod:`.obs`, :mod:`.quant`, :mod:`.obc`,
:mod:`.mfac`) usable on their own.
"""

from prunekit.posttrain.compress import compress
from prunekit.posttrain.methods import (
    CompressConfig,
    Compressor,
    available_compressors,
    get_compressor,
    register_compressor,
)
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
from prunekit.posttrain.report import CompressionReport, LayerReport

__all__ = [
    "CompressConfig",
    "CompressionReport",
    "Compressor",
    "HessianAccumulator",
    "HessianError",
    "HessianInfo",
    "LayerReport",
    "available_compressors",
    "compress",
    "get_compressor",
    "gptq_quantize",
    "layer_hessian",
    "magnitude_prune",
    "minmax_grid",
    "obs_remove_one",
    "prepare_hessian",
    "quantize_rtn",
    "register_compressor",
    "sparsegpt_prune",
    "wanda_prune",
]
