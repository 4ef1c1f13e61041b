"""The op rules (:mod:`prunekit.structured.rules`, with the module rules of
:mod:`prunekit.structured.module_rules`) on tiny hand-built modules.

Activations whose f(0) depends on their arguments, and in-place item assignment. Then the rules
the torchvision zoo needs: stochastic depth / DropPath / dropout (a zero channel times a per-sample
or per-element factor is zero), multiplicative gates ``a · f(b)`` (squeeze-and-excitation, GLU: a
zero channel of ``a`` times any gate is zero, and the gate's channel goes with it), parameters read
in ``forward`` (layer scale), and an Inception-like block (branches concatenated, one of them the
block's input max-pooled).

Each of those tests checks the group against the channel structure written out here (which slices
go together), then zeroes it and checks that ``slim`` is exact and smaller; the tests of wrong
variants show that the rule does not over-reach (a gate used twice, two gates, a sum) and that slim
refuses a model built from wrong groups (the rule broken on purpose through ``monkeypatch``).
"""

import importlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.structured import SlimError, find_groups, slim
from prunekit.structured import rules as R


class _Hidden(nn.Module):
    """``fc2(act(fc1(x)))``: the 6 hidden channels are prunable exactly when ``act(0) = 0``."""

    def __init__(self, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Functional(nn.Module):
    def __init__(self, name: str, *args: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.name, self.args = name, args

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.name == "hardtanh":
            h = F.hardtanh(h, *self.args)
        elif self.name == "threshold":
            h = F.threshold(h, *self.args)
        else:
            h = F.softplus(h)
        return self.fc2(h)


# f(0) written out: hardtanh clamps 0 to [min, max]; threshold(t, v) maps x <= t to v;
# softplus(0) = log 2; logsigmoid(0) = -log 2; the others are 0 at 0.
CASES = [
    ("Hardtanh(0.5, 1.0)", lambda: _Hidden(nn.Hardtanh(0.5, 1.0)), "= 0.5, not 0"),
    ("Hardtanh(-2, -1)", lambda: _Hidden(nn.Hardtanh(-2.0, -1.0)), "= -1, not 0"),
    ("Hardtanh()", lambda: _Hidden(nn.Hardtanh()), None),
    ("ReLU6", lambda: _Hidden(nn.ReLU6()), None),
    ("Threshold(0.1, 2.0)", lambda: _Hidden(nn.Threshold(0.1, 2.0)), "= 2, not 0"),
    ("Threshold(0.1, 0.0)", lambda: _Hidden(nn.Threshold(0.1, 0.0)), None),
    ("Softplus", lambda: _Hidden(nn.Softplus()), "= 0.693147, not 0"),
    ("LogSigmoid", lambda: _Hidden(nn.LogSigmoid()), "= -0.693147, not 0"),
    ("ELU(2.0)", lambda: _Hidden(nn.ELU(2.0)), None),
    ("CELU(0.5)", lambda: _Hidden(nn.CELU(0.5)), None),
    ("SELU", lambda: _Hidden(nn.SELU()), None),
    ("Softshrink", lambda: _Hidden(nn.Softshrink(0.3)), None),
    ("F.hardtanh(x, 0.5, 1.0)", lambda: _Functional("hardtanh", 0.5, 1.0), "= 0.5, not 0"),
    ("F.hardtanh(x)", lambda: _Functional("hardtanh"), None),
    ("F.threshold(x, 0.1, 2.0)", lambda: _Functional("threshold", 0.1, 2.0), "= 2, not 0"),
    ("F.threshold(x, 0.1, 0.0)", lambda: _Functional("threshold", 0.1, 0.0), None),
    ("F.softplus", lambda: _Functional("softplus"), "= 0.693147, not 0"),
]


@pytest.mark.parametrize(("make", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_activation_is_prunable_exactly_when_it_maps_zero_to_zero(make, reason):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(5, 4)
    hidden = [g for g in find_groups(model, x) if ("fc1.weight", 0) in g.slices("out")]
    assert len(hidden) == 6
    if reason is None:
        assert all(g.prunable for g in hidden)
    else:
        assert not any(g.prunable for g in hidden)
        assert all(reason in str(g.reason) for g in hidden), hidden[0].reason
    with torch.no_grad():  # zero two hidden channels' producers, as an optimizer would
        model.fc1.weight[1:3] = 0.0
        model.fc1.bias[1:3] = 0.0
        ref = model(x)
    small = slim(model, x)  # checks the output: pinned channels are kept, others removed
    assert small.fc1.out_features == (6 if reason else 4)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref)


class _ItemAssignment(nn.Module):
    """``h[:, 3] = 1.0`` and ``h[:, 0] = g[:, 1]`` in the forward; ``fc3``'s channels are untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.aux = nn.Linear(4, 6), nn.Linear(4, 2)
        self.fc2, self.fc3, self.out = nn.Linear(6, 5), nn.Linear(4, 7), nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h[:, 3] = 1.0
        g = F.relu(self.aux(x))
        h[:, 0] = g[:, 1]
        return self.out(torch.cat([self.fc2(F.relu(h)), F.relu(self.fc3(x))], 1))


def test_item_assignment_pins_its_channels_with_the_real_reason():
    torch.manual_seed(0)
    model = _ItemAssignment().eval()
    x = torch.randn(5, 4)
    groups = find_groups(model, x)  # captured: not refused as control flow

    def of(tensor: str) -> list:
        return [g for g in groups if (tensor, 0) in g.slices("out")]

    assigned = of("fc1.weight")
    assert len(assigned) == 6 and not any(g.prunable for g in assigned)
    assert all("in-place item assignment" in str(g.reason) for g in assigned), assigned[0].reason
    assert len(of("aux.weight")) == 2 and not any(g.prunable for g in of("aux.weight"))
    assert len(of("fc3.weight")) == 7 and all(g.prunable for g in of("fc3.weight"))
    with torch.no_grad():  # channel 3 of h is 1.0 whatever fc1 computes: removing it would be wrong
        for name in ("fc1", "fc3", "aux"):
            getattr(model, name).weight[:4] = 0.0
            getattr(model, name).bias[:4] = 0.0
        ref = model(x)
    small = slim(model, x)  # checks the output
    assert (small.fc1.out_features, small.aux.out_features, small.fc3.out_features) == (6, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref)


def test_an_untraceable_forward_is_not_blamed_on_control_flow():
    from prunekit.structured import CaptureError

    class Length(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x) / len(x)

    with pytest.raises(CaptureError, match="'len' is not supported") as info:
        find_groups(Length(), torch.randn(2, 4))
    assert "control flow" not in str(info.value)


def _tv_ops():
    importlib.import_module("benchmarks.torchvision_shim")  # before torchvision
    return importlib.import_module("torchvision.ops")


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _group_of(groups, tensor: str, index: int):
    found = [g for g in groups if index in g.slices("out").get((tensor, 0), [])]
    assert len(found) == 1, f"{tensor}[{index}] in {len(found)} groups"
    return found[0]


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial batch-norm statistics and affine parameters (so eval mode is not the identity)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))


def _image_model(make: Callable[[], nn.Module]) -> tuple[nn.Module, Tensor, list]:
    """``make()`` after ``torch.manual_seed(0)``, its batch norms randomised, a ``(2, 3, 6, 6)``
    input and the model's groups."""
    torch.manual_seed(0)
    model = make()
    _randomise_bn(model)
    x = torch.randn(2, 3, 6, 6)
    return model, x, find_groups(model, x)


def _zero_and_slim(model: nn.Module, x: Tensor, group) -> nn.Module:
    """Zero ``group``, slim, and check exactness by hand (the masked output, computed here)."""
    group.zero_()
    model.eval()
    with torch.no_grad():
        ref = model(x)
    small = slim(model, x, find_groups(model, x)).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref, rtol=1e-5, atol=1e-5)
    assert _params(small) < _params(model)
    return small


# ------------------------------------------------------------------ stochastic depth, dropout
class _DropPath(nn.Module):
    """timm-style DropPath written out: ``x / keep · r`` with ``r ~ Bernoulli(keep)`` per sample."""

    def __init__(self, keep: float) -> None:
        super().__init__()
        self.keep = keep

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        r = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(self.keep)
        return x.div(self.keep) * r


class _ResidualDrop(nn.Module):
    """``x + drop(bn2(conv2(relu(bn1(conv1(x))))))``, ``drop`` in {stochastic depth, DropPath,
    Dropout, Dropout2d, noise added instead of multiplied}."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)
        self.kind = kind
        self.drop = {"droppath": _DropPath(0.7), "dropout": nn.Dropout(0.3),
                     "dropout2d": nn.Dropout2d(0.3)}.get(kind, nn.Identity())  # fmt: skip
        if kind == "stochastic_depth":  # calls torchvision.ops.stochastic_depth, fx-wrapped
            self.drop = _tv_ops().StochasticDepth(0.5, "row")

    def branch(self, x: Tensor) -> Tensor:
        y = self.conv1(x)
        if self.kind == "inner_noise":  # a sum: 0 + noise is not 0
            y = y + torch.randn_like(y)
        return self.bn2(self.conv2(F.relu(self.bn1(y))))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = F.relu(h + self.drop(self.branch(h)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("kind", ["stochastic_depth", "droppath", "dropout", "dropout2d"])
@pytest.mark.parametrize("train", [True, False])
def test_stochastic_depth_and_dropout_keep_zero_channels(kind, train):
    torch.manual_seed(0)
    model = _ResidualDrop(kind).train(train)
    _randomise_bn(model)
    x = torch.randn(4, 3, 6, 6)
    if kind == "stochastic_depth":  # one call of the function itself, not traced through
        calls = [n.target for n in R.trace(model).graph.nodes if n.op == "call_function"]
        assert _tv_ops().stochastic_depth in calls
    groups = find_groups(model, x)  # traced in train mode when train: the random branch is in
    # the stream (stem + conv2 + bn2, joined by the residual add) and the inner channels
    stream = _group_of(groups, "stem.weight", 2)
    assert stream.prunable, stream.reason
    assert ("conv2.weight", 0) in stream.slices("out") and ("bn2.bias", 0) in stream.slices("out")
    inner = _group_of(groups, "conv1.weight", 4)
    assert inner.prunable and inner.slices("in") == {("conv2.weight", 1): [4]}
    if train and kind in ("stochastic_depth", "droppath"):
        # in training the zero channel stays exactly zero through the random per-sample factor
        stream.zero_()
        seen: list[Tensor] = []
        hook = model.bn2.register_forward_hook(lambda m, i, o: seen.append(o))
        torch.manual_seed(1)
        model(x)
        hook.remove()
        assert not seen[0][:, 2].any()
    _zero_and_slim(model.train(train), x, inner)


def test_sum_with_noise_is_not_zero_preserving():
    torch.manual_seed(0)
    model = _ResidualDrop("inner_noise")
    groups = find_groups(model, torch.randn(2, 3, 6, 6))
    inner = _group_of(groups, "conv1.weight", 4)
    assert not inner.prunable  # a full-size untracked tensor added: a boundary


def test_unknown_function_on_the_branch_still_pins():
    """A function without a rule (torch.cumsum here) is still a boundary after the new rules."""

    class M(_ResidualDrop):
        def forward(self, x: Tensor) -> Tensor:
            h = self.stem(x)
            return self.head(F.relu(h + torch.cumsum(self.branch(h), 1)).mean((2, 3)))

    groups = find_groups(M("none"), torch.randn(2, 3, 6, 6))
    assert not _group_of(groups, "conv2.weight", 0).prunable


# ------------------------------------------------------------------ squeeze-and-excitation gate
class _SENet(nn.Module):
    """conv → BN → ReLU → SE (torchvision's ``SqueezeExcitation``: ``x · σ(fc2(relu(fc1(pool x))))``
    or a variant) → conv → pool → linear."""

    def __init__(self, variant: str = "torchvision") -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.variant = variant
        if variant == "torchvision":
            self.se = _tv_ops().SqueezeExcitation(8, 4, scale_activation=nn.Hardsigmoid)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.out = nn.Conv2d(8, 5, 1)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn(self.conv(x)))
        if self.variant == "torchvision":
            y = self.se(y)
        else:
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
            if self.variant == "gate_used_twice":
                y = y * s + s  # the gate also reaches the output directly
            elif self.variant == "two_gates":
                y = torch.sigmoid(y) * s  # neither factor is zero at a zeroed channel
            else:
                y = y * s
        return self.head(self.out(y).mean((2, 3)))


def test_se_gate_channel_fc1_column_and_fc2_row_form_one_group():
    model, x, groups = _image_model(_SENet)
    g = _group_of(groups, "conv.weight", 3)
    assert g.prunable, g.reason
    assert g.slices("out") == {
        ("conv.weight", 0): [3], ("conv.bias", 0): [3], ("bn.weight", 0): [3],
        ("bn.bias", 0): [3], ("se.fc2.weight", 0): [3], ("se.fc2.bias", 0): [3],
    }  # fmt: skip
    assert g.slices("in") == {("se.fc1.weight", 1): [3], ("out.weight", 1): [3]}
    small = _zero_and_slim(model, x, g)
    assert (small.se.fc1.in_channels, small.se.fc2.out_channels, small.conv.out_channels) == (
        7, 7, 7,
    )  # fmt: skip


@pytest.mark.parametrize("variant", ["gate_used_twice", "two_gates"])
def test_gate_rule_does_not_over_reach(variant):
    model = _SENet(variant)
    x = torch.randn(2, 3, 6, 6)
    g = _group_of(find_groups(model, x), "conv.weight", 3)
    assert not g.prunable and "not 0" in (g.reason or "")


def test_se_gate_pinned_without_the_waiver(monkeypatch):
    """Mutation: without the gate rule the SE channels are pinned (sigmoid(0) = 1/2), as before."""
    monkeypatch.setattr(R, "_gate", lambda ctx, node, flows: None)
    g = _group_of(find_groups(_SENet("plain"), torch.randn(2, 3, 6, 6)), "conv.weight", 3)
    assert not g.prunable and "sigmoid" in (g.reason or "")


def test_wrong_gate_groups_are_refused_by_slim(monkeypatch):
    """Wrong rules on purpose: slim's check refuses the models they build.

    * waiving both factors' pins (``σ(y) · s``: neither is zero) — removes a live channel;
    * the gate treated as the identity on the gate branch (``y · s`` keeps ``y``'s channels and
      leaves ``s``'s unjoined) — the slim ``s`` keeps 8 channels, ``y`` has 7.
    """
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)

    def waive_both(ctx, node, flows):
        for f in flows:
            ctx.graph.waive(f.ids, ctx.graph.value_sites(f.ids))

    monkeypatch.setattr(R, "_gate", waive_both)
    model = _SENet("two_gates")
    groups = find_groups(model, x)
    g = _group_of(groups, "conv.weight", 3)
    assert g.prunable  # the broken rule lets it through ...
    g.zero_()
    with pytest.raises(SlimError, match="differs"):  # ... and the check refuses the result
        slim(model, x, groups)
    monkeypatch.undo()

    real_join = R.join_rule

    def gate_as_identity(ctx, node, inputs, zero_absorbing):
        flows = [v for v in inputs if isinstance(v, R.Flow)]
        if zero_absorbing and len(flows) == 2 and R._is_product(node):
            return R.Flow(flows[0].dim, list(flows[0].ids))
        return real_join(ctx, node, inputs, zero_absorbing)

    monkeypatch.setattr(R, "join_rule", gate_as_identity)
    model = _SENet("plain")
    groups = find_groups(model, x)
    g = _group_of(groups, "conv.weight", 3)
    assert g.prunable and ("fc2.weight", 0) not in g.slices("out")
    g.zero_()
    with pytest.raises(SlimError, match="differs"):
        slim(model, x, groups)


# ------------------------------------------------------------------ GLU-like gates
class _GLU(nn.Module):
    """``fc2(a · f(b))`` with ``[a, b] = fc1(x)`` halved: by ``chunk`` and a product, ``F.glu`` or
    ``nn.GLU`` (f = σ), or SwiGLU ``silu(w1 x) · w3 x`` (two linears)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1, self.w1, self.w3 = nn.Linear(5, 12), nn.Linear(5, 6), nn.Linear(5, 6)
        self.glu = nn.GLU(-1)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.kind == "chunk":
            a, b = h.chunk(2, dim=-1)
            h = a * torch.sigmoid(b)
        elif self.kind == "F.glu":
            h = F.glu(h, -1)
        elif self.kind == "nn.GLU":
            h = self.glu(h)
        else:  # swiglu: the gate is the first factor and f(0) = 0 (no waiver needed)
            h = F.silu(self.w1(x)) * self.w3(x)
        return self.fc2(h)


@pytest.mark.parametrize("kind", ["chunk", "F.glu", "nn.GLU", "swiglu"])
def test_glu_like_gate_joins_the_two_halves(kind):
    torch.manual_seed(0)
    model = _GLU(kind)
    x = torch.randn(4, 5)
    groups = find_groups(model, x)
    g = _group_of(groups, "w1.weight" if kind == "swiglu" else "fc1.weight", 2)
    assert g.prunable, g.reason
    if kind == "swiglu":
        assert g.slices("out")[("w3.weight", 0)] == [2]
    else:
        assert g.slices("out")[("fc1.weight", 0)] == [2, 8]  # a's row c and b's row 6 + c
    assert g.slices("in") == {("fc2.weight", 1): [2]}
    small = _zero_and_slim(model, x, g)
    assert small.fc2.in_features == 5


# ------------------------------------------------------------------ parameters read in forward
class _LayerScale(nn.Module):
    """ConvNeXt-style ``x + γ · branch(x)``, plus a bias parameter ``β`` added by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = nn.Conv2d(8, 6, 1, bias=False)
        self.beta = nn.Parameter(torch.randn(6, 1, 1))
        self.proj = nn.Conv2d(6, 8, 1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        y = F.relu(self.inner(h) + self.beta)
        return self.head((h + self.gamma * self.proj(y)).mean((2, 3)))


def test_layer_scale_and_bias_parameters_follow_their_channel():
    torch.manual_seed(0)
    model = _LayerScale()
    x = torch.randn(2, 3, 5, 5)
    groups = find_groups(model, x)
    stream = _group_of(groups, "stem.weight", 1)
    assert stream.prunable and stream.slices("in")[("gamma", 0)] == [1]  # 0 · γ = 0: consumer
    inner = _group_of(groups, "inner.weight", 4)
    assert inner.prunable and inner.slices("out")[("beta", 0)] == [4]  # 0 + β = β: producer
    small = _zero_and_slim(model, x, stream)
    assert small.gamma.shape == (7, 1, 1)
    small = _zero_and_slim(model, x, inner)
    assert small.beta.shape == (5, 1, 1)


def test_bias_parameter_not_zeroed_keeps_the_channel():
    """Zeroing the producers without ``β`` leaves ``0 + β_c``: not a zero group, nothing removed."""
    torch.manual_seed(0)
    model = _LayerScale()
    x = torch.randn(2, 3, 5, 5)
    inner = _group_of(find_groups(model, x), "inner.weight", 4)
    with torch.no_grad():
        model.inner.weight[4] = 0.0
    assert not inner.is_zero()
    assert slim(model, x).inner.out_channels == 6


# ------------------------------------------------------------------ Inception-like concat
class _InceptionLike(nn.Module):
    """A 1×1 branch, a 1×1→3×3 branch, an avg-pool→1×1 branch and the input max-pooled, concatenated
    (InceptionB/D put the block input itself into the concatenation), then a 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.b1 = nn.Conv2d(4, 3, 1)
        self.b2a, self.b2b = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 5, 3, padding=1)
        self.b3 = nn.Conv2d(4, 2, 1)
        self.after = nn.Conv2d(3 + 5 + 2 + 4, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn0(self.stem(x)))
        pool = F.avg_pool2d(h, 3, stride=1, padding=1)
        parts = [self.b1(h), self.b2b(F.relu(self.b2a(h))), self.b3(pool), F.max_pool2d(h, 1)]
        return self.head(F.relu(self.after(torch.cat(parts, 1))).mean((2, 3)))


def test_inception_like_concat_offsets_each_branch():
    model, x, groups = _image_model(_InceptionLike)
    # the cat's channels: b1 at 0..2, b2b at 3..7, b3 at 8..9, the stem itself at 10..13
    for tensor, index, column in [("b1.weight", 1, 1), ("b2b.weight", 4, 7), ("b3.weight", 0, 8)]:
        g = _group_of(groups, tensor, index)
        assert g.prunable and g.slices("in") == {("after.weight", 1): [column]}
    stem = _group_of(groups, "stem.weight", 2)
    assert stem.prunable
    assert stem.slices("in") == {
        ("b1.weight", 1): [2], ("b2a.weight", 1): [2], ("b3.weight", 1): [2],
        ("after.weight", 1): [12],
    }  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    prunable = [g for g in groups if g.prunable]
    chosen = torch.randperm(len(prunable), generator=gen)[: max(2, int(0.3 * len(prunable)))]
    for i in chosen.tolist()[1:]:
        prunable[i].zero_()
    _zero_and_slim(model, x, prunable[chosen[0]])


def test_inception_like_concat_in_the_wrong_order_is_refused(monkeypatch):
    """Mutation of the concat rule (branch offsets reversed): slim's check refuses the model."""
    real_cat = R.cat_rule

    def reversed_cat(ctx, node, inputs):
        parts = inputs[0] if isinstance(inputs[0], tuple) else tuple(inputs)
        return real_cat(ctx, node, [tuple(reversed(parts))])

    monkeypatch.setattr(R, "cat_rule", reversed_cat)
    torch.manual_seed(0)
    model = _InceptionLike()
    x = torch.randn(2, 3, 6, 6)
    groups = find_groups(model, x)
    _group_of(groups, "b1.weight", 1).zero_()
    with pytest.raises(SlimError):
        slim(model, x, groups)


# ------------------------------------------------------------------ the float64 check's grouped conv
@pytest.mark.parametrize(
    "cfg",
    [
        {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1, "groups": 8},
        {"in_channels": 4, "out_channels": 8, "kernel_size": 5, "padding": 2, "stride": 2,
         "groups": 4},
        {"in_channels": 12, "out_channels": 6, "kernel_size": (3, 1), "padding": (1, 0),
         "dilation": 2, "groups": 3, "bias": False},
    ],
)  # fmt: skip
def test_grouped_conv2d_equals_conv2d(cfg):
    """slim's float64 check runs grouped convs as kh·kw einsums: the same sum as F.conv2d."""
    from prunekit.structured.slim import grouped_conv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(**cfg).double()
    x = torch.randn(2, cfg["in_channels"], 9, 11, dtype=torch.double)
    torch.testing.assert_close(grouped_conv2d(conv, x), conv(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grouped_conv2d(conv, x[0]), conv(x[0]), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------- chunk, channel shuffle
class _ChunkTwoWays(nn.Module):
    """``a, b = h.chunk(2)`` along the channels, each half to its own conv: the slim model cuts at
    ``C' / 2``, so both halves must lose the same positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.left, self.right = nn.Conv2d(4, 5, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, b = F.relu(self.conv(x)).chunk(2, dim=1)
        return self.left(a) + self.right(b)


def test_chunk_joins_the_same_position_of_every_piece():
    torch.manual_seed(0)
    model, x = _ChunkTwoWays(), torch.randn(2, 3, 6, 6)
    groups = find_groups(model, x)
    group = _group_of(groups, "conv.weight", 1)
    assert group.prunable
    assert group.slices("out")[("conv.weight", 0)] == [1, 5]  # position 1 of each half
    assert group.slices("in") == {("left.weight", 1): [1], ("right.weight", 1): [1]}
    small = _zero_and_slim(model, x, group)
    assert small.conv.out_channels == 6


def _channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's, as torchvision writes it (sizes read from the tensor at run time)."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, c, h, w)


class _Shuffle(nn.Module):
    def __init__(self, variant: str = "runtime") -> None:
        super().__init__()
        self.variant = variant
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.conv(x)))
        if self.variant == "runtime":
            h = _channel_shuffle(h, 2)
        else:  # the group size written as a literal: it cannot follow pruning
            b, c, hh, ww = h.size()
            h = torch.transpose(h.view(b, 2, 4, hh, ww), 1, 2).contiguous().view(b, c, hh, ww)
        return self.out(h)


def test_channel_shuffle_joins_each_position_across_the_shuffled_groups():
    model, x, groups = _image_model(_Shuffle)
    assert all(g.prunable for g in groups if ("conv.weight", 0) in g.slices())
    group = _group_of(groups, "conv.weight", 1)
    # input position g·4 + j goes to output position 2j + g: positions 1 and 5 (j = 1) go together
    # and are consumed by columns 2 and 3 of the next conv
    assert group.slices("out")[("conv.weight", 0)] == [1, 5]
    assert group.slices("in") == {("out.weight", 1): [2, 3]}
    small = _zero_and_slim(model, x, group)
    assert small.conv.out_channels == 6


def test_channel_shuffle_with_a_literal_group_size_is_pinned():
    model, x = _Shuffle("literal"), torch.randn(2, 3, 6, 6)
    groups = find_groups(model, x)
    pinned = _group_of(groups, "conv.weight", 1)
    assert not pinned.prunable and "split into (2, 4)" in (pinned.reason or "")


def test_shuffle_without_the_join_is_refused_by_slim(monkeypatch):
    """The join is what makes the shuffle exact: without it, one position of one shuffled group is
    removed and slim's own check refuses the result."""
    from prunekit.structured import heads

    real = heads._is_shuffle

    def no_join(ctx, site):
        joins = ctx.graph.union_all
        ctx.graph.union_all = lambda a, b: None
        try:
            return real(ctx, site)
        finally:
            ctx.graph.union_all = joins

    monkeypatch.setattr(heads, "_is_shuffle", no_join)
    model, x, groups = _image_model(_Shuffle)
    _group_of(groups, "conv.weight", 1).zero_()
    with pytest.raises(SlimError):
        slim(model, x, groups)
