import pytest
import torch

from prunekit import sparsity_report
from prunekit.core import format_report
from tests.helpers import mlp


def test_report_counts_zeros_per_layer_and_globally():
    model = mlp()
    with torch.no_grad():
        model[0].weight[:, :8] = 0  # half of layer 0 (16*64 weights)
        model[4].weight.zero_()
    r = sparsity_report(model)
    assert r["layers"][0]["sparsity"] == 0.5
    assert r["layers"][2]["sparsity"] == 1.0
    total = 16 * 64 + 64 * 32 + 32 * 4
    zeros = 8 * 64 + 32 * 4
    assert r["total_weights"] == total
    assert r["global_sparsity"] == pytest.approx(zeros / total)
    assert r["compression"] == pytest.approx(total / (total - zeros))
    assert "global" in format_report(r)


def test_count_macs_and_params():
    from torch import nn

    from prunekit.core import count_macs, count_params
    from prunekit.models import LeNet5Caffe, LeNet300100

    assert count_macs(LeNet300100(), torch.zeros(1, 1, 28, 28)) == 784 * 300 + 300 * 100 + 100 * 10
    # LeNet-5-Caffe: conv1 20@24x24x25, conv2 50@8x8x(20*25), fc 800*500, 500*10
    expected = 20 * 24 * 24 * 25 + 50 * 8 * 8 * 500 + 800 * 500 + 500 * 10
    assert count_macs(LeNet5Caffe(), torch.zeros(1, 1, 28, 28)) == expected
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert count_macs(dw, torch.zeros(1, 8, 5, 5)) == 8 * 25 * 9
    model = LeNet300100()
    assert count_params(model) == 266200 + 300 + 100 + 10
    with torch.no_grad():
        model.fc1.weight.zero_()
    assert count_params(model, nonzero=True) == 30000 + 1000 + 410


def test_meta_device_is_a_clear_error_not_a_traceback():
    import pytest
    import torch
    from torch import nn

    import prunekit

    model = nn.Sequential(nn.Linear(4, 4)).to("meta")
    with pytest.raises(ValueError, match="meta device; materialise"):
        prunekit.sparsity_report(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="meta device"):
        prunekit.sparsify(model, opt, "gmp", sparsity=0.5, total_steps=10)
    real = nn.Sequential(nn.Linear(4, 4))
    pruner = prunekit.sparsify(real, torch.optim.SGD(real.parameters(), lr=0.1), "gmp",
                               sparsity=0.5, total_steps=10)  # fmt: skip
    real.to_empty(device="meta")
    with pytest.raises(ValueError, match=r"finalize.*meta device"):
        pruner.finalize()
