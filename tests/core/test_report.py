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
