"""Layers whose channels are all removed fold into the tensor they still compute."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.core.cost import count_macs
from prunekit.models import build_model
from prunekit.structured import FoldedConv, find_groups, slim, slim_with_plan
from prunekit.structured.io import load_slim, save_slim
from prunekit.structured.slim import apply_kept, slim_plan


def _settled_resnet20() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = build_model("resnet20", (1, 28, 28), 10)
    x = torch.randn(4, 1, 28, 28)
    model.train()
    with torch.no_grad():  # non-trivial running statistics: the folded constant is BN(bias) ≠ 0
        for _ in range(3):
            model(x)
    return model.eval(), x


def _empty_branches(model: nn.Module, x: Tensor, blocks: list[int]) -> list:
    groups = find_groups(model, x)
    for g in groups:
        inner = {name for name, _ in g.slices("out")}
        if g.prunable and any(f"layers.{b}.conv1.weight" in inner for b in blocks):
            g.zero_()
    return groups


def test_conv_with_no_inputs_outputs_its_bias_with_the_conv_output_shape():
    for conv in (
        nn.Conv2d(3, 5, 3, stride=2, padding=1),
        nn.Conv2d(3, 5, (3, 1), stride=(1, 2), dilation=(2, 1)),
        nn.Conv1d(3, 5, 4, padding="same"),
        nn.Conv2d(3, 5, 3, padding="valid", bias=False),
    ):
        x = torch.zeros(2, 3, *([9] * (conv.weight.dim() - 2)))
        emptied = nn.Module()
        emptied.add_module("c", conv)
        plan = {"c.weight": [{"axis": 1, "kept": []}]}
        folded = apply_kept(emptied, plan, copy_model=True, broadcast_folds=False).c
        assert isinstance(folded, FoldedConv)
        got = folded(x[:, :0])  # what it receives: no channels
        torch.testing.assert_close(got, conv(x))  # a conv of zeros: its bias everywhere
        folded.broadcast = True
        small = folded(x[:, :0])
        assert small.shape[2:] == (1,) * (x.dim() - 2)
        torch.testing.assert_close(small.expand_as(got), got)


def test_empty_residual_branches_fold_exactly_and_save_load(tmp_path):
    model, x = _settled_resnet20()
    groups = _empty_branches(model, x, [1, 2, 5])
    with torch.no_grad():
        ref = model(x)
    small, plan = slim_with_plan(model, x, groups)
    assert plan.folds
    for b in (1, 2, 5):
        block = small.layers[b]
        assert isinstance(block.conv1, FoldedConv) and block.conv1.out_channels == 0
        assert isinstance(block.bn1, nn.Identity)
        assert isinstance(block.conv2, FoldedConv) and block.conv2.out_channels > 0
    assert isinstance(small.layers[0].conv1, nn.Conv2d)  # untouched blocks stay
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref, rtol=1e-4, atol=1e-5)
    # cheaper than keeping one zero channel per emptied layer (the fallback)
    kept_one = apply_kept(model, slim_plan(model, groups).kept, copy_model=True)
    one = x[:1]
    assert count_macs(small, one) < count_macs(kept_one, one)
    assert sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in kept_one.parameters()
    )
    save_slim(small, plan.spec(), tmp_path)
    torch.manual_seed(1)
    loaded = load_slim(build_model("resnet20", (1, 28, 28), 10), tmp_path).eval()
    assert isinstance(loaded.layers[5].conv2, FoldedConv)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))


def test_folded_branches_export_to_onnx(tmp_path):
    import onnxruntime as ort

    model, x = _settled_resnet20()
    small = slim(model, x, _empty_branches(model, x, [4])).eval()
    path = tmp_path / "folded.onnx"
    torch.onnx.export(small, (x,), str(path), dynamo=True, input_names=["x"])
    (got,) = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), small(x), rtol=1e-4, atol=1e-5)


class _ViewsItsChannels(nn.Module):
    """A model whose code cannot run on an empty tensor: ``view(B, C, -1)`` of zero elements."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        return self.fc(h.view(h.size(0), h.size(1), -1).mean(-1))


def test_model_code_that_cannot_run_empty_falls_back_to_one_zero_channel():
    torch.manual_seed(0)
    model, x = _ViewsItsChannels().eval(), torch.randn(2, 3, 6, 6)
    groups = find_groups(model, x)
    assert len([g for g in groups if g.prunable]) == 4
    for g in groups:
        g.zero_()
    with torch.no_grad():
        ref = model(x)
    small, plan = slim_with_plan(model, x, groups)
    assert not plan.folds
    assert isinstance(small.conv, nn.Conv2d) and small.conv.out_channels == 1
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref)


class _ConcatBranch(nn.Module):
    """A branch concatenated to its input: its folded constant must have the full spatial size."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 3, stride=1, padding=1)
        self.post = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        y = self.conv2(F.relu(self.bn(self.conv1(h))))
        z = F.relu(self.post(torch.cat([h, y], 1)))
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))


def emptied_concat_branch() -> tuple[nn.Module, Tensor, list]:
    """A :class:`_ConcatBranch` (seed 0, eval) whose branch's inner channels are all zeroed, its
    input and its groups: slimming folds ``conv2`` into a constant."""
    torch.manual_seed(0)
    model = _ConcatBranch().eval()
    x = torch.randn(2, 3, 6, 6)
    groups = find_groups(model, x)
    for g in groups:
        if g.prunable and ("conv1.weight", 0) in g.slices("out"):
            g.zero_()
    return model, x, groups


def test_broadcast_constant_where_it_broadcasts_full_size_where_the_code_needs_it():
    model, x = _settled_resnet20()
    small = slim(model, x, _empty_branches(model, x, [3]))
    folded = small.layers[3].conv2
    assert isinstance(folded, FoldedConv) and folded.broadcast  # added to the shortcut
    assert folded(torch.zeros(2, 0, 14, 14)).shape == (2, 32, 1, 1)

    model, x, groups = emptied_concat_branch()
    with torch.no_grad():
        ref = model(x)
    small, plan = slim_with_plan(model, x, groups)
    assert plan.folds and not plan.broadcast_folds
    assert isinstance(small.conv2, FoldedConv) and not small.conv2.broadcast
    assert small.conv2(torch.zeros(2, 0, 6, 6)).shape == (2, 2, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref)


def test_a_folded_model_can_be_captured_and_pruned_again():
    model, x = _settled_resnet20()
    first = slim(model, x, _empty_branches(model, x, [1, 2])).eval()
    groups = find_groups(first, x)
    stream = [g for g in groups if ("conv1.weight", 0) in g.slices("out")]  # the stage-1 stream
    assert len(stream) == 16 and all(g.prunable for g in stream)
    # the folded constants of the emptied branches belong to the stream's groups
    assert ("layers.1.conv2.bias", 0) in stream[0].slices("out")
    for g in stream[::2]:
        g.zero_()
    with torch.no_grad():
        ref = first(x)
    second = slim(first, x, groups)
    assert second.conv1.out_channels == 8
    assert second.layers[1].conv2.out_channels == 8 and second.layers[1].conv2.bias.shape == (8,)
    with torch.no_grad():
        torch.testing.assert_close(second(x), ref, rtol=1e-4, atol=1e-5)


def test_a_fixup_that_refuses_an_empty_layer_falls_back(monkeypatch):
    model, x = _settled_resnet20()
    groups = _empty_branches(model, x, [4])
    with torch.no_grad():
        ref = model(x)

    def refuse(conv):
        raise ValueError("no empty layers here")

    monkeypatch.setattr(FoldedConv, "from_conv", staticmethod(refuse))
    small, plan = slim_with_plan(model, x, groups)
    assert not plan.folds and small.layers[4].conv1.out_channels == 1
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref, rtol=1e-4, atol=1e-5)
