"""HESSO (:mod:`prunekit.structured.hesso`): the importance terms and the decay of the least
important groups, linear to zero within a period; cost targets (a share of group costs, of the
model's MACs, in channel multiples, discounted by ``cost_power``) and the layer cap that
``may_empty`` lifts for a branch slim folds.

Every expected value of the by-hand tests is computed here from the paper's formulas on numbers
set by hand on the 4-group model of :func:`tests.structured.tiny_models.four_groups`, never
by the optimizer's own helpers.
"""

import math

import pytest
import torch

from prunekit.structured import find_groups, slim
from prunekit.structured.optim import HESSO
from tests.structured.tiny_models import TINY_MODELS, dot, four_groups, group_rows, train_steps

HX = [[1.0, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0.4, 0.3], [2.0, 2.0, 0, 0]]
HG = [[0.3, 0, 0, 0], [0, -0.2, 0.1, 0], [0, 0.1, 0, 0.2], [-0.5, 0.1, 0, 0.4]]
LR = 0.1
TOTAL = 120


def _hesso_terms_by_hand():
    norm = [math.sqrt(dot(x, x)) for x in HX]
    gnorm = [math.sqrt(dot(g, g)) for g in HG]
    inner = [dot(x, g) for x, g in zip(HX, HG, strict=True)]
    raw = {
        "magnitude": norm,
        "avg_magnitude": [n / 2 for n in norm],  # ||x||/√4
        "cosine": [i / (a * b) + 1 for i, a, b in zip(inner, norm, gnorm, strict=True)],
        "taylor_first": [abs(i) for i in inner],
        "taylor_second": [0.5 * i * i for i in inner],
    }
    return {k: [v / math.sqrt(dot(t, t)) for v in t] for k, t in raw.items()}


@pytest.mark.parametrize(
    "criterion", ["magnitude", "avg_magnitude", "cosine", "taylor_first", "taylor_second", None]
)
def test_hesso_importance_terms_by_hand(criterion):
    terms = _hesso_terms_by_hand()
    _model, groups, params = four_groups(HX, HG)
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
    model, groups, params = four_groups(HX, HG)
    opt = HESSO(params, groups, lr=LR, momentum=0.0, start_step=0, end_step=4, periods=1,
                target_group_sparsity=0.25)  # fmt: skip
    opt.step()
    assert {i for i in range(4) if bool(opt.decaying[i])} == {least}
    # OTOv3: x − lr ∇f for every group, then the decaying one times (T − k − 1)/(T − k) = 3/4
    expected = torch.tensor(HX) - LR * torch.tensor(HG)
    expected[least] *= 3 / 4
    torch.testing.assert_close(group_rows(model), expected)


def test_hesso_decays_linearly_to_zero_within_a_period():
    torch.manual_seed(0)
    model, x = TINY_MODELS["residual"]()
    groups = find_groups(model, x)
    opt = HESSO(model.parameters(), groups, lr=0.0, momentum=0.0, start_step=0, end_step=10, periods=1,
                target_group_sparsity=0.25)  # fmt: skip
    norms0 = opt.index.sq_norms().sqrt()
    ratios = []
    for _ in range(10):
        train_steps(model, x, opt, 1)
        chosen = opt.decaying if opt.decaying.any() else opt.zero
        ratios.append(float((opt.index.sq_norms().sqrt()[chosen] / norms0[chosen]).mean()))
    assert ratios == pytest.approx([1 - k / 10 for k in range(1, 11)], abs=1e-5)  # lr 0: decay only
    assert int(opt.zero.sum()) == round(0.25 * opt.index.num_groups)


def test_hesso_cost_removed_removes_that_share_of_the_cost_expensive_first():
    torch.manual_seed(0)
    model, x = TINY_MODELS["residual"]()
    groups = find_groups(model, x)
    n = sum(g.prunable for g in groups)
    costs = [1.0] * n
    costs[3] = float(n)  # one group costs as much as all the others together
    opt = HESSO(model.parameters(), groups, lr=0.05, start_step=TOTAL // 5,
                end_step=TOTAL // 5 + TOTAL // 2, periods=5, group_costs=costs, cost_removed=0.45)  # fmt: skip
    train_steps(model, x, opt, TOTAL)
    zero = opt.index.sq_norms() == 0
    removed = float(torch.tensor(costs)[zero].sum()) / sum(costs)
    assert removed >= 0.45 and bool(zero[3])  # the expensive group went first
    assert int(zero.sum()) < n // 2  # a few cheap ones besides: far fewer than 45% of the groups
    slim(model, x, groups)  # raises if the output differs
    with pytest.raises(ValueError, match="group_costs"):
        HESSO(
            model.parameters(),
            groups,
            lr=0.05,
            end_step=10,
            group_costs=[1.0],
            cost_removed=0.5,
        )


@pytest.mark.parametrize("multiple", [1, 4])
def test_hesso_exact_macs_target_meets_the_model_macs_fraction(multiple):
    from prunekit.core import count_macs
    from prunekit.structured import group_macs, macs_rates

    torch.manual_seed(0)
    model, x = TINY_MODELS["residual"]()
    groups = find_groups(model, x)
    before = count_macs(model, x[:1])
    opt = HESSO(model.parameters(), groups, lr=0.05, start_step=TOTAL // 5, end_step=TOTAL // 5 + TOTAL // 2,
                periods=5, group_costs=group_macs(model, groups, x[:1]), cost_removed=0.5,
                cost_rates=macs_rates(model, x[:1]), channel_multiple=multiple)  # fmt: skip
    train_steps(model, x, opt, TOTAL)
    small = slim(model, x, groups)
    removed = 1 - count_macs(small, x[:1]) / before
    assert 0.5 <= removed < 0.65  # the target, overshot by at most a few groups' worth
    widths = [m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths != [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % multiple == 0 for w in widths), widths  # in units that keep multiples


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_hesso_cost_power_sets_how_much_cost_discounts_importance(power, monkeypatch):
    model, x = TINY_MODELS["residual"]()
    groups = find_groups(model, x)
    n = sum(g.prunable for g in groups)
    costs = [1.0] * n
    costs[3] = float(n)  # half of all the cost in one group, the most important one
    importance = torch.ones(n)
    importance[3] = 3.0
    opt = HESSO(model.parameters(), groups, lr=0.05, end_step=10, group_costs=costs,
                cost_removed=0.1, max_layer_fraction=1.0, cost_power=power)  # fmt: skip
    monkeypatch.setattr(opt, "importance", lambda: importance)
    opt._select_by_cost(1.0)
    # score of group 3 relative to a cheap one: 3 / n**power (costs relative to their mean)
    expensive_first = 3.0 / n**power < 1.0
    assert bool(opt.decaying[3]) == expensive_first
    assert int(opt.decaying.sum()) == (1 if expensive_first else math.ceil(0.1 * (2 * n - 1)))
    with pytest.raises(ValueError, match="cost_power"):
        HESSO(model.parameters(), groups, lr=0.05, end_step=10, group_costs=costs,
              cost_removed=0.1, cost_power=2.0)  # fmt: skip


def test_hesso_channel_multiple_is_validated():
    model, x = TINY_MODELS["residual"]()
    groups = find_groups(model, x)
    with pytest.raises(ValueError, match="channel_multiple"):
        HESSO(model.parameters(), groups, lr=0.05, end_step=10, group_costs=[1.0] * 40,
              cost_removed=0.1, channel_multiple=0)  # fmt: skip


@pytest.mark.parametrize("may", [False, True])
def test_hesso_may_empty_lifts_the_layer_cap_for_a_branch_that_slim_folds(may, monkeypatch):
    from prunekit.models import build_model
    from prunekit.structured import FoldedConv, emptiable, group_macs, macs_rates

    torch.manual_seed(0)
    model, x = build_model("resnet20", (1, 28, 28), 10).eval(), torch.randn(2, 1, 28, 28)
    groups = [g for g in find_groups(model, x) if g.prunable]
    branch = [i for i, g in enumerate(groups) if ("layers.1.conv1.weight", 0) in g.slices("out")]
    assert len(branch) == 16
    importance = torch.ones(len(groups))
    importance[branch] = 0.01  # the least important: taken first
    opt = HESSO(model.parameters(), groups, lr=0.05, end_step=10, group_costs=group_macs(model, groups, x[:1]),
                cost_removed=0.15, cost_rates=macs_rates(model, x[:1]), max_layer_fraction=0.5, cost_power=0.0,
                may_empty=emptiable(model, groups, x) if may else None)  # fmt: skip
    monkeypatch.setattr(opt, "importance", lambda: importance)
    opt._select_by_cost(1.0)
    taken = int(opt.decaying[branch].sum())
    assert taken == (16 if may else 8)  # the cap: half of the branch's 16 channels
    for i in torch.nonzero(opt.decaying).flatten().tolist():
        groups[i].zero_()
    small = slim(model, x, groups)
    assert isinstance(small.layers[1].conv2, FoldedConv) == may
    with pytest.raises(ValueError, match="may_empty"):
        HESSO(model.parameters(), groups, lr=0.05, end_step=10, group_costs=[1.0] * len(groups),
              cost_removed=0.1, may_empty=[True])  # fmt: skip
