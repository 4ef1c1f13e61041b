"""DHSPG (:mod:`prunekit.structured.dhspg`): the redundant set, the adaptive ``λ_g`` and the
half-space projection, the automatic ``λ``, and both stopping once the target is reached.

Every expected value of the by-hand tests is computed here from the paper's formulas on numbers
set by hand on the 4-group model of :func:`tests.structured.tiny_models.four_groups`, never
by the optimizer's own helpers.
"""

import math

import pytest
import torch

from prunekit.structured import find_groups
from prunekit.structured.optim import DHSPG
from tests.structured.tiny_models import TINY_MODELS, dot, four_groups, group_rows, train_steps

DX = [[1.4, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1.2, 0.9], [0, 0, 0, 0.6]]
DG = [[-1.0, 0.5, 0, 0], [0, -0.3, 0.5, 0], [0, 0, 0.8, 0.6], [0, 0, 0, -1.0]]
DLAM, AMPLIFY, HAT = 0.2, 2.0, 10.0
LR = 0.1


def _dhspg_by_hand():
    """Redundancy ranking, λ_g (OTOv2) and trial points, from the formulas."""
    norm = [math.sqrt(dot(x, x)) for x in DX]
    dnorm = [math.sqrt(dot(g, g)) for g in DG]
    inner = [dot(g, x) for x, g in zip(DX, DG, strict=True)]
    cos = [i / (a * b) for i, a, b in zip(inner, norm, dnorm, strict=True)]
    inv = [1 / (n / 4 + 1e-6) for n in norm]  # 4 entries per group
    cn, vn = math.sqrt(dot(cos, cos)), math.sqrt(dot(inv, inv))
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
    ratio = [dot(trial[g], DX[g]) / norm[g] ** 2 for g in range(4)]
    # the largest redundant group (2) leaves the half-space at ε = 0.93, the smallest (1) does not
    assert ratio[2] == pytest.approx(0.92) and ratio[1] == pytest.approx(0.94)
    assert ratio[3] == pytest.approx(1.0) and norm[2] > norm[3] > norm[1]
    for epsilon, projected in ((0.0, set()), (0.93, {2})):
        model, groups, params = four_groups(DX, DG)
        # s* = 0.75 of 4 groups: K = ⌊4 · 0.8⌋ = 3 redundant
        opt = DHSPG(params, groups, lr=LR, momentum=0.0, start_step=0, end_step=100,
                    lambda_=DLAM, epsilon=epsilon, amplify=AMPLIFY, hat_coeff=HAT,
                    target_group_sparsity=0.75)  # fmt: skip
        opt.step()
        assert {i for i in range(4) if bool(opt.redundant[i])} == redundant
        expected = torch.tensor(trial)
        expected[sorted(projected)] = 0.0
        torch.testing.assert_close(group_rows(model), expected)
        assert {i for i in range(4) if bool(opt.zero[i])} == projected


def test_dhspg_automatic_lambda_uses_each_parameters_own_lr():
    _, _, norm = _dhspg_by_hand()
    _model, groups, params = four_groups(DX, DG, lr_first=0.0)
    opt = DHSPG(params, groups, lr=LR, momentum=0.0, start_step=0, end_step=10,
                target_group_sparsity=0.75)  # fmt: skip
    opt.step()
    # median over the redundant groups (1, 2, 3) of ||x_g||/lr, over (end_step − start)/2
    expected = sorted(n / LR for n in norm[1:])[1] / 5
    assert opt.lambda_ == pytest.approx(expected)


def test_dhspg_margin_sizes_the_redundant_set_and_the_target_is_exact():
    torch.manual_seed(0)
    model, x = TINY_MODELS["residual"]()
    groups = find_groups(model, x)
    opt = DHSPG(model.parameters(), groups, lr=0.05, momentum=0.9, start_step=5,
                end_step=30, target_group_sparsity=0.5)  # fmt: skip
    train_steps(model, x, opt, 30)
    n = opt.index.num_groups
    assert int(opt.redundant.sum()) == int(n * 0.55) > round(0.5 * n)
    zero = opt.index.sq_norms() == 0
    assert int(zero.sum()) == round(0.5 * n)
    assert not bool((zero & ~opt.redundant).any())  # only redundant groups went


def test_dhspg_penalty_and_projection_stop_once_the_target_is_reached():
    _, lams, norm = _dhspg_by_hand()
    model, groups, params = four_groups(DX, DG)
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
    torch.testing.assert_close(group_rows(model), x1)
    opt.step()
    # target reached: no λ, no projection (group 2's plain step would leave the half-space too)
    x2 = x1 - LR * d
    x2[1] = 0.0
    assert float((x2[2] * x1[2]).sum() / (x1[2] ** 2).sum()) < 0.99
    torch.testing.assert_close(group_rows(model), x2)
    assert {i for i in range(4) if bool(opt.zero[i])} == {1}
