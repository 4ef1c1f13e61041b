"""The data of a run: the recipe's data set, calibration batches, and a fingerprint for resumes."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from prunekit.data import ArrayDataset, load_dataset

__all__ = ["calibration_batches", "digest", "fingerprint", "load_data"]


def load_data(spec: Any, seed: int) -> ArrayDataset:
    """The data set a :class:`~prunekit.app.recipe.DataSpec` describes (MNIST-1D is generated
    with ``seed``, the recipe's seed), cut to its subsets."""
    if spec.name == "mnist":
        data = load_dataset("mnist", root=spec.root, split=spec.split)
    else:
        data = load_dataset("mnist1d", num_samples=spec.num_samples, seed=seed)
    return data.subset(spec.train_subset, spec.test_subset)


def digest(*tensors: Tensor) -> str:
    """A short content hash of tensors (dtype, shape and bytes)."""
    h = hashlib.sha1(usedforsecurity=False)
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(data: ArrayDataset) -> dict[str, Any]:
    """What identifies the examples a run trains and tests on: sizes and a content hash.

    A resume must see the same data: the same recipe can read other files (``data.root``), and a
    caller can pass its own :class:`ArrayDataset`.
    """
    return {
        "name": data.name,
        "train": len(data.x_train),
        "test": len(data.x_test),
        "hash": digest(data.x_train, data.y_train, data.x_test, data.y_test),
    }


def calibration_batches(
    data: ArrayDataset, samples: int, batch_size: int, seed: int, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """``(inputs, labels)`` batches of ``samples`` random training examples (seeded)."""
    g = torch.Generator().manual_seed(seed)
    n = min(samples, len(data.x_train))
    idx = torch.randperm(len(data.x_train), generator=g)[:n]
    return [
        (
            data.x_train[idx[i : i + batch_size]].to(device),
            data.y_train[idx[i : i + batch_size]].to(device),
        )
        for i in range(0, n, batch_size)
    ]
