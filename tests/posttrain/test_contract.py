"""Contract tests run for every registered post-training method (a new method is covered the
moment it is registered): a strict config whose every field survives ``to_dict``/``from_dict`` and
JSON, an unknown key refused by name, and compression that does what the config class says it
does (``prunes``: every layer reaches the sparsity; ``quantizes``: every row holds at most
``2**bits`` values), which a method that returns its weights unchanged fails."""

import dataclasses
import json

import pytest
import torch

import prunekit
from prunekit.config import ConfigError
from prunekit.posttrain import available_compressors, get_compressor
from tests.helpers import MLP, calibration_batches

NAMES = available_compressors()
PRUNERS = [m for m in NAMES if get_compressor(m).config_class.prunes]
QUANTIZERS = [m for m in NAMES if get_compressor(m).config_class.quantizes]

#: keys every method takes, each set away from its default
_COMMON = {"targets": ["fc1", "re:fc[23]"], "ignore": ["fc3"], "recalibrate_batchnorm": False}

#: per method, a valid config that sets as many fields as the method allows away from their
#: defaults (a method that only quantizes takes no sparsity, pattern or overrides; M-FAC no
#: pattern, overrides or sequential; SparseGPT's sym/mse need sparsity 0); a new method needs its
#: entry here
NON_DEFAULT = {
    "magnitude": {**_COMMON, "sequential": False, "sparsity": 0.6, "overrides": {"fc2": 0.25},
                  "bits": 4, "group_size": 8, "sym": True, "mse": True},
    "wanda": {**_COMMON, "sequential": False, "pattern": "2:4", "bits": 3, "group_size": 4,
              "sym": True, "mse": True},
    "sparsegpt": {**_COMMON, "sequential": False, "sparsity": 0.7, "overrides": {"re:fc.*": 0.3},
                  "bits": 4, "group_size": 16, "block_size": 64, "damp": 0.05,
                  "mask_scope": "block"},
    "obc": {**_COMMON, "sequential": False, "sparsity": 0.4, "overrides": {"fc1": 0.2},
            "damp": 0.02, "mask_scope": "layer", "database_levels": [0.25, 0.75]},
    "rtn": {**_COMMON, "sequential": False, "bits": 3, "group_size": 8, "sym": True, "mse": True},
    "gptq": {**_COMMON, "sequential": False, "bits": 4, "group_size": 32, "block_size": 32,
             "damp": 0.1, "sym": True, "mse": True, "act_order": True, "static_groups": True},
    "obq": {**_COMMON, "sequential": False, "bits": 2, "group_size": 16, "damp": 0.05,
            "sym": True, "mse": True},
    "mfac": {**_COMMON, "sparsity": 0.8, "ngrads": 16, "fisher_block": 32, "damp": 1e-4,
             "steps": 2},
}  # fmt: skip


def minimal(name):
    """The smallest config that makes method ``name`` do its job, from its config class: half the
    weights for a pruner, 2 bits for a method that only quantizes (M-FAC: 8 gradients)."""
    entry = get_compressor(name)
    config = {"sparsity": 0.5} if entry.config_class.prunes else {"bits": 2}
    return config | ({"ngrads": 8} if entry.global_method else {})


def _default(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def test_the_registry_holds_the_issue_methods():
    assert {"magnitude", "wanda", "sparsegpt", "obc", "rtn", "gptq", "obq"} <= set(
        available_compressors()
    )


def test_every_method_prunes_or_quantizes_and_has_a_config_here():
    assert set(PRUNERS) | set(QUANTIZERS) == set(NAMES)
    assert set(NON_DEFAULT) == set(NAMES), "add the new method's config to NON_DEFAULT"


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_to_dict_and_json(name):
    cls = get_compressor(name).config_class
    config = cls.from_dict(NON_DEFAULT[name])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert all(NON_DEFAULT[name][k] != _default(fields[k]) for k in NON_DEFAULT[name])
    data = config.to_dict()
    assert set(data) == set(fields)  # every field, none dropped
    assert {k: data[k] for k in NON_DEFAULT[name]} == NON_DEFAULT[name]
    again = cls.from_dict(data)
    assert again == config and again is not config
    assert cls.from_dict(json.loads(json.dumps(data))) == config


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_key_is_a_config_error_naming_it(name):
    assert issubclass(prunekit.ConfigError, ValueError)
    cls = get_compressor(name).config_class
    with pytest.raises(prunekit.ConfigError, match="unknown key 'spasity'"):
        cls.from_dict({**NON_DEFAULT[name], "spasity": 0.5})
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunekit.ConfigError, match="unknown key 'spasity'"):
        prunekit.posttrain.compress(
            model, calibration_batches(), method=name, **minimal(name), spasity=0.5
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", PRUNERS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_pruner_reaches_its_sparsity_and_beats_nothing(method, pattern):
    """Layer-wise methods: every layer exactly at the sparsity (N:M: every group); a global
    method (M-FAC) spreads the same total over the layers."""
    torch.manual_seed(0)
    model, batches = MLP((16, 16, 8, 4)), calibration_batches(shape=(32, 16))
    kw = {"sparsity": 0.5} if pattern == "unstructured" else {"pattern": pattern}
    layers = (model.fc1, model.fc2, model.fc3)
    if get_compressor(method).global_method:
        if pattern != "unstructured":
            with pytest.raises(ConfigError, match="not supported"):
                prunekit.compress(model, batches, method, **kw)
            return
        report = prunekit.compress(model, batches, method, ngrads=8, **kw)
        nnz = sum(int((lin.weight != 0).sum()) for lin in layers)
        assert nnz == sum(lin.weight.numel() for lin in layers) // 2
    else:
        report = prunekit.compress(model, batches, method, **kw)
        for lin in layers:
            nnz = (lin.weight.reshape(-1, 4) != 0).sum(1)
            assert nnz.sum() == lin.weight.numel() // 2
            if pattern == "2:4":
                assert nnz.max() <= 2
    assert all(0 < r.rel_error < 1 for r in report.layers)


@pytest.mark.parametrize("method", QUANTIZERS)
def test_every_quantizer_puts_each_row_on_at_most_2_to_the_bits_values(method):
    torch.manual_seed(0)
    model, batches = MLP((16, 16, 8, 4)), calibration_batches(shape=(32, 16))
    report = prunekit.compress(model, batches, method, bits=2)
    for lin in (model.fc1, model.fc2, model.fc3):
        assert max(len(torch.unique(row)) for row in lin.weight) <= 4
    assert all(r.bits == 2 and r.rel_error < 1 for r in report.layers)
