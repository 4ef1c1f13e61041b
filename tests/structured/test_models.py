import pytest
import torch

from prunekit.models import build_model
from prunekit.structured import find_groups, slim


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg_bn", "mobilenet_v2", "densenet"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_reference_models_slim_exactly(name, shape):
    torch.manual_seed(0)
    kwargs = {"width": 0.25} if name in ("vgg_bn", "mobilenet_v2") else {}
    model = build_model(name, shape, 10, **kwargs)
    x = torch.randn(2, *shape)
    groups = find_groups(model, x)
    prunable = [g for g in groups if g.prunable]
    # only the classifier's output groups are unprunable
    assert len(groups) - len(prunable) == 10
    for g in prunable[::2]:
        g.zero_()
    small = slim(model, x, groups)  # verifies equal outputs
    assert sum(p.numel() for p in small.parameters()) < 0.8 * sum(
        p.numel() for p in model.parameters()
    )


def test_resnet20_group_structure():
    model = build_model("resnet20", (3, 32, 32), 10)
    groups = [g for g in find_groups(model, torch.randn(1, 3, 32, 32)) if g.prunable]
    # stage-wide channels joined through the residual adds (16 + 32 + 64) + each block's inner conv
    assert len(groups) == 16 + 32 + 64 + 3 * (16 + 32 + 64)
    stage1 = next(g for g in groups if ("conv1.weight", 0) in g.slices("out"))
    outs = {name for name, _ in stage1.slices("out")}
    assert {"conv1.weight", "bn1.weight", "layers.0.conv2.weight", "layers.2.bn2.bias"} <= outs
