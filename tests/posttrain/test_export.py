"""The integer export of :mod:`prunekit.posttrain.export`: ``save_quantized`` / ``load_quantized``
give back the compressed model bitwise (min-max, symmetric and MSE grids, act-order GPTQ), smaller
than the float file, and refuse weights that left their grid."""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.posttrain.export import load_quantized, save_quantized


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("gptq", {"bits": 4, "group_size": 6}),
        ("obq", {"bits": 3}),
        ("sparsegpt", {"sparsity": 0.5, "bits": 4}),
        ("rtn", {"bits": 2, "group_size": 9}),
        ("gptq", {"bits": 4, "group_size": 6, "sym": True, "act_order": True}),
        ("gptq", {"bits": 3, "mse": True, "act_order": True, "static_groups": True,
                  "group_size": 9}),
        ("obq", {"bits": 3, "sym": True, "mse": True}),
        ("rtn", {"bits": 4, "sym": True, "group_size": 18}),
    ],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_export_reproduces_the_compressed_model_exactly(method, kw, dtype, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)
    ).to(dtype)
    report = prunekit.compress(model, [torch.randn(8, 4, 8, 8, dtype=dtype)], method, **kw)
    size = save_quantized(model, report, tmp_path / "q.pt")
    assert torch.load(tmp_path / "q.pt", weights_only=True)["sym"] == kw.get("sym", False)
    state = load_quantized(tmp_path / "q.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    if dtype == torch.float32:
        torch.save(model.state_dict(), tmp_path / "float.pt")
        assert size < (tmp_path / "float.pt").stat().st_size  # a byte per code instead of four
    with torch.no_grad():
        model[3].weight.mul_(1.1)  # no longer on the grid: refused, not silently rounded
    with pytest.raises(ValueError, match="grid"):
        save_quantized(model, report, tmp_path / "q2.pt")
