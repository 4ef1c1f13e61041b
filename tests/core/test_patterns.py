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


def test_nm_mask_on_conv_groups_input_channels_at_each_kernel_position():
    torch.manual_seed(0)
    scores = torch.rand(3, 8, 3, 3)
    mask = nm_mask(scores, 2, 4)
    assert mask.shape == scores.shape
    for o in range(3):
        for i in range(3):
            for j in range(3):
                for g in range(2):  # input channels 4g..4g+3 at kernel position (i, j)
                    s = scores[o, 4 * g : 4 * g + 4, i, j]
                    kept = mask[o, 4 * g : 4 * g + 4, i, j]
                    assert int(kept.sum()) == 2
                    assert set(kept.nonzero().flatten().tolist()) == set(s.topk(2).indices.tolist())


def test_nm_mask_refuses_input_channels_not_divisible_by_m():
    with pytest.raises(ValueError, match="divisible by M=4"):
        nm_mask(torch.rand(16, 3, 3, 3), 2, 4)  # a 3-channel stem: 27 = 3·3·3 is no excuse


def test_nm_layers_with_incompatible_inputs_stay_dense_and_are_reported(caplog):
    import prunekit
    from tests.helpers import sgd

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 4),
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        pruner = prunekit.sparsify(
            model, sgd(model), "gmp", sparsity=0.5, pattern="2:4", total_steps=10, update_every=1
        )
    assert pruner.dense_targets == ["0.weight"] and "0.weight" in caplog.text
    x = torch.randn(4, 3, 8, 8)
    for _ in range(10):
        pruner.optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        pruner.optimizer.step()
        pruner.step()
    pruner.finalize()
    assert int(torch.count_nonzero(model[0].weight)) == model[0].weight.numel()
    for layer in (model[2], model[4]):
        w = layer.weight.detach()
        groups = (w.movedim(1, -1) if w.dim() > 2 else w).reshape(-1, 4)
        assert ((groups != 0).sum(1) <= 2).all()


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4").sparsity == 0.5
    for bad in ("4:4", "0:4", "2-4", "dense"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_topk_mask_selects_the_k_largest_and_breaks_ties_by_index(dtype):
    torch.manual_seed(0)
    scores = torch.rand(50, 40).to(dtype)
    for keep in (0, 1, 7, 1000, 1999, 2000):
        mask = topk_mask(scores, keep)
        assert int(mask.sum()) == keep
        if 0 < keep < 2000:
            assert scores[mask].min() >= scores[~mask].max()
    ties = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5], dtype=dtype)
    assert topk_mask(ties, 3).tolist() == [False, True, True, True, False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_mask_refuses_nan_scores_on_every_path(dtype):
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(torch.tensor([float("nan"), 1.0, 2.0, 3.0], dtype=dtype), 2)
