import pytest
import yaml

from prunekit.config import ConfigError
from prunekit.training import load_recipe, recipe_from_dict

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
            "unknown key 'epoch' in recipe; valid keys: data, epochs, lr_schedule",
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

    files = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").rglob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        load_recipe(f)
