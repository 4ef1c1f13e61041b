"""The README's flow, end to end in one directory: train dense and sparse, compress, then train
from the compressed model with ``constant`` (its zeros kept); every output checked."""

import json

import torch
import yaml

from prunekit.cli.main import main
from prunekit.serialization import load_sparse, read_sparse_metadata

DATA = {"name": "mnist", "train_subset": 512, "test_subset": 256, "batch_size": 64}
TRAIN_OUTPUTS = {
    "model.pt",
    "model_sparse.pt",
    "metrics.json",
    "report.md",
    "accuracy.png",
    "layer_sparsity.png",
    "checkpoint.pt",
    "run.json",
}
COMPRESS_OUTPUTS = {
    "model.pt",
    "model_sparse.pt",
    "metrics.json",
    "report.md",
    "layer_error.png",
    "run.json",
}


def _write(path, spec):
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _check_outputs(out, expected, sparsity):
    """The files a run writes, each readable and consistent with the others."""
    assert {p.name for p in out.iterdir()} == expected
    for png in [n for n in expected if n.endswith(".png")]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    metrics = json.loads((out / "metrics.json").read_text())
    state = torch.load(out / "model.pt", weights_only=True)
    sparse = load_sparse(out / "model_sparse.pt")
    assert state.keys() == sparse.keys()
    assert all(torch.equal(state[k], sparse[k]) for k in state)
    weights = [v for k, v in state.items() if v.dim() > 1]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - metrics["global_sparsity"]) < 1e-6  # the metric is the file's
    assert abs(zeros - sparsity) <= 0.01, (zeros, sparsity)
    assert metrics["sparse_file_bytes"] == (out / "model_sparse.pt").stat().st_size
    if sparsity >= 0.5:  # the export is smaller than the dense file
        assert metrics["sparse_file_bytes"] < 0.6 * (out / "model.pt").stat().st_size
    report = (out / "report.md").read_text()
    assert f"{100 * metrics['test_accuracy']:.2f}%" in report
    return metrics, state


def test_train_compress_and_train_again_from_the_compressed_model(tmp_path, capsys):
    base = {"model": "lenet300_100", "data": DATA, "epochs": 1, "seed": 0}
    dense = _write(tmp_path / "dense.yaml", base)
    dpf = _write(tmp_path / "dpf.yaml", {**base, "pruning": {"method": "dpf", "sparsity": 0.9}})
    for name, recipe in (("dense", dense), ("dpf", dpf)):
        argv = ["train", "--recipe", recipe, "--out", str(tmp_path / name), "--quiet"]
        assert main(argv) == 0
        assert f"outputs in {tmp_path / name}: " in capsys.readouterr().out
    _check_outputs(tmp_path / "dense", TRAIN_OUTPUTS, 0.0)
    dpf_metrics, _ = _check_outputs(tmp_path / "dpf", TRAIN_OUTPUTS, 0.9)
    assert dpf_metrics["target_sparsity"] == 0.9

    compressed = {}
    for source in ("dense", "dpf"):
        recipe = _write(
            tmp_path / f"compress_{source}.yaml",
            {
                "model": {"run": str(tmp_path / source)},
                "calibration": {"samples": 128, "batch_size": 64},
                "compress": {"method": "sparsegpt", "sparsity": 0.5},
            },
        )
        out = tmp_path / f"{source}-sparsegpt"
        assert main(["compress", "--recipe", recipe, "--out", str(out), "--quiet"]) == 0
        expected = 0.5 if source == "dense" else 0.9  # a 90% input stays at least 90% sparse
        metrics, state = _check_outputs(out, COMPRESS_OUTPUTS, expected)
        compressed[source] = state
        assert read_sparse_metadata(out / "model_sparse.pt")["model"] == "lenet300_100"
        assert metrics["input_global_sparsity"] == (0.0 if source == "dense" else 0.9)

    # train again from the compressed model, its zeros fixed (`constant`): a run directory as
    # the model section, the architecture from the run's record
    recipe = _write(
        tmp_path / "finetune.yaml",
        {
            "model": {"run": str(tmp_path / "dense-sparsegpt")},
            "data": DATA,
            "pruning": {"method": "constant"},
            "optimizer": {"name": "sgd", "lr": 0.01},
            "epochs": 1,
        },
    )
    out = tmp_path / "finetuned"
    assert main(["train", "--recipe", recipe, "--out", str(out), "--quiet"]) == 0
    metrics, state = _check_outputs(out, TRAIN_OUTPUTS, 0.5)
    assert metrics["model"] == "lenet300_100" and metrics["target_sparsity"] == 0.0
    before = compressed["dense"]
    for k, w in state.items():
        if w.dim() > 1:
            assert torch.equal(w == 0, before[k] == 0), k  # the same zeros, kept
            assert not torch.equal(w, before[k]), k  # and the rest trained
    # the chain goes on: that run's model file records its architecture too
    assert read_sparse_metadata(out / "model_sparse.pt")["model"] == "lenet300_100"
