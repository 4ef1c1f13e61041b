"""Model files other programs read: the compressed-tensors layout of Hugging Face ``transformers``
and vLLM (:func:`save_compressed`, :func:`load_compressed`)."""

from prunekit.export.compressed_tensors import FORMATS, CompressedExport, save_compressed
from prunekit.export.reader import load_compressed

__all__ = ["FORMATS", "CompressedExport", "load_compressed", "save_compressed"]
