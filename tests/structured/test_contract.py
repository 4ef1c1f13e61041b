"""Contract tests run for every registered structured optimizer (a new optimizer is covered the
moment it is registered): strict configs, JSON round trip, target group sparsity reached with zero
groups kept exactly zero, and a bit-exact resume from ``state_dict``."""

import copy
import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.config import ConfigError
from prunekit.structured import (
    available_structured,
    build_structured,
    config_from_section,
    find_groups,
    get_structured,
)
from tests.structured.tiny_models import TINY_MODELS

NAMES = available_structured()
TOTAL = 60

#: per field, values its config must refuse (every field of every config must appear here, so a
#: new field comes with its range check)
BAD = {
    "target_group_sparsity": [1.0, -0.1, float("nan")],
    "start": [-0.1, 1.0],
    "end": [0.05, 1.5],  # 0.05 is before the default start 0.1
    "periods": [0, -3],
    "lambda_": [-1e-3],
    "epsilon": [-0.5],
    "margin": [-0.05],
    "amplify": [0.0, -2.0],
    "hat_coeff": [0.0],
    "criteria": [{"magnitude": 1.0, "bogus": 1.0}, {"magnitude": -1.0}, {"cosine": 0.0}],
    "flops_removed": [0.0, 1.0],
    "channel_multiple": [0, 8],  # 8 without flops_removed
    "remove_branches": [True],  # without flops_removed
    "max_layer_fraction": [0.0, 1.5],
    "cost_power": [-0.1, 1.5],
}

#: per optimizer, settings that differ from every default (for the round trip)
NON_DEFAULT = {
    "hspg": {"target_group_sparsity": 0.3, "start": 0.2, "lambda_": 2.0, "epsilon": 0.1},
    "dhspg": {
        "target_group_sparsity": 0.4,
        "start": 0.2,
        "end": 0.7,
        "lambda_": 0.5,
        "epsilon": 0.1,
        "margin": 0.1,
        "amplify": 3.0,
        "hat_coeff": 50.0,
    },
    "hesso": {
        "target_group_sparsity": 0.6,
        "start": 0.2,
        "end": 0.7,
        "periods": 3,
        "criteria": {"magnitude": 0.5, "cosine": 0.5},
        "flops_removed": 0.5,
        "channel_multiple": 4,
        "remove_branches": True,
        "max_layer_fraction": 0.8,
        "cost_power": 1.0,
    },
}

#: per optimizer, a schedule reaching group sparsity 0.5 well within TOTAL steps on the toy model
#: (HSPG is λ-driven: a strong λ makes the 0.5 cap the binding limit)
SCHEDULE = {
    "hspg": {"target_group_sparsity": 0.5, "start": 0.2, "lambda_": 2.0},
    "dhspg": {"target_group_sparsity": 0.5, "start": 0.2, "end": 0.6},
    "hesso": {"target_group_sparsity": 0.5, "start": 0.2, "end": 0.6, "periods": 3},
}
UPDATE = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "variant": "sgd"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest, and spares the shared cores (a second thread made these
    tests ten times slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fields(name):
    return [f.name for f in dataclasses.fields(get_structured(name).config_class)]


def test_the_three_oto_optimizers_are_registered():
    assert {"hspg", "dhspg", "hesso"} <= set(NAMES)
    with pytest.raises(ConfigError, match="unknown structured optimizer 'otov9'; available: dhspg"):
        get_structured("otov9")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_key_is_an_error_listing_the_valid_ones(name):
    valid = sorted(["optimizer", *_fields(name)])
    with pytest.raises(ConfigError) as err:
        config_from_section({"optimizer": name, "lamda": 0.1})
    assert f"unknown key 'lamda' in structured (optimizer {name}); valid keys: " in str(err.value)
    assert str(err.value).endswith(", ".join(valid))
    with pytest.raises(ConfigError, match="unknown key 'lamda'"):
        get_structured(name).config_class.from_dict({"lamda": 0.1})


@pytest.mark.parametrize("name", NAMES)
def test_another_optimizers_keys_are_errors(name):
    """Keys of the other configs are not silently accepted (``periods`` is not a DHSPG key)."""
    own = set(_fields(name))
    foreign = {k for other in NAMES for k in _fields(other)} - own
    assert foreign, "every OTO config has keys the others lack"
    for key in sorted(foreign):
        with pytest.raises(ConfigError, match=re.escape(f"unknown key '{key}'")):
            config_from_section({"optimizer": name, key: SCHEDULE["hesso"].get(key, 1)})


@pytest.mark.parametrize("name", NAMES)
def test_out_of_range_values_are_refused_naming_field_and_value(name):
    cls = get_structured(name).config_class
    assert set(_fields(name)) <= set(BAD), "add the new field's bad values to BAD"
    for key in _fields(name):
        for value in BAD[key]:
            with pytest.raises(ConfigError) as err:
                cls.from_dict({key: value})
            message = str(err.value)
            assert key in message, (key, value, message)
            if isinstance(value, float) and value == value:  # the value itself is named
                assert repr(value) in message, (key, value, message)
    with pytest.raises(ConfigError, match="must be"):  # wrong type: a string for a number
        cls.from_dict({"start": "0.1"})


@pytest.mark.parametrize("name", NAMES)
def test_json_round_trip(name):
    cls = get_structured(name).config_class
    config = cls.from_dict(NON_DEFAULT[name])
    assert all(getattr(config, k) != getattr(cls(), k) for k in NON_DEFAULT[name])
    again = cls.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again is not config
    assert config_from_section({"optimizer": name, **json.loads(json.dumps(config.to_dict()))}) == (
        config
    )
    assert isinstance(cls.version, int) and cls.version >= 1
    assert config.to_dict() == NON_DEFAULT[name] | {
        k: v for k, v in cls().to_dict().items() if k not in NON_DEFAULT[name]
    }


def _leaky_mlp():
    """Leaky ReLU keeps a gradient on a zeroed channel's bias (ReLU would kill it at 0), so a zero
    group stays zero only if the optimizer holds it there."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.LeakyReLU(0.1), nn.Linear(32, 32), nn.LeakyReLU(0.1), nn.Linear(32, 2)
    )
    return model, torch.randn(16, 12, generator=torch.Generator().manual_seed(1))


MODELS = {"residual": lambda: TINY_MODELS["residual"](), "leaky_mlp": _leaky_mlp}


def _batches(seed, steps, x):
    gen = torch.Generator().manual_seed(seed)
    return [x + 0.05 * torch.randn(x.shape, generator=gen) for _ in range(steps)]


def _build(name, model, groups, x):
    config = config_from_section({"optimizer": name, **SCHEDULE[name]})
    return build_structured(
        config, model.parameters(), groups, total_steps=TOTAL, model=model, example=x, **UPDATE
    )


def _step(model, opt, xb):
    y = torch.arange(len(xb)) % 2
    loss = F.cross_entropy(model(xb)[:, :2], y)
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", NAMES)
def test_reaches_target_group_sparsity_and_keeps_zero_groups_zero(name, model_name):
    """No group is zero before ``start`` (fractions of training become steps), the target is
    reached by ``end`` where the optimizer has one, and a zero group stays exactly zero."""
    torch.manual_seed(0)
    model, x = MODELS[model_name]()
    groups = find_groups(model, x)
    prunable = [g for g in groups if g.prunable]
    opt = _build(name, model, groups, x)
    assert type(opt) is get_structured(name) and opt.config.to_dict() == {
        **type(opt.config)().to_dict(),
        **SCHEDULE[name],
    }
    target = round(0.5 * len(prunable))
    start = round(SCHEDULE[name]["start"] * TOTAL)
    end = round(SCHEDULE[name].get("end", 1.0) * TOTAL)
    seen: set[int] = set()
    for step, xb in enumerate(_batches(1, TOTAL, x)):
        _step(model, opt, xb)  # the (step + 1)-th optimizer step
        zero = {i for i, g in enumerate(prunable) if g.is_zero()}
        assert seen <= zero, f"step {step}: groups {sorted(seen - zero)} left zero"
        assert step >= start or not zero, f"step {step}: groups zero before start={start}"
        assert step + 1 < end or len(zero) == target, f"step {step}: {len(zero)} zero by end"
        seen = zero
    assert len(seen) == target, (len(seen), len(prunable))
    assert opt.group_sparsity() == len(seen) / len(prunable)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_is_bit_exact(name):
    """Stopped mid-pruning (HESSO inside a period, DHSPG after its selection, HSPG in the
    half-space phase), saved and restored into a fresh model and optimizer: the same weights."""
    torch.manual_seed(0)
    model, x = TINY_MODELS["residual"]()
    batches = _batches(2, TOTAL, x)
    groups = find_groups(model, x)
    opt = _build(name, model, groups, x)
    stop = 25  # after start (12 steps), before end (36)
    for xb in batches[:stop]:
        _step(model, opt, xb)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for xb in batches[stop:]:
        _step(model, opt, xb)

    fresh, _ = TINY_MODELS["residual"]()
    fresh.load_state_dict(saved[0])
    resumed = _build(name, fresh, find_groups(fresh, x), x)
    resumed.load_state_dict(saved[1])
    for xb in batches[stop:]:
        _step(fresh, resumed, xb)
    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert saved[1]["group_sparse"]["config"] == opt.config.to_dict()


def test_cli_lists_every_registered_optimizer(capsys):
    from prunekit.cli.main import main

    assert main(["methods"]) == 0
    listing = capsys.readouterr().out.split("structured, Only-Train-Once")[1].splitlines()[1:]
    assert [line.split()[0] for line in listing] == NAMES
