import json

import yaml

from prunekit.cli.main import main


def test_cli_train_tiny_budget(tmp_path, capsys):
    recipe = {
        "model": "lenet300_100",
        "data": {"name": "mnist", "train_subset": 512, "test_subset": 256, "batch_size": 64},
        "pruning": {"method": "gmp", "sparsity": 0.95, "update_every": 2},
        "epochs": 1,
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                "--recipe",
                str(path),
                "--out",
                str(out),
                "--quiet",
                "--set",
                "pruning.sparsity=0.9",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["global_sparsity"] - 0.9) < 0.005
    assert "test_accuracy" in capsys.readouterr().out


def test_cli_bad_recipe_exits_2_with_message(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("model: lenet300_100\nepohcs: 3\n")
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'epohcs'" in err and "epochs" in err


def test_cli_methods_lists_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("gmp", "dpf", "acdc", "rigl", "gap", "imp", "cram"):
        assert name in out
