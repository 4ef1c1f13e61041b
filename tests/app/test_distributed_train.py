"""Data-parallel ``prunekit train``: sharding, averaged gradients, rank-0 files, exact resume.

Two spawns: one 2-rank process group runs every ``train`` call the checks need (a sparse CrAM run,
the same run interrupted and resumed, a dense SGD run), and ``prunekit train --nproc 2`` starts its
own ranks once.
"""

import io
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from prunekit.app import NonFiniteLossError, recipe_from_dict, train
from prunekit.cli.main import main
from prunekit.config import ConfigError
from prunekit.data import ArrayDataset, BatchIterator, load_dataset
from prunekit.data.datasets import shard_indices
from prunekit.distributed import run_workers
from prunekit.models import build_model
from tests.helpers import NanGradient

SEED, BATCH, LR, EPOCHS = 1, 16, 0.05, 2
DATA = {"name": "mnist1d", "num_samples": 400, "batch_size": BATCH}
TOPK = {"method": "topk", "ratio": 0.1}


def _sparse_recipe() -> dict:
    """CrAM: its closure makes a second forward/backward through the DDP wrapper every step."""
    return {
        "model": {"name": "lenet300_100"},
        "data": DATA,
        "pruning": {"method": "cram", "sparsity": 0.8},
        "optimizer": {"name": "sgd", "lr": LR, "momentum": 0.9, "weight_decay": 1e-4},
        "epochs": EPOCHS,
        "seed": SEED,
    }


def _dense_recipe() -> dict:
    """Plain SGD at a constant learning rate: one step is ``w -= lr * g`` with ``g`` the gradient
    of the mean loss of the (global) batch."""
    return {
        "model": {"name": "lenet300_100"},
        "data": DATA,
        "optimizer": {"name": "sgd", "lr": LR, "momentum": 0.0, "weight_decay": 0.0},
        "lr_schedule": {"name": "constant"},
        "epochs": EPOCHS,
        "seed": SEED,
    }


def _structured_recipe() -> dict:
    """HESSO on a batch-norm ResNet: group-sparse steps on the all-reduced gradients."""
    return {
        "model": {"name": "resnet20"},
        "data": {"name": "mnist", "batch_size": 16},
        "structured": {"optimizer": "hesso", "target_group_sparsity": 0.5, "start": 0.2},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "epochs": 2,
        "seed": SEED,
    }


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist1d", num_samples=400, seed=SEED)


def _state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ranks(rank, world_size, data, images, root):
    """Every train() call of the checks, in one 2-rank process group; returns what each rank saw."""
    import prunekit.app.loop as trainer
    import prunekit.app.training as train_module

    writes: list[str] = []  # files this rank put in place (the atomic helpers end in os.replace)
    real_replace = os.replace

    def replace(src, dst):
        writes.append(os.path.basename(dst))
        real_replace(src, dst)

    os.replace = replace
    finals = {}  # each run's final model on this rank, keyed by its out directory
    real_finish = train_module.finish

    def finish(*args):
        metrics = real_finish(*args)
        finals[os.path.basename(args[5].path)] = _state(args[2].model)
        return metrics

    train_module.finish = finish
    sparse, dense = recipe_from_dict(_sparse_recipe()), recipe_from_dict(_dense_recipe())
    quiet = {"progress": False, "data": data, "device": "cpu"}
    full = train(sparse, f"{root}/full", **quiet)
    part = train(sparse, f"{root}/part", stop_after_epoch=1, **quiet)
    resumed = train(sparse, f"{root}/part", **quiet)
    dense_metrics = train(dense, f"{root}/dense", **quiet)
    # top-k with error feedback: each rank's residual must survive the interruption
    topk = recipe_from_dict({**_dense_recipe(), "communication": TOPK})
    topk_full = train(topk, f"{root}/topk_full", **quiet)
    train(topk, f"{root}/topk_part", stop_after_epoch=1, **quiet)
    topk_resumed = train(topk, f"{root}/topk_part", **quiet)
    train(recipe_from_dict(_structured_recipe()), f"{root}/structured", **{**quiet, "data": images})
    train(dense, f"{root}/interrupted", stop_after_epoch=1, **quiet)  # left unfinished at W=2
    # a NaN loss on rank 1 alone must stop both ranks (alone, rank 1 would leave rank 0 hanging)
    real_loss, calls = trainer.F.cross_entropy, []

    def loss(*args, **kwargs):
        calls.append(1)
        nan = rank == 1 and len(calls) == 3
        return real_loss(*args, **kwargs) * (math.nan if nan else 1.0)

    trainer.F.cross_entropy = loss
    try:
        train(dense, f"{root}/nan", **quiet)
        stopped = "not stopped"
    except NonFiniteLossError as exc:
        stopped = str(exc)
    # a finite loss whose gradient is NaN on rank 1 alone, under QSGD: both ranks skip that step
    calls.clear()

    def nan_gradient(*args, **kwargs):
        calls.append(1)
        out = real_loss(*args, **kwargs)
        return NanGradient.apply(out) if rank == 1 and len(calls) == 3 else out

    trainer.F.cross_entropy = nan_gradient
    qsgd = recipe_from_dict({**_dense_recipe(), "communication": {"method": "qsgd"}})
    skipped = train(qsgd, f"{root}/skipped", **quiet)
    trainer.F.cross_entropy = real_loss
    # tensors as bytes: a tensor sent through the result queue is shared memory whose owner (this
    # process) may have exited before the parent reads it
    buffer = io.BytesIO()
    torch.save(finals, buffer)
    return {
        "writes": writes,
        "finals": buffer.getvalue(),
        "metrics": (full, part, resumed, dense_metrics),
        "topk": (topk_full, topk_resumed),
        "stopped": stopped,
        "skipped": skipped,
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("ddp")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    images = ArrayDataset("mnist", x, y, x[:32], y[:32], 10)
    results = run_workers(_ranks, 2, data, images, str(root))
    for r in results:
        r["finals"] = torch.load(io.BytesIO(r["finals"]))
    return root, results


def test_shards_are_disjoint_and_cover_the_epoch():
    for n, world in ((64, 2), (10, 3), (7, 2)):
        for epoch in (0, 1):
            shards = [
                shard_indices(n, seed=SEED, epoch=epoch, rank=r, world_size=world)
                for r in range(world)
            ]
            per_rank = -(-n // world)
            assert all(len(s) == per_rank for s in shards)  # equal steps on every rank
            flat = torch.cat(shards).tolist()
            assert set(flat) == set(range(n))  # the union is the epoch's data
            assert len(flat) - len(set(flat)) == per_rank * world - n  # only padding repeats
            again = shard_indices(n, seed=SEED, epoch=epoch, rank=0, world_size=world)
            assert torch.equal(again, shards[0])  # a function of (seed, epoch, rank) only
        other = shard_indices(64, seed=SEED, epoch=1, rank=0, world_size=2)
        assert not torch.equal(other, shard_indices(64, seed=SEED, epoch=0, rank=0, world_size=2))
    # the batch iterator of each rank serves its shard: batches of an epoch disjoint, union = data
    x = torch.arange(64).float()
    iters = [BatchIterator(x, x, 8, seed=SEED, rank=r, world_size=2) for r in range(2)]
    assert len(iters[0]) == len(iters[1]) == 4
    seen = [torch.cat([xb for xb, _ in it.epoch(3)]).long().tolist() for it in iters]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(64))


def test_two_ranks_write_the_single_process_files_once(two_ranks, data, tmp_path):
    root, (r0, r1) = two_ranks
    single = train(
        recipe_from_dict(_sparse_recipe()), tmp_path, progress=False, data=data, device="cpu"
    )
    assert sorted(os.listdir(root / "full")) == sorted(os.listdir(tmp_path))
    assert r1["writes"] == []  # rank 1 wrote nothing
    assert {"checkpoint.pt", "model.pt", "metrics.json", "report.md"} <= set(r0["writes"])
    metrics = json.loads((root / "full" / "metrics.json").read_text())
    assert metrics.keys() == single.keys()
    assert (metrics["world_size"], metrics["global_batch_size"]) == (2, 2 * BATCH)
    assert (single["world_size"], single["global_batch_size"]) == (1, BATCH)
    assert metrics["steps"] == EPOCHS * -(-len(data.x_train) // (2 * BATCH))
    assert r0["metrics"][0] == r1["metrics"][0]  # every rank returns rank 0's metrics
    saved = torch.load(root / "full" / "model.pt")
    for run in ("full", "part", "dense", "structured"):
        a, b = r0["finals"][run], r1["finals"][run]
        for k in a:
            assert torch.equal(a[k], b[k]), (run, k)  # the replicas end bitwise identical
    for k in saved:
        assert torch.equal(saved[k], r0["finals"]["full"][k]), k
    assert metrics["global_sparsity"] == pytest.approx(0.8, abs=0.01)


def test_interrupted_two_rank_run_resumes_bitwise(two_ranks):
    root, (r0, r1) = two_ranks
    full, part, resumed, _ = r0["metrics"]
    assert part["stopped_after_epoch"] == 1
    assert resumed["history"] == full["history"]
    for rank in (r0, r1):
        for k, v in rank["finals"]["full"].items():
            assert torch.equal(v, rank["finals"]["part"][k]), k
    a, b = torch.load(root / "full" / "model.pt"), torch.load(root / "part" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compressed_run_records_its_traffic_and_resumes_with_each_ranks_residual(two_ranks):
    """The recipe's ``communication`` section compresses the exchange; the checkpoint keeps every
    rank's own top-k residual, so an interrupted run resumes to the uninterrupted one bitwise."""
    root, (r0, r1) = two_ranks
    full, resumed = r0["topk"]
    comm = full["communication"]
    assert comm["method"] == "topk" and comm["mode"] == "allgather"
    # fp32 ring all-reduce at W=2 sends 4 bytes per value; top-k 10% sends 8 bytes (int32 index
    # + float32 value) per kept value to the one other rank: 4 / (0.1 * 8) = 5x
    assert comm["compression"] == pytest.approx(5.0, rel=0.02)
    assert resumed["history"] == full["history"]
    for rank in (r0, r1):
        for k, v in rank["finals"]["topk_full"].items():
            assert torch.equal(v, rank["finals"]["topk_part"][k]), k
    saved = torch.load(root / "topk_part" / "checkpoint.pt", weights_only=False)["communication"]
    assert len(saved) == 2  # one state per rank


def test_two_ranks_of_batch_b_equal_one_process_of_batch_2b(two_ranks, data):
    """DDP averages the ranks' gradients: ``(g_0 + g_1) / 2`` is the gradient of the mean loss over
    the union of their batches, so the 2-rank run is plain SGD on those 2b-example batches."""
    _, (r0, _) = two_ranks
    torch.manual_seed(SEED)
    model = build_model("lenet300_100", data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    n, losses = len(data.x_train), []
    for epoch in range(EPOCHS):
        shards = [shard_indices(n, seed=SEED, epoch=epoch, rank=r, world_size=2) for r in (0, 1)]
        epoch_losses = []
        for start in range(0, len(shards[0]), BATCH):
            idx = torch.cat([s[start : start + BATCH] for s in shards])
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch_losses.append(float(loss.detach()))
        losses.append(sum(epoch_losses) / len(epoch_losses))
    ddp = r0["finals"]["dense"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)
    history = r0["metrics"][3]["history"]
    # the logged loss is the mean over both ranks' batches, the accuracy over the whole test set
    assert [h["train_loss"] for h in history] == pytest.approx(losses, rel=1e-5)
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    assert abs(history[-1]["test_accuracy"] - acc) <= 1 / len(data.x_test)


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def test_cli_nproc_trains_end_to_end(tmp_path, capsys):
    recipe = {**_dense_recipe(), "epochs": 1, "pruning": {"method": "gmp", "sparsity": 0.5}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    argv = ["train", "--recipe", str(path), "--out", str(out), "--quiet", "--device", "cpu"]
    assert main([*argv, "--nproc", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["global_batch_size"]) == (2, 2 * BATCH)
    assert metrics["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "test_accuracy" in capsys.readouterr().out
    # the complete 2-rank run, run again without --nproc: left as it is (metrics.json used to be
    # rewritten with world_size 1 and the traffic record deleted)
    before = _files(out)
    assert main(argv) == 0
    assert "left as they are" in capsys.readouterr().out
    assert _files(out) == before
    # ... and with another learning rate: another run, refused, files unchanged
    assert main([*argv, "--set", "optimizer.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "recipe.optimizer.lr 0.05 -> 0.01" in err and err.count("\n") == 1, err
    assert _files(out) == before


def test_an_interrupted_two_rank_run_resumes_only_with_two_ranks(
    two_ranks, data, tmp_path, capsys, monkeypatch
):
    """Resuming at another world size would cut the schedule short (and a top-k run would index
    residuals of ranks that do not exist): refused, in one line, before any rank starts."""
    root, _ = two_ranks
    run = root / "interrupted"
    before = _files(run)
    with pytest.raises(ConfigError, match=r"interrupted at world size 2.*--nproc 2"):
        train(recipe_from_dict(_dense_recipe()), run, progress=False, device="cpu", data=data)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_dense_recipe()))
    argv = ["train", "--recipe", str(path), "--out", str(run), "--quiet", "--device", "cpu"]
    import prunekit.distributed as distributed

    spawned = []
    monkeypatch.setattr(distributed, "run_workers", lambda *a, **k: spawned.append(a))
    assert main([*argv, "--nproc", "3"]) == 2
    assert spawned == []  # refused by the launcher, before any rank starts
    err = capsys.readouterr().err
    assert (
        "interrupted at world size 2 (checkpoint.pt); resume it with 2 ranks (--nproc 2), not 3"
        in err
    )
    assert err.count("\n") == 1 and "Traceback" not in err
    assert _files(run) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--nproc", "0"], "--nproc must be >= 1"),
        (["--nproc", "2", "--device", "cuda"], "needs one GPU per rank"),
    ],
)
def test_cli_nproc_errors_are_one_line(tmp_path, capsys, monkeypatch, extra, message):
    import prunekit.app.launch as launch

    # a machine with one GPU, whatever this one has
    monkeypatch.setattr(launch, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_dense_recipe()))
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before anything was created or spawned


def test_cli_nproc_beyond_the_cores_is_one_line_before_spawning(tmp_path, capsys, monkeypatch):
    import prunekit.distributed as distributed

    spawned = []
    monkeypatch.setattr(distributed, "run_workers", lambda *a, **k: spawned.append(a))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_dense_recipe()))
    argv = ["train", "--recipe", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main([*argv, "--nproc", "1000"]) == 2
    err = capsys.readouterr().err
    assert "--nproc 1000 on" in err and "use at most" in err and err.count("\n") == 1
    assert spawned == [] and not (tmp_path / "o").exists()


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(two_ranks):
    _, (r0, r1) = two_ranks
    assert "loss is nan at epoch 1, step 2" in r0["stopped"]
    assert r0["stopped"] == r1["stopped"]


def test_structured_two_rank_run_writes_the_slim_model(two_ranks):
    """HESSO through DDP; batch norm statistics end identical on both ranks (rank 0's)."""
    root, (r0, r1) = two_ranks
    metrics = json.loads((root / "structured" / "metrics.json").read_text())
    assert (root / "structured" / "slim").is_dir() and metrics["world_size"] == 2
    assert metrics["group_sparsity"] == pytest.approx(0.5, abs=0.05)
    a, b = r0["finals"]["structured"], r1["finals"]["structured"]
    assert any("running_mean" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(two_ranks):
    """Under QSGD, rank 1's NaN gradient is agreed on: both ranks skip that optimizer step (the
    replicas stay identical and finite), the run goes on, and the skip is counted."""
    root, (r0, r1) = two_ranks
    for rank in (r0, r1):
        assert rank["skipped"]["skipped_steps"] == 1
        assert rank["skipped"]["communication"]["method"] == "qsgd"
    a, b = r0["finals"]["skipped"], r1["finals"]["skipped"]
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.isfinite(a[k]).all(), k
    saved = torch.load(root / "skipped" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], a[k]) for k in saved)
