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
from prunekit.posttrain.mfac_model import split_calls


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


def test_gradual_steps_keep_pruned_weights_at_zero_and_reach_the_target():
    model = _model()
    xs, ys = _data(n_items=2, batch=16)  # 2 items split into 8 micro-batches
    seen = []

    def spy(module, args):
        seen.append(module.weight.detach().clone())

    h = model[0].register_forward_pre_hook(spy)
    prunekit.compress(model, xs, "mfac", sparsity=0.5, ngrads=8, steps=3, labels=ys)
    h.remove()
    zeros = [(w == 0) for w in seen]
    for earlier, later in itertools.pairwise(zeros):
        assert (later | ~earlier).all()  # once zero, always zero
    total = model[0].weight.numel() + model[2].weight.numel()
    nnz = int((model[0].weight != 0).sum() + (model[2].weight != 0).sum())
    assert nnz == total - round(0.5 * total)


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
