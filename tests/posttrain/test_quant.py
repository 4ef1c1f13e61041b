"""Quantization, :mod:`prunekit.posttrain.quant` (and the min-max grid maths it re-exports from
:mod:`prunekit.posttrain.grid`): grids per row and per group, round-to-nearest, integer codes, and
GPTQ against a sequential OBS reference built from explicit inverses. OBQ is in ``test_obc.py``;
the integer export of a whole model in ``test_export.py``."""

import pytest
import torch

from prunekit.posttrain.obc import obq_quantize
from prunekit.posttrain.obs import layer_hessian
from prunekit.posttrain.quant import gptq_quantize, minmax_grid, quantize_rtn, quantize_to_ints
from tests.posttrain.layer_data import correlated, low_rank, reference_grid, rel_err


def test_minmax_grid_contains_zero_for_an_all_positive_row():
    W = torch.tensor([[0.0, 1.0, 1.5, 2.1], [1.0, 1.2, 1.4, 1.7]])  # nonnegative rows
    scale, zero = minmax_grid(W, 3)
    torch.testing.assert_close(scale[:, 0], torch.tensor([2.1, 1.7]) / 7)
    assert zero.flatten().tolist() == [0.0, 0.0]
    Wq = quantize_rtn(W, 3)
    assert Wq[0, 0] == 0.0  # 0 is exactly on the grid
    lone = torch.tensor([[5.0, 5.0, 5.0, 0.0]])
    assert quantize_rtn(lone, 2)[0, 3] == 0.0
    # Per group of 2 columns: each group widened on its own.
    scale_g, _ = minmax_grid(W, 3, group_size=2)
    torch.testing.assert_close(scale_g, torch.tensor([[1.0, 2.1], [1.2, 1.7]]) / 7)


def test_a_partial_last_group_keeps_its_group_size():
    """d_in = 18 in groups of 8 is 3 groups (8, 8, 2), not 3 groups of 6: RTN must use the grid of
    the group each input belongs to (every weight on its grid, error at most half a step)."""
    torch.manual_seed(0)
    W = torch.randn(5, 18)
    bits, gs = 3, 8
    scale, zero = minmax_grid(W, bits, gs)
    Wq = quantize_rtn(W, bits, group_size=gs)
    for g, (a, b) in enumerate([(0, 8), (8, 16), (16, 18)]):
        s = scale[:, g : g + 1]
        assert ((Wq[:, a:b] - W[:, a:b]).abs() <= s / 2 + 1e-6).all(), g
    codes, _, _ = quantize_to_ints(Wq, scale, zero, bits, group_size=gs)
    assert int(codes.max()) <= 2**bits - 1
    with pytest.raises(ValueError, match="group_size"):
        quantize_to_ints(Wq, scale, zero, bits)


def test_gptq_equals_sequential_obs_and_stays_on_the_grid():
    d_out, d_in, bits = 3, 12, 3
    X = correlated(60, d_in, seed=17) * torch.logspace(-1, 1, d_in, dtype=torch.float64)
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    H = layer_hessian(X)
    H_d = H + 0.01 * H.diagonal().mean() * torch.eye(d_in, dtype=torch.float64)
    scale, zero = reference_grid(W, bits)
    expected = W.clone()
    for j in range(d_in):
        hinv = torch.linalg.inv(H_d[j:, j:])
        q = scale[:, 0] * (
            torch.clamp(torch.round(expected[:, j] / scale[:, 0]) + zero[:, 0], 0, 7) - zero[:, 0]
        )
        expected[:, j:] -= ((expected[:, j] - q) / hinv[0, 0]).unsqueeze(1) * hinv[:, 0].unsqueeze(
            0
        )
        expected[:, j] = q
    for block_size in (4, 12):
        got = gptq_quantize(W, H, bits, block_size=block_size)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    levels = got / scale + zero
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-9)
    assert (levels.round() >= 0).all() and (levels.round() <= 7).all()


def _sequential_gptq_groups(W, H_d, bits, group_size):
    """GPTQ from explicit inverses, one column at a time; the grid of a group is the min-max of
    the group's current (OBS-updated) weights when its first column is reached."""
    W = W.clone()
    maxq = 2**bits - 1
    for j in range(W.shape[1]):
        if j % group_size == 0:
            scale, zero = reference_grid(W[:, j : j + group_size], bits)
        hinv = torch.linalg.inv(H_d[j:, j:])
        q = scale[:, 0] * (
            torch.clamp(torch.round(W[:, j] / scale[:, 0]) + zero[:, 0], 0, maxq) - zero[:, 0]
        )
        W[:, j:] -= ((W[:, j] - q) / hinv[0, 0]).unsqueeze(1) * hinv[:, 0].unsqueeze(0)
        W[:, j] = q
    return W


@pytest.mark.parametrize(("group_size", "block_size"), [(4, 4), (4, 12), (6, 8)])
def test_gptq_groups_use_the_updated_weights_of_the_group(group_size, block_size):
    d_out, d_in, bits = 3, 12, 3
    X = correlated(60, d_in, seed=27) * torch.logspace(-1, 1, d_in, dtype=torch.float64)
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(28), dtype=torch.float64)
    H = layer_hessian(X)
    H_d = H + 0.01 * H.diagonal().mean() * torch.eye(d_in, dtype=torch.float64)
    expected = _sequential_gptq_groups(W, H_d, bits, group_size)
    got, scale, _ = gptq_quantize(
        W, H, bits, block_size=block_size, group_size=group_size, return_grid=True
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # The grids of later groups differ from those of the original weights.
    assert not torch.allclose(scale, minmax_grid(W, bits, group_size)[0])


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_round_to_nearest(bits):
    X = low_rank(512, 64, rank=16, seed=19)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(20))
    H = layer_hessian(X)
    W_gptq = gptq_quantize(W, H, bits, block_size=16)
    err_gptq = rel_err(W, W_gptq, X)
    err_rtn = rel_err(W, quantize_rtn(W, bits), X)
    # Measured (3 / 4 bits, rank-16 inputs): GPTQ 0.0053 / 0.0012, round-to-nearest 0.038 / 0.0083.
    assert err_gptq < 0.5 * err_rtn, (err_gptq, err_rtn)
    assert max(len(torch.unique(row)) for row in W_gptq) <= 2**bits


def test_groupwise_grids_are_finer_and_export_exactly():
    X = low_rank(512, 64, rank=16, seed=23)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(24))
    W[:, 5] *= 8.0  # one large column: a per-row grid is coarse for the others
    H = layer_hessian(X)
    for bits in (3, 4):
        err_row = rel_err(W, quantize_rtn(W, bits), X)
        err_group = rel_err(W, quantize_rtn(W, bits, group_size=16), X)
        assert err_group < err_row, (bits, err_group, err_row)
    Wq, scale, zero = gptq_quantize(W, H, 3, block_size=32, group_size=16, return_grid=True)
    assert scale.shape == (16, 4)
    groups = Wq.reshape(16, 4, 16)
    assert max(len(torch.unique(groups[r, g])) for r in range(16) for g in range(4)) <= 8
    codes, _, zero_u8 = quantize_to_ints(Wq, scale, zero, 3, group_size=16)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7
    deq = scale.repeat_interleave(16, dim=1) * (
        codes.float() - zero_u8.float().repeat_interleave(16, dim=1)
    )
    assert torch.equal(deq, Wq)
    with pytest.raises(ValueError, match="not on the given grid"):
        quantize_to_ints(W, scale, zero, 3, group_size=16)
    W_obq = obq_quantize(W, H, 3, group_size=16)
    groups = W_obq.reshape(16, 4, 16)
    assert max(len(torch.unique(groups[r, g])) for r in range(16) for g in range(4)) <= 8
    quantize_to_ints(W_obq, *minmax_grid(W, 3, 16), 3, group_size=16)  # on its fixed grid
    assert rel_err(W, W_obq, X) < rel_err(W, quantize_rtn(W, 3, group_size=16), X)
