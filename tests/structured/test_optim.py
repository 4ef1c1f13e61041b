import math

import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit.structured import emptiable, find_groups, slim
from prunekit.structured.optim import DHSPG, HESSO, HSPG
from tests.structured.tiny_models import TINY_MODELS

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
    model, x = TINY_MODELS[model_name]()
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
    model, x = TINY_MODELS["residual"]()
    groups = find_groups(model, x)
    opt = HESSO(model.parameters(), groups, lr=0.0, momentum=0.0, start_step=0, end_step=10, periods=1,
                target_group_sparsity=0.25)  # fmt: skip
    norms0 = opt.index.sq_norms().sqrt()
    ratios = []
    for _ in range(10):
        _train(model, x, opt, 1)
        chosen = opt.decaying if opt.decaying.any() else opt.zero
        ratios.append(float((opt.index.sq_norms().sqrt()[chosen] / norms0[chosen]).mean()))
    assert ratios == pytest.approx([1 - k / 10 for k in range(1, 11)], abs=1e-5)  # lr 0: decay only
    assert int(opt.zero.sum()) == round(0.25 * opt.index.num_groups)


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
    _train(model, x, opt, 40)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    rng = torch.get_rng_state()
    _train(model, x, opt, 24)

    model2, x2, opt2 = build()  # fresh objects, as a new process would have
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.num_steps == 40
    if name == "hesso":
        assert bool(opt2.decaying.any())  # the break falls inside a period
    torch.set_rng_state(rng)
    _train(model2, x2, opt2, 24)
    for (key, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert torch.equal(opt2.zero, opt.zero) and opt2.num_steps == opt.num_steps == 64
    assert bool(opt.zero.any())  # groups went to zero after the break


def test_no_prunable_groups_is_reported():
    model, x = TINY_MODELS["tied"]()
    groups = [g for g in find_groups(model, x) if not g.prunable]
    with pytest.raises(prunekit.NoPrunableLayersError, match="no prunable groups"):
        HESSO(model.parameters(), groups, lr=0.1, end_step=10)


def test_group_macs_price_what_slimming_saves():
    from prunekit.core import count_macs
    from prunekit.structured import group_macs

    torch.manual_seed(0)
    model, x = TINY_MODELS["conv_bn_flatten"]()
    groups = find_groups(model, x)
    costs = group_macs(model, groups, x[:1])
    total = count_macs(model, x[:1])
    for g, c in zip(groups, costs, strict=True):
        if not g.prunable:
            continue
        m, _ = TINY_MODELS["conv_bn_flatten"]()
        m.load_state_dict(model.state_dict())
        sub = find_groups(m, x)
        sub[g.index].zero_()
        saved = total - count_macs(slim(m, x, sub), x[:1])
        assert c == pytest.approx(saved, rel=1e-6)  # one group alone: no shared slices


def test_hesso_cost_removed_removes_that_share_of_the_cost_expensive_first():
    torch.manual_seed(0)
    model, x = TINY_MODELS["residual"]()
    groups = find_groups(model, x)
    n = sum(g.prunable for g in groups)
    costs = [1.0] * n
    costs[3] = float(n)  # one group costs as much as all the others together
    opt = HESSO(model.parameters(), groups, lr=0.05, start_step=TOTAL // 5,
                end_step=TOTAL // 5 + TOTAL // 2, periods=5, group_costs=costs, cost_removed=0.45)  # fmt: skip
    _train(model, x, opt, TOTAL)
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
    _train(model, x, opt, TOTAL)
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


def test_emptiable_allows_residual_branches_and_refuses_every_path():
    from prunekit.models import build_model

    torch.manual_seed(0)
    for name, kwargs in (("resnet20", {}), ("vgg_bn", {"width": 0.25})):
        model, x = build_model(name, (1, 28, 28), 10, **kwargs), torch.randn(2, 1, 28, 28)
        groups = find_groups(model, x)
        flags = emptiable(model, groups, x)
        by_layer = {}
        for g, f in zip(groups, flags, strict=True):
            if g.prunable:
                by_layer.setdefault(min(n for n, _ in g.slices("out")), set()).add(f)
        assert all(len(v) == 1 for v in by_layer.values())  # a whole family or nothing
        may = {k for k, v in by_layer.items() if v == {True}}
        if name == "vgg_bn":  # a chain: every layer is on every path
            assert not may
        else:  # the 9 branches' inner channels; not the stem/stage streams
            assert may == {f"layers.{b}.bn1.bias" for b in range(9)}
        assert not any(f for g, f in zip(groups, flags, strict=True) if not g.prunable)


def test_emptiable_with_token_inputs_and_the_emptied_mlp_branch_is_exact():
    torch.manual_seed(0)
    model, idx = TINY_MODELS["embed_layernorm"]()  # h + fc2(gelu(fc1(h))): the MLP is a branch
    model.eval()
    groups = find_groups(model, idx)
    flags = emptiable(model, groups, idx)
    hidden = [i for i, g in enumerate(groups) if ("fc1.weight", 0) in g.slices("out")]
    assert len(hidden) == 16 and all(flags[i] for i in hidden)
    assert not any(f for i, f in enumerate(flags) if i not in hidden)
    for i in hidden:
        groups[i].zero_()
    with torch.no_grad():
        ref = model(idx)
    small = slim(model, idx, groups)
    assert small.fc1.out_features == 0 and small.fc2.in_features == 0  # nothing left to compute
    with torch.no_grad():
        torch.testing.assert_close(small(idx), ref)


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
