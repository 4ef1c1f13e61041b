"""Contract tests run for every registered method (a new method is covered when registered)."""

import copy

import pytest
import torch

import prunekit
from prunekit.config import ConfigError
from tests.helpers import QUICK, mlp, run, sgd, small_cnn, toy_data

METHODS = prunekit.available()
STEPS = 120


def test_all_mission_methods_are_registered():
    assert {"gmp", "dpf", "acdc", "rigl", "gap", "imp", "cram"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_reaches_target_sparsity(method, sparsity):
    model = mlp()
    opt = sgd(model)
    pruner = prunekit.sparsify(
        model, opt, method, sparsity=sparsity, total_steps=STEPS, **QUICK[method]
    )
    run(model, opt, pruner, STEPS)
    pruner.finalize()
    report = prunekit.sparsity_report(model)
    assert abs(report["global_sparsity"] - sparsity) <= 0.005
    assert not [n for n, _ in model.named_buffers()]  # finalize removes the buffers


@pytest.mark.parametrize("method", METHODS)
def test_works_on_conv_with_batchnorm(method):
    model = small_cnn()
    opt = sgd(model)
    pruner = prunekit.sparsify(model, opt, method, sparsity=0.8, total_steps=60, **QUICK[method])
    run(model, opt, pruner, 60, data=toy_data(image=True))
    pruner.finalize()
    assert abs(prunekit.sparsity_report(model)["global_sparsity"] - 0.8) <= 0.005


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_continues_identically(method):
    def make():
        model = mlp()
        opt = sgd(model)
        return (
            model,
            opt,
            prunekit.sparsify(model, opt, method, sparsity=0.9, total_steps=STEPS, **QUICK[method]),
        )

    torch.manual_seed(0)
    model, opt, pruner = make()
    run(model, opt, pruner, 50, seed=1)
    saved = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(pruner.state_dict()),
    )
    rng = torch.get_rng_state()
    run(model, opt, pruner, 70, seed=2)

    model2, opt2, pruner2 = make()
    pruner2.load_state_dict(saved[2])
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    torch.set_rng_state(rng)
    run(model2, opt2, pruner2, 70, seed=2)
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k


@pytest.mark.parametrize("method", METHODS)
def test_config_validation(method):
    model = mlp()
    with pytest.raises(ConfigError, match="sparsity"):
        prunekit.sparsify(model, sgd(model), method, sparsity=1.0, total_steps=10)
    with pytest.raises(ConfigError, match="sparsity"):
        prunekit.sparsify(model, sgd(model), method, sparsity=-0.1, total_steps=10)
    with pytest.raises(ConfigError, match="valid keys"):
        prunekit.sparsify(model, sgd(model), method, sparsity=0.5, total_steps=10, spasity=0.5)
    cls = prunekit.methods.get_method(method)
    cfg = cls.config_class.from_dict({"sparsity": 0.5, "total_steps": 100})
    assert cls.config_class.from_dict(cfg.to_dict()) == cfg  # JSON round trip


def test_unknown_method_lists_available():
    model = mlp()
    with pytest.raises(ValueError, match="available: acdc"):
        prunekit.sparsify(model, sgd(model), "magic", sparsity=0.5, total_steps=10)


def test_nm_pattern_training():
    model = mlp()
    opt = sgd(model)
    pruner = prunekit.sparsify(
        model, opt, "gmp", sparsity=0.5, pattern="2:4", total_steps=40, update_every=5
    )
    run(model, opt, pruner, 40)
    pruner.finalize()
    for t in pruner.targets:
        groups = (t.param.detach().reshape(-1, 4) != 0).sum(1)
        assert (groups <= 2).all()
    with pytest.raises(ConfigError, match="fixes the sparsity"):
        prunekit.sparsify(mlp(), opt, "gmp", sparsity=0.9, pattern="2:4", total_steps=40)


@pytest.mark.parametrize("method", METHODS)
def test_deepcopy_mid_run_continues_identically_and_independently(method):
    model = mlp()
    opt = sgd(model)
    pruner = prunekit.sparsify(model, opt, method, sparsity=0.9, total_steps=STEPS, **QUICK[method])
    run(model, opt, pruner, 50, seed=1)
    model2, opt2, pruner2 = copy.deepcopy((model, opt, pruner))
    assert pruner2.model is model2 and pruner2.optimizer is opt2
    rng = torch.get_rng_state()
    run(model, opt, pruner, 70, seed=2)
    pruner.finalize()
    torch.set_rng_state(rng)
    run(model2, opt2, pruner2, 70, seed=2)
    pruner2.finalize()
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k
    assert abs(prunekit.sparsity_report(model2)["global_sparsity"] - 0.9) <= 0.005


def test_finalize_after_full_schedule_does_not_warn(caplog):
    model = mlp()
    opt = sgd(model)
    pruner = prunekit.sparsify(model, opt, "dpf", sparsity=0.986, total_steps=60, update_every=4)
    run(model, opt, pruner, 60)
    with caplog.at_level("WARNING"):
        pruner.finalize()
    assert "before the schedule reached" not in caplog.text


def test_early_finalize_prunes_to_target_and_warns(caplog):
    model = mlp()
    opt = sgd(model)
    pruner = prunekit.sparsify(model, opt, "gmp", sparsity=0.9, total_steps=100, update_every=5)
    run(model, opt, pruner, 10)
    with caplog.at_level("WARNING"):
        pruner.finalize()
    assert "before the schedule reached" in caplog.text
    assert abs(prunekit.sparsity_report(model)["global_sparsity"] - 0.9) <= 0.005
