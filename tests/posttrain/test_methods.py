"""The registered post-training methods of :mod:`prunekit.posttrain.methods` through
``prunekit.compress``: config errors, what the second-order methods buy over magnitude, OBC's
database of levels, the grid options reaching the quantizers. What every method must do is in
``test_contract.py``."""

import pytest
import torch

import prunekit
from prunekit.config import ConfigError
from prunekit.posttrain.obs import layer_hessian
from prunekit.posttrain.quant import gptq_quantize
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
    with pytest.raises(ConfigError, match="sym sets the quantization grid: it needs bits"):
        prunekit.compress(model, batches, "sparsegpt", sparsity=0.5, sym=True)
    with pytest.raises(ConfigError, match="mse sets the quantization grid: it needs bits"):
        prunekit.compress(model, batches, "magnitude", sparsity=0.5, mse=True)
    with pytest.raises(ConfigError, match=r"static_groups .* needs group_size"):
        prunekit.compress(model, batches, "gptq", bits=4, static_groups=True)
    with pytest.raises(ConfigError, match="sym/mse need sparsity=0"):
        prunekit.compress(model, batches, "sparsegpt", sparsity=0.5, bits=4, sym=True)
    with pytest.raises(ConfigError, match="unknown key 'act_order'"):
        prunekit.compress(model, batches, "rtn", bits=4, act_order=True)


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("rtn", {}),
        ("gptq", {"act_order": True}),
        ("obq", {}),
        ("magnitude", {"sparsity": 0.5}),
        ("sparsegpt", {"sparsity": 0.5}),
        ("sparsegpt", {}),
    ],
)
def test_a_group_size_that_leaves_a_ragged_group_is_refused_naming_the_layer(method, kw):
    """fc1 has 16 inputs, fc2 12, fc3 8: groups of 8 leave fc2 a last group of 4. fc1 is
    compressed before fc2 is refused; the model comes back unchanged."""
    torch.manual_seed(0)
    model, batches = MLP((16, 12, 8, 4)), calibration_batches(shape=(32, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"fc2\.weight has 12 inputs .* group_size=8"):
        prunekit.compress(model, batches, method, bits=3, group_size=8, **kw)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # A group at least as wide as a layer is one grid per row there (fc2, fc3 under 16).
    report = prunekit.compress(model, batches, method, bits=3, group_size=16, **kw)
    assert [g.scale.shape[-1] for g in report.grids["fc1.weight"]] == [1]
    assert [g.scale.shape[-1] for g in report.grids["fc2.weight"]] == [1]


def test_grid_options_reach_the_quantizers():
    """A layer compressed with every GPTQ option equals gptq_quantize with them on its Hessian;
    the symmetric grid puts every zero point at the mid code; MSE grids lower RTN's error."""
    torch.manual_seed(0)
    model = MLP((16, 12, 8, 4)).double()
    batches = [b.double() for b in calibration_batches(shape=(32, 16))]
    W = model.fc1.weight.detach().clone()
    options = {"sym": True, "mse": True, "act_order": True, "static_groups": True}
    report = prunekit.compress(
        model, batches, "gptq", bits=3, group_size=4, targets=["fc1"], **options
    )
    H = layer_hessian(torch.cat(batches))
    expected = gptq_quantize(W, H, 3, group_size=4, **options)
    torch.testing.assert_close(model.fc1.weight.detach(), expected, rtol=0, atol=1e-12)
    assert not torch.equal(expected, gptq_quantize(W, H, 3, group_size=4))
    assert (report.grids["fc1.weight"][0].zero == 4).all()
    errors = {}
    for mse in (False, True):
        torch.manual_seed(0)
        m = MLP((16, 12, 8, 4))
        report = prunekit.compress(m, calibration_batches(shape=(32, 16)), "rtn", bits=3, mse=mse)
        errors[mse] = report.layer("fc1").rel_error
    assert errors[True] < errors[False]


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
