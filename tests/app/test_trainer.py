import json
import math

import pytest
import torch

from prunekit.app import (
    CheckpointError,
    NonFiniteLossError,
    load_checkpoint,
    recipe_from_dict,
    train,
)
from prunekit.app.data import load_data
from prunekit.config import ConfigError
from tests.helpers import NanGradient


def _recipe(method="dpf", epochs=3, **pruning):
    return recipe_from_dict(
        {
            "model": {"name": "lenet300_100"},
            "data": {"name": "mnist", "batch_size": 64, "train_subset": 1024, "test_subset": 500},
            "pruning": {"method": method, "sparsity": 0.9, **pruning},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
            "epochs": epochs,
            "seed": 3,
        }
    )


@pytest.fixture(scope="module")
def data():
    recipe = _recipe()
    return load_data(recipe.data, recipe.seed)


@pytest.mark.parametrize("method", ["dpf", "acdc", "rigl", "cram"])
def test_resume_equals_uninterrupted(tmp_path, data, method):
    recipe = _recipe(method)
    full = train(recipe, tmp_path / "full", progress=False, data=data, device="cpu")
    part = train(
        recipe, tmp_path / "part", progress=False, data=data, device="cpu", stop_after_epoch=1
    )
    assert part["stopped_after_epoch"] == 1
    resumed = train(recipe, tmp_path / "part", progress=False, data=data, device="cpu")
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert resumed["history"] == full["history"]
    a = torch.load(tmp_path / "full" / "model.pt")
    b = torch.load(tmp_path / "part" / "model.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_outputs_and_metrics(tmp_path, data):
    m = train(
        _recipe("gmp", epochs=2, update_every=5), tmp_path, progress=False, data=data, device="cpu"
    )
    for name in (
        "model_sparse.pt",
        "model.pt",
        "metrics.json",
        "report.md",
        "accuracy.png",
        "layer_sparsity.png",
    ):
        assert (tmp_path / name).exists(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "method",
        "model",
        "dataset",
        "target_sparsity",
        "global_sparsity",
        "compression",
        "test_accuracy",
        "epochs",
        "wall_seconds",
    ):
        assert key in metrics
    assert metrics["global_sparsity"] == pytest.approx(0.9, abs=0.005)
    assert m["sparse_file_bytes"] < m["model_file_bytes"] / 3
    assert metrics["test_accuracy"] > 0.5


def _patch_loss(monkeypatch, transform):
    """The trainer's loss becomes ``transform(loss, call number)``; returns the real function."""
    import prunekit.app.loop as trainer

    real = trainer.F.cross_entropy
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        return transform(real(*args, **kwargs), calls["n"])

    monkeypatch.setattr(trainer.F, "cross_entropy", patched)
    return real


def test_nan_loss_stops_with_last_good_checkpoint_intact(tmp_path, data, monkeypatch):
    recipe = _recipe("gmp", epochs=3, update_every=5)
    train(recipe, tmp_path, progress=False, data=data, device="cpu", stop_after_epoch=1)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    import prunekit.app.loop as trainer

    real = _patch_loss(monkeypatch, lambda out, n: out * math.nan if n > 5 else out)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train(recipe, tmp_path, progress=False, data=data, device="cpu")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    # what the message says to do: a lower learning rate resumes from that checkpoint
    monkeypatch.setattr(trainer.F, "cross_entropy", real)
    spec = recipe.to_dict()
    spec["optimizer"]["lr"] = recipe.optimizer.lr / 2
    lower = recipe_from_dict({k: v for k, v in spec.items() if v is not None})
    real_step, lrs = torch.optim.SGD.step, []

    def spy(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    m = train(lower, tmp_path, progress=False, data=data, device="cpu")
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    # the resumed steps use the new rate on the same cosine: 0.025 · ½(1 + cos(π t / T))
    steps = 1024 // 64
    expected = [0.025 * 0.5 * (1 + math.cos(math.pi * t / (3 * steps))) for t in (steps, steps + 1)]
    assert lrs[:2] == pytest.approx(expected, rel=1e-12)
    # the outputs say the run was trained at 0.05 for one epoch, then at 0.025
    change = {"epoch": 1, "key": "optimizer.lr", "from": 0.05, "to": 0.025}
    assert m["recipe_changes"] == [change]
    assert "from epoch 2: `optimizer.lr` 0.05 → 0.025" in (tmp_path / "report.md").read_text()


def test_nan_loss_in_the_first_epoch_says_there_is_no_checkpoint(tmp_path, data, monkeypatch):
    import prunekit.app.loop as trainer

    real = trainer.F.cross_entropy
    monkeypatch.setattr(trainer.F, "cross_entropy", lambda *a, **k: real(*a, **k) * math.nan)
    with pytest.raises(NonFiniteLossError, match="no checkpoint"):
        train(_recipe("gmp", epochs=2, update_every=5), tmp_path, progress=False, data=data)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_resume_with_other_recipe_is_refused(tmp_path, data):
    train(
        _recipe("gmp", epochs=2, update_every=5),
        tmp_path,
        progress=False,
        data=data,
        device="cpu",
        stop_after_epoch=1,
    )
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(
        ConfigError,
        match=r"holds an unfinished run that differs \(recipe.pruning.method 'gmp' -> 'dpf'",
    ):
        train(_recipe("dpf", epochs=2), tmp_path, progress=False, data=data, device="cpu")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_acdc_run_writes_dense_pair(tmp_path, data):
    """The pair's dense model is the one the final compressed phase was pruned from (AC/DC, Peste
    et al. 2021): dense, its top-10% magnitudes are exactly the sparse model's support, and the
    reported accuracy is that file's accuracy."""
    from prunekit.models import build_model

    m = train(_recipe("acdc", epochs=2), tmp_path, progress=False, data=data, device="cpu")
    dense = torch.load(tmp_path / "model_dense_pair.pt", weights_only=True)
    final = torch.load(tmp_path / "model.pt", weights_only=True)
    weights = [k for k in final if final[k].dim() > 1]
    d = torch.cat([dense[k].abs().flatten() for k in weights])
    f = torch.cat([final[k].flatten() != 0 for k in weights])
    assert float((d != 0).float().mean()) > 0.99  # dense, not the sparse model saved twice
    assert int(f.sum()) == round(0.1 * f.numel())  # 90% sparse
    top = torch.zeros_like(f)
    top[d.topk(int(f.sum())).indices] = True
    assert torch.equal(top, f)  # global magnitude mask of the dense pair = the final support
    model = build_model("lenet300_100", data.input_shape, data.num_classes)
    model.load_state_dict(dense)
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    assert m["dense_pair_test_accuracy"] == pytest.approx(acc, abs=1e-6)


#: each optimizer's section holds only its own config's keys (HSPG has no end, only HESSO periods)
_SCHEDULES = {
    "hspg": {"start": 0.1, "lambda_": 5.0},
    "dhspg": {"start": 0.1, "end": 0.6},
    "hesso": {"start": 0.1, "end": 0.6, "periods": 2},
}


def _structured_recipe(optimizer="hesso", epochs=2, **extra):
    section = {"optimizer": optimizer, "target_group_sparsity": 0.5, **_SCHEDULES[optimizer]}
    return recipe_from_dict(
        {
            "model": {"name": "resnet20"},
            "data": {"name": "mnist", "batch_size": 64, "train_subset": 256, "test_subset": 200},
            "structured": {**section, **extra},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
            "epochs": epochs,
            "seed": 1,
        }
    )


@pytest.mark.parametrize("optimizer", ["hesso", "dhspg"])
def test_structured_run_writes_an_equivalent_slim_model(tmp_path, data, optimizer):
    from prunekit.models import build_model
    from prunekit.structured.io import load_slim

    m = train(_structured_recipe(optimizer), tmp_path, progress=False, data=data, device="cpu")
    assert abs(m["group_sparsity"] - 0.5) <= 1 / 448 + 1e-9  # within one group of the target
    assert m["params_after"] < m["params_before"] and m["macs_after"] < m["macs_before"]
    assert m["test_accuracy_slim"] == m["test_accuracy_group_sparse"]
    slim_model = load_slim(build_model("resnet20", (1, 28, 28), 10), tmp_path / "slim")
    assert sum(p.numel() for p in slim_model.parameters()) == m["params_after"]
    assert "Structured pruning" in (tmp_path / "report.md").read_text()


def test_structured_run_with_a_flops_target(tmp_path, data):
    m = train(_structured_recipe("hesso", flops_removed=0.6), tmp_path, progress=False, data=data)
    assert m["flops_removed"] >= 0.6  # priced by MACs: the target is met, not a group count
    assert "(target 60.0%)" in (tmp_path / "report.md").read_text()  # the target that drove it
    with pytest.raises(ConfigError, match="flops_removed"):
        _structured_recipe("dhspg", flops_removed=0.6)
    with pytest.raises(ConfigError, match="channel_multiple"):
        _structured_recipe("hesso", channel_multiple=8)  # without a FLOPs target
    with pytest.raises(ConfigError, match="remove_branches"):
        _structured_recipe("hesso", remove_branches=True)  # without a FLOPs target


def test_structured_run_removing_whole_branches(tmp_path, data):
    from prunekit.models import build_model
    from prunekit.structured import FoldedConv
    from prunekit.structured.io import load_slim

    recipe = _structured_recipe(
        "hesso", flops_removed=0.6, channel_multiple=16, remove_branches=True
    )
    m = train(recipe, tmp_path, progress=False, data=data, device="cpu")
    assert m["flops_removed"] >= 0.6
    assert m["test_accuracy_slim"] == m["test_accuracy_group_sparse"]
    slim_model = load_slim(build_model("resnet20", (1, 28, 28), 10), tmp_path / "slim")
    folded = sum(isinstance(x, FoldedConv) for x in slim_model.modules())
    assert folded == m["folded_layers"] > 0  # a removed branch folds its two convolutions
    assert f"{folded} convolutions folded" in (tmp_path / "report.md").read_text()
    widths = [c.out_channels for c in slim_model.modules() if isinstance(c, torch.nn.Conv2d)]
    assert all(w % 16 == 0 for w in widths), widths


def test_structured_resume_equals_uninterrupted(tmp_path, data):
    recipe = _structured_recipe("hesso", epochs=3)
    full = train(recipe, tmp_path / "full", progress=False, data=data, device="cpu")
    train(recipe, tmp_path / "part", progress=False, data=data, device="cpu", stop_after_epoch=1)
    resumed = train(recipe, tmp_path / "part", progress=False, data=data, device="cpu")
    assert resumed["history"] == full["history"]
    assert resumed["params_after"] == full["params_after"]


def test_recipe_cannot_mix_sparse_and_structured():
    from prunekit.config import ConfigError

    with pytest.raises(ConfigError, match="not both"):
        recipe_from_dict({"model": "resnet20", "pruning": {"method": "gmp", "sparsity": 0.5},
                          "structured": {"optimizer": "hesso"}})  # fmt: skip


def test_clip_grad_norm_bounds_every_update(tmp_path, data):
    """With plain SGD (no momentum) each step moves the weights by at most lr · clip."""
    spec = {
        "model": {"name": "lenet300_100"},
        "data": {"name": "mnist", "batch_size": 64, "train_subset": 1024, "test_subset": 500},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "clip_grad_norm": 1e-3},
        "lr_schedule": {"name": "constant"},
        "epochs": 1,
        "seed": 3,
    }
    recipe = recipe_from_dict(spec)
    torch.manual_seed(recipe.seed)
    from prunekit.models import build_model

    before = build_model("lenet300_100", data.input_shape, data.num_classes)
    train(recipe, tmp_path, progress=False, data=data, device="cpu")
    after = torch.load(tmp_path / "model.pt", weights_only=True)
    moved = torch.sqrt(
        sum(((after[k] - v) ** 2).sum() for k, v in before.state_dict().items() if k in after)
    )
    steps = 1024 // 64
    assert 0 < float(moved) <= 0.05 * 1e-3 * steps * (1 + 1e-4)
    with pytest.raises(ConfigError, match="clip_grad_norm"):
        spec["optimizer"]["clip_grad_norm"] = -1.0
        recipe_from_dict(spec)


def test_exploded_finite_loss_stops_with_last_good_checkpoint_intact(tmp_path, data, monkeypatch):
    """A loss of ~1e15 that never turns NaN must not be checkpointed as a good epoch."""
    from prunekit.app import DivergenceError

    recipe = _recipe("gmp", epochs=3, update_every=5)
    train(recipe, tmp_path, progress=False, data=data, device="cpu", stop_after_epoch=1)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    # the value is 1e15 x the loss, the gradient is the true one: the weights stay finite
    _patch_loss(monkeypatch, lambda out, n: out + (1e15 - 1) * out.detach() if n > 5 else out)
    with pytest.raises(
        DivergenceError, match=r"diverged.*last good checkpoint.*epoch 1\) is intact"
    ):
        train(recipe, tmp_path, progress=False, data=data, device="cpu")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_a_large_but_bounded_loss_is_not_divergence(tmp_path, data, monkeypatch):
    """The criterion is DIVERGENCE_FACTOR x the first batch's loss: 100x that still trains on."""
    _patch_loss(monkeypatch, lambda out, n: out + 99 * out.detach() if n == 3 else out)
    m = train(_recipe("gmp", epochs=1, update_every=5), tmp_path, progress=False, data=data)
    assert [h["epoch"] for h in m["history"]] == [1]


@pytest.mark.parametrize("closure", [False, True])
def test_clip_norm_excludes_pruned_coordinates(tmp_path, data, monkeypatch, closure):
    """Pruned (zero, hard-masked) weights must carry zero gradient when the clipping norm is taken."""
    from prunekit.methods.gmp import GMP

    if closure:  # the optimizer.step(closure) path of the trainer (CrAM's), with a hard mask
        monkeypatch.setattr(GMP, "needs_closure", True)
    real_clip = torch.nn.utils.clip_grad_norm_
    pruned, pruned_grad_sq = [], []

    def spy(parameters, max_norm, *args, **kwargs):
        params = list(parameters)
        weights = [p for p in params if p.dim() > 1 and p.grad is not None]  # what gmp prunes
        pruned.append(sum(int((p.detach() == 0).sum()) for p in weights))
        pruned_grad_sq.append(sum(float((p.grad[p.detach() == 0] ** 2).sum()) for p in weights))
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    spec = {
        "model": {"name": "lenet300_100"},
        "data": {"name": "mnist", "batch_size": 256, "train_subset": 1024, "test_subset": 100},
        "pruning": {"method": "gmp", "sparsity": 0.95, "initial_sparsity": 0.95, "end": 0.0},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "clip_grad_norm": 1e-3},
        "epochs": 2,
        "seed": 3,
    }
    train(recipe_from_dict(spec), tmp_path, progress=False, data=data, device="cpu")
    total = 784 * 300 + 300 * 100 + 100 * 10
    calls = 8 * (2 if closure else 1)  # the closure path clips before the step and inside it
    assert len(pruned) == calls and all(n >= 0.94 * total for n in pruned), pruned  # 95% pruned
    assert pruned_grad_sq == [0.0] * calls


def test_divergence_criterion():
    """Diverged: not finite, or above 1000 x max(1, first batch loss) (the floor keeps a tiny
    first loss from making every later loss look exploded)."""
    from prunekit.app.divergence import divergence

    assert divergence(2300.0, 2.3) is None and divergence(2301.0, 2.3) is not None
    assert divergence(999.0, 0.01) is None and divergence(1001.0, 0.01) is not None
    assert "loss is nan" in divergence(math.nan, 2.3) and "loss is inf" in divergence(math.inf, 2.3)


def test_a_non_finite_gradient_skips_the_step_and_the_run_goes_on(tmp_path, data, monkeypatch):
    """As torch's AMP grad scaler does: the optimizer step of that batch is skipped (weights and
    momentum untouched, or NaN would reach every weight), counted and reported."""
    _patch_loss(monkeypatch, lambda out, n: NanGradient.apply(out) if n == 4 else out)
    real_step, steps = torch.optim.SGD.step, []

    def counted(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counted)
    m = train(_recipe("gmp", epochs=1, update_every=5), tmp_path, progress=False, data=data)
    assert m["skipped_steps"] == 1 and m["steps"] == 1024 // 64
    assert len(steps) == m["steps"] - 1
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert "| steps skipped (non-finite gradient) | 1 |" in (tmp_path / "report.md").read_text()


def test_non_finite_gradients_on_every_step_stop_the_run(tmp_path, data, monkeypatch):
    from prunekit.app import loop

    monkeypatch.setattr(loop, "MAX_CONSECUTIVE_SKIPS", 3)
    _patch_loss(monkeypatch, lambda out, n: NanGradient.apply(out))
    with pytest.raises(NonFiniteLossError, match="not finite for 3 steps in a row"):
        train(_recipe("gmp", epochs=1, update_every=5), tmp_path, progress=False, data=data)


def test_a_skip_streak_carries_across_epochs(tmp_path, data, monkeypatch):
    """The streak of skipped steps is part of the run's progress, not of one epoch: 20 skips in
    a row stop a run of 16-step epochs in its second epoch."""
    from prunekit.app import loop

    monkeypatch.setattr(loop, "MAX_CONSECUTIVE_SKIPS", 20)
    _patch_loss(monkeypatch, lambda out, n: NanGradient.apply(out))
    with pytest.raises(NonFiniteLossError, match="not finite for 20 steps in a row \\(epoch 2"):
        train(_recipe("gmp", epochs=3, update_every=5), tmp_path, progress=False, data=data)


def test_no_resume_starts_an_unfinished_run_again(tmp_path, data):
    recipe = _recipe("gmp", epochs=2, update_every=5)
    full = train(recipe, tmp_path / "full", progress=False, data=data, device="cpu")
    train(recipe, tmp_path / "r", progress=False, data=data, device="cpu", stop_after_epoch=1)
    again = train(recipe, tmp_path / "r", progress=False, data=data, device="cpu", resume=False)
    assert again["history"] == full["history"]  # from epoch 0, as a fresh run
    with pytest.raises(ConfigError, match="differs"):  # and it does not leave the old one's
        train(_recipe("dpf", epochs=2), tmp_path / "r", progress=False, data=data, resume=False)


def test_a_resume_on_other_data_is_refused(tmp_path, data):
    recipe = _recipe("gmp", epochs=2, update_every=5)
    train(recipe, tmp_path, progress=False, data=data, device="cpu", stop_after_epoch=1)
    other = data.subset(1000, None)
    with pytest.raises(ConfigError, match=r"data.hash .*data.train 1024 -> 1000"):
        train(recipe, tmp_path, progress=False, data=other, device="cpu")


def test_a_checkpoint_of_another_model_is_one_line(tmp_path, data):
    recipe = _recipe("gmp", epochs=2, update_every=5)
    train(recipe, tmp_path, progress=False, data=data, device="cpu", stop_after_epoch=1)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    ckpt["model"] = {"conv.weight": torch.zeros(1)}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"does not fit this run .*--no-resume"):
        train(recipe, tmp_path, progress=False, data=data, device="cpu")
