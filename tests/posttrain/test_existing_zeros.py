"""The zeros a layer already has count toward ``sparsity``, for every post-training pruner.

A layer made sparse earlier (structured pruning: whole zero rows, and dead inputs, zero on every
calibration sample, whose weights are zeroed) compressed at ``sparsity=s`` ends with
``max(z, round(s·d))`` zeros, per row for the row-wise methods, per layer for the layer-wise
scopes and M-FAC (one target here, so global = layer): the existing zeros ``z`` are counted and
kept, never pruned "in addition". Expected counts come from the counts of the test's own layer.

On a dense layer (no zero weight, no dead input) every method gives bitwise the output of the
code before this rule (:mod:`tests.posttrain._legacy`, a frozen copy); M-FAC in one step only.
"""

import copy
import importlib
import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit.posttrain import available_compressors, get_compressor, layer_hessian
from prunekit.posttrain.obc import obc_database
from prunekit.posttrain.obs import magnitude_prune, sparsegpt_prune, wanda_prune

from . import _legacy

D_OUT, D_IN, S = 12, 32, 0.5
T = math.floor(S * D_IN + 0.5)  # zeros per row asked for: 16

#: (method, config) of the methods that prune per row: each row ends with max(z_r, T) zeros
ROW_WISE = [
    ("magnitude", {}),
    ("wanda", {}),
    ("sparsegpt", {"block_size": 8}),
    ("obc", {}),
]
#: methods / scopes that count per layer (M-FAC: over all targets, one here)
LAYER_WISE = [
    ("sparsegpt", {"block_size": 8, "mask_scope": "block"}),
    ("obc", {"mask_scope": "layer"}),
    ("mfac", {"ngrads": 8}),
]


def _ids(cases):
    return [f"{m}-{cfg.get('mask_scope', 'global' if m == 'mfac' else 'row')}" for m, cfg in cases]


def _sparse_layer(dead_cols, zero_rows, scattered, seed=0):
    """A (D_OUT, D_IN) weight with whole zero rows, ``scattered[r]`` random zeros in row ``r``
    among its live columns, and nonzero weights on the dead columns (they count as zeros only
    because their inputs are dead). Returns ``(W, calibration batches)``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D_OUT, D_IN, generator=g)
    W[zero_rows] = 0.0
    live = [j for j in range(D_IN) if j not in dead_cols]
    for r, k in scattered.items():
        cols = torch.tensor(live)[torch.randperm(len(live), generator=g)[:k]]
        W[r, cols] = 0.0
    mix = torch.randn(D_IN, D_IN, generator=g) + 2.0 * torch.eye(D_IN)
    batches = []
    for _ in range(4):
        x = torch.randn(64, D_IN, generator=g) @ mix.T  # correlated: OBS differs from magnitude
        x[:, dead_cols] = 0.0
        batches.append(x)
    return W, batches


def _about_30_percent():
    """~30% zeros: 2 zero rows, 3 dead inputs, a few scattered zeros per row (row 3 is already
    sparser than the target without being empty)."""
    dead = [5, 17, 30]
    scattered = {r: r % 3 for r in range(D_OUT) if r not in (0, 7)}
    scattered[3] = 14  # 17 zeros with the dead inputs
    return _sparse_layer(dead, [0, 7], scattered, seed=1), dead


def _about_70_percent():
    """~71% zeros, every row at >= 50%: 2 zero rows, 6 dead inputs, 15 scattered zeros per row."""
    dead = [1, 4, 9, 16, 25, 31]
    scattered = {r: 15 for r in range(D_OUT) if r not in (2, 9)}
    return _sparse_layer(dead, [2, 9], scattered, seed=2), dead


def _existing(W, dead):
    z = W == 0
    z[:, dead] = True
    return z


def _compress(W, batches, method, cfg, **kw):
    model = nn.Sequential(nn.Linear(D_IN, D_OUT))
    with torch.no_grad():
        model[0].weight.copy_(W)
    report = prunekit.compress(model, batches, method, **cfg, **kw)
    return model[0].weight.detach().clone(), report


def test_every_registered_pruner_is_covered():
    pruners = {n for n in available_compressors() if get_compressor(n).config_class.prunes}
    assert pruners == {m for m, _ in ROW_WISE + LAYER_WISE}


@pytest.mark.parametrize(("method", "cfg"), ROW_WISE, ids=_ids(ROW_WISE))
def test_row_wise_methods_count_existing_zeros_per_row(method, cfg):
    (W, batches), dead = _about_30_percent()
    zeros = _existing(W, dead)
    assert 0.27 < float(zeros.float().mean()) < 0.33
    out, report = _compress(W, batches, method, cfg, sparsity=S)
    expected = torch.clamp(zeros.sum(dim=1), min=T)  # max(z_r, round(s·d_in)) per row
    assert expected[3] > T and expected[0] == D_IN  # rows already sparser than asked
    assert (out == 0).sum(dim=1).tolist() == expected.tolist()
    assert (out[zeros] == 0).all()  # every existing zero kept, dead inputs zeroed
    assert report.layer("0").dead_inputs == len(dead)


@pytest.mark.parametrize(("method", "cfg"), LAYER_WISE, ids=_ids(LAYER_WISE))
def test_layer_wise_methods_count_existing_zeros_per_layer(method, cfg):
    (W, batches), dead = _about_30_percent()
    zeros = _existing(W, dead)
    out, report = _compress(W, batches, method, cfg, sparsity=S)
    expected = max(int(zeros.sum()), math.floor(S * D_OUT * D_IN + 0.5))
    assert expected == D_OUT * T  # the layer had fewer zeros than asked: it ends at exactly 50%
    assert int((out == 0).sum()) == expected
    assert (out[zeros] == 0).all()
    assert report.layer("0").dead_inputs == len(dead)


@pytest.mark.parametrize(("method", "cfg"), ROW_WISE + LAYER_WISE, ids=_ids(ROW_WISE + LAYER_WISE))
def test_a_layer_sparser_than_asked_keeps_its_zeros_and_nothing_more(method, cfg):
    (W, batches), dead = _about_70_percent()
    zeros = _existing(W, dead)
    assert 0.68 < float(zeros.float().mean()) < 0.73
    assert (zeros.sum(dim=1) >= T).all()
    out, _ = _compress(W, batches, method, cfg, sparsity=S)
    assert torch.equal(out == 0, zeros)  # the same zeros, exactly: none lost, none added
    assert torch.equal(out, W.masked_fill(zeros, 0.0))  # nothing pruned: nothing compensated


@pytest.mark.parametrize(("method", "cfg"), ROW_WISE, ids=_ids(ROW_WISE))
def test_nm_groups_count_and_keep_existing_zeros(method, cfg):
    (W, batches), dead = _about_30_percent()
    zeros = _existing(W, dead)
    out, _ = _compress(W, batches, method, cfg, pattern="2:4")
    per_group = zeros.reshape(D_OUT, D_IN // 4, 4).sum(dim=2)
    assert (per_group > 2).any()  # some groups already hold more zeros than 2:4 asks for
    got = (out == 0).reshape(D_OUT, D_IN // 4, 4).sum(dim=2)
    assert torch.equal(got, per_group.clamp(min=2))
    assert (out[zeros] == 0).all()


# --- dense layers: bitwise the old result ---------------------------------------------------------


def _dense(d_out, d_in, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, d_in, generator=g, dtype=dtype) @ (
        torch.randn(d_in, d_in, generator=g, dtype=dtype) + 2.0 * torch.eye(d_in, dtype=dtype)
    )
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    assert (W != 0).all() and (X != 0).any(dim=0).all()
    return W, layer_hessian(X), X


DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_dense_magnitude_and_wanda_give_the_old_result(s, dtype):
    W, H, X = _dense(10, 45, dtype, seed=3)
    norms = X.norm(dim=0)
    assert torch.equal(magnitude_prune(W, s), _legacy.magnitude_prune(W, s))
    assert torch.equal(wanda_prune(W, norms, s), _legacy.wanda_prune(W, norms, s))
    for name, old in (
        ("magnitude", _legacy.magnitude_prune(W, s)),
        ("wanda", _legacy.wanda_prune(W, H.diagonal().clamp(min=0).sqrt(), s)),
    ):
        cls = get_compressor(name)
        assert torch.equal(cls(cls.config_class(sparsity=s)).compress_matrix(W, H, s, 0.0), old)
    W, H, X = _dense(10, 48, dtype, seed=4)
    norms = X.norm(dim=0)
    assert torch.equal(magnitude_prune(W, 0.0, (2, 4)), _legacy.magnitude_prune(W, 0.0, (2, 4)))
    assert torch.equal(
        wanda_prune(W, norms, 0.0, (2, 4)), _legacy.wanda_prune(W, norms, 0.0, (2, 4))
    )


SPARSEGPT_CASES = [
    {"sparsity": 0.3, "block_size": 1},  # every cumulative count round(s·column) shows
    {"sparsity": 0.3, "block_size": 8},
    {"sparsity": 0.5, "block_size": 16},
    {"sparsity": 0.7, "block_size": 128},
    {"sparsity": 0.45, "block_size": 8, "mask_scope": "block"},
    {"sparsity": 0.3, "block_size": 1, "mask_scope": "block"},
    {"sparsity": 0.6, "block_size": 12, "mask_scope": "block"},
    {"sparsity": 0.5, "block_size": 8, "bits": 4},
    {"sparsity": 0.5, "block_size": 16, "bits": 3, "group_size": 8},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SPARSEGPT_CASES)
def test_dense_sparsegpt_gives_the_old_result(case, dtype):
    W, H, _ = _dense(10, 45, dtype, seed=5)
    assert torch.equal(sparsegpt_prune(W, H, **case), _legacy.sparsegpt_prune(W, H, **case))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_sparsegpt_nm_gives_the_old_result(dtype):
    W, H, _ = _dense(10, 48, dtype, seed=6)
    for kw in ({"block_size": 8}, {"block_size": 16, "bits": 4, "group_size": 8}):
        new = sparsegpt_prune(W, H, 0.0, nm=(2, 4), **kw)
        assert torch.equal(new, _legacy.sparsegpt_prune(W, H, 0.0, nm=(2, 4), **kw))


def _same_database(new, old):
    assert len(new.weights) == len(old.weights)
    for a, b in zip(new.weights, old.weights, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(new.counts, old.counts)
    assert torch.equal(new.order, old.order)
    torch.testing.assert_close(new.step_losses, old.step_losses, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(new.losses, old.losses)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_obc_gives_the_old_result(dtype):
    W, H, _ = _dense(6, 21, dtype, seed=7)
    levels = [0.3, 0.5, 0.8]
    _same_database(obc_database(W, H, levels), _legacy.obc_database(W, H, levels))
    _same_database(
        obc_database(W, H, [0.45], mask_scope="layer", row_batch=4),
        _legacy.obc_database(W, H, [0.45], mask_scope="layer", row_batch=4),
    )
    W, H, _ = _dense(6, 16, dtype, seed=8)
    _same_database(obc_database(W, H, [], nm=(2, 4)), _legacy.obc_database(W, H, [], nm=(2, 4)))


@pytest.mark.parametrize("sparsity", [0.6, 0.3])
def test_dense_mfac_gives_the_old_result(monkeypatch, sparsity):
    """One step only: since issue 20 the gradual steps follow the reference's geometric density
    schedule over Fisher blocks of live weights (tests/posttrain/test_mfac_model.py), which the
    frozen copy does not; a single step from a dense model is the same in both."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))  # 208 weights
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(8, 8, generator=g) for _ in range(4)]
    kw = {"sparsity": sparsity, "ngrads": 8, "fisher_block": 32, "steps": 1}
    new = copy.deepcopy(model)
    prunekit.compress(new, xs, "mfac", **kw)
    walk = importlib.import_module("prunekit.posttrain.methods")
    monkeypatch.setattr(walk, "mfac_prune_model", _legacy.mfac_prune_model)
    old = copy.deepcopy(model)
    prunekit.compress(old, xs, "mfac", **kw)
    for a, b in zip(new.parameters(), old.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("method", "cfg"), ROW_WISE + LAYER_WISE, ids=_ids(ROW_WISE + LAYER_WISE))
def test_a_weight_whose_score_underflows_is_not_taken_for_an_existing_zero(method, cfg):
    """float32: w = 1e-30 has the score 0 (w² underflows) that an exact zero has. A layer already
    sparser than asked must keep exactly its zeros, and the tiny weight, unchanged."""
    (W, batches), dead = _about_70_percent()
    is_dead = torch.isin(torch.arange(D_IN), torch.tensor(dead))
    for r in range(D_OUT):
        live_nonzero = torch.nonzero((W[r] != 0) & ~is_dead).flatten()
        if live_nonzero.numel():
            W[r, int(live_nonzero[0])] = 1e-30  # before most of the row's zeros in column order
    zeros = _existing(W, dead)
    out, _ = _compress(W, batches, method, cfg, sparsity=S)
    assert torch.equal(out, W.masked_fill(zeros, 0.0))
