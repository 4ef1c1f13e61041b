import pytest
import torch
from torch import nn

from prunekit.core.cost import count_macs
from prunekit.core.forward import count_correct, eval_mode, example_args


def _mixed() -> nn.Module:
    """A training model with a frozen (eval-mode) batch-norm layer inside."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[1].eval()
    return model


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_eval_mode_sets_eval_and_restores_every_submodules_flag():
    model, other = _mixed(), _mixed()
    other[3].eval()
    before, before_other = _flags(model), _flags(other)
    assert before == [True, True, False, True, True]
    with eval_mode(model, other):
        assert not any(_flags(model)) and not any(_flags(other))
    assert _flags(model) == before and _flags(other) == before_other


def test_eval_mode_restores_on_an_exception_and_runs_deterministically():
    model = _mixed()
    model[1].train()  # batch norm in training mode: a forward would update its statistics
    before = _flags(model)
    stats = model[1].running_mean.clone()
    x = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        a, b = model(x), model(x)  # dropout off, batch norm uses its running statistics
        assert torch.equal(a, b)
        raise RuntimeError("boom")
    assert _flags(model) == before
    assert torch.equal(model[1].running_mean, stats)


def test_example_args():
    x, y = torch.zeros(1), torch.ones(2)
    assert example_args(x) == (x,) and example_args(x)[0] is x
    args = example_args([x, y])
    assert isinstance(args, tuple) and args[0] is x and args[1] is y
    assert example_args((x,))[0] is x


def test_count_macs_leaves_a_frozen_layer_frozen():
    model = _mixed()
    before = _flags(model)
    assert count_macs(model, torch.randn(1, 4)) == 4 * 4 + 4 * 2
    assert _flags(model) == before


def test_count_correct_counts_each_slice_in_eval_mode_and_restores_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3))
    model.train()
    model[1].eval()  # a frozen batch norm keeps its own flag
    x, y = torch.randn(23, 4), torch.randint(0, 3, (23,))
    with torch.no_grad():
        model.eval()
        hits = (model(x).argmax(1) == y).tolist()  # reference, computed here in one batch
        model.train()
        model[1].eval()
    assert count_correct(model, x, y, batch_size=5) == sum(hits)
    for start in range(0, 23, 2):  # every slice, batches overshooting it or not
        for stop in range(start, 24):
            assert count_correct(model, x, y, start, stop, batch_size=4) == sum(hits[start:stop])
    assert count_correct(model, x, y, 9, 9) == 0
    assert model.training and model[2].training and not model[1].training
