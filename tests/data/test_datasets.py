import gzip
import struct

import numpy as np
import pytest
import torch

from prunekit.data import BatchIterator, load_mnist, load_mnist1d, read_idx


def _write_idx(path, arr, gz=False):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_mnist_from_idx_directory(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)), gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (20,)), gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (7, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, (7,)))
    ds = load_mnist(tmp_path)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (7, 1, 28, 28)
    assert ds.y_train.dtype == torch.int64


def test_truncated_idx_is_refused(tmp_path):
    _write_idx(tmp_path / "x", np.zeros((5, 28, 28)))
    data = (tmp_path / "x").read_bytes()
    (tmp_path / "x").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "x")


def test_bundled_mnist():
    ds = load_mnist()
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert set(ds.y_test.unique().tolist()) == set(range(10))
    assert abs(float(ds.x_train[:5000].mean())) < 0.1  # normalised
    assert load_mnist(split="train").x_train.shape[0] == 50000


def test_mnist1d_generated():
    ds = load_mnist1d(num_samples=1000)
    assert ds.x_train.shape == (800, 1, 40) and ds.x_test.shape == (200, 1, 40)
    assert ds.num_classes == 10


def test_batch_order_depends_only_on_seed_and_epoch():
    x, y = torch.arange(100).float().unsqueeze(1), torch.arange(100)
    a = [b[1].tolist() for b in BatchIterator(x, y, 16, seed=1).epoch(3)]
    b = [b[1].tolist() for b in BatchIterator(x, y, 16, seed=1).epoch(3)]
    c = [b[1].tolist() for b in BatchIterator(x, y, 16, seed=1).epoch(4)]
    assert a == b and a != c
    assert sorted(i for batch in a for i in batch) == list(range(100))


@pytest.mark.parametrize("counts", [{"train": -5}, {"test": 0}, {"train": 0}])
def test_subset_refuses_counts_below_one(counts):
    """A negative count would slice "all but the last few"; zero would leave an empty split."""
    x, y = torch.zeros(10, 1), torch.zeros(10, dtype=torch.int64)
    from prunekit.data import ArrayDataset

    ds = ArrayDataset("toy", x, y, x, y, 2)
    with pytest.raises(ValueError, match="subset must be >= 1"):
        ds.subset(**counts)
    assert len(ds.subset(3, None).x_train) == 3 and len(ds.subset(3, None).x_test) == 10
