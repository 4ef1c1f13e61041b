"""The layer Hessian of :mod:`prunekit.posttrain.hessian`: the ``2XᵀX/n`` convention and its
running average, damping escalated on a rank-deficient Hessian, and the error when no damping
helps."""

import logging

import pytest
import torch

from prunekit.posttrain import (
    HessianAccumulator,
    HessianError,
    layer_hessian,
    prepare_hessian,
    sparsegpt_prune,
)
from tests.posttrain.layer_data import correlated


def test_hessian_convention_and_accumulator():
    X = correlated(50, 6)
    H = layer_hessian(X)
    expected = 2.0 * sum(torch.outer(x, x) for x in X) / X.shape[0]
    torch.testing.assert_close(H, expected)
    acc = HessianAccumulator(6, dtype=torch.float64)
    acc.add(X[:7])
    acc.add(X[7:].reshape(43, 1, 6))
    assert acc.n_samples == 50
    torch.testing.assert_close(acc.hessian, expected)


def test_damping_escalates_on_rank_deficient_hessian(caplog):
    X = correlated(3, 8, seed=9)  # 3 samples, 8 inputs: rank 3
    H = layer_hessian(X)
    with caplog.at_level(logging.WARNING, logger="prunekit.posttrain.hessian"):
        H_d, info = prepare_hessian(H, damp=0.0)
    assert info.tries >= 2
    assert info.damp_history[0] == 0.0
    assert info.damp > 0.0
    assert "retrying" in caplog.text
    torch.linalg.cholesky(H_d)  # accepted factor exists
    # Duplicated column: also rank deficient.
    Xd = correlated(40, 6, seed=10)
    Xd[:, 3] = Xd[:, 1]
    _, info2 = prepare_hessian(layer_hessian(Xd), damp=0.0)
    assert info2.tries >= 2 and info2.damp > 0.0
    # Default damping needs no escalation on a full-rank Hessian.
    _, info3 = prepare_hessian(layer_hessian(correlated(40, 6)), damp=0.01)
    assert info3.tries == 1 and info3.damp == 0.01


def test_non_psd_hessian_raises_after_the_cap():
    H = -torch.eye(5, dtype=torch.float64)
    with pytest.raises(HessianError, match="not positive definite"):
        prepare_hessian(H, damp=0.01, max_tries=3)
    with pytest.raises(HessianError):
        sparsegpt_prune(torch.randn(3, 5, dtype=torch.float64), H, 0.5)
