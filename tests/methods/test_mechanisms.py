"""Tests that each method does what its paper says (would fail if the mechanism were wrong)."""

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit.methods.imp import imp_lr_factor
from tests.helpers import mlp, run, sgd, small_cnn, toy_data


def test_gmp_follows_cubic_ramp_and_pruned_stay_pruned():
    model = mlp()
    opt = sgd(model)
    pruner = prunekit.sparsify(
        model, opt, "gmp", sparsity=0.9, total_steps=100, start=0.1, end=0.5, update_every=5
    )
    seen = []
    prev_masks = None

    def check():
        nonlocal prev_masks
        seen.append(pruner.current_sparsity())
        masks = [m.clone() for m in pruner.masker.masks]
        if prev_masks is not None:
            for a, b in zip(prev_masks, masks, strict=True):
                assert not (b & ~a).any()  # hard: nothing ever returns
        prev_masks = masks

    run(model, opt, pruner, 100, callback=check)
    assert seen[8] == 0.0  # before start (step 9 < 10)
    assert seen[29] == pytest.approx(pruner.scheduled_sparsity(30), abs=0.002)
    assert seen[49] == pytest.approx(0.9, abs=0.002) and seen[-1] == pytest.approx(0.9, abs=0.002)
    assert all(b >= a - 1e-9 for a, b in pairwise(seen))


def test_dpf_pruned_coordinates_get_gradient_and_return():
    model = mlp()
    opt = sgd(model, lr=0.1)
    pruner = prunekit.sparsify(
        model, opt, "dpf", sparsity=0.8, total_steps=200, end=0.2, update_every=4
    )
    x, y = toy_data()
    run(model, opt, pruner, 50)
    masks_before = [m.clone() for m in pruner.masker.masks]
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    for t, m in zip(pruner.targets, masks_before, strict=True):
        assert torch.count_nonzero(t.param.grad[~m]) > 0  # feedback reaches pruned weights
    opt.zero_grad()
    run(model, opt, pruner, 100, seed=3)
    revived = sum(
        int((m & ~m0).sum()) for m, m0 in zip(pruner.masker.masks, masks_before, strict=True)
    )
    assert revived > 0  # some pruned weights came back when the mask was recomputed
    pruner.finalize()
    assert prunekit.sparsity_report(model)["global_sparsity"] == pytest.approx(0.8, abs=0.005)


def test_rigl_constant_nonzeros_and_zero_initialised_growth():
    model = mlp()
    opt = sgd(model, lr=0.1)
    pruner = prunekit.sparsify(
        model, opt, "rigl", sparsity=0.9, total_steps=200, update_every=10, allocation="erk"
    )
    counts = [int(m.sum()) for m in pruner.masker.masks]
    previous = [m.clone() for m in pruner.masker.masks]
    changed_at = []

    def check():
        masks = pruner.masker.masks
        assert [int(m.sum()) for m in masks] == counts  # per-layer counts never change
        for t, m in zip(pruner.targets, masks, strict=True):
            assert torch.count_nonzero(t.param[~m]) == 0
        if any(not torch.equal(m, p) for m, p in zip(masks, previous, strict=True)):
            changed_at.append(pruner.step_count)
        previous[:] = [m.clone() for m in masks]

    run(model, opt, pruner, 200, callback=check)
    # the masks move at every update (every 10 steps until 75% of training) that drops at least one
    # weight, α_t = 0.3/2 · (1 + cos(π t / 150)) of a layer's active weights, and only then
    expected = [
        t
        for t in range(10, 150, 10)
        if any(int(0.15 * (1 + math.cos(math.pi * t / 150)) * n) > 0 for n in counts)
    ]
    assert len(expected) >= 10 and changed_at == expected


def test_rigl_grows_largest_gradient_and_drops_smallest_magnitude():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights do not move: selection observable
    pruner = prunekit.sparsify(
        model, opt, "rigl", sparsity=0.9, total_steps=100, update_every=1, allocation="erk"
    )
    x, y = toy_data()
    old = [m.clone() for m in pruner.masker.masks]
    weights = [t.param.detach().clone() for t in pruner.targets]
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    grads = [t.param.grad.detach().clone() for t in pruner.targets]  # captured before masking
    opt.step()
    pruner.step()
    fraction = 0.15 * (1 + math.cos(math.pi * 1 / 75))  # α_1 with α = 0.3, T_end = 75
    for t, m_old, m_new, w, g in zip(
        pruner.targets, old, pruner.masker.masks, weights, grads, strict=True
    ):
        # expected, written out: drop the k active weights of smallest |w|, then grow the k
        # inactive ones (just-dropped included) of largest |grad|
        k = int(fraction * int(m_old.sum()))
        assert k > 0
        active = m_old.reshape(-1)
        drop_score = torch.where(active, w.abs().reshape(-1), torch.inf)
        after_drop = active.clone()
        after_drop[drop_score.argsort()[:k]] = False
        grow_score = torch.where(after_drop, -1.0, g.abs().reshape(-1))
        expected = after_drop.clone()
        expected[grow_score.argsort(descending=True)[:k]] = True
        assert torch.equal(m_new.reshape(-1), expected)
        new = m_new & ~m_old
        assert int(new.sum()) > 0
        # new connections start at zero; surviving ones (dropped and regrown ones too) keep |w|
        assert torch.count_nonzero(t.param[new]) == 0
        assert torch.equal(t.param.detach()[m_new & m_old], w[m_new & m_old])


def test_rigl_uniform_keeps_the_first_layer_dense():
    model = mlp()
    pruner = prunekit.sparsify(
        model, sgd(model), "rigl", sparsity=0.8, total_steps=100, allocation="uniform"
    )
    density = [float(m.float().mean()) for m in pruner.masker.masks]
    assert density[0] == 1.0
    assert density[1:] == [pytest.approx(0.2, abs=0.005)] * 2
    run(model, pruner.optimizer, pruner, 100)
    pruner.finalize()  # keeps the paper's distribution: no magnitude pruning of the first layer
    assert int(torch.count_nonzero(model[0].weight)) > 0.95 * model[0].weight.numel()


def _acdc_setup():
    """AC/DC over 100 steps: dense [0,10), C [10,20), D [20,30), C [30,40), D [40,80), C [80,100]."""
    model = mlp()
    opt = sgd(model)
    pruner = prunekit.sparsify(
        model, opt, "acdc", sparsity=0.9, total_steps=100, warmup=0.1, period=0.1, alternate_end=0.5,
        final_start=0.8,
    )  # fmt: skip
    return model, opt, pruner


def test_acdc_switches_phases_at_configured_steps_and_yields_pair():
    model, opt, pruner = _acdc_setup()
    total = 100
    phases = [pruner.compressed]
    sparsities = [pruner.current_sparsity()]

    def record():
        phases.append(pruner.compressed)
        sparsities.append(pruner.current_sparsity())

    run(model, opt, pruner, total, callback=record)
    # dense [0,10), C [10,20), D [20,30), C [30,40), D [40,80), C [80,100]
    expected = [False] * 10 + [True] * 10 + [False] * 10 + [True] * 10 + [False] * 40 + [True] * 21
    assert phases == expected
    assert sparsities[15] == pytest.approx(0.9, abs=0.002)
    assert sparsities[25] < 0.5  # decompressed: pruned weights were revived
    dense = pruner.dense_state_dict()
    assert all(not k.endswith("_mask") for k in dense)
    dense_nnz = sum(int(torch.count_nonzero(v)) for k, v in dense.items() if k.endswith("weight"))
    pruner.finalize()
    assert prunekit.sparsity_report(model)["nonzeros"] < dense_nnz / 5  # the pair: dense and sparse


def test_acdc_resets_momentum_when_dense_phase_starts():
    model, opt, pruner = _acdc_setup()
    run(model, opt, pruner, 20)  # step 20: dense phase just started
    for t in pruner.targets:
        assert torch.count_nonzero(opt.state[t.param]["momentum_buffer"]) == 0


def test_gap_grows_one_partition_at_a_time():
    model = mlp()
    opt = sgd(model)
    pruner = prunekit.sparsify(
        model, opt, "gap", sparsity=0.9, total_steps=120, partitions=3, cycles=2, grow_end=0.6
    )
    # 3 layers, one per partition; 0.6 · 120 steps / (3 partitions · 2 cycles) = 12 steps a phase
    for step in range(72):
        part = (step // 12) % 3
        dens = [float(m.float().mean()) for m in pruner.masker.masks]
        assert dens[part] == 1.0  # the grown partition is dense
        assert all(d == pytest.approx(0.1, abs=0.01) for i, d in enumerate(dens) if i != part)
        run(model, opt, pruner, 1, seed=step)
    assert pruner.phase(pruner.step_count) is None
    for _ in range(10):  # the cycles are over: everything stays sparse
        run(model, opt, pruner, 1)
        assert all(
            float(m.float().mean()) == pytest.approx(0.1, abs=0.01) for m in pruner.masker.masks
        )
    assert all(float(m.float().mean()) == pytest.approx(0.1, abs=0.01) for m in pruner.masker.masks)


def test_gap_refuses_an_allocation_that_empties_a_layer_at_init():
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)  # the smallest magnitudes at init: global magnitude drops it all
    with pytest.raises(prunekit.ConfigError, match=r"layer collapse.*erk"):
        prunekit.sparsify(
            model, sgd(model), "gap", sparsity=0.9, total_steps=100, allocation="global"
        )
    prunekit.sparsify(model, sgd(model), "gap", sparsity=0.9, total_steps=100, allocation="erk")


def test_imp_rounds_and_retraining_schedules():
    total = 100
    model = mlp()
    opt = sgd(model, lr=0.2)
    pruner = prunekit.sparsify(
        model, opt, "imp", sparsity=0.875, total_steps=total, rounds=3, pretrain=0.4
    )
    assert pruner.round_starts() == [40, 60, 80]
    lrs, sparsity = [], []

    def record():
        lrs.append(opt.param_groups[0]["lr"])
        sparsity.append(pruner.current_sparsity())

    run(model, opt, pruner, total, callback=record)
    assert sparsity[38] == 0.0
    assert sparsity[39] == pytest.approx(0.5, abs=0.002)  # 1 - 0.125 ** (1/3)
    assert sparsity[59] == pytest.approx(0.75, abs=0.002)
    assert sparsity[79] == pytest.approx(0.875, abs=0.002)
    # LLR: each retraining phase restarts at the initial lr and decays linearly
    assert (
        lrs[39] == pytest.approx(0.2)
        and lrs[49] == pytest.approx(0.1)
        and lrs[59] == pytest.approx(0.2)
    )


@pytest.mark.parametrize("schedule", ["ft", "lrw", "slr", "llr"])
def test_imp_lr_schedule_shapes(schedule):
    cfg = prunekit.methods.IMPConfig(
        sparsity=0.9,
        total_steps=100,
        rounds=2,
        pretrain=0.6,
        retrain_schedule=schedule,
        base_schedule="linear",
    )
    # base: linear 1 -> 0 over 60 steps; retraining phases of 20 steps at 60 and 80
    base = [imp_lr_factor(cfg, t) for t in range(60)]
    assert base[0] == 1.0 and base[30] == pytest.approx(0.5)
    phase = [imp_lr_factor(cfg, t) for t in range(60, 80)]
    assert phase == [imp_lr_factor(cfg, t) for t in range(80, 100)]  # every round restarts
    expected = {
        "ft": [0.01] * 20,
        "lrw": [1 - (40 + j) / 60 for j in range(20)],
        "slr": [1 - int(j * 3) / 60 for j in range(20)],
        "llr": [1 - j / 20 for j in range(20)],
    }[schedule]
    assert phase == pytest.approx(expected)


def test_cram_requires_closure_and_combines_gradients():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = prunekit.sparsify(
        model,
        opt,
        "cram",
        sparsity=0.9,
        total_steps=10,
        rho=0.05,
        sparsities=[0.7],
        include_target=False,
    )  # fmt: skip  (one level: the compression of the perturbed pass is known)
    x, y = toy_data(image=True)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()

    # expected CrAM+ update, computed by hand on a copy
    import copy

    ref = copy.deepcopy(model)
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    g = [p.grad.clone() for p in ref.parameters()]
    bn_before = [b.clone() for b in ref.buffers()]
    with torch.no_grad():
        theta = [p.clone() for p in ref.parameters()]
        for p, gi in zip(ref.parameters(), g, strict=True):
            p.add_(gi, alpha=0.05)
        ws = [ref[0].weight, ref[3].weight, ref[6].weight]
        from prunekit.core import compute_masks

        for w, m in zip(ws, compute_masks([w.abs() for w in ws], 0.7, "global"), strict=True):
            w.mul_(m)
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    expected = [
        t - 0.1 * (p.grad + gi) for t, p, gi in zip(theta, ref.parameters(), g, strict=True)
    ]

    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    bn_model_before = [b.clone() for b in model.buffers()]

    def closure():
        opt.zero_grad()
        out = F.cross_entropy(model(x), y)
        out.backward()
        return out

    opt.step(closure)
    pruner.step()
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e)
    # batch-norm statistics are not updated by the perturbed pass
    for b0, b1 in zip(bn_model_before, model.buffers(), strict=True):
        assert torch.equal(b0, b1)
    del bn_before


def test_cram_draws_target_level_by_default():
    cfg = prunekit.methods.CrAMConfig(sparsity=0.95, total_steps=10, sparsities=[0.5, 0.9])
    assert cfg.levels() == [0.5, 0.9, 0.95]
    model = mlp()
    opt = sgd(model)
    pruner = prunekit.sparsify(model, opt, "cram", sparsity=0.95, total_steps=40, sparsities=[0.5])
    seen = set()
    run(model, opt, pruner, 40, callback=lambda: seen.add(pruner.last_compression))
    assert seen == {0.5, 0.95}


def test_acdc_pruned_weights_stay_zero_in_every_compressed_phase():
    # the second compressed phase follows a dense phase in which pruned weights gathered momentum
    model, opt, pruner = _acdc_setup()

    def check():
        if pruner.compressed:
            for t, m in zip(pruner.targets, pruner.masker.masks, strict=True):
                assert torch.count_nonzero(t.param[~m]) == 0, pruner.step_count

    run(model, opt, pruner, 100, callback=check)


def test_acdc_every_compressed_phase_keeps_the_largest_weights_unchanged():
    # Entering a compressed phase must keep the global top-k of the current weights *as they are*.
    # Regression: the stale masks of the previous compressed phase were applied first, zeroing
    # weights that regrew in the dense phase and were selected again (every re-entry but the first).
    model = mlp()
    opt = sgd(model, lr=0.1)
    pruner = prunekit.sparsify(
        model, opt, "acdc", sparsity=0.9, total_steps=120, warmup=0.1, period=0.1,
        alternate_end=0.7, final_start=0.8,
    )  # fmt: skip
    x, y = toy_data()
    g = torch.Generator().manual_seed(0)
    entries = 0
    for _ in range(120):
        was_compressed = pruner.compressed
        i = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = [t.param.detach().clone() for t in pruner.targets]
        pruner.step()
        if pruner.compressed and not was_compressed:
            entries += 1
            flat = torch.cat([w.abs().reshape(-1) for w in before])
            keep = round(0.1 * flat.numel())
            threshold = flat.topk(keep).values.min()
            for t, w in zip(pruner.targets, before, strict=True):
                expected = torch.where(w.abs() >= threshold, w, torch.zeros_like(w))
                assert torch.equal(t.param.detach(), expected), (entries, t.name)
    assert entries == 4  # C [12,24), [36,48), [60,72), then the final phase from 96


def _imp_run_to_first_round(**config):
    """IMP over 100 steps, dense for 70; returns the weights just before and after round 1."""
    model = mlp()
    opt = sgd(model, lr=0.2)
    pruner = prunekit.sparsify(
        model, opt, "imp", sparsity=0.875, total_steps=100, rounds=3, pretrain=0.7, **config
    )
    x, y = toy_data()
    g = torch.Generator().manual_seed(0)
    snapshots = {}
    for step in range(1, 71):
        i = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        before = [t.param.detach().clone() for t in pruner.targets]
        if step == 10:
            snapshots["state_10"] = {k: v.clone() for k, v in model.state_dict().items()}
        pruner.step()
        snapshots[step] = before
    return model, opt, pruner, snapshots


def _global_topk(weights, keep_fraction):
    flat = torch.cat([w.abs().reshape(-1) for w in weights])
    threshold = flat.topk(round(keep_fraction * flat.numel())).values.min()
    return [w.abs() >= threshold for w in weights]


def test_imp_allr_restarts_at_the_relative_norm_drop_over_sqrt_sparsity():
    model, opt, pruner, snapshots = _imp_run_to_first_round(retrain_schedule="allr")
    w = snapshots[70]  # the weights the first round prunes (to 50%: 0.875 = 1 - 0.5³)
    masks = _global_topk(w, 0.5)
    removed = sum(float(wi[~m].pow(2).sum()) for wi, m in zip(w, masks, strict=True))
    total = sum(float(wi.pow(2).sum()) for wi in w)
    peak = math.sqrt(removed / total) / math.sqrt(0.5)
    assert 1 / 7 < peak < 1  # not clipped: the floor is R/T0 = 10/70
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * peak)  # j = 0 of the restart
    run(model, opt, pruner, 5, seed=5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * peak * (1 - 5 / 10))  # linear decay


def test_imp_weight_rewinding_restarts_survivors_from_their_early_values():
    _, opt, pruner, snapshots = _imp_run_to_first_round(rewind_to=0.1)
    after_round = [t.param.detach() for t in pruner.targets]
    masks = _global_topk(snapshots[70], 0.5)  # chosen by the trained weights' magnitudes
    for now, w10, m in zip(after_round, snapshots[10], masks, strict=True):
        assert torch.equal(now, w10 * m)  # the survivors' values after 10 of 100 steps
    model = pruner.model
    for name in ("0.bias", "2.bias", "4.bias"):  # the whole network rewinds, not only the targets
        assert torch.equal(model.state_dict()[name], snapshots["state_10"][name])
    assert not opt.state  # momentum restarts with the weights


def test_cram_finalize_re_estimates_batchnorm_on_the_pruned_model():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = prunekit.sparsify(model, opt, "cram", sparsity=0.9, total_steps=20)
    x, y = toy_data(image=True)
    run(model, opt, pruner, 20, data=(x, y))
    batches = [x[i : i + 64] for i in range(0, 256, 64)]
    stale = model[1].running_mean.clone()
    pruner.finalize(calibration=iter(batches))
    # expected, by hand: the mean over the batches of the pruned conv's per-batch channel means
    with torch.no_grad():
        means = [model[0](b).mean(dim=(0, 2, 3)) for b in batches]
    expected = torch.stack(means).mean(0)
    torch.testing.assert_close(model[1].running_mean, expected)
    assert not torch.allclose(stale, expected, atol=1e-3)  # the dense run's statistics were stale
    assert model.training and model[1].momentum == 0.1  # mode and momentum restored


def test_gap_keeps_the_nm_pattern_when_a_partition_holds_a_dense_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 4),
    )  # fmt: skip  (6 inputs: not a multiple of 4, left dense)
    opt = sgd(model)
    pruner = prunekit.sparsify(
        model, opt, "gap", sparsity=0.5, pattern="2:4", total_steps=40, partitions=1, cycles=1,
        grow_end=0.5,
    )  # fmt: skip
    x, y = torch.randn(256, 6), torch.randint(0, 4, (256,))
    run(model, opt, pruner, 40, data=(x, y))
    assert pruner.phase(pruner.step_count) is None  # grown and pruned back
    for layer in (model[2], model[4]):
        groups = (layer.weight.detach() != 0).reshape(-1, 4)
        assert (groups.sum(1) <= 2).all()
