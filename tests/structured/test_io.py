"""Saving and loading slim models: atomic exports and specs that are checked, not trusted."""

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import prunekit.atomic
from prunekit.structured import FoldedConv, find_groups, slim_with_plan
from prunekit.structured import io as slim_io
from prunekit.structured.io import SlimSpecError, load_slim, save_slim
from tests.structured.test_folded import _ConcatBranch
from tests.structured.zoo import ZOO


def _export(name: str, every: int, directory: Path) -> tuple[nn.Module, Tensor]:
    """Zero every ``every``-th prunable group of a fresh ZOO model, slim it and save it."""
    torch.manual_seed(0)
    model, x = ZOO[name]()
    groups = find_groups(model, x)
    for g in [g for g in groups if g.prunable][::every]:
        g.zero_()
    small, plan = slim_with_plan(model, x, groups)
    save_slim(small, plan.spec(), directory)
    return small.eval(), x


def _shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in model.state_dict().values()]


def _load(name: str, directory: Path) -> nn.Module:
    fresh, _ = ZOO[name]()
    return load_slim(fresh, directory).eval()


def _disk_full(*args: Any, **kwargs: Any) -> None:
    f = args[1]
    f.write(b"PK\x03\x04 partial")  # some bytes reach the file before the disk is full
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fail", ["weights", "spec"])
def test_a_failed_save_leaves_the_previous_export_loadable(tmp_path, monkeypatch, fail):
    first, x = _export("residual", 2, tmp_path)
    if fail == "weights":
        monkeypatch.setattr(slim_io.torch, "save", _disk_full)
    else:  # the weights are written, the spec's rename (the commit point) fails
        real = os.replace

        def replace(src: str, dst: str | Path) -> None:
            if Path(dst).name == "spec.json":
                raise OSError(errno.ENOSPC, "No space left on device")
            real(src, dst)

        monkeypatch.setattr(prunekit.atomic.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        _export("residual", 3, tmp_path)  # a different slim model
    monkeypatch.undo()
    loaded = _load("residual", tmp_path)
    assert _shapes(loaded) == _shapes(first)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), first(x), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "spec.json") == [
        json.loads((tmp_path / "spec.json").read_text())["weights"]
    ]  # no partial files left behind


def test_a_new_save_replaces_the_old_one(tmp_path):
    _export("residual", 2, tmp_path)
    second, _ = _export("residual", 3, tmp_path)
    loaded = _load("residual", tmp_path)
    assert _shapes(loaded) == _shapes(second)
    assert len(list(tmp_path.glob("weights*.pt"))) == 1  # the old weights are removed


def test_a_version_1_export_still_loads(tmp_path):
    small, x = _export("residual", 2, tmp_path)
    spec = json.loads((tmp_path / "spec.json").read_text())
    (tmp_path / spec.pop("weights")).rename(tmp_path / "weights.pt")
    del spec["broadcast_folds"]
    spec["version"] = 1
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with torch.no_grad():
        torch.testing.assert_close(_load("residual", tmp_path)(x), small(x), rtol=0, atol=0)


def test_the_fold_layout_is_saved(tmp_path):
    torch.manual_seed(0)
    model = _ConcatBranch().eval()
    x = torch.randn(2, 3, 6, 6)
    groups = find_groups(model, x)
    for g in groups:
        if g.prunable and ("conv1.weight", 0) in g.slices("out"):
            g.zero_()
    small, plan = slim_with_plan(model, x, groups)
    assert not plan.broadcast_folds  # the concatenation needs the constant at full size
    save_slim(small, plan.spec(), tmp_path)
    torch.manual_seed(1)
    loaded = load_slim(_ConcatBranch(), tmp_path).eval()
    assert isinstance(loaded.conv2, FoldedConv) and not loaded.conv2.broadcast
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def _kept(spec: dict[str, Any], tensor: str) -> list[int]:
    return spec["kept"][tensor][0]["kept"]


def _craft_version(spec: dict[str, Any]) -> None:
    spec["version"] = 99


def _craft_forward(spec: dict[str, Any]) -> None:
    spec["attributes"]["forward"] = 1


def _craft_unrelated_int(spec: dict[str, Any]) -> None:
    spec["attributes"]["depth"] = 2  # an int attribute no view/reshape follows


def _craft_raised_count(spec: dict[str, Any]) -> None:
    spec["attributes"]["num_heads"] = 5  # slim only lowers a head count (it is 4)


def _craft_negative(spec: dict[str, Any]) -> None:
    _kept(spec, "q.weight")[0] = -1


def _craft_out_of_range(spec: dict[str, Any]) -> None:
    _kept(spec, "q.weight")[-1] = 12  # q has 12 rows


def _craft_repeated(spec: dict[str, Any]) -> None:
    _kept(spec, "q.weight")[1] = _kept(spec, "q.weight")[0]


def _craft_axis(spec: dict[str, Any]) -> None:
    spec["kept"]["q.bias"][0]["axis"] = 1  # a bias has one axis


def _craft_unknown_tensor(spec: dict[str, Any]) -> None:
    spec["kept"]["q.scale"] = [{"axis": 0, "kept": [0]}]


def _craft_shape(spec: dict[str, Any]) -> None:
    _kept(spec, "o.weight").pop()  # a consistent-looking spec that the weights do not match


def _craft_unknown_key(spec: dict[str, Any]) -> None:
    spec["extra"] = True


def _craft_weights_path(spec: dict[str, Any]) -> None:
    spec["weights"] = "../elsewhere.pt"


@pytest.mark.parametrize(
    ("craft", "message"),
    [
        (_craft_version, "version 99"),
        (_craft_forward, "'forward' is not one slim records"),
        (_craft_unrelated_int, "'depth' is not one slim records"),
        (_craft_raised_count, "slim only lowers it"),
        (_craft_negative, r"integer indices in \[0, 12\)"),
        (_craft_out_of_range, r"integer indices in \[0, 12\)"),
        (_craft_repeated, "increasing, without repeats"),
        (_craft_axis, "axis 1"),
        (_craft_unknown_tensor, "'q.scale', which is not a parameter"),
        (_craft_shape, r"o\.weight has shape"),
        (_craft_unknown_key, "unknown keys"),
        (_craft_weights_path, "'weights' must name"),
    ],
)
def test_a_crafted_spec_is_refused(tmp_path, craft, message):
    _export("head_attribute_attention", 2, tmp_path)
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert spec["attributes"] == {"num_heads": 2} and len(_kept(spec, "q.weight")) == 6
    craft(spec)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    fresh, _ = ZOO["head_attribute_attention"]()
    forward = fresh.forward
    with pytest.raises(SlimSpecError, match=message):
        load_slim(fresh, tmp_path)
    if craft is not _craft_shape:  # refused before any change (the weights are read after)
        assert fresh.forward == forward and fresh.num_heads == 4
    assert issubclass(SlimSpecError, ValueError)
