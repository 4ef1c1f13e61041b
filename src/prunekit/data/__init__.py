"""Small real data sets held in memory, and a deterministic batch iterator."""

from prunekit.data.datasets import (
    DATASETS,
    ArrayDataset,
    BatchIterator,
    load_dataset,
    load_mnist,
    load_mnist1d,
    read_idx,
)

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "BatchIterator",
    "load_dataset",
    "load_mnist",
    "load_mnist1d",
    "read_idx",
]
