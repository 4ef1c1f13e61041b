import pytest
import torch

from prunekit.core import nm_mask, parse_pattern, topk_mask


def test_topk_keeps_exactly_k_largest():
    scores = torch.tensor([[0.1, 5.0, 3.0], [4.0, 0.2, 0.3]])
    mask = topk_mask(scores, 3)
    assert mask.tolist() == [[False, True, True], [True, False, False]]


def test_nm_mask_keeps_n_per_group():
    torch.manual_seed(0)
    scores = torch.rand(8, 16)
    mask = nm_mask(scores, 2, 4)
    groups = mask.reshape(-1, 4)
    assert (groups.sum(1) == 2).all()
    # the kept ones are the two largest of each group
    kept_min = torch.where(groups, scores.reshape(-1, 4), torch.inf).min(1).values
    dropped_max = torch.where(~groups, scores.reshape(-1, 4), -torch.inf).max(1).values
    assert (kept_min >= dropped_max).all()


def test_nm_mask_on_conv_weight_uses_flattened_input():
    mask = nm_mask(torch.rand(4, 2, 2, 2), 1, 4)
    assert mask.shape == (4, 2, 2, 2) and int(mask.sum()) == 4 * 2


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4").sparsity == 0.5
    for bad in ("4:4", "0:4", "2-4", "dense"):
        with pytest.raises(ValueError):
            parse_pattern(bad)
