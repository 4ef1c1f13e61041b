"""HSPG (:mod:`prunekit.structured.hspg`): the half-space projection, the subgradient phase, the
optional cap and the Adam variant's lasso step.

Every expected value of the by-hand tests is computed here from the paper's formulas on numbers
set by hand on the 4-group model of :func:`tests.structured.tiny_models.four_groups`, never
by the optimizer's own helpers.
"""

import math

import pytest
import torch

from prunekit.structured.optim import HSPG
from tests.structured.tiny_models import four_groups, group_rows

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
    model, groups, params = four_groups(HSPG_X, HSPG_G)
    opt = HSPG(params, groups, lr=LR, momentum=0.0, lambda_=LAM, epsilon=epsilon,
               subgradient_steps=0)  # fmt: skip
    opt.step()
    expected = trial.clone()
    expected[sorted(projected)] = 0.0
    torch.testing.assert_close(group_rows(model), expected)
    assert {i for i in range(4) if bool(opt.zero[i])} == projected  # no cap by default


def test_hspg_subgradient_phase_projects_nothing_and_defaults_to_a_quarter():
    trial, _ = _hspg_trial()
    model, groups, params = four_groups(HSPG_X, HSPG_G)
    opt = HSPG(params, groups, lr=LR, momentum=0.0, lambda_=LAM, epsilon=0.99,
               subgradient_steps=1)  # fmt: skip
    opt.step()
    torch.testing.assert_close(group_rows(model), trial)  # group 0 crossed zero and stays crossed
    assert HSPG(params, groups, lr=LR, total_steps=100).subgradient_steps == 25
    with pytest.raises(ValueError, match="total_steps"):
        HSPG(params, groups, lr=LR)


def test_hspg_cap_only_when_asked():
    _model, groups, params = four_groups(HSPG_X, HSPG_G)
    opt = HSPG(params, groups, lr=LR, momentum=0.0, lambda_=LAM, epsilon=0.99,
               subgradient_steps=0, target_group_sparsity=0.5)  # fmt: skip
    opt.step()
    # three groups cross; the cap keeps two, the smallest norms after the step (groups 1, 0)
    assert {i for i in range(4) if bool(opt.zero[i])} == {0, 1}


def test_hspg_adam_lasso_step_uses_each_parameters_own_lr():
    model, groups, params = four_groups(HSPG_X, [[0.0] * 4] * 4, lr_first=0.0)
    opt = HSPG(params, groups, lr=LR, variant="adam", lambda_=LAM, subgradient_steps=1)
    opt.step()  # zero gradients: Adam moves nothing, only the decoupled λ step lr·λ x/||x||
    x = torch.tensor(HSPG_X)
    expected = x - LR * LAM * x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(group_rows(model), expected)
