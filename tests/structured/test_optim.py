import pytest
import torch
import torch.nn.functional as F

from prunekit.structured import find_groups, slim
from prunekit.structured.optim import DHSPG, HESSO, HSPG
from tests.structured.zoo import ZOO

TOTAL = 120


def _make(name, params, groups, variant="sgd", target=0.5):
    common = dict(lr=0.05 if variant == "sgd" else 5e-3, momentum=0.9, weight_decay=1e-4, variant=variant,
                  target_group_sparsity=target)  # fmt: skip
    if name == "hspg":  # λ-driven: the same push lr·λ = 0.1 per step for both variants
        lam = 2.0 if variant == "sgd" else 20.0
        return HSPG(params, groups, lambda_=lam, subgradient_steps=TOTAL // 4, **common)
    if name == "dhspg":
        return DHSPG(params, groups, start_step=TOTAL // 5, project_end=int(0.8 * TOTAL), **common)
    return HESSO(
        params, groups, start_step=TOTAL // 5, pruning_steps=TOTAL // 2, periods=5, **common
    )


def _train(model, x, opt, steps, check=None):
    y = torch.arange(len(x)) % 2
    model.train()
    for _ in range(steps):
        out = model(x + 0.05 * torch.randn_like(x))
        loss = F.cross_entropy(out[:, :2], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if check is not None:
            check()


@pytest.mark.parametrize("variant", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["hspg", "dhspg", "hesso"])
@pytest.mark.parametrize("model_name", ["residual", "concat_bn"])
def test_reaches_target_group_sparsity_and_zero_groups_stay_zero(name, variant, model_name):
    torch.manual_seed(0)
    model, x = ZOO[model_name]()
    groups = find_groups(model, x)
    opt = _make(name, model.parameters(), groups, variant)
    seen_zero = torch.zeros(opt.index.num_groups, dtype=torch.bool)

    def check():
        zero = opt.index.sq_norms() == 0
        assert bool((zero | ~seen_zero).all()), "a zero group came back"
        seen_zero.copy_(seen_zero | zero)

    _train(model, x, opt, TOTAL, check)
    n = opt.index.num_groups
    zeros = int((opt.index.sq_norms() == 0).sum())
    assert abs(zeros - round(0.5 * n)) <= 1, (zeros, n)
    before = sum(p.numel() for p in model.parameters())
    small = slim(model, x, groups)  # raises if the output differs
    assert sum(p.numel() for p in small.parameters()) < before


def test_hesso_decays_linearly_to_zero_within_a_period():
    torch.manual_seed(0)
    model, x = ZOO["residual"]()
    groups = find_groups(model, x)
    opt = HESSO(model.parameters(), groups, lr=0.0, momentum=0.0, start_step=0, pruning_steps=10, periods=1,
                target_group_sparsity=0.25)  # fmt: skip
    norms0 = opt.index.sq_norms().sqrt()
    ratios = []
    for _ in range(10):
        _train(model, x, opt, 1)
        chosen = opt.decaying if opt.decaying.any() else opt.zero
        ratios.append(float((opt.index.sq_norms().sqrt()[chosen] / norms0[chosen]).mean()))
    assert ratios == pytest.approx([1 - k / 10 for k in range(1, 11)], abs=1e-5)  # lr 0: decay only
    assert int(opt.zero.sum()) == round(0.25 * opt.index.num_groups)


def test_optimizer_state_dict_round_trip():
    torch.manual_seed(0)
    model, x = ZOO["residual"]()
    groups = find_groups(model, x)
    opt = _make("hesso", model.parameters(), groups)
    _train(model, x, opt, 40)
    state = opt.state_dict()
    opt2 = _make("hesso", model.parameters(), groups)
    opt2.load_state_dict(state)
    assert torch.equal(opt2.zero, opt.zero) and torch.equal(opt2.decaying, opt.decaying)
    assert opt2.num_steps == 40


def test_no_prunable_groups_is_reported():
    model, x = ZOO["tied"]()
    groups = [g for g in find_groups(model, x) if not g.prunable]
    with pytest.raises(ValueError, match="no prunable groups"):
        HESSO(model.parameters(), groups, lr=0.1, pruning_steps=10)
