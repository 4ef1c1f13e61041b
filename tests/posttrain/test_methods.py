"""The registered post-training methods of :mod:`prunekit.posttrain.methods` through
``prunekit.compress``: config errors, what the second-order methods buy over magnitude, OBC's
database of levels. What every method must do is in ``test_contract.py``."""

import pytest
import torch

import prunekit
from prunekit.config import ConfigError
from tests.helpers import MLP, calibration_batches


def test_config_errors_name_the_problem():
    model, batches = MLP(), calibration_batches()
    with pytest.raises(ConfigError, match="valid keys"):
        prunekit.compress(model, batches, "sparsegpt", sparsity=0.5, spasity=0.5)
    with pytest.raises(ConfigError, match="sparsity"):
        prunekit.compress(model, batches, "sparsegpt", sparsity=1.0)
    with pytest.raises(ConfigError, match="bits"):
        prunekit.compress(model, batches, "gptq", bits=9)
    with pytest.raises(ConfigError, match="quantizes only"):
        prunekit.compress(model, batches, "rtn", bits=4, sparsity=0.5)
    with pytest.raises(ConfigError, match="does not quantize"):
        prunekit.compress(model, batches, "obc", sparsity=0.5, bits=4)
    with pytest.raises(ConfigError, match="nothing to do"):
        prunekit.compress(model, batches, "sparsegpt")
    with pytest.raises(ConfigError, match="fixes the sparsity"):
        prunekit.compress(model, batches, "sparsegpt", sparsity=0.7, pattern="2:4")
    with pytest.raises(ValueError, match="available: "):
        prunekit.compress(model, batches, "magic", sparsity=0.5)


def test_second_order_methods_beat_magnitude_on_a_trained_like_layer():
    """On correlated inputs, the compensating methods reconstruct better, at the model level."""
    torch.manual_seed(0)
    mix = torch.randn(4, 16)  # four latent factors drive the 16 inputs
    batches = [torch.randn(64, 4) @ mix + 0.1 * torch.randn(64, 16) for _ in range(4)]
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt", "obc"):
        torch.manual_seed(1)
        m = MLP((16, 12, 8, 4))
        errors[method] = prunekit.compress(m, batches, method, sparsity=0.7).layer("fc1").rel_error
    assert errors["obc"] <= errors["sparsegpt"] < 0.8 * errors["magnitude"]


def test_obc_database_holds_every_requested_level():
    torch.manual_seed(0)
    model, batches = MLP(), calibration_batches()
    report = prunekit.compress(
        model, batches, "obc", sparsity=0.5, targets=["fc1"], database_levels=[0.25, 0.75]
    )
    (db,) = report.extras["obc_database"]["fc1.weight"]
    assert sorted(db.levels) == [0.25, 0.5, 0.75]
    torch.testing.assert_close(db.weights_at(0.5), model.fc1.weight.detach())
    assert (db.weights_at(0.75) == 0).sum(1).tolist() == [9] * 16
