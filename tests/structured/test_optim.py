"""What every group-sparsity optimizer does (HSPG, DHSPG and HESSO, SGD and Adam variants): reach
the target group sparsity with zero groups staying zero and slim exact, resume bit-exactly from a
saved state, refuse a model without prunable groups. Each optimizer's own update is in
``test_hspg.py``, ``test_dhspg.py`` and ``test_hesso.py``; the registry's contract in
``test_contract.py``."""

import pytest
import torch

import prunekit
from prunekit.structured import find_groups, slim
from prunekit.structured.optim import DHSPG, HESSO, HSPG
from tests.structured.tiny_models import TINY_MODELS, train_steps

TOTAL = 120


def _make(name, params, groups, variant="sgd", target=0.5):
    common = dict(lr=0.05 if variant == "sgd" else 5e-3, momentum=0.9, weight_decay=1e-4, variant=variant,
                  target_group_sparsity=target)  # fmt: skip
    if name == "hspg":  # λ-driven: the same push lr·λ = 0.1 per step for both variants
        lam = 2.0 if variant == "sgd" else 20.0
        return HSPG(params, groups, lambda_=lam, subgradient_steps=TOTAL // 4, **common)
    if name == "dhspg":
        return DHSPG(params, groups, start_step=TOTAL // 5, end_step=int(0.8 * TOTAL), **common)
    return HESSO(
        params, groups, start_step=TOTAL // 5, end_step=TOTAL // 5 + TOTAL // 2, periods=5, **common
    )


@pytest.mark.parametrize("variant", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["hspg", "dhspg", "hesso"])
@pytest.mark.parametrize("model_name", ["residual", "concat_bn"])
def test_reaches_target_group_sparsity_and_zero_groups_stay_zero(name, variant, model_name):
    torch.manual_seed(0)
    model, x = TINY_MODELS[model_name]()
    groups = find_groups(model, x)
    opt = _make(name, model.parameters(), groups, variant)
    seen_zero = torch.zeros(opt.index.num_groups, dtype=torch.bool)

    def check():
        zero = opt.index.sq_norms() == 0
        assert bool((zero | ~seen_zero).all()), "a zero group came back"
        seen_zero.copy_(seen_zero | zero)

    train_steps(model, x, opt, TOTAL, check)
    n = opt.index.num_groups
    zeros = int((opt.index.sq_norms() == 0).sum())
    assert abs(zeros - round(0.5 * n)) <= 1, (zeros, n)
    before = sum(p.numel() for p in model.parameters())
    small = slim(model, x, groups)  # raises if the output differs
    assert sum(p.numel() for p in small.parameters()) < before


@pytest.mark.parametrize("variant", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["hspg", "dhspg", "hesso"])
def test_resume_mid_run_continues_bit_exactly(name, variant):
    """Stop at step 40 (mid-period for HESSO, mid-projection for DHSPG, half-space phase for
    HSPG), save model and optimizer through ``torch.save``, rebuild both, continue past two
    HESSO period ends to step 64: the result equals the uninterrupted run bit for bit."""
    import io

    def build():
        torch.manual_seed(0)
        model, x = TINY_MODELS["residual"]()
        groups = find_groups(model, x)
        return model, x, _make(name, model.parameters(), groups, variant)

    model, x, opt = build()
    train_steps(model, x, opt, 40)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    rng = torch.get_rng_state()
    train_steps(model, x, opt, 24)

    model2, x2, opt2 = build()  # fresh objects, as a new process would have
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.num_steps == 40
    if name == "hesso":
        assert bool(opt2.decaying.any())  # the break falls inside a period
    torch.set_rng_state(rng)
    train_steps(model2, x2, opt2, 24)
    for (key, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert torch.equal(opt2.zero, opt.zero) and opt2.num_steps == opt.num_steps == 64
    assert bool(opt.zero.any())  # groups went to zero after the break


def test_no_prunable_groups_is_reported():
    model, x = TINY_MODELS["tied"]()
    groups = [g for g in find_groups(model, x) if not g.prunable]
    with pytest.raises(prunekit.NoPrunableLayersError, match="no prunable groups"):
        HESSO(model.parameters(), groups, lr=0.1, end_step=10)
