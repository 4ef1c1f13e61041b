"""M-FAC at the model level: the gradients, the global selection and the compensation, checked
against an explicit Fisher built in the test."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.config import ConfigError
from prunekit.posttrain import get_compressor
from prunekit.posttrain.mfac_model import mfac_schedule, split_calls


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _data(n_items=8, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 5, generator=g) for _ in range(n_items)]
    ys = [torch.randint(0, 3, (batch,), generator=g) for _ in range(n_items)]
    return xs, ys


def _explicit(model, xs, ys, sparsity, damp):
    """One OBS step with the dense empirical Fisher, written out with explicit inverses."""
    params = [model[0].weight, model[2].weight]
    rows = []
    for x, y in zip(xs, ys, strict=True):
        out = model(x)
        target = out.detach().argmax(1) if y is None else y
        grads = torch.autograd.grad(F.cross_entropy(out, target), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    G = torch.stack(rows)
    d = G.shape[1]
    Fm = damp * torch.eye(d, dtype=torch.float64) + G.T @ G / G.shape[0]
    Finv = torch.linalg.inv(Fm)
    w = torch.cat([p.detach().reshape(-1) for p in params]).double()
    rho = w.square() / (2 * Finv.diagonal())
    P = torch.argsort(rho)[: round(sparsity * d)]
    delta = -Finv[:, P] @ torch.linalg.solve(Finv[P][:, P], w[P])
    new = w + delta
    new[P] = 0.0
    return new, P


@pytest.mark.parametrize("with_labels", [True, False])
def test_one_step_equals_the_explicit_fisher_obs(with_labels):
    model = _model()
    xs, ys = _data()
    expected, P = _explicit(copy.deepcopy(model), xs, ys if with_labels else [None] * 8, 0.4, 1e-3)
    report = prunekit.compress(
        model,
        xs,
        "mfac",
        sparsity=0.4,
        ngrads=8,
        fisher_block=10_000,
        damp=1e-3,
        steps=1,
        labels=ys if with_labels else None,
    )
    got = torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])
    assert set(torch.nonzero(got == 0).flatten().tolist()) == set(P.tolist())
    torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=2e-5)
    assert report.global_sparsity == pytest.approx(round(0.4 * 32) / 32)


def test_the_density_falls_geometrically_as_in_the_reference():
    """density_k = ρ_0 · (ρ_T / ρ_0)^(k / steps), rounded to whole weights."""
    # 1000 weights to 90% in 4 steps: 1000 · 0.1^(k/4) = 562.3, 316.2, 177.8, 100 stay alive
    assert mfac_schedule(1000, 0, 0.9, 4) == [438, 684, 822, 900]
    # 200 existing zeros, 60%: the 800 alive fall to 400; after step 1, 800 · √0.5 = 565.7
    assert mfac_schedule(1000, 200, 0.6, 2) == [434, 600]
    assert mfac_schedule(1000, 700, 0.6, 3) == [700, 700, 700]  # already sparser than asked
    assert mfac_schedule(32, 0, 0.5, 1) == [16]
    # the default: the reference's 16 recomputations of the gradients
    assert get_compressor("mfac").config_class(sparsity=0.5).steps == 16


def test_each_step_computes_its_gradients_at_the_current_weights():
    """A forward hook sees, per step, ``ngrads`` forwards with autograd on, all at the weights the
    previous step left (zeros following the schedule), then the final weights."""
    model = _model()
    xs, ys = _data(n_items=2, batch=16)  # 2 items split into 8 micro-batches
    seen = []

    def spy(module, args):
        w = torch.cat([model[0].weight.reshape(-1), model[2].weight.reshape(-1)]).detach()
        seen.append((torch.is_grad_enabled(), w.clone()))

    h = model[0].register_forward_pre_hook(spy)
    prunekit.compress(model, xs, "mfac", sparsity=0.5, ngrads=8, steps=3, labels=ys)
    h.remove()
    grad_passes = [w for enabled, w in seen if enabled]
    assert len(grad_passes) == 3 * 8  # recomputed for every step
    counts = mfac_schedule(32, 0, 0.5, 3)
    assert counts == [7, 12, 16]  # 32 · 0.5^(k/3) = 25.4, 20.2, 16 alive
    for step, zeros in enumerate([0, *counts[:-1]]):
        for w in grad_passes[8 * step : 8 * step + 8]:
            assert int((w == 0).sum()) == zeros
    zeros = [(w == 0) for _, w in seen]
    for earlier, later in itertools.pairwise(zeros):
        assert (later | ~earlier).all()  # once zero, always zero
    nnz = int((model[0].weight != 0).sum() + (model[2].weight != 0).sum())
    assert nnz == 32 - counts[-1]


def _explicit_gradual(model, xs, ys, counts, damp, block, recompute=True, live_blocks=True):
    """Gradual M-FAC written out with explicit inverses: before each step the gradients at the
    current weights (or, ``recompute=False``, those of the dense model), the Fisher over the live
    weights in blocks of ``block`` consecutive live ones (or, ``live_blocks=False``, fixed blocks
    over all weights with the pruned columns zeroed), the ``goal − zeros`` live weights of lowest
    saliency removed jointly. Returns the final weights (float64)."""
    params = [model[0].weight, model[2].weight]
    d = sum(p.numel() for p in params)
    pruned = torch.zeros(d, dtype=torch.bool)
    G = None
    for goal in counts:
        if G is None or recompute:
            rows = []
            for x, y in zip(xs, ys, strict=True):
                grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
                rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
            G = torch.stack(rows)
        w = torch.cat([p.detach().reshape(-1) for p in params]).double()
        coords = (~pruned).nonzero().flatten() if live_blocks else torch.arange(d)
        Gc = G[:, coords].masked_fill(pruned[coords], 0.0)
        Fm = damp * torch.eye(len(coords), dtype=torch.float64) + Gc.T @ Gc / G.shape[0]
        for i in range(0, len(coords), block):  # block-diagonal
            Fm[i : i + block, i + block :] = 0.0
            Fm[i + block :, i : i + block] = 0.0
        Finv = torch.linalg.inv(Fm)
        wc = w[coords]
        rho = (wc.square() / (2 * Finv.diagonal())).masked_fill(pruned[coords], float("inf"))
        order = torch.argsort(rho)
        n = goal - int(pruned.sum())
        assert rho[order[n]] > rho[order[n - 1]] * (1 + 1e-3)  # no near-tie at the cut
        P = order[:n]
        new = wc - Finv[:, P] @ torch.linalg.solve(Finv[P][:, P], wc[P])
        new[P] = 0.0
        w[coords] = new
        w[pruned] = 0.0
        pruned[coords[P]] = True
        with torch.no_grad():
            for p, chunk in zip(params, torch.split(w, [p.numel() for p in params]), strict=True):
                p.copy_(chunk.view_as(p))
    return w


def test_gradual_pruning_equals_the_explicit_recomputed_live_block_fisher():
    """Three steps, blocks of 8 of the 32 weights: each step's Fisher is built from gradients at
    the pruned, compensated weights, over blocks of 8 *live* weights. Reusing the dense
    gradients, or keeping fixed blocks, gives other weights (checked here, so that the test
    tells them apart)."""
    model = _model()
    xs, ys = _data()
    counts = mfac_schedule(32, 0, 0.5, 3)
    args = (xs, ys, counts, 1e-3, 8)
    expected = _explicit_gradual(copy.deepcopy(model), *args)
    stale = _explicit_gradual(copy.deepcopy(model), *args, recompute=False)
    fixed = _explicit_gradual(copy.deepcopy(model), *args, live_blocks=False)
    prunekit.compress(
        model, xs, "mfac", sparsity=0.5, ngrads=8, fisher_block=8, damp=1e-3, steps=3, labels=ys
    )
    got = torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])
    assert torch.equal(got == 0, expected == 0)
    torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=2e-5)
    for other in (stale, fixed):
        assert float((other - expected).abs().max()) > 1e-2


def test_split_calls_makes_enough_micro_batches_or_says_why():
    calls = [((torch.randn(6, 2),), {}), ((torch.randn(6, 2),), {})]
    out, _ = split_calls(calls, None, 5)
    assert len(out) >= 5 and sum(c[0][0].shape[0] for c in out) == 12
    with pytest.raises(ValueError, match="ngrads"):
        split_calls(calls, None, 13)
    with pytest.raises(ConfigError, match="N:M"):
        prunekit.compress(_model(), [torch.randn(4, 5)], "mfac", pattern="2:4")
    with pytest.raises(ValueError, match="labels are used by method='mfac' only"):
        prunekit.compress(_model(), [torch.randn(4, 5)], "sparsegpt", sparsity=0.5, labels=[1])


class DictOut(nn.Module):
    """A model returning a mapping with "logits", with a frozen first layer."""

    def __init__(self):
        super().__init__()
        self.net = _model()
        self.net[0].weight.requires_grad_(False)

    def forward(self, x):
        return {"logits": self.net(x).unsqueeze(1)}  # (N, 1, C): a sequence of length 1


def test_frozen_weights_and_dict_outputs_are_handled():
    model = DictOut()
    xs, ys = _data()
    expected, _ = _explicit(copy.deepcopy(model.net).requires_grad_(True), xs, ys, 0.4, 1e-3)
    prunekit.compress(
        model, xs, "mfac", sparsity=0.4, ngrads=8, fisher_block=10_000, damp=1e-3, steps=1,
        labels=[y.unsqueeze(1) for y in ys],
    )  # fmt: skip
    got = torch.cat([model.net[0].weight.reshape(-1), model.net[2].weight.reshape(-1)])
    torch.testing.assert_close(got.detach().double(), expected, rtol=2e-4, atol=2e-5)
    assert not model.net[0].weight.requires_grad  # frozen again afterwards
