import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
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
    for name in ("gmp", "dpf", "acdc", "rigl", "gap", "imp", "cram", "constant"):
        assert name in out
    from prunekit.posttrain import available_compressors

    post = out.split("post-training")[1]
    for name in available_compressors():
        assert f"  {name} " in post


def _read_only_dir(tmp_path):
    """A directory this process cannot create files in (root ignores chmod: fall back to sysfs)."""
    candidate = tmp_path / "ro"
    candidate.mkdir()
    candidate.chmod(0o555)
    for path in (candidate, Path("/sys/kernel")):
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError:
            return path
    pytest.skip("no read-only directory available")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A recipe file, and a 64-example synthetic data set in place of MNIST (fast)."""
    import prunekit.app.training as trainer
    from prunekit.data import ArrayDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    loads = []

    def load_data(spec, seed):
        loads.append(spec)
        return ArrayDataset("mnist", x, y, x[:32], y[:32], 10)

    monkeypatch.setattr(trainer, "load_data", load_data)
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump({"model": {"name": "lenet300_100"}, "data": {"batch_size": 32}, "epochs": 1})
    )
    return path, loads


def _fails_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("prunekit: error:") and re.search(message, err), err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "pruning=[a,"], "override 'pruning=\\[a,': the value is not valid YAML"),
        (["--set", "data.split=test"], "data.split 'test' unknown; available: train\\+val"),
        (["--set", "optimizer.momentum=-0.9"], "optimizer.momentum must be in \\[0, 1\\)"),
        (["--set", "data.test_subset=0"], "data.test_subset must be >= 1"),
        (["--set", "model.kwargs.depth=3"], "'lenet300_100' refuses model.kwargs \\{'depth': 3\\}"),
        (["--device", "gpu7"], "device 'gpu7' is not a device name"),
        (["--device", "meta"], "device 'meta' holds no data"),
        (["--set", "seed=99999999999999999999999"], "seed must be in \\[0, 2\\*\\*63\\)"),
        (["--set", "lr_schedule.warmup_epochs=-1"], "warmup_epochs must be >= 0"),
        (["--set", "model.weights=missing.pt"], "model.weights missing.pt not found"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, capsys, tiny, extra, message):
    recipe, _ = tiny
    argv = ["train", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--quiet", *extra]
    _fails_with_one_line(capsys, argv, message)
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_cli_cuda_without_cuda_is_one_line(tmp_path, capsys, tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    recipe, loads = tiny
    argv = ["train", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--device", "cuda"]
    _fails_with_one_line(capsys, argv, "device 'cuda' is not available on this machine")
    assert loads == []  # found before the data is loaded


def test_cli_unusable_out_is_found_before_training(tmp_path, capsys, tiny):
    recipe, loads = tiny
    read_only = _read_only_dir(tmp_path)
    argv = ["train", "--recipe", str(recipe), "--quiet", "--out"]
    _fails_with_one_line(capsys, [*argv, str(read_only)], f"{read_only} is not writable")
    (tmp_path / "file").write_text("x")
    _fails_with_one_line(capsys, [*argv, str(tmp_path / "file")], "is a file; choose a directory")
    assert loads == []  # no data loaded, no epoch trained


def test_cli_recipe_that_is_a_directory_or_binary(tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path / "o"), "--recipe"]
    _fails_with_one_line(capsys, [*argv, str(tmp_path)], "is not a file")
    (tmp_path / "model.pt").write_bytes(bytes(range(256)) * 8)
    _fails_with_one_line(capsys, [*argv, str(tmp_path / "model.pt")], "not a text file")


def test_cli_nm_pattern_override_as_in_the_readme(tmp_path, capsys, tiny):
    """``--set pruning.pattern=2:4`` (YAML 1.1: the integer 124) trains a 2:4 model."""
    recipe, _ = tiny
    out = tmp_path / "o"
    argv = ["train", "--recipe", str(recipe), "--out", str(out), "--quiet"]
    pruning = ["pruning.method=gmp", "pruning.sparsity=0.5", "pruning.pattern=2:4"]
    assert main([*argv, *[a for p in pruning for a in ("--set", p)]]) == 0
    w = torch.load(out / "model.pt", weights_only=True)["fc1.weight"]
    assert (w.reshape(-1, 4) != 0).sum(1).eq(2).all()  # two nonzeros in every group of four
