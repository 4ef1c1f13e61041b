"""Saving and loading slim models: atomic exports and specs that are checked, not trusted."""

import errno
import importlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import prunekit.atomic
from prunekit.structured import FoldedConv, find_groups, slim, slim_with_plan
from prunekit.structured import io as slim_io
from prunekit.structured.io import SlimSpecError, load_slim, save_slim
from tests.structured.test_folded import _ConcatBranch, emptied_concat_branch
from tests.structured.tiny_models import TINY_MODELS

slim_mod = importlib.import_module("prunekit.structured.slim")  # the package exports slim() too


def _export(name: str, every: int, directory: Path) -> tuple[nn.Module, Tensor]:
    """Zero every ``every``-th prunable group of a fresh TINY_MODELS model, slim it and save it."""
    torch.manual_seed(0)
    model, x = TINY_MODELS[name]()
    groups = find_groups(model, x)
    for g in [g for g in groups if g.prunable][::every]:
        g.zero_()
    small, plan = slim_with_plan(model, x, groups)
    save_slim(small, plan.spec(), directory)
    return small.eval(), x


def _shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in model.state_dict().values()]


def _load(name: str, directory: Path) -> nn.Module:
    fresh, _ = TINY_MODELS[name]()
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
    model, x, groups = emptied_concat_branch()
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
    fresh, _ = TINY_MODELS["head_attribute_attention"]()
    forward = fresh.forward
    with pytest.raises(SlimSpecError, match=message):
        load_slim(fresh, tmp_path)
    assert fresh.forward == forward and fresh.num_heads == 4  # left as it was, even _craft_shape
    assert issubclass(SlimSpecError, ValueError)


# -- a failed load leaves the fresh model as it was -------------------------------------------
def _export_kind(kind: str, directory: Path) -> tuple[nn.Module, Tensor, Callable[[], nn.Module]]:
    """A slim export of a head-count model (attributes) or of one whose slimming replaces a conv
    by its folded constant (module replacement); its inputs and a factory of fresh models."""
    if kind == "attention":
        small, x = _export("head_attribute_attention", 2, directory)
        return small, x, lambda: TINY_MODELS["head_attribute_attention"]()[0]
    model, x, groups = emptied_concat_branch()
    small, plan = slim_with_plan(model, x, groups)
    assert isinstance(small.conv2, FoldedConv)
    save_slim(small, plan.spec(), directory)
    return small.eval(), x, _ConcatBranch


def _fingerprint(model: nn.Module) -> tuple[list[Any], dict[str, Any]]:
    """Every module (name, identity, type) with the identity and repr of each attribute and of each
    registry entry; every state-dict tensor's dtype, shape and bytes."""
    modules = []
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = {
            k: {kk: (id(vv), repr(vv)) for kk, vv in v.items()}
            if isinstance(v, dict)
            else (id(v), repr(v))
            for k, v in vars(m).items()
        }
        modules.append((name, id(m), type(m), attrs))
    tensors = {
        k: (
            t.dtype,
            tuple(t.shape),
            t.requires_grad,
            t.detach().reshape(-1).view(torch.uint8).numpy().tobytes(),
        )
        for k, t in model.state_dict(keep_vars=True).items()
    }
    return modules, tensors


def _edit_weights(directory: Path, edit: Callable[[dict[str, Tensor]], Any]) -> Any:
    path = directory / json.loads((directory / "spec.json").read_text())["weights"]
    state = torch.load(path, weights_only=True)
    result = edit(state)
    torch.save(state, path)
    return result


def _first_float(state: dict[str, Tensor], last: bool = False) -> str:
    names = [k for k, v in state.items() if v.is_floating_point() and v.numel()]
    return names[-1] if last else names[0]


Failure = Callable[[Path, pytest.MonkeyPatch, Callable[[], nn.Module]], tuple[type, str]]


def _spec_shape(
    d: Path, mp: pytest.MonkeyPatch, fresh: Callable[[], nn.Module]
) -> tuple[type, str]:
    spec = json.loads((d / "spec.json").read_text())
    kept = list(spec["kept"].values())[-1][0]["kept"]
    kept.pop() if kept else kept.append(0)  # well-formed, but the weights no longer fit
    (d / "spec.json").write_text(json.dumps(spec))
    return SlimSpecError, "has shape|holds tensors"


def _full_size_weights(
    d: Path, mp: pytest.MonkeyPatch, fresh: Callable[[], nn.Module]
) -> tuple[type, str]:
    _edit_weights(d, lambda s: (s.clear(), s.update(fresh().state_dict())))  # the wrong file
    return SlimSpecError, "has shape|holds tensors"


def _no_weights_file(
    d: Path, mp: pytest.MonkeyPatch, fresh: Callable[[], nn.Module]
) -> tuple[type, str]:
    (d / json.loads((d / "spec.json").read_text())["weights"]).unlink()
    return SlimSpecError, "cannot be read"


def _garbage_weights(
    d: Path, mp: pytest.MonkeyPatch, fresh: Callable[[], nn.Module]
) -> tuple[type, str]:
    (d / json.loads((d / "spec.json").read_text())["weights"]).write_bytes(b"PK\x03\x04 not a zip")
    return SlimSpecError, "cannot be read"


def _missing_tensor(
    d: Path, mp: pytest.MonkeyPatch, fresh: Callable[[], nn.Module]
) -> tuple[type, str]:
    _edit_weights(d, lambda s: s.pop(_first_float(s, last=True)))
    return SlimSpecError, "holds tensors"


def _extra_tensor(
    d: Path, mp: pytest.MonkeyPatch, fresh: Callable[[], nn.Module]
) -> tuple[type, str]:
    _edit_weights(d, lambda s: s.update(extra=torch.zeros(3)))
    return SlimSpecError, "holds tensors"


def _wrong_shape(
    d: Path, mp: pytest.MonkeyPatch, fresh: Callable[[], nn.Module]
) -> tuple[type, str]:
    name = _edit_weights(
        d, lambda s: (n := _first_float(s), s.update({n: torch.zeros(2, 2, 2)}))[0]
    )
    return SlimSpecError, rf"{re.escape(name)} has shape \(2, 2, 2\)"


def _not_a_tensor(
    d: Path, mp: pytest.MonkeyPatch, fresh: Callable[[], nn.Module]
) -> tuple[type, str]:
    name = _edit_weights(d, lambda s: (n := _first_float(s), s.update({n: 3}))[0])
    return SlimSpecError, rf"{re.escape(name)} has shape int"


def _nan_weight(
    d: Path, mp: pytest.MonkeyPatch, fresh: Callable[[], nn.Module]
) -> tuple[type, str]:
    name = _edit_weights(
        d, lambda s: (n := _first_float(s), s[n].view(-1).__setitem__(0, math.nan))[0]
    )
    return SlimSpecError, rf"{re.escape(name)} holds 1 NaN/Inf of \d+ values"


def _inf_weight(
    d: Path, mp: pytest.MonkeyPatch, fresh: Callable[[], nn.Module]
) -> tuple[type, str]:
    name = _edit_weights(
        d, lambda s: (n := _first_float(s, last=True), s[n].view(-1).fill_(-math.inf))[0]
    )
    return SlimSpecError, rf"{re.escape(name)} holds \d+ NaN/Inf"


def _fixup_fails(
    d: Path, mp: pytest.MonkeyPatch, fresh: Callable[[], nn.Module]
) -> tuple[type, str]:
    """A failure half-way through slimming: tensors sliced, the first module's fixup applied."""
    real = list(slim_mod._FIXUPS)
    calls: list[nn.Module] = []

    def fix(m: nn.Module) -> nn.Module | None:
        calls.append(m)
        if len(calls) == 2:
            raise RuntimeError("a fixup failed half-way")
        return next((f(m) for types, f in real if isinstance(m, types)), None)

    mp.setattr(slim_mod, "_FIXUPS", [(nn.Module, fix)])
    return RuntimeError, "half-way"


FAILURES: list[Failure] = [
    _spec_shape,
    _full_size_weights,
    _no_weights_file,
    _garbage_weights,
    _missing_tensor,
    _extra_tensor,
    _wrong_shape,
    _not_a_tensor,
    _nan_weight,
    _inf_weight,
    _fixup_fails,
]


@pytest.mark.parametrize("failure", FAILURES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("kind", ["attention", "fold"])
def test_a_failed_load_leaves_the_fresh_model_as_it_was(tmp_path, monkeypatch, kind, failure):
    good, bad = tmp_path / "good", tmp_path / "bad"
    small, x, fresh_model = _export_kind(kind, good)
    shutil.copytree(good, bad)
    error, match = failure(bad, monkeypatch, fresh_model)
    torch.manual_seed(1)
    fresh = fresh_model()
    before = _fingerprint(fresh)
    with pytest.raises(error, match=match) as info:
        load_slim(fresh, bad)
    assert "\n" not in str(info.value)
    assert _fingerprint(fresh) == before
    monkeypatch.undo()
    loaded = load_slim(fresh, good).eval()  # and it is still a fresh model to load into
    assert loaded is fresh
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


class _Masked(nn.Module):
    """A linear layer whose output is masked by a −inf buffer (a constant, not a weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("mask", torch.tensor([0.0, -math.inf, 0.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + self.mask


def test_a_non_finite_constant_the_model_holds_itself_still_loads(tmp_path):
    torch.manual_seed(0)
    model, x = _Masked().eval(), torch.randn(2, 4)
    small, plan = slim_with_plan(model, x, find_groups(model, x), check=False)  # inf - inf
    save_slim(small, plan.spec(), tmp_path)
    loaded = load_slim(_Masked(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


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
    model, x = TINY_MODELS[name]()
    groups = find_groups(model, x)
    for g in [g for g in groups if g.prunable][::2]:
        g.zero_()
    small = slim(model, x, groups).eval()
    save_slim(small, slim_spec(model, groups, x), tmp_path)
    assert (tmp_path / "spec.json").read_text().startswith("{")
    fresh, _ = TINY_MODELS[name]()  # a new instance of the original class
    loaded = load_slim(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in small.parameters()]
