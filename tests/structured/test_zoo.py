"""Structured pruning on torchvision 0.28 classifiers: groups found, 30% of them zeroed, slim exact.

For each model (random init, seeded; parameters that torchvision initialises to zero — ViT's head,
biases — are drawn too, so no output is trivially zero): ``find_groups`` → zero a seeded random 30%
of the prunable groups → ``slim``. The test then checks, itself: the slim model's output equals the
masked model's within ``1e-4 × max |output|`` (float32, eval mode) while zeroing itself moved the
output by more than 1% of that scale (ConvNeXt's layer scale, 1e-6 at init, is set to 1 so that it
does), parameters were removed, and the
coverage — the share of groups that are prunable and the fraction of parameters left — is at least
what the rules reach today (so a rule that stops applying fails here). Inputs are small (the cost is
the channel bookkeeping, not the convolutions); the classifier has 10 classes.
"""

import importlib

import pytest
import torch
from torch import nn

from prunekit.structured import find_groups, slim

#: name → (builder kwargs, input side, minimum prunable share of groups, maximum params left)
MODELS = {
    "resnet18": ({}, 32, 0.99, 0.52),
    "mobilenet_v3_small": ({}, 32, 0.99, 0.53),  # SE gates (hardsigmoid) prunable
    "efficientnet_b0": ({}, 32, 0.99, 0.53),  # SE gates (sigmoid) and stochastic depth
    "inception_v3": ({"aux_logits": False, "init_weights": False}, 75, 0.99, 0.51),
    "shufflenet_v2_x0_5": ({}, 32, 0.99, 0.47),  # channel shuffle: positions joined across groups
    "squeezenet1_0": ({}, 32, 0.99, 0.50),
    # the LayerNorm stream is kept, the MLPs go; 1 block per stage instead of 3, 3, 9, 3
    "convnext_tiny": ({"depths": (1, 1, 1, 1)}, 32, 0.79, 0.78),
    # heads and MLPs; the stream is kept; 2 encoder layers instead of 12
    "vit_b_32": ({"image_size": 32, "num_layers": 2}, 32, 0.61, 0.75),
}
FRACTION = 0.3


def _models():
    importlib.import_module("benchmarks.torchvision_shim")  # before torchvision
    return importlib.import_module("torchvision.models")


def _get_model(name: str, kwargs: dict) -> nn.Module:
    """``torchvision.models.get_model``; ``depths`` / ``num_layers`` build the same architecture
    (same classes, widths and code) with fewer blocks, which the builders do not expose."""
    models = _models()
    kwargs = dict(kwargs)
    if "depths" in kwargs:
        cfg = models.convnext.CNBlockConfig
        widths = (96, 192, 384, 768)
        setting = [
            cfg(w, widths[i + 1] if i < 3 else None, d)
            for i, (w, d) in enumerate(zip(widths, kwargs.pop("depths"), strict=True))
        ]
        return models.convnext.ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=10)
    if "num_layers" in kwargs:
        return models.vision_transformer.VisionTransformer(
            patch_size=32, num_heads=12, hidden_dim=768, mlp_dim=3072, num_classes=10, **kwargs
        )
    return models.get_model(name, weights=None, num_classes=10, **kwargs)


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    kwargs, side, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = _get_model(name, kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            if pname.endswith("layer_scale"):  # ConvNeXt's 1e-6 would make any pruning invisible
                p.fill_(1.0)
    return model, torch.randn(2, 3, side, side, generator=gen)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_model_slims_exactly_with_coverage(name):
    model, x = _build(name)
    _, _, min_share, max_left = MODELS[name]
    groups = find_groups(model, x)
    prunable = [g for g in groups if g.prunable]
    share = len(prunable) / len(groups)
    assert share >= min_share, f"{name}: prunable share {share:.3f} < {min_share}"

    model.eval()
    with torch.no_grad():
        dense = model(x)
    model.train()  # groups and slim as a training run sees the model
    gen = torch.Generator().manual_seed(2)
    chosen = torch.randperm(len(prunable), generator=gen)[: int(FRACTION * len(prunable))]
    for i in chosen.tolist():
        prunable[i].zero_()
    small = slim(model, x, groups)

    model.eval()
    small.eval()
    with torch.no_grad():
        ref, got = model(x), small(x)
    scale = float(ref.abs().max())
    assert scale > 0
    # the zeroed groups must change the output, or the comparison below could not fail
    assert float((ref - dense).abs().max()) > 0.01 * scale, f"{name}: zeroing changed nothing"
    diff = float((got - ref).abs().max())
    assert diff <= 1e-4 * scale, f"{name}: max |diff| {diff:.3g} at output scale {scale:.3g}"
    left = _params(small) / _params(model)
    assert left <= max_left, f"{name}: {left:.3f} of the parameters left > {max_left}"
