import pytest
import torch
from torch import nn

import prunekit
from prunekit.core import NoPrunableLayersError, select_targets
from tests.helpers import mlp, small_cnn


def test_default_selects_linear_and_conv_weights_only():
    names = [t.name for t in select_targets(small_cnn())]
    assert names == ["0.weight", "3.weight", "6.weight"]  # BatchNorm (1) and biases excluded


def test_names_and_regex_and_ignore():
    model = mlp()
    assert [t.name for t in select_targets(model, targets=["0"])] == ["0.weight"]
    assert [t.name for t in select_targets(model, targets=["re:[02]\\.weight"])] == [
        "0.weight",
        "2.weight",
    ]
    assert [t.name for t in select_targets(model, ignore=["4"])] == ["0.weight", "2.weight"]


def test_ignoring_a_module_ignores_the_layers_inside_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    assert [t.name for t in select_targets(model, ignore=["1"])] == ["0.weight"]
    # a name is a whole path component: "1" does not cover a module called "10"
    wide = nn.Sequential(*[nn.Linear(4, 4) for _ in range(11)])
    assert "10.weight" in [t.name for t in select_targets(wide, ignore=["1"])]


def test_unmatched_target_pattern_is_an_error():
    with pytest.raises(ValueError, match="matched no"):
        select_targets(mlp(), targets=["fc9"])


def test_model_without_prunable_layers_is_reported():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    with pytest.raises(NoPrunableLayersError, match="LayerNorm"):
        select_targets(model)


def test_unmatched_ignore_pattern_is_an_error():
    with pytest.raises(ValueError, match=r"ignore patterns matched no.*'fc4'"):
        select_targets(mlp(), ignore=["fc4"])  # a typo for "4": the classifier would be pruned
    # naming a layer that exists but would not be pruned anyway is not a typo
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 4))
    assert [t.name for t in select_targets(model, ignore=["0"])] == ["1.weight"]


class TiedAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(32, 32)
        self.mid = nn.Linear(32, 32)
        self.dec = nn.Linear(32, 32)
        self.dec.weight = self.enc.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.mid(torch.relu(self.enc(x)))))


def test_tied_weights_are_one_target_with_one_mask_counted_once():
    model = TiedAutoencoder()
    assert [t.name for t in select_targets(model)] == ["enc.weight", "mid.weight"]
    assert [t.name for t in select_targets(model, ignore=["dec"])] == ["mid.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = prunekit.sparsify(model, opt, "rigl", sparsity=0.8, total_steps=40, update_every=5)
    x = torch.randn(64, 32)
    for _ in range(40):
        opt.zero_grad()
        (model(x) - x).pow(2).mean().backward()
        opt.step()
        pruner.step()
    pruner.finalize()
    # the truth, counted by hand over the two distinct weights
    enc, mid = model.enc.weight, model.mid.weight
    true = 1 - (int(torch.count_nonzero(enc)) + int(torch.count_nonzero(mid))) / (2 * 32 * 32)
    report = prunekit.sparsity_report(model)
    assert report["total_weights"] == 2 * 32 * 32
    assert report["global_sparsity"] == pytest.approx(true)
    assert true == pytest.approx(0.8, abs=0.01)
    assert model.dec.weight is model.enc.weight  # still tied
