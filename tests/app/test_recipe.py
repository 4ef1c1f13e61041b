import re

import pytest
import yaml

from prunekit.app import load_recipe, recipe_from_dict
from prunekit.config import ConfigError

BASE = {
    "model": {"name": "lenet300_100"},
    "pruning": {"method": "dpf", "sparsity": 0.9},
    "epochs": 2,
}


def test_valid_recipe():
    r = recipe_from_dict(BASE)
    assert r.method == "dpf" and r.optimizer.name == "sgd" and r.epochs == 2


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {"epochs": 2, "epoch": 3},
            "unknown key 'epoch' in recipe; valid keys: communication, data, epochs, lr_schedule",
        ),
        (
            {"optimizer": {"name": "sgd", "learning_rate": 0.1}},
            "unknown key 'learning_rate' in optimizer; valid keys: .*lr, momentum",
        ),
        (
            {"pruning": {"method": "dpf", "sparsity": 0.9, "update_evry": 3}},
            "unknown key 'update_evry'.*update_every",
        ),
        ({"pruning": {"method": "dpf", "sparsity": 1.2}}, "sparsity must be in \\[0, 1\\)"),
        ({"pruning": {"method": "dpf", "sparsity": "0.9"}}, "pruning.sparsity must be float"),
        (
            {"pruning": {"method": "magic", "sparsity": 0.9}},
            "unknown method 'magic'; available: acdc",
        ),
        ({"pruning": {"sparsity": 0.9}}, "needs a 'method'"),
        (
            {"pruning": {"method": "gmp", "sparsity": 0.9, "total_steps": 5}},
            "total_steps is derived",
        ),
        (
            {"model": {"name": "resnet1000"}},
            "model.name 'resnet1000' unknown; available: .*lenet300_100",
        ),
        ({"data": {"name": "cifar"}}, "data.name 'cifar' unknown"),
        ({"optimizer": {"name": "lion"}}, "optimizer.name 'lion' unknown"),
        ({"epochs": 0}, "epochs must be >= 1"),
    ],
)
def test_invalid_recipes_name_the_problem(patch, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({**BASE, **patch})


def test_load_recipe_with_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    r = load_recipe(path, ["pruning.sparsity=0.99", "optimizer.lr=0.05"])
    assert r.pruning["sparsity"] == 0.99 and r.optimizer.lr == 0.05
    with pytest.raises(ConfigError, match=r"r\.yaml: unknown key 'sparsty'"):
        load_recipe(path, ["pruning.sparsty=0.5"])
    path.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)


def test_shipped_recipes_are_valid():
    from pathlib import Path

    from prunekit.app.compress_recipe import load_compress_recipe

    files = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").rglob("*.yaml"))
    assert len(files) >= 8
    compress = [f for f in files if "compress:" in f.read_text()]
    assert len(compress) >= 6
    for f in files:
        if f in compress:
            load_compress_recipe(f)  # a `prunekit compress` recipe
        else:
            load_recipe(f)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"data": {"test_subset": 0}}, "data.test_subset must be >= 1"),
        ({"data": {"train_subset": -5}}, "data.train_subset must be >= 1"),
        ({"data": {"split": "val"}}, "data.split 'val' unknown; available: train\\+val, train"),
        ({"data": {"num_samples": 0}}, "data.num_samples must be >= 1"),
        ({"optimizer": {"momentum": -0.5}}, "optimizer.momentum must be in \\[0, 1\\)"),
        ({"optimizer": {"weight_decay": -1e-4}}, "optimizer.weight_decay must be >= 0"),
        ({"optimizer": {"momentum": 0.0, "nesterov": True}}, "nesterov needs"),
        ({"optimizer": {"lr": float("inf")}}, "optimizer.lr must be positive and finite"),
        (
            {"model": {"name": "lenet300_100", "kwargs": {"num_classes": 3}}},
            "model.kwargs may not set num_classes",
        ),
    ],
)
def test_out_of_range_values_are_config_errors(patch, message):
    """Values torch would reject mid-run (or silently misuse, like a negative slice) fail up front."""
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({**BASE, **patch})


def test_yaml_scalars_follow_yaml_1_2(tmp_path):
    """``2:4`` is a string (YAML 1.1: sexagesimal 124), ``1.0e6`` / ``1e-3`` are floats (1.1: strings)."""
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: {name: lenet300_100}\n"
        "pruning: {method: gmp, sparsity: 0.5, pattern: 2:4}\n"
        "optimizer: {lr: 1e-3, weight_decay: 5.0e-4}\n"
        "name: 2024-01-01\n"
    )
    r = load_recipe(path)
    assert r.pruning["pattern"] == "2:4"
    assert r.optimizer.lr == 0.001 and r.optimizer.weight_decay == 0.0005
    assert r.name == "2024-01-01"  # not a datetime.date
    r = load_recipe(path, ["pruning.pattern=1:4", "pruning.sparsity=0.75", "optimizer.lr=1.0e6"])
    assert r.pruning["pattern"] == "1:4" and r.optimizer.lr == 1e6


def test_yaml12_scalar_table():
    from prunekit.app.yaml12 import load_yaml

    cases = {
        "2:4": "2:4",
        "1.0e6": 1e6,
        "1e-3": 1e-3,
        "-2.5E+2": -250.0,
        ".5": 0.5,
        "010": 10,
        "0o17": 15,
        "0x1F": 31,
        "-7": -7,
        "yes": "yes",
        "off": "off",
        "1_000": "1_000",
        "True": True,
        "false": False,
        "~": None,
        "null": None,
        "'2:4'": "2:4",
        "!!float 1": 1.0,
    }
    for text, expected in cases.items():
        value = load_yaml(text)
        assert value == expected and type(value) is type(expected), (text, value)
    assert load_yaml(".inf") == float("inf") and load_yaml("-.Inf") == float("-inf")
    assert load_yaml("a: &x {k: 1}\nb:\n  <<: *x\n  j: 2") == {"a": {"k": 1}, "b": {"k": 1, "j": 2}}


def test_unreadable_recipes_and_overrides_are_config_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(
        ConfigError, match=r"override 'pruning.targets=\[a,': the value is not valid"
    ):
        load_recipe(path, ["pruning.targets=[a,"])
    with pytest.raises(ConfigError, match="is not a file"):
        load_recipe(tmp_path)
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a text file"):
        load_recipe(binary)
    binary.write_bytes(b"\x00\x01\x02 model: x")  # valid UTF-8, but control characters
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(binary)


def test_hspg_recipe_is_lambda_driven_unless_a_cap_is_given():
    import torch

    from prunekit.app.recipe import recipe_from_dict
    from prunekit.app.structured import build_structured_optimizer
    from prunekit.models import build_model
    from prunekit.structured import find_groups

    def optimizer(structured):
        recipe = recipe_from_dict(
            {"model": {"name": "lenet300_100"}, "data": {"name": "mnist"},
             "structured": structured, "optimizer": {"name": "sgd", "lr": 0.1}}
        )  # fmt: skip
        model = build_model("lenet300_100", (1, 28, 28), 10)
        x = torch.randn(2, 1, 28, 28)
        return build_structured_optimizer(recipe, model, find_groups(model, x), 100, x)

    assert optimizer({"optimizer": "hspg"}).capped is False
    capped = optimizer({"optimizer": "hspg", "target_group_sparsity": 0.3})
    assert capped.capped and capped.target == 0.3
    assert optimizer({"optimizer": "hesso"}).target == 0.5  # DHSPG/HESSO still default to 0.5


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"levels": 4}, "communication needs a 'method' key"),
        ({"method": "zip"}, "unknown gradient compression method 'zip'; available: natural, none"),
        ({"method": "qsgd", "level": 4}, "unknown key 'level' in communication (method qsgd)"),
        ({"method": "qsgd", "levels": 0}, "levels"),
    ],
)
def test_invalid_communication_sections_name_the_problem(section, message):
    data = {"model": {"name": "lenet300_100"}, "communication": section}
    with pytest.raises(ConfigError, match=re.escape(message)):
        recipe_from_dict(data)


def test_communication_section_round_trips():
    data = {"model": {"name": "lenet300_100"}, "communication": {"method": "qsgd", "levels": 8}}
    recipe = recipe_from_dict(data)
    assert recipe.communication == {"method": "qsgd", "levels": 8}
    assert recipe_from_dict(recipe.to_dict()).communication == recipe.communication
