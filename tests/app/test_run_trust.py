"""Runs you can trust: the bad inputs and reruns a user tried, each one line, files untouched."""

import json
import math
import re

import pytest
import torch
import yaml

from prunekit.cli.main import main
from prunekit.serialization import read_sparse_metadata

DATA = {"name": "mnist", "train_subset": 512, "test_subset": 256, "batch_size": 64}


def _recipe_file(path, **sections):
    path.write_text(
        yaml.safe_dump({"model": "lenet300_100", "data": DATA, "epochs": 1, **sections})
    )
    return path


def _files(directory):
    """Every file under ``directory`` with its bytes (what "unchanged" means)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def _one_line(capsys, pattern):
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("prunekit: error:") and re.search(pattern, err), err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dense and a GMP (``pruning:``) run, trained by ``prunekit train``."""
    root = tmp_path_factory.mktemp("runs")
    dense = _recipe_file(root / "dense.yaml")
    gmp = _recipe_file(root / "gmp.yaml", pruning={"method": "gmp", "sparsity": 0.8})
    for recipe in (dense, gmp):
        out = root / recipe.stem
        assert main(["train", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    return root


def _compress_file(path, model, **extra):
    spec = {
        "model": model,
        "calibration": {"samples": 128, "batch_size": 64},
        "compress": {"method": "sparsegpt", "sparsity": 0.5},
        **extra,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("source", ["dense", "gmp"])
def test_compress_reads_dense_and_pruning_runs_and_records_their_recipe(tmp_path, runs, source):
    """A ``pruning:`` run used to be refused ("either 'pruning' or 'structured'": the recorded
    ``structured: null`` was read back as HESSO), and a dense run's compressed model recorded
    ``structured: {optimizer: hesso}``."""
    recipe = _compress_file(tmp_path / "c.yaml", {"run": str(runs / source)})
    out = tmp_path / "out"
    assert main(["compress", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    recorded = read_sparse_metadata(out / "model_sparse.pt")["recipe"]
    trained = read_sparse_metadata(runs / source / "model_sparse.pt")["recipe"]
    assert recorded["structured"] is None and recorded == trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_sparsity"] >= 0.5 - 0.01
    expected_input = 0.8 if source == "gmp" else 0.0
    assert metrics["input_global_sparsity"] == pytest.approx(expected_input, abs=0.01)
    report = (out / "report.md").read_text()
    assert f"input model ({100 * metrics['input_global_sparsity']:.2f}% sparse)" in report
    assert "dense test accuracy" not in report  # the input of a pruning run is not dense


def test_a_run_into_what_it_reads_is_refused_even_with_overwrite(
    tmp_path, runs, capsys, monkeypatch
):
    """``compress`` or ``train`` whose ``--out`` is (or holds) its own source would replace it."""
    before = _files(runs / "dense")
    monkeypatch.chdir(runs)
    weights = {"name": "lenet300_100", "weights": str(runs / "dense" / "model.pt")}
    for model, out in (
        ({"run": str(runs / "dense")}, str(runs / "dense")),
        ({"run": "dense"}, str(runs / "dense")),  # relative source, absolute --out
        (weights, "dense"),  # a weights file inside --out
    ):
        recipe = _compress_file(tmp_path / "c.yaml", model, data=DATA)
        for overwrite in ([], ["--overwrite"]):
            assert main(["compress", "--recipe", str(recipe), "--out", out, *overwrite]) == 2
            _one_line(capsys, "holds what this run reads \\(model.(run|weights) ")
    train = _recipe_file(tmp_path / "t.yaml", pruning={"method": "constant"})
    argv = ["train", "--recipe", str(train), "--out", "dense", "--set", "model={run: dense}"]
    assert main([*argv, "--overwrite"]) == 2
    _one_line(capsys, "holds what this run reads \\(model.run dense\\)")
    assert _files(runs / "dense") == before


def test_overwrite_then_a_failure_leaves_the_old_run_as_it_was(tmp_path, runs, capsys):
    """``--overwrite`` sets the old outputs aside; a new run failing before its first checkpoint
    (bad weights, a bad compress config) puts them back."""
    out = tmp_path / "out"
    recipe = _compress_file(tmp_path / "c.yaml", {"run": str(runs / "dense")})
    assert main(["compress", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    before = _files(out)
    bad = ["--set", "compress.ignore=[nosuch]", "--overwrite", "--quiet"]
    assert main(["compress", "--recipe", str(recipe), "--out", str(out), *bad]) == 2
    _one_line(capsys, "matched no")
    assert _files(out) == before
    train = ["train", "--recipe", str(runs / "dense.yaml"), "--out", str(out), "--overwrite"]
    assert main([*train, "--set", "model.weights=nowhere.pt"]) == 2
    _one_line(capsys, "model.weights nowhere.pt not found")
    assert _files(out) == before
    assert main([*train, "--set", "model.kwargs.depth=3"]) == 2  # found when the model is built
    _one_line(capsys, "refuses model.kwargs")
    assert _files(out) == before


def test_train_into_a_compress_output_is_refused_unless_overwrite(tmp_path, runs, capsys):
    recipe = _compress_file(tmp_path / "c.yaml", {"run": str(runs / "dense")})
    out = tmp_path / "out"
    assert main(["compress", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    before = _files(out)
    train = ["train", "--recipe", str(runs / "dense.yaml"), "--out", str(out), "--quiet"]
    assert main(train) == 2
    _one_line(capsys, "holds a compress run \\(.*model.pt.*\\), not a train run; choose another")
    assert _files(out) == before
    assert main([*train, "--overwrite"]) == 0
    assert not (out / "layer_error.png").exists()  # the compress run's outputs are gone
    assert (out / "accuracy.png").exists()


def test_a_complete_run_is_left_as_it_is_and_another_recipe_is_refused(runs, capsys):
    out = runs / "gmp"
    before = _files(out)
    argv = ["train", "--recipe", str(runs / "gmp.yaml"), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert "left as they are" in capsys.readouterr().out
    assert main([*argv, "--set", "name=renamed"]) == 0  # a name changes nothing
    assert "left as they are" in capsys.readouterr().out
    assert main([*argv, "--set", "optimizer.lr=0.01"]) == 2
    _one_line(capsys, "holds a complete run that differs \\(recipe.optimizer.lr 0.1 -> 0.01")
    assert _files(out) == before


def test_a_complete_compress_read_through_another_path_is_the_same_run(
    tmp_path, runs, capsys, monkeypatch
):
    monkeypatch.chdir(runs)
    out = tmp_path / "out"
    for source in (str(runs / "dense"), "dense"):
        recipe = _compress_file(tmp_path / "c.yaml", {"run": source})
        assert main(["compress", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    assert "left as they are" in capsys.readouterr().out.splitlines()[-1]


def test_a_damaged_metrics_file_of_a_complete_run_is_one_line(tmp_path, runs, capsys):
    out = tmp_path / "copy"
    out.mkdir()
    for f in (runs / "dense").iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    (out / "metrics.json").write_text("{bad")
    argv = ["train", "--recipe", str(runs / "dense.yaml"), "--out", str(out), "--quiet"]
    assert main(argv) == 2
    _one_line(capsys, "metrics.json is missing or damaged .* pass --overwrite")


def test_a_run_directory_with_damaged_metadata_is_one_line_naming_the_file(tmp_path, runs, capsys):
    import torch as t

    from prunekit.serialization import load_sparse, save_sparse

    state = load_sparse(runs / "dense" / "model_sparse.pt")
    meta = read_sparse_metadata(runs / "dense" / "model_sparse.pt")
    cases = {
        "kwargs": {**meta, "kwargs": [1, 2]},
        "name": {**meta, "model": "resnet9000"},
        "recipe": {**meta, "recipe": {**meta["recipe"], "optimizer": {"betas": 1}}},
    }
    for name, bad in cases.items():
        run = tmp_path / name
        run.mkdir()
        save_sparse(state, run / "model_sparse.pt", bad)
        recipe = _compress_file(tmp_path / "c.yaml", {"run": str(run)})
        assert main(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
        _one_line(capsys, f"{re.escape(str(run / 'model_sparse.pt'))} records")
    del t


def test_a_pruning_runs_checkpoint_is_accepted_as_weights_with_its_masks_applied(tmp_path, runs):
    """A training checkpoint holds each weight and its mask: the model computes with w ⊙ m."""
    ckpt = runs / "gmp" / "checkpoint.pt"
    model_section = {"name": "lenet300_100", "weights": str(ckpt)}
    recipe = _compress_file(tmp_path / "c.yaml", model_section, data=DATA)
    out = tmp_path / "out"
    assert main(["compress", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    trained = json.loads((runs / "gmp" / "metrics.json").read_text())
    assert metrics["input_global_sparsity"] == pytest.approx(trained["global_sparsity"], abs=1e-6)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory, runs):
    """Every kind of wrong ``model.weights`` file a user tried."""
    root = tmp_path_factory.mktemp("weights")
    good = torch.load(runs / "dense" / "model.pt", weights_only=True)
    (root / "recipe.yaml").write_text("model: lenet300_100\n")
    (root / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    torch.save(torch.nn.Linear(2, 2), root / "module.pt")
    torch.save(good, root / "full.pt")
    (root / "truncated.pt").write_bytes((root / "full.pt").read_bytes()[:5000])
    torch.save({k: v for k, v in good.items() if k != "fc3.bias"}, root / "missing.pt")
    torch.save({**good, "fc1.weight": good["fc1.weight"][:, :100]}, root / "shape.pt")
    nan = dict(good)
    nan["fc2.weight"] = good["fc2.weight"].clone()
    nan["fc2.weight"][0, :3] = math.nan
    torch.save(nan, root / "nan.pt")
    torch.save([1, 2, 3], root / "list.pt")
    return root


@pytest.mark.parametrize(
    ("name", "model", "message"),
    [
        ("recipe.yaml", "lenet300_100", "cannot be read as a state dict: it is truncated"),
        ("garbage.pt", "lenet300_100", "cannot be read as a state dict: it is truncated"),
        ("module.pt", "lenet300_100", "holds pickled Python objects .*save model.state_dict"),
        ("truncated.pt", "lenet300_100", "cannot be read as a state dict: it is truncated"),
        ("missing.pt", "lenet300_100", "does not fit model 'lenet300_100' \\(missing fc3.bias\\)"),
        ("shape.pt", "lenet300_100", "fc1.weight is \\[300, 100\\] in the file, \\[300, 784\\]"),
        ("full.pt", "lenet5_caffe", "does not fit model 'lenet5_caffe' \\(missing conv1.weight"),
        ("nan.pt", "lenet300_100", "tensor 'fc2.weight' has 3 non-finite value"),
        ("list.pt", "lenet300_100", "is not a state dict .*found list"),
        ("absent.pt", "lenet300_100", "not found"),
    ],
)
def test_bad_weights_files_are_one_line_and_leave_no_out(
    tmp_path, weight_files, capsys, name, model, message
):
    path = weight_files / name
    before = _files(weight_files)
    model_section = {"name": model, "weights": str(path)}
    recipe = _compress_file(tmp_path / "c.yaml", model_section, data=DATA)
    out = tmp_path / "out"
    assert main(["compress", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 2
    _one_line(capsys, f"model.weights {re.escape(str(path))}:? .*{message}")
    assert not out.exists()  # no empty --out left behind
    assert _files(weight_files) == before


def test_a_prunekit_model_file_is_accepted_as_weights(tmp_path, runs):
    """``model_sparse.pt`` is a model file too: it loads (the dense weights, exactly)."""
    model_section = {"name": "lenet300_100", "weights": str(runs / "gmp" / "model_sparse.pt")}
    recipe = _compress_file(tmp_path / "c.yaml", model_section, data=DATA)
    out = tmp_path / "out"
    assert main(["compress", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    trained = json.loads((runs / "gmp" / "metrics.json").read_text())
    assert metrics["input_test_accuracy"] == trained["test_accuracy"]


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu0", "device 'gpu0' is not a device name"), ("cuda:7", "not available on this machine")],
)
def test_compress_on_a_device_this_machine_lacks_is_one_line(
    tmp_path, runs, capsys, device, message
):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has cuda:7")
    recipe = _compress_file(tmp_path / "c.yaml", {"run": str(runs / "dense")})
    argv = ["compress", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--device", device]
    assert main(argv) == 2
    _one_line(capsys, message)
    assert not (tmp_path / "o").exists()


def test_a_failed_compress_leaves_no_out_and_no_partial_files(tmp_path, runs, capsys, monkeypatch):
    """A failure after the model was compressed (here: writing the report) removes what the run
    wrote and the directory it created."""
    import prunekit.app.compression as compression

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(compression.CompressionReport, "table", boom)
    recipe = _compress_file(tmp_path / "c.yaml", {"run": str(runs / "dense")})
    out = tmp_path / "out"
    assert main(["compress", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 2
    _one_line(capsys, "disk full")
    assert not out.exists()


def test_structured_run_report_and_outputs_line(tmp_path, capsys):
    """The structured run's report has no "target sparsity 0.00%", and the outputs line names
    ``slim/`` and ``model.pt``."""
    recipe = tmp_path / "s.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": "resnet20",
                "data": {**DATA, "train_subset": 128, "test_subset": 64},
                "structured": {"optimizer": "hesso", "target_group_sparsity": 0.3, "start": 0.1},
                "epochs": 1,
            }
        )
    )
    out = tmp_path / "out"
    assert main(["train", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    for name in ("model.pt", "model_sparse.pt", "metrics.json", "report.md", "slim/"):
        assert name in line, line
    report = (out / "report.md").read_text()
    assert "target sparsity" not in report and "Structured pruning" in report
    assert json.loads((out / "metrics.json").read_text())["target_sparsity"] is None
