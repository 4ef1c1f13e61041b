"""The defining update of each group-sparsity optimizer, checked by hand on a 4-group model.

Every expected value is computed here from the papers' formulas on numbers set by hand (the model
``Linear(3, 4) → ReLU → Linear(4, 2)`` has one group per hidden unit: the row of the first weight
and its bias entry, ``x_g ∈ R⁴``), never by the optimizer's own helpers.
"""

import math

import pytest
import torch
from torch import nn

from prunekit.structured import find_groups
from prunekit.structured.optim import DHSPG, HESSO, HSPG


def _tiny(rows, grads, lr_first=None):
    """The 4-group model with ``x_g = rows[g]`` (3 weights, then the bias) and gradients ``grads``;
    with ``lr_first`` the unmanaged second layer is a first param group with that lr."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    groups = find_groups(model, torch.randn(2, 3))
    assert [g.slices("out") for g in groups if g.prunable] == [
        {("0.bias", 0): [i], ("0.weight", 0): [i]} for i in range(4)
    ]
    x, g = torch.tensor(rows), torch.tensor(grads)
    with torch.no_grad():
        model[0].weight.copy_(x[:, :3])
        model[0].bias.copy_(x[:, 3])
    model[0].weight.grad, model[0].bias.grad = g[:, :3].clone(), g[:, 3].clone()
    for p in model[2].parameters():
        p.grad = torch.zeros_like(p)
    params = (
        list(model.parameters())
        if lr_first is None
        else [{"params": model[2].parameters(), "lr": lr_first}, {"params": model[0].parameters()}]
    )
    return model, groups, params


def _rows(model):
    return torch.cat([model[0].weight.detach(), model[0].bias.detach()[:, None]], dim=1)


# ---------------------------------------------------------------------------------------- HSPG
HSPG_X = [[1.0, 0, 0, 0], [0.1, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 1.0, 0.5]]
HSPG_G = [[11.0, 0, 0, 0], [0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 0]]
LR, LAM = 0.1, 0.5


def _hspg_trial():
    """x̂ = x − lr (∇f + λ x/||x||) and <x̂, x>/||x||² per group, by hand."""
    trial, ratio = [], []
    for x, g in zip(HSPG_X, HSPG_G, strict=True):
        n = math.sqrt(sum(v * v for v in x))
        t = [a - LR * (b + LAM * a / n) for a, b in zip(x, g, strict=True)]
        trial.append(t)
        ratio.append(sum(a * b for a, b in zip(t, x, strict=True)) / n**2)
    return torch.tensor(trial), ratio


@pytest.mark.parametrize(
    ("epsilon", "projected"),
    [(0.0, {0}), (0.3, {0}), (0.7, {0, 1}), (0.99, {0, 1, 3})],
)
def test_hspg_half_space_projection_follows_epsilon(epsilon, projected):
    trial, ratio = _hspg_trial()
    # the hand figures: group 0 crosses zero; group 1, the smallest, keeps half its length;
    # group 3 keeps 95.5%; group 2 grows
    assert ratio[0] < 0 and ratio[1] == pytest.approx(0.5) and 0.95 < ratio[3] < 0.96
    assert {i for i, r in enumerate(ratio) if r < epsilon} == projected
    model, groups, params = _tiny(HSPG_X, HSPG_G)
    opt = HSPG(params, groups, lr=LR, momentum=0.0, lambda_=LAM, epsilon=epsilon,
               subgradient_steps=0)  # fmt: skip
    opt.step()
    expected = trial.clone()
    expected[sorted(projected)] = 0.0
    torch.testing.assert_close(_rows(model), expected)
    assert {i for i in range(4) if bool(opt.zero[i])} == projected  # no cap by default


def test_hspg_subgradient_phase_projects_nothing_and_defaults_to_a_quarter():
    trial, _ = _hspg_trial()
    model, groups, params = _tiny(HSPG_X, HSPG_G)
    opt = HSPG(params, groups, lr=LR, momentum=0.0, lambda_=LAM, epsilon=0.99,
               subgradient_steps=1)  # fmt: skip
    opt.step()
    torch.testing.assert_close(_rows(model), trial)  # group 0 crossed zero and stays crossed
    assert HSPG(params, groups, lr=LR, total_steps=100).subgradient_steps == 25
    with pytest.raises(ValueError, match="total_steps"):
        HSPG(params, groups, lr=LR)


def test_hspg_cap_only_when_asked():
    _model, groups, params = _tiny(HSPG_X, HSPG_G)
    opt = HSPG(params, groups, lr=LR, momentum=0.0, lambda_=LAM, epsilon=0.99,
               subgradient_steps=0, target_group_sparsity=0.5)  # fmt: skip
    opt.step()
    # three groups cross; the cap keeps two, the smallest norms after the step (groups 1, 0)
    assert {i for i in range(4) if bool(opt.zero[i])} == {0, 1}


def test_hspg_adam_lasso_step_uses_each_parameters_own_lr():
    model, groups, params = _tiny(HSPG_X, [[0.0] * 4] * 4, lr_first=0.0)
    opt = HSPG(params, groups, lr=LR, variant="adam", lambda_=LAM, subgradient_steps=1)
    opt.step()  # zero gradients: Adam moves nothing, only the decoupled λ step lr·λ x/||x||
    x = torch.tensor(HSPG_X)
    expected = x - LR * LAM * x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(_rows(model), expected)


# --------------------------------------------------------------------------------------- DHSPG
DX = [[1.4, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1.2, 0.9], [0, 0, 0, 0.6]]
DG = [[-1.0, 0.5, 0, 0], [0, -0.3, 0.5, 0], [0, 0, 0.8, 0.6], [0, 0, 0, -1.0]]
DLAM, AMPLIFY, HAT = 0.2, 2.0, 10.0


def _dot(a, b):
    return sum(u * v for u, v in zip(a, b, strict=True))


def _dhspg_by_hand():
    """Redundancy ranking, λ_g (OTOv2) and trial points, from the formulas."""
    norm = [math.sqrt(_dot(x, x)) for x in DX]
    dnorm = [math.sqrt(_dot(g, g)) for g in DG]
    inner = [_dot(g, x) for x, g in zip(DX, DG, strict=True)]
    cos = [i / (a * b) for i, a, b in zip(inner, norm, dnorm, strict=True)]
    inv = [1 / (n / 4 + 1e-6) for n in norm]  # 4 entries per group
    cn, vn = math.sqrt(_dot(cos, cos)), math.sqrt(_dot(inv, inv))
    score = [0.5 * c / cn + 0.5 * v / vn for c, v in zip(cos, inv, strict=True)]
    lams = []
    for i, n, dn in zip(inner, norm, dnorm, strict=True):
        if i >= 0:
            lams.append(DLAM)
            continue
        lo, hi = -i / n, -(dn**2) * n / i
        lam = min(max(AMPLIFY * lo, DLAM), HAT * DLAM)
        lams.append((lo + hi) / 2 if lam >= hi else lam)
    return score, lams, norm


def test_dhspg_adaptive_lambda_and_half_space_projection_by_hand():
    score, lams, norm = _dhspg_by_hand()
    redundant = set(sorted(range(4), key=lambda i: -score[i])[:3])
    assert redundant == {1, 2, 3}
    assert set(sorted(range(4), key=lambda i: norm[i])[:3]) == {0, 1, 3}  # magnitude alone differs
    # the three cases of λ_g: amplify·λ_lo, λ (the step already shrinks it), the λ_hi fallback
    assert [lams[i] for i in (1, 2, 3)] == pytest.approx([0.6, 0.2, 1.0])
    trial = [
        [a - LR * b - (LR * lams[g] * a / norm[g] if g in redundant else 0.0)
         for a, b in zip(DX[g], DG[g], strict=True)]
        for g in range(4)
    ]  # fmt: skip
    ratio = [_dot(trial[g], DX[g]) / norm[g] ** 2 for g in range(4)]
    # the largest redundant group (2) leaves the half-space at ε = 0.93, the smallest (1) does not
    assert ratio[2] == pytest.approx(0.92) and ratio[1] == pytest.approx(0.94)
    assert ratio[3] == pytest.approx(1.0) and norm[2] > norm[3] > norm[1]
    for epsilon, projected in ((0.0, set()), (0.93, {2})):
        model, groups, params = _tiny(DX, DG)
        # s* = 0.75 of 4 groups: K = ⌊4 · 0.8⌋ = 3 redundant
        opt = DHSPG(params, groups, lr=LR, momentum=0.0, start_step=0, end_step=100,
                    lambda_=DLAM, epsilon=epsilon, amplify=AMPLIFY, hat_coeff=HAT,
                    target_group_sparsity=0.75)  # fmt: skip
        opt.step()
        assert {i for i in range(4) if bool(opt.redundant[i])} == redundant
        expected = torch.tensor(trial)
        expected[sorted(projected)] = 0.0
        torch.testing.assert_close(_rows(model), expected)
        assert {i for i in range(4) if bool(opt.zero[i])} == projected


def test_dhspg_automatic_lambda_uses_each_parameters_own_lr():
    _, _, norm = _dhspg_by_hand()
    _model, groups, params = _tiny(DX, DG, lr_first=0.0)
    opt = DHSPG(params, groups, lr=LR, momentum=0.0, start_step=0, end_step=10,
                target_group_sparsity=0.75)  # fmt: skip
    opt.step()
    # median over the redundant groups (1, 2, 3) of ||x_g||/lr, over (end_step − start)/2
    expected = sorted(n / LR for n in norm[1:])[1] / 5
    assert opt.lambda_ == pytest.approx(expected)


def test_dhspg_margin_sizes_the_redundant_set_and_the_target_is_exact():
    from tests.structured.test_optim import _train
    from tests.structured.tiny_models import TINY_MODELS

    torch.manual_seed(0)
    model, x = TINY_MODELS["residual"]()
    groups = find_groups(model, x)
    opt = DHSPG(model.parameters(), groups, lr=0.05, momentum=0.9, start_step=5,
                end_step=30, target_group_sparsity=0.5)  # fmt: skip
    _train(model, x, opt, 30)
    n = opt.index.num_groups
    assert int(opt.redundant.sum()) == int(n * 0.55) > round(0.5 * n)
    zero = opt.index.sq_norms() == 0
    assert int(zero.sum()) == round(0.5 * n)
    assert not bool((zero & ~opt.redundant).any())  # only redundant groups went


# --------------------------------------------------------------------------------------- HESSO
HX = [[1.0, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0.4, 0.3], [2.0, 2.0, 0, 0]]
HG = [[0.3, 0, 0, 0], [0, -0.2, 0.1, 0], [0, 0.1, 0, 0.2], [-0.5, 0.1, 0, 0.4]]


def _hesso_terms_by_hand():
    norm = [math.sqrt(_dot(x, x)) for x in HX]
    gnorm = [math.sqrt(_dot(g, g)) for g in HG]
    inner = [_dot(x, g) for x, g in zip(HX, HG, strict=True)]
    raw = {
        "magnitude": norm,
        "avg_magnitude": [n / 2 for n in norm],  # ||x||/√4
        "cosine": [i / (a * b) + 1 for i, a, b in zip(inner, norm, gnorm, strict=True)],
        "taylor_first": [abs(i) for i in inner],
        "taylor_second": [0.5 * i * i for i in inner],
    }
    return {k: [v / math.sqrt(_dot(t, t)) for v in t] for k, t in raw.items()}


@pytest.mark.parametrize(
    "criterion", ["magnitude", "avg_magnitude", "cosine", "taylor_first", "taylor_second", None]
)
def test_hesso_importance_terms_by_hand(criterion):
    terms = _hesso_terms_by_hand()
    _model, groups, params = _tiny(HX, HG)
    weights = {criterion: 1.0} if criterion else None
    opt = HESSO(params, groups, lr=LR, end_step=10, criteria=weights)
    if criterion is None:  # the default mixture: equal weights 0.2
        expected = [sum(0.2 * t[g] for t in terms.values()) for g in range(4)]
    else:
        expected = terms[criterion]
    torch.testing.assert_close(opt.importance(), torch.tensor(expected))


def test_hesso_decaying_group_takes_the_gradient_step_then_is_scaled():
    terms = _hesso_terms_by_hand()
    mixture = [sum(0.2 * t[g] for t in terms.values()) for g in range(4)]
    least = min(range(4), key=lambda g: mixture[g])
    model, groups, params = _tiny(HX, HG)
    opt = HESSO(params, groups, lr=LR, momentum=0.0, start_step=0, end_step=4, periods=1,
                target_group_sparsity=0.25)  # fmt: skip
    opt.step()
    assert {i for i in range(4) if bool(opt.decaying[i])} == {least}
    # OTOv3: x − lr ∇f for every group, then the decaying one times (T − k − 1)/(T − k) = 3/4
    expected = torch.tensor(HX) - LR * torch.tensor(HG)
    expected[least] *= 3 / 4
    torch.testing.assert_close(_rows(model), expected)


def test_dhspg_penalty_and_projection_stop_once_the_target_is_reached():
    _, lams, norm = _dhspg_by_hand()
    model, groups, params = _tiny(DX, DG)
    # s* = 0.25 (one group) with a margin of 0.5: K = ⌊4 · 0.75⌋ = 3 redundant groups
    opt = DHSPG(params, groups, lr=LR, momentum=0.0, start_step=0, end_step=100,
                lambda_=DLAM, epsilon=0.99, margin=0.5, amplify=AMPLIFY, hat_coeff=HAT,
                target_group_sparsity=0.25)  # fmt: skip
    opt.step()
    x, d = torch.tensor(DX), torch.tensor(DG)
    lam = torch.tensor([0.0, lams[1], lams[2], lams[3]])
    x1 = x - LR * d - LR * lam[:, None] * x / torch.tensor(norm)[:, None]
    # groups 1 and 2 leave the half-space at ε = 0.99; the target takes one, the smaller (1)
    x1[1] = 0.0
    torch.testing.assert_close(_rows(model), x1)
    opt.step()
    # target reached: no λ, no projection (group 2's plain step would leave the half-space too)
    x2 = x1 - LR * d
    x2[1] = 0.0
    assert float((x2[2] * x1[2]).sum() / (x1[2] ** 2).sum()) < 0.99
    torch.testing.assert_close(_rows(model), x2)
    assert {i for i in range(4) if bool(opt.zero[i])} == {1}
