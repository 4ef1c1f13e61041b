"""``prunekit compress``: a trained run directory in, a compressed model and its report out."""

import json

import pytest
import torch
import yaml

from prunekit.cli.main import main
from prunekit.posttrain.export import load_quantized
from prunekit.serialization import load_sparse

TINY_DATA = {"name": "mnist", "train_subset": 512, "test_subset": 256, "batch_size": 64}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dense LeNet-300-100 trained for one epoch on 512 images by `prunekit train`."""
    root = tmp_path_factory.mktemp("dense")
    path = root / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "lenet300_100", "data": TINY_DATA, "epochs": 1}))
    assert main(["train", "--recipe", str(path), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


def _recipe(tmp_path, trained, compress, **extra):
    path = tmp_path / "c.yaml"
    data = {
        "model": {"run": str(trained)},
        "calibration": {"samples": 256, "batch_size": 64},
        "compress": compress,
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_compress_writes_the_model_exports_report_and_plot(tmp_path, trained, capsys):
    path = _recipe(tmp_path, trained, {"method": "sparsegpt", "sparsity": 0.5, "bits": 4})
    out = tmp_path / "out"
    assert main(["compress", "--recipe", str(path), "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert 0.5 < metrics["test_accuracy"] <= 1.0
    assert len(metrics["report"]["layers"]) == 3
    state = torch.load(out / "model.pt", weights_only=True)
    for k, v in load_sparse(out / "model_sparse.pt").items():
        assert torch.equal(v, state[k]), k
    for k, v in load_quantized(out / "model_quantized.pt").items():
        assert torch.equal(v, state[k]), k
    for row in state["fc1.weight"]:
        assert len(torch.unique(row)) <= 16
    report = (out / "report.md").read_text()
    assert "| fc1.weight | 300×784 |" in report
    assert (out / "layer_error.png").read_bytes()[:4] == b"\x89PNG"
    assert '"test_accuracy"' in capsys.readouterr().out


def test_compress_then_sparse_finetune_keeps_the_zeros(tmp_path, trained):
    path = _recipe(
        tmp_path,
        trained,
        {"method": "wanda", "sparsity": 0.7},
        finetune={"epochs": 1, "lr": 0.01},
    )
    out = tmp_path / "out"
    assert main(["compress", "--recipe", str(path), "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finetuned_global_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert "finetuned_test_accuracy" in metrics


@pytest.mark.parametrize(
    ("compress", "extra", "message"),
    [
        ({"method": "sparsegpt", "sparsity": 0.5, "blok_size": 64}, {}, "unknown key 'blok_size'"),
        ({"method": "sparsegpd", "sparsity": 0.5}, {}, "available: "),
        ({"method": "gptq", "bits": 12}, {}, "bits must be an integer in \\[2, 8\\]"),
        ({"method": "sparsegpt", "sparsity": 0.5}, {"calibrate": {}}, "unknown key 'calibrate'"),
        ({"method": "sparsegpt", "sparsity": 0.5, "ignore": ["fc9"]}, {}, "matched no"),
        ({"method": "gptq", "bits": 4}, {"finetune": {"epochs": 1}}, "off the grid"),
        ({"method": "wanda", "sparsity": 0.5}, {"finetune": {"batch_size": 0}}, "batch_size"),
        ({"method": "mfac", "sparsity": 0.5, "ngrads": 9999}, {}, "ngrads"),
    ],
)
def test_bad_compress_recipes_exit_2_naming_the_key(
    tmp_path, trained, capsys, compress, extra, message
):
    path = _recipe(tmp_path, trained, compress, **extra)
    assert main(["compress", "--recipe", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunekit: error:")
    import re

    assert re.search(message, err), err


def test_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    path = _recipe(tmp_path, tmp_path / "nothing", {"method": "sparsegpt", "sparsity": 0.5})
    assert main(["compress", "--recipe", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "prunekit train" in capsys.readouterr().err


def test_a_recipe_that_is_not_text_or_not_yaml_is_one_line(tmp_path, capsys):
    for name, content in (("bin.yaml", b"\x00\x01\xff"), ("bad.yaml", b"model: [unclosed\n")):
        path = tmp_path / name
        path.write_bytes(content)
        assert main(["compress", "--recipe", str(path), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("prunekit: error: recipe") and "Traceback" not in err
