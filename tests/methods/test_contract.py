"""Contract tests run for every registered method (a new method is covered when registered)."""

import copy
import json

import pytest
import torch

import prunekit
from prunekit.config import ConfigError
from tests.helpers import QUICK, mlp, run, sgd, small_cnn, toy_data

METHODS = prunekit.methods.available_methods()
STEPS = 120


def test_all_mission_methods_are_registered():
    assert {"gmp", "dpf", "acdc", "rigl", "gap", "imp", "cram", "constant"} <= set(METHODS)


def scheduled(method: str, sparsity: float, step: int, total: int) -> float | None:
    """The sparsity each method's paper schedule gives at ``step`` with its default settings (written
    out here, independently of the code under test); ``None`` where the value depends on the data."""
    if method in ("gmp", "dpf"):  # cubic ramp over [0, 0.75·total], updated every 5 / 4 steps
        end, every = round(0.75 * total), QUICK[method]["update_every"]
        last = min(step - step % every, end) if step < end else end
        return sparsity * (1 - (1 - last / end) ** 3)
    if method in ("rigl", "constant"):  # the parameter count is fixed from the start
        return sparsity
    if method == "imp":  # dense for 40%, then 3 rounds, each pruning the same share of survivors
        t0 = round(0.4 * total)
        rounds = [r for r in range(3) if step >= t0 + r * ((total - t0) // 3)]
        return 1 - (1 - sparsity) ** (len(rounds) / 3)
    if method == "acdc":  # dense to 10%, then phases of 5% starting compressed; final from 85%
        warmup, period = round(0.1 * total), round(0.05 * total)
        if step >= round(0.85 * total):
            return sparsity
        if step < warmup or step >= round(0.75 * total):
            return None  # dense phase: zeros only where pruned weights have not moved yet
        return sparsity if ((step - warmup) // period) % 2 == 0 else None
    if method == "cram":  # trains a dense model; pruned one-shot at finalize
        return 0.0
    return None  # gap: one partition dense at a time (tested in test_mechanisms)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_follows_the_schedule_and_reaches_target_sparsity(method, sparsity, caplog):
    model = mlp()
    opt = sgd(model)
    pruner = prunekit.sparsify(
        model, opt, method, sparsity=sparsity, total_steps=STEPS, **QUICK[method]
    )
    checked = []

    def check():
        expected = scheduled(method, sparsity, pruner.step_count, STEPS)
        if expected is not None and pruner.step_count % 10 == 5:  # not on RigL's update steps
            checked.append(pruner.step_count)
            assert pruner.current_sparsity() == pytest.approx(expected, abs=0.005), checked[-1]

    run(model, opt, pruner, STEPS, callback=check)
    assert len(checked) >= 2 or method == "gap"
    if method == "cram":
        assert pruner.current_sparsity() < 0.01  # dense until the one-shot compression
    else:  # the schedule itself reached the target: finalize has nothing left to prune
        assert pruner.current_sparsity() == pytest.approx(sparsity, abs=0.005)
    with caplog.at_level("WARNING"):
        pruner.finalize()
    assert "before the schedule reached" not in caplog.text
    report = prunekit.sparsity_report(model)
    assert abs(report["global_sparsity"] - sparsity) <= 0.005
    assert not [n for n, _ in model.named_buffers()]  # finalize removes the buffers


@pytest.mark.parametrize("method", METHODS)
def test_works_on_conv_with_batchnorm(method):
    model = small_cnn()
    opt = sgd(model)
    pruner = prunekit.sparsify(model, opt, method, sparsity=0.8, total_steps=60, **QUICK[method])
    run(model, opt, pruner, 60, data=toy_data(image=True))
    if method != "cram":  # reached by training, not by finalize
        assert pruner.current_sparsity() == pytest.approx(0.8, abs=0.005)
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
    text = json.dumps(cfg.to_dict())
    assert cls.config_class.from_dict(json.loads(text)) == cfg  # JSON round trip


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
