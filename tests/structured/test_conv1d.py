"""transformers' Conv1D (GPT-2's layers, weight stored (in, out)) in group discovery and slim."""

import benchmarks.torchvision_shim  # noqa: F401  (before transformers imports torchvision)
import pytest
import torch

from prunekit.structured import find_groups, slim

transformers = pytest.importorskip("transformers")


def _mlp() -> torch.nn.Module:
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=8, activation_function="relu", resid_pdrop=0.0)
    return GPT2MLP(32, config).eval()  # c_fc: Conv1D(32, 8) -> ReLU -> c_proj: Conv1D(8, 32)


def test_the_hidden_channels_of_a_gpt2_mlp_are_groups_and_slim_removes_them_exactly():
    model, x = _mlp(), torch.randn(2, 5, 8)
    groups = [g for g in find_groups(model, x) if g.prunable]
    assert len(groups) == 32  # one per hidden channel: a column of c_fc, a row of c_proj
    g = groups[3]
    assert {(name, axis) for name, axis in g.slices("out")} == {
        ("c_fc.weight", 1),
        ("c_fc.bias", 0),
    }
    assert {(name, axis) for name, axis in g.slices("in")} == {("c_proj.weight", 0)}
    with torch.no_grad():
        for group in groups[:12]:
            for (name, axis), idx in group.slices().items():
                model.get_parameter(name).index_fill_(axis, torch.tensor(idx), 0.0)
    expected = model(x)
    small = slim(model, x)
    assert small.c_fc.weight.shape == (8, 20) and (small.c_fc.nx, small.c_fc.nf) == (8, 20)
    assert small.c_proj.weight.shape == (20, 8) and (small.c_proj.nx, small.c_proj.nf) == (20, 8)
    torch.testing.assert_close(small(x), expected)
