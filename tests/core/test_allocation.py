import math

import pytest
import torch

from prunekit.core import compute_masks, erk_densities, parse_pattern, random_masks


def _scores():
    torch.manual_seed(0)
    return [torch.randn(300, 784).abs(), torch.randn(100, 300).abs(), torch.randn(10, 100).abs()]


@pytest.mark.parametrize("allocation", ["uniform", "global", "erk"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_total_kept_matches_budget(allocation, sparsity):
    scores = _scores()
    masks = compute_masks(scores, sparsity, allocation)
    total = sum(s.numel() for s in scores)
    kept = sum(int(m.sum()) for m in masks)
    assert abs(kept - (1 - sparsity) * total) <= len(scores)


def test_global_uses_one_threshold():
    scores = _scores()
    masks = compute_masks(scores, 0.9, "global")
    kept_min = min(float(s[m].min()) for s, m in zip(scores, masks, strict=True))
    dropped_max = max(float(s[~m].max()) for s, m in zip(scores, masks, strict=True))
    assert kept_min >= dropped_max


def test_uniform_gives_each_layer_the_target():
    masks = compute_masks(_scores(), 0.8, "uniform")
    for m in masks:
        assert abs(1 - m.float().mean().item() - 0.8) < 0.01


def test_erk_density_proportional_to_shape_ratio_and_capped():
    shapes = [(300, 784), (100, 300), (10, 100)]
    dens = erk_densities(shapes, 0.1)
    total = sum(math.prod(s) for s in shapes)
    assert abs(sum(d * math.prod(s) for d, s in zip(dens, shapes, strict=True)) - 0.1 * total) < 1
    assert all(0 < d <= 1 for d in dens)
    # uncapped layers follow (in+out)/(in*out)
    ratio = [sum(s) / math.prod(s) for s in shapes]
    assert dens[0] / dens[1] == pytest.approx(ratio[0] / ratio[1])
    # at high density the small last layer is capped at 1 and the budget is still met
    dens = erk_densities(shapes, 0.5)
    assert dens[2] == 1.0
    assert abs(sum(d * math.prod(s) for d, s in zip(dens, shapes, strict=True)) - 0.5 * total) < 1


def test_nm_allocation_and_ramp():
    pattern = parse_pattern("2:4")
    masks = compute_masks([torch.rand(8, 16)], 0.5, pattern=pattern)
    assert float(masks[0].float().mean()) == 0.5
    masks = compute_masks([torch.rand(8, 16)], 0.25, pattern=pattern)  # 3:4 on the way to 2:4
    assert float(masks[0].float().mean()) == 0.75


def test_sparsity_out_of_range_is_refused():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            compute_masks(_scores(), bad)


def test_random_masks_counts():
    masks = random_masks([(50, 40), (10, 50)], 0.75, "uniform")
    assert [int(m.sum()) for m in masks] == [500, 125]


def test_global_allocation_never_empties_a_layer(caplog):
    scores = _scores()
    scores[2] = scores[2] * 1e-6  # all of the last layer falls under the global threshold
    plain = torch.cat([s.reshape(-1) for s in scores])
    keep = round(0.1 * plain.numel())
    threshold = plain.topk(keep).values.min()
    assert not bool((scores[2] >= threshold).any())  # one threshold alone would empty it
    with caplog.at_level("WARNING"):
        masks = compute_masks(scores, 0.9, "global")
    assert "would empty 1 layer" in caplog.text
    assert int(masks[2].sum()) == 1 and bool(masks[2].reshape(-1)[scores[2].argmax()])
    assert sum(int(m.sum()) for m in masks) == keep  # the budget is unchanged


def test_global_rescue_never_empties_another_layer():
    scores = [
        torch.tensor([10.0, 10, 10, 10]),
        torch.tensor([0.1, 0.2]),
        torch.tensor([0.01, 0.01]),
    ]
    masks = compute_masks(scores, 1 - 5 / 8, "global")
    assert all(bool(m.any()) for m in masks)
    assert sum(int(m.sum()) for m in masks) == 5
