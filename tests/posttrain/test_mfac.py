import pytest
import torch

from prunekit.posttrain.mfac import BlockFisherInverse, FisherInverse, mfac_prune_step

F64 = torch.float64


def _grads(m, d, seed=0, dtype=F64):
    """Correlated gradients: random rows mixed by a fixed d×d matrix."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=F64) / d**0.5 + torch.eye(d, dtype=F64)
    return (torch.randn(m, d, generator=g, dtype=F64) @ mix).to(dtype)


def _fisher(G, damp):
    G = G.to(F64)
    return damp * torch.eye(G.shape[1], dtype=F64) + G.T @ G / G.shape[0]


def _block_diag(F, B):
    out = torch.zeros_like(F)
    for i in range(0, F.shape[0], B):
        out[i : i + B, i : i + B] = F[i : i + B, i : i + B]
    return out


def _rel(a, b):
    return float((a.to(F64) - b).norm() / b.norm())


@pytest.mark.parametrize(("m", "d"), [(8, 40), (60, 25)])
def test_fisher_inverse_matches_explicit_inverse(m, d):
    damp = 1e-2
    G = _grads(m, d)
    F = _fisher(G, damp)
    Finv = torch.linalg.inv(F)
    fi = FisherInverse(G, damp)
    for seed in range(3):
        v = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=F64)
        assert _rel(fi.mul(v), torch.linalg.solve(F, v)) < 1e-5
    assert _rel(fi.diag(), torch.diagonal(Finv)) < 1e-5
    rows, cols = torch.tensor([3, 0, 7]), torch.tensor([7, 1])
    assert _rel(fi.entries(rows, cols), Finv[rows][:, cols]) < 1e-5


def test_fisher_inverse_float32_is_accurate():
    G = _grads(16, 300, seed=1, dtype=torch.float32)
    F = _fisher(G, 1e-3)
    fi = FisherInverse(G, 1e-3)
    v = torch.randn(300, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert fi.mul(v).dtype == torch.float32
    assert _rel(fi.mul(v), torch.linalg.solve(F, v)) < 1e-4
    assert _rel(fi.diag(), torch.diagonal(torch.linalg.inv(F))) < 1e-4


@pytest.mark.parametrize(("m", "B"), [(6, 8), (20, 8), (6, 64)])
def test_block_fisher_inverse_matches_block_diagonal_inverse(m, B):
    d, damp = 37, 1e-2  # 37 is not a multiple of B: the last block is short
    G = _grads(m, d, seed=3)
    Fb = _block_diag(_fisher(G, damp), B)
    Finv = torch.linalg.inv(Fb)
    bi = BlockFisherInverse(G, B, damp)
    v = torch.randn(d, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert _rel(bi.mul(v), torch.linalg.solve(Fb, v)) < 1e-5
    assert _rel(bi.diag(), torch.diagonal(Finv)) < 1e-5
    idx = torch.arange(d)
    assert _rel(bi.entries(idx, idx), Finv) < 1e-5
    torch.testing.assert_close(bi.grads, G)


def _kkt_update(F, w, P):
    """argmin ½δᵀFδ s.t. (w+δ)_P = 0, from the KKT system solved by lstsq (independent of F⁻¹)."""
    d = F.shape[0]
    E = torch.eye(d, dtype=F64)[P]
    K = torch.cat(
        [torch.cat([F, E.T], 1), torch.cat([E, torch.zeros(len(P), len(P), dtype=F64)], 1)], 0
    )
    rhs = torch.cat([torch.zeros(d, dtype=F64), -w[P]])
    return torch.linalg.lstsq(K, rhs.unsqueeze(1)).solution[:d, 0]


@pytest.mark.parametrize("block_size", [None, 6])
def test_prune_step_selects_lowest_saliency_and_is_the_constrained_minimiser(block_size):
    m, d, damp, n_prune = 12, 30, 1e-2, 7
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(d, generator=gen, dtype=F64)
    old = torch.zeros(d, dtype=torch.bool)
    old[[2, 11, 19]] = True
    w[old] = 0.0
    G = _grads(m, d, seed=6) * torch.logspace(-1, 1, d, dtype=F64)  # unequal coordinate scales
    G[:, old] = 0.0  # the Fisher of the live weights
    live = (~old).nonzero().flatten()
    F = _fisher(G, damp)
    if block_size is not None:
        F = _block_diag(F, block_size)
    finv = FisherInverse(G, damp) if block_size is None else BlockFisherInverse(G, block_size, damp)

    w_new, mask = mfac_prune_step(w, finv, n_prune, already_pruned_mask=old)

    # expected selection: the n_prune lowest ρ = w²/(2[F_LL⁻¹]_qq) over the live coordinates
    FLL_inv = torch.linalg.inv(F[live][:, live])
    rho = w[live].square() / (2 * torch.diagonal(FLL_inv))
    assert torch.sort(rho).values[n_prune] > torch.sort(rho).values[n_prune - 1] * (1 + 1e-6)
    expected_new = live[torch.argsort(rho)[:n_prune]]
    magnitude = live[torch.argsort(w[live].abs())[:n_prune]]
    assert set(expected_new.tolist()) != set(magnitude.tolist())  # the saliency matters here
    assert set(((mask & ~old).nonzero().flatten()).tolist()) == set(expected_new.tolist())
    assert bool(mask[old].all()) and int(mask.sum()) == 3 + n_prune

    P = mask.nonzero().flatten()
    delta = _kkt_update(F, w, P)
    assert bool((w_new[mask] == 0).all())
    torch.testing.assert_close(w_new, w + delta, rtol=1e-7, atol=1e-9)


def test_prune_step_beats_magnitude_on_correlated_gradients():
    """Quadratic loss ½δᵀFδ of the OBS step vs magnitude pruning (δ = −w_S) of the same count,
    and vs the reference code's sum of independent single-weight OBS updates on the same mask.

    Measured: joint OBS 0.0061, independent updates 33.3, magnitude 45.7.
    """
    m, d, damp, n_prune = 32, 60, 1e-3, 30
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(d, generator=gen, dtype=F64)
    # gradients concentrated on a few correlated directions, with very unequal coordinate scales
    basis = torch.randn(4, d, generator=gen, dtype=F64) * torch.logspace(-1, 1, d, dtype=F64)
    G = torch.randn(m, 4, generator=gen, dtype=F64) @ basis + 0.05 * torch.randn(
        m, d, generator=gen, dtype=F64
    )
    F = _fisher(G, damp)

    def quad(delta):
        return float(0.5 * delta @ F @ delta)

    w_new, mask = mfac_prune_step(w, FisherInverse(G, damp), n_prune)
    mag = torch.zeros_like(w)
    mag_idx = torch.topk(w.abs(), n_prune, largest=False).indices
    mag[mag_idx] = -w[mag_idx]
    Finv = torch.linalg.inv(F)
    indep = Finv[:, mask] @ (-w[mask] / torch.diagonal(Finv)[mask])
    indep[mask] = -w[mask]
    loss_mfac, loss_mag, loss_indep = quad(w_new - w), quad(mag), quad(indep)
    assert int(mask.sum()) == n_prune
    assert loss_mfac < 0.2 * loss_mag, (loss_mfac, loss_mag)
    assert loss_mfac < 0.2 * loss_indep, (loss_mfac, loss_indep)


def test_float32_prune_step_keeps_pruned_weights_exactly_zero():
    G = _grads(16, 200, seed=8, dtype=torch.float32)
    w = torch.randn(200, generator=torch.Generator().manual_seed(9))
    finv = BlockFisherInverse(G, 32, 1e-4)
    w1, m1 = mfac_prune_step(w, finv, 50)
    G[:, m1] = 0.0
    w2, m2 = mfac_prune_step(w1, BlockFisherInverse(G, 32, 1e-4), 50, m1)
    assert w2.dtype == torch.float32 and int(m2.sum()) == 100 and bool(m2[m1].all())
    assert bool((w2[m2] == 0).all()) and bool((w2[~m2] != 0).all())


def test_invalid_input_is_rejected():
    G = _grads(4, 10)
    with pytest.raises(ValueError, match="damp"):
        FisherInverse(G, 0.0)
    with pytest.raises(ValueError, match="block_size"):
        BlockFisherInverse(G, 0)
    finv = FisherInverse(G, 1e-2)
    with pytest.raises(ValueError, match="n_prune"):
        mfac_prune_step(torch.ones(10, dtype=F64), finv, 11)
    old = torch.zeros(10, dtype=torch.bool)
    old[0] = True
    with pytest.raises(ValueError, match="already-pruned"):
        mfac_prune_step(torch.ones(10, dtype=F64), finv, 1, old)
