import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.structured import CaptureError, FoldedConv, find_groups, removal_plan, slim
from prunekit.structured.slim import apply_kept, slim_plan
from tests.structured.zoo import ZOO


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _settle_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Give batch norms non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x if x.is_floating_point() is False else x + 0.1 * torch.randn_like(x))


@pytest.mark.parametrize("name", list(ZOO))
def test_zero_random_groups_then_slim_is_exact(name):
    torch.manual_seed(0)
    model, x = ZOO[name]()
    _settle_bn(model, x)
    groups = find_groups(model, x)
    gen = torch.Generator().manual_seed(0)
    chosen = [g for g in groups if torch.rand((), generator=gen) < 0.5]  # prunable or not
    for g in chosen:
        g.zero_()
    model.eval()
    with torch.no_grad():
        ref = model(x)
    small = slim(model, x, groups, check=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref, rtol=1e-5, atol=1e-6)
    removed = [g for g in chosen if g.prunable]
    if removed:
        assert _params(small) < _params(model)
    plan = removal_plan(groups)
    for g in groups:  # unprunable groups are never removed
        if not g.prunable:
            for key, idx in g.slices().items():
                assert not set(idx) & set(plan.get(key, [])), (g.details(), key)


@pytest.mark.parametrize(
    "name",
    [
        "mlp",
        "conv_bn_flatten",
        "residual",
        "concat_bn",
        "inverted_residual",
        "conv1d",
        "grouped_unknown",
        "groupnorm",
        "head_attribute_attention",
        "sdpa_attention",
    ],
)
def test_slim_after_real_training_steps(name):
    """Groups zeroed and held at zero while SGD with momentum and BN updates trains the rest."""
    torch.manual_seed(0)
    model, x = ZOO[name]()
    groups = find_groups(model, x)
    prunable = [g for g in groups if g.prunable]
    chosen = prunable[::3]
    for g in chosen:
        g.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    model.train()
    for _ in range(20):
        out = model(x + 0.05 * torch.randn_like(x))
        loss = out.pow(2).mean() + F.cross_entropy(out, torch.zeros(len(x), dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in chosen:  # projection onto the group-sparse set (what HSPG-style optimizers do)
            g.zero_()
    before = _params(model)
    small = slim(model, x, groups)  # check=True: raises if the output differs
    assert _params(small) < before
    assert _params(model) == before  # the original is untouched


def test_expected_groups_on_residual_and_concat():
    model, x = ZOO["residual"]()
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
    model, x = ZOO["concat_bn"]()
    groups = find_groups(model, x)
    g = next(g for g in groups if g.slices("out").get(("b.weight", 0)) == [2])
    assert g.slices("out")[("bn.weight", 0)] == [5 + 2]  # offset by the 5 channels of branch a
    assert g.slices("out")[("bn2.weight", 0)] == [5 + 2]
    g = next(g for g in groups if g.slices("out").get(("c.weight", 0)) == [1])
    assert g.slices("out")[("bn2.weight", 0)] == [12 + 1]


def test_depthwise_joins_its_input_group():
    model, x = ZOO["inverted_residual"]()
    groups = find_groups(model, x)
    g = next(g for g in groups if g.slices("out").get(("expand.0.weight", 0)) == [3])
    assert g.prunable
    assert g.slices("out")[("dw.0.weight", 0)] == [3]
    small_model, x = ZOO["inverted_residual"]()
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
    model, x = ZOO["grouped_unknown"]()
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
    model, x = ZOO[name]()
    groups = [g for g in find_groups(model, x) if any(k[0] == tensor for k in g.slices("out"))]
    assert groups and all(not g.prunable for g in groups)
    assert all(re.search(reason, g.reason) for g in groups), groups[0].reason


def test_tied_model_keeps_unshared_groups_prunable():
    model, x = ZOO["tied"]()
    groups = find_groups(model, x)
    # dec's channels feed the shared weight: unprunable; extra's touch nothing shared: prunable
    assert not any(g.prunable for g in groups if ("dec.weight", 0) in g.slices("out"))
    extra = [g for g in groups if ("extra.weight", 0) in g.slices("out")]
    assert len(extra) == 7 and all(g.prunable for g in extra)


def test_embed_layernorm_mlp_hidden_stays_prunable():
    model, x = ZOO["embed_layernorm"]()
    hidden = [g for g in find_groups(model, x) if ("fc1.weight", 0) in g.slices("out")]
    assert len(hidden) == 16 and all(g.prunable for g in hidden)


def test_group_is_printable_and_zero_is_exact():
    model, x = ZOO["conv_bn_flatten"]()
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
    model, x = ZOO["conv_bn_flatten"]()
    model.train()
    stats = [b.clone() for b in model.buffers()]
    find_groups(model, x)
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers(), strict=True))


@pytest.mark.parametrize(
    "name",
    [
        "residual",
        "concat_bn",
        "inverted_residual",
        "embed_layernorm",
        "groupnorm",
        "head_attribute_attention",
    ],
)
def test_save_and_load_slim_without_pickled_code(tmp_path, name):
    from prunekit.structured.io import load_slim, save_slim, slim_spec

    torch.manual_seed(0)
    model, x = ZOO[name]()
    groups = find_groups(model, x)
    for g in [g for g in groups if g.prunable][::2]:
        g.zero_()
    small = slim(model, x, groups).eval()
    save_slim(small, slim_spec(model, groups, x), tmp_path)
    assert (tmp_path / "spec.json").read_text().startswith("{")
    fresh, _ = ZOO[name]()  # a new instance of the original class
    loaded = load_slim(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in small.parameters()]


@pytest.mark.parametrize("name", ["attention", "attention_seq_first"])
def test_attention_heads_are_groups_and_slim_drops_heads(name):
    from prunekit.structured import SlimMultiheadAttention

    torch.manual_seed(0)
    model, x = ZOO[name]()
    groups = find_groups(model, x)
    heads = [g for g in groups if ("attn.in_proj_weight", 0) in g.slices("out")]
    assert len(heads) == 4 and all(g.prunable for g in heads)
    assert heads[1].slices("out")[("attn.in_proj_weight", 0)] == [
        *range(4, 8),
        *range(20, 24),
        *range(36, 40),
    ]
    assert heads[1].slices("in")[("attn.out_proj.weight", 1)] == list(range(4, 8))
    mlp = [g for g in groups if ("fc1.weight", 0) in g.slices("out")]
    assert len(mlp) == 32 and all(g.prunable for g in mlp)
    stream = [g for g in groups if ("embed.weight", 0) in g.slices("out")]
    assert stream and not any(g.prunable for g in stream)  # through LayerNorm
    heads[0].zero_()
    heads[2].zero_()
    small = slim(model, x, groups)
    assert isinstance(small.attn, SlimMultiheadAttention) and small.attn.num_heads == 2


def test_handwritten_attention_with_literal_head_count_is_pinned_but_exact():
    model, x = ZOO["handwritten_attention"]()
    groups = find_groups(model, x)
    for proj in ("q.weight", "k.weight", "v.weight"):
        gs = [g for g in groups if (proj, 0) in g.slices("out")]
        assert gs and not any(g.prunable for g in gs)
        assert all("head count 2 is a literal" in g.reason for g in gs)
    assert all(g.prunable for g in groups if ("fc.weight", 0) in g.slices("out"))


@pytest.mark.parametrize(
    ("name", "attribute"), [("head_attribute_attention", "num_heads"), ("sdpa_attention", None)]
)
def test_handwritten_attention_heads_are_groups_and_slim_drops_heads(name, attribute):
    torch.manual_seed(0)
    model, x = ZOO[name]()
    groups = find_groups(model, x)
    heads = [g for g in groups if ("q.weight", 0) in g.slices("out")]
    assert len(heads) == 4 and all(g.prunable for g in heads)
    # head 1: rows 3..5 of q, k and v (and their biases) produce it; columns 3..5 of o consume it
    for proj in ("q", "k", "v"):
        assert heads[1].slices("out")[(f"{proj}.weight", 0)] == [3, 4, 5]
        assert heads[1].slices("out")[(f"{proj}.bias", 0)] == [3, 4, 5]
    assert heads[1].slices("in")[("o.weight", 1)] == [3, 4, 5]
    assert heads[1].counters == ([(attribute, 4)] if attribute else [])
    heads[1].zero_()
    heads[3].zero_()
    small = slim(model, x, groups)  # checks the output
    assert small.q.out_features == small.v.out_features == small.o.in_features == 6
    if attribute:
        assert getattr(small, attribute) == 2 and small.depth == 4  # the unrelated int is untouched
    assert getattr(model, attribute or "training") in (4, True)  # the original is untouched


def test_only_the_value_rows_matter_for_exactness():
    """A head whose q and k rows are nonzero but whose v rows are zero outputs exactly zero."""
    torch.manual_seed(0)
    model, x = ZOO["head_attribute_attention"]()
    with torch.no_grad():
        model.v.weight[3:6] = 0
        model.v.bias[3:6] = 0
    groups = find_groups(model, x)
    head = next(g for g in groups if g.slices("out").get(("q.weight", 0)) == [3, 4, 5])
    assert not head.is_zero()  # the group's q/k rows are not zero: slim keeps the head
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.q.weight[3:6] = 0  # what zeroing the rest of the group changes: nothing
        model.k.weight[3:6] = 0
        model.q.bias[3:6] = 0
        model.k.bias[3:6] = 0
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)
    assert head.is_zero()
    assert slim(model, x, groups).num_heads == 3


def test_split_into_heads_outside_attention_is_pinned():
    class Shuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x).view(-1, 2, 3).transpose(1, 2).reshape(-1, 6)  # a channel shuffle
            return self.b(F.relu(y))

    x = torch.randn(5, 4)
    groups = find_groups(Shuffle(), x)
    gs = [g for g in groups if ("a.weight", 0) in g.slices("out")]
    assert gs and all("outside attention" in g.reason for g in gs)


def test_groupnorm_removes_whole_norm_groups():
    torch.manual_seed(0)
    model, x = ZOO["groupnorm"]()
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
