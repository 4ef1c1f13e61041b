"""Post-training compression: the layer-wise OBS family (OBC/OBQ, SparseGPT, GPTQ), Wanda,
magnitude, RTN and M-FAC, and the model-level :func:`compress` that drives them.

``compress(model, calibration, method=..., sparsity=..., bits=...)`` walks the model block by
block; the per-layer maths are pure tensor functions (:mod:`.obs`, :mod:`.quant`, :mod:`.obc`,
:mod:`.mfac`) usable on their own.
"""

from prunekit.posttrain.export import load_quantized, save_quantized
from prunekit.posttrain.methods import (
    CompressConfig,
    Compressor,
    available_compressors,
    get_compressor,
    register_compressor,
)
from prunekit.posttrain.mfac import BlockFisherInverse, FisherInverse, mfac_prune_step
from prunekit.posttrain.obc import ObcDatabase, obc_database, obc_prune, obq_quantize
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
from prunekit.posttrain.pipeline import compress
from prunekit.posttrain.quant import (
    expand_grid,
    gptq_quantize,
    minmax_grid,
    quantize_rtn,
    quantize_to_ints,
)
from prunekit.posttrain.report import CompressionReport, LayerReport

__all__ = [
    "BlockFisherInverse",
    "CompressConfig",
    "CompressionReport",
    "Compressor",
    "FisherInverse",
    "HessianAccumulator",
    "HessianError",
    "HessianInfo",
    "LayerReport",
    "ObcDatabase",
    "available_compressors",
    "compress",
    "expand_grid",
    "get_compressor",
    "gptq_quantize",
    "layer_hessian",
    "load_quantized",
    "magnitude_prune",
    "mfac_prune_step",
    "minmax_grid",
    "obc_database",
    "obc_prune",
    "obq_quantize",
    "obs_remove_one",
    "prepare_hessian",
    "quantize_rtn",
    "quantize_to_ints",
    "register_compressor",
    "save_quantized",
    "sparsegpt_prune",
    "wanda_prune",
]
