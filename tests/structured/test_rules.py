"""Op rules: activations whose f(0) depends on their arguments, and in-place item assignment."""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.structured import find_groups, slim


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
