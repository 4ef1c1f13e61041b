"""Group discovery, :func:`prunekit.structured.find_groups` (:mod:`prunekit.structured.groups`):
the groups found on the tiny models, why a group is unprunable, and what capture leaves alone.
Attention heads are in ``test_attention.py`` and ``test_heads.py``, the op rules in
``test_rules.py``, removing groups in ``test_slim.py``."""

import re

import pytest
import torch
from torch import nn

from prunekit.structured import CaptureError, FoldedConv, find_groups, slim
from prunekit.structured.slim import apply_kept, slim_plan
from tests.structured.tiny_models import TINY_MODELS


def test_expected_groups_on_residual_and_concat():
    model, x = TINY_MODELS["residual"]()
    groups = find_groups(model, x)
    first = next(g for g in groups if ("stem.weight", 0) in g.slices("out"))
    # the residual add joins stem/bn0 with c2/b2 (same channel), consumed by c1, c3, proj
    assert set(first.slices("out")) == {
        ("stem.weight", 0),
        ("bn0.weight", 0),
        ("bn0.bias", 0),
        ("c2.weight", 0),
        ("b2.weight", 0),
        ("b2.bias", 0),
    }
    assert set(first.slices("in")) == {("c1.weight", 1), ("c3.weight", 1), ("proj.weight", 1)}
    model, x = TINY_MODELS["concat_bn"]()
    groups = find_groups(model, x)
    g = next(g for g in groups if g.slices("out").get(("b.weight", 0)) == [2])
    assert g.slices("out")[("bn.weight", 0)] == [5 + 2]  # offset by the 5 channels of branch a
    assert g.slices("out")[("bn2.weight", 0)] == [5 + 2]
    g = next(g for g in groups if g.slices("out").get(("c.weight", 0)) == [1])
    assert g.slices("out")[("bn2.weight", 0)] == [12 + 1]


def test_depthwise_joins_its_input_group():
    model, x = TINY_MODELS["inverted_residual"]()
    groups = find_groups(model, x)
    g = next(g for g in groups if g.slices("out").get(("expand.0.weight", 0)) == [3])
    assert g.prunable
    assert g.slices("out")[("dw.0.weight", 0)] == [3]
    small_model, x = TINY_MODELS["inverted_residual"]()
    small_groups = find_groups(small_model, x)
    for gg in small_groups:
        if gg.prunable and gg.slices("out").get(("dw.0.weight", 0)):
            gg.zero_()
    # all 24 expanded channels are zero: the branch folds (slim checks the output)
    small = slim(small_model, x, small_groups)
    assert isinstance(small.dw[0], FoldedConv) and small.dw[0].out_channels == 0
    assert isinstance(small.expand[0], FoldedConv) and isinstance(small.expand[1], nn.Identity)
    assert isinstance(small.project[0], FoldedConv) and not small.project[0].bias.any()
    # without folding, one zero channel is kept so that the layers stay valid
    kept = apply_kept(small_model, slim_plan(small_model, small_groups).kept, copy_model=True)
    assert kept.dw[0].groups == kept.dw[0].in_channels == kept.dw[0].out_channels == 1


def test_grouped_conv_groups_keep_conv_groups_balanced():
    model, x = TINY_MODELS["grouped_unknown"]()
    groups = find_groups(model, x)
    # g has 2 conv groups of 4 inputs: a's channels s and 4+s feed the same weight column s
    a_groups = [g for g in groups if ("a.weight", 0) in g.slices("out")]
    assert sorted(g.slices("out")[("a.weight", 0)] for g in a_groups) == [
        [s, 4 + s] for s in range(4)
    ]
    assert all(g.prunable for g in a_groups)
    assert all(g.slices("in")[("g.weight", 1)] == [i] for i, g in enumerate(a_groups))
    # g's outputs t and 6+t; the depthwise multiplier conv dm joins its 2 outputs per input channel
    first = next(g for g in groups if g.slices("out").get(("g.weight", 0)) == [0, 6])
    assert first.prunable
    assert first.slices("out")[("dm.weight", 0)] == [0, 1, 12, 13]
    a_groups[1].zero_()
    first.zero_()
    small = slim(model, x, groups)
    assert (small.g.in_channels, small.g.out_channels, small.g.groups) == (6, 10, 2)
    assert (small.dm.in_channels, small.dm.out_channels, small.dm.groups) == (10, 20, 10)
    assert small.b.in_channels == 20


@pytest.mark.parametrize(
    ("name", "tensor", "reason"),
    [
        ("mlp", "net.4.weight", "model output"),
        ("embed_layernorm", "emb.weight", "LayerNorm"),
        ("tied", "hidden.weight", "shared"),
        ("tied", "mid.weight", "shared"),
        ("grouped_unknown", "b.weight", "cumsum"),
    ],
)
def test_unprunable_groups_say_why(name, tensor, reason):
    model, x = TINY_MODELS[name]()
    groups = [g for g in find_groups(model, x) if any(k[0] == tensor for k in g.slices("out"))]
    assert groups and all(not g.prunable for g in groups)
    assert all(re.search(reason, g.reason) for g in groups), groups[0].reason


def test_tied_model_keeps_unshared_groups_prunable():
    model, x = TINY_MODELS["tied"]()
    groups = find_groups(model, x)
    # dec's channels feed the shared weight: unprunable; extra's touch nothing shared: prunable
    assert not any(g.prunable for g in groups if ("dec.weight", 0) in g.slices("out"))
    extra = [g for g in groups if ("extra.weight", 0) in g.slices("out")]
    assert len(extra) == 7 and all(g.prunable for g in extra)


def test_embed_layernorm_mlp_hidden_stays_prunable():
    model, x = TINY_MODELS["embed_layernorm"]()
    hidden = [g for g in find_groups(model, x) if ("fc1.weight", 0) in g.slices("out")]
    assert len(hidden) == 16 and all(g.prunable for g in hidden)


def test_group_is_printable_and_zero_is_exact():
    model, x = TINY_MODELS["conv_bn_flatten"]()
    g = next(
        g
        for g in find_groups(model, x)
        if g.prunable and ("features.4.weight", 0) in g.slices("out")
    )
    text = g.details()
    assert "prunable" in text and "fc.weight[:, " in text and "features.5.running_mean" in text
    assert not g.is_zero()
    g.zero_()
    assert g.is_zero() and g.norm() == 0.0


def test_untraceable_model_gives_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(CaptureError, match=r"torch\.fx could not trace DataDependent"):
        find_groups(DataDependent(), torch.randn(2, 4))


def test_capture_leaves_model_state_alone():
    model, x = TINY_MODELS["conv_bn_flatten"]()
    model.train()
    stats = [b.clone() for b in model.buffers()]
    find_groups(model, x)
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers(), strict=True))


def test_groupnorm_removes_whole_norm_groups():
    torch.manual_seed(0)
    model, x = TINY_MODELS["groupnorm"]()
    groups = find_groups(model, x)
    n1 = [g for g in groups if ("n1.weight", 0) in g.slices("out")]
    n2 = [g for g in groups if ("n2.weight", 0) in g.slices("out")]
    assert [g.slices("out")[("n1.weight", 0)] for g in n1] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [g.slices("in")[("c2.weight", 1)] for g in n1] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(n2) == 4 and all(g.prunable for g in n1 + n2)
    n3 = [g for g in groups if ("c3.weight", 0) in g.slices("out")]
    assert n3 and all("affine" in str(g.reason) for g in n3)
    n1[0].zero_()
    n2[2].zero_()
    small = slim(model, x, groups)  # raises if the output differs
    assert (small.n1.num_groups, small.n1.num_channels) == (1, 4)
    assert (small.n2.num_groups, small.n2.num_channels) == (3, 9)
    assert small.c2.weight.shape == (9, 4, 3, 3)


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
