import copy

import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit.core import Masker, MaskMode, compute_masks, select_targets
from tests.helpers import mlp, run, sgd, toy_data


def _masked(mode, optimizer_factory=sgd, sparsity=0.8):
    model = mlp()
    opt = optimizer_factory(model)
    targets = select_targets(model)
    masker = Masker(targets, opt, mode)
    masker.set_masks_(compute_masks([t.param.detach().abs() for t in targets], sparsity))
    return model, opt, masker


@pytest.mark.parametrize(
    "factory",
    [
        sgd,
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-2),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-2),
    ],
    ids=["sgd-momentum-wd", "adam-wd", "adamw"],
)
def test_hard_masked_weights_stay_exactly_zero(factory):
    model, opt, masker = _masked(MaskMode.HARD, factory)
    run(model, opt, None, steps=200)
    for p, m in zip(masker.params, masker.masks, strict=True):
        assert torch.count_nonzero(p[~m]) == 0
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert torch.count_nonzero(value[~m]) == 0  # momentum never sees pruned coordinates
        assert torch.count_nonzero(p[m]) == int(m.sum())  # the survivors did train


def test_masks_are_readable_state_dict_buffers():
    model, _, _ = _masked(MaskMode.HARD)
    keys = model.state_dict().keys()
    assert {"0.weight_mask", "2.weight_mask", "4.weight_mask"} <= set(keys)
    mask = model.state_dict()["0.weight_mask"]
    assert mask.dtype == model[0].weight.dtype  # float 0/1: multiplies 6x faster than bool
    assert set(mask.unique().tolist()) == {0.0, 1.0}


class NoisySGD(torch.optim.SGD):
    """An optimizer that moves every weight, even with zero gradient (not zero-preserving)."""

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p), alpha=1e-3)
        return out


def test_hard_mode_remasks_after_step_for_unknown_optimizers():
    model, opt, masker = _masked(MaskMode.HARD, lambda m: NoisySGD(m.parameters(), lr=0.01))
    assert masker.remask_after_step
    run(model, opt, None, steps=20)
    for p, m in zip(masker.params, masker.masks, strict=True):
        assert torch.count_nonzero(p[~m]) == 0


def test_straight_through_recovers_from_a_step_that_raised():
    class Failing(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("boom")

    model, _, masker = _masked(MaskMode.STRAIGHT_THROUGH, lambda m: Failing(m.parameters(), lr=0.1))
    x, y = toy_data()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="boom"):
        masker.optimizer.step()
    masker.apply_()  # e.g. via set_masks_ or set_mode_: the parameter gets its own storage back
    for p, d, m in zip(masker.params, masker.dense_weights(), masker.masks, strict=True):
        assert p.data_ptr() != d.data_ptr()
        assert torch.equal(p.detach(), d * m)


def test_straight_through_gradient_reaches_pruned_coordinates():
    model, opt, masker = _masked(MaskMode.STRAIGHT_THROUGH)
    x, y = toy_data()
    dense_before = [d.clone() for d in masker.dense_weights()]
    # forward uses m ⊙ w
    for p, d, m in zip(masker.params, dense_before, masker.masks, strict=True):
        assert torch.equal(p.detach(), d * m)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in masker.params]
    opt.step()
    for g, m, d0, d1 in zip(grads, masker.masks, dense_before, masker.dense_weights(), strict=True):
        assert torch.count_nonzero(g[~m]) > 0  # ∇f(m ⊙ w) is nonzero at pruned coordinates
        assert not torch.equal(d0[~m], d1[~m])  # and it moved the dense pruned weights


def test_straight_through_step_equals_dense_sgd_on_masked_gradient():
    model, opt, masker = _masked(
        MaskMode.STRAIGHT_THROUGH, lambda m: torch.optim.SGD(m.parameters(), lr=0.1)
    )
    x, y = toy_data()
    dense = [d.clone() for d in masker.dense_weights()]
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    expected = [d - 0.1 * p.grad for d, p in zip(dense, masker.params, strict=True)]
    opt.step()
    for e, d, p, m in zip(
        expected, masker.dense_weights(), masker.params, masker.masks, strict=True
    ):
        torch.testing.assert_close(d, e)
        torch.testing.assert_close(p.detach(), e * m)


def test_remove_bakes_masks_and_deletes_buffers_and_hooks():
    model, opt, masker = _masked(MaskMode.STRAIGHT_THROUGH)
    masks = [m.clone() for m in masker.masks]
    masker.remove()
    assert not [n for n, _ in model.named_buffers()]
    for t, m in zip(masker.targets, masks, strict=True):
        assert torch.count_nonzero(t.param[~m]) == 0
    run(model, opt, None, steps=5)  # hooks gone: pruned weights may now change
    assert any(
        torch.count_nonzero(t.param[~m]) > 0 for t, m in zip(masker.targets, masks, strict=True)
    )


def test_second_masker_on_same_model_is_refused():
    model, opt, _ = _masked(MaskMode.HARD)
    with pytest.raises(RuntimeError, match="already carries a mask"):
        Masker(select_targets(model), opt)


@pytest.mark.parametrize("method", ["gmp", "dpf"])
def test_model_optimizer_pruner_survive_deepcopy(method):
    model = mlp()
    opt = sgd(model)
    pruner = prunekit.sparsify(model, opt, method, sparsity=0.8, total_steps=60, update_every=5)
    run(model, opt, pruner, steps=30)
    model2, opt2, pruner2 = copy.deepcopy((model, opt, pruner))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(model2, opt2, pruner2, steps=30)
    pruner2.finalize()
    assert prunekit.sparsity_report(model2)["global_sparsity"] == pytest.approx(0.8, abs=0.005)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    # and the original still trains and prunes on its own
    run(model, opt, pruner, steps=30)
    pruner.finalize()
    assert prunekit.sparsity_report(model)["global_sparsity"] == pytest.approx(0.8, abs=0.005)


def test_deepcopy_of_model_alone_for_ema():
    model = mlp()
    opt = sgd(model)
    prunekit.sparsify(model, opt, "dpf", sparsity=0.5, total_steps=10, update_every=1)
    ema = copy.deepcopy(model)
    x, _ = toy_data()
    torch.testing.assert_close(ema(x), model(x))
