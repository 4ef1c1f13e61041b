import pytest
from torch import nn

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


def test_unmatched_target_pattern_is_an_error():
    with pytest.raises(ValueError, match="matched no"):
        select_targets(mlp(), targets=["fc9"])


def test_model_without_prunable_layers_is_reported():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    with pytest.raises(NoPrunableLayersError, match="LayerNorm"):
        select_targets(model)
