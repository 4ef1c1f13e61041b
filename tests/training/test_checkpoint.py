import pytest
import torch

from prunekit.training import (
    CheckpointError,
    load_checkpoint,
    load_sparse,
    save_checkpoint,
    save_sparse,
)


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 3, "t": torch.arange(4)}, path)
    obj = load_checkpoint(path)
    assert obj["epoch"] == 3 and torch.equal(obj["t"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left behind


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 1, "w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a checkpoint"):
        load_checkpoint(path)
    foreign = tmp_path / "f.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a prunekit-checkpoint file"):
        load_checkpoint(foreign)
    text = tmp_path / "t.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 1}, path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_sparse_export_stores_only_nonzeros_and_round_trips(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(300, 784)
    w[torch.rand_like(w) < 0.98] = 0
    state = {"fc1.weight": w, "fc1.bias": torch.randn(300), "steps": torch.tensor(5)}
    save_sparse(state, tmp_path / "s.pt")
    torch.save(state, tmp_path / "d.pt")
    back = load_sparse(tmp_path / "s.pt")
    for k, v in state.items():
        assert torch.equal(back[k], v)
    assert (tmp_path / "s.pt").stat().st_size < (tmp_path / "d.pt").stat().st_size / 10
    with pytest.raises(CheckpointError, match="not a prunekit-sparse file"):
        load_sparse(tmp_path / "d.pt")


def _craft(path, tensors):
    torch.save({"format": "prunekit-sparse", "version": 1, "tensors": tensors}, path)


def _entry(**changes):
    entry = {
        "shape": [2, 3],
        "indices": torch.tensor([0, 4], dtype=torch.int32),
        "values": torch.tensor([1.0, 2.0]),
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"w": _entry(indices=torch.tensor([-1, 4], dtype=torch.int32))}, "outside \\[0, 6\\)"),
        ({"w": _entry(indices=torch.tensor([0, 6], dtype=torch.int32))}, "outside \\[0, 6\\)"),
        ({"w": _entry(indices=None)}, "has keys \\['shape', 'values'\\]"),
        ({"w": _entry(values=torch.tensor([1.0]))}, "2 indices but 1 values"),
        ({"w": _entry(shape=[2, -3])}, "expected a list of non-negative ints"),
        ({"w": _entry(shape="2x3")}, "expected a list of non-negative ints"),
        ({"w": _entry(indices=torch.tensor([0.0, 4.0]))}, "'indices' that is not a 1-D int"),
        ({"w": _entry(values=torch.tensor([1, 2]))}, "'values' that is not a 1-D floating"),
        ({"w": _entry(indices=torch.tensor([4, 4], dtype=torch.int32))}, "repeated indices"),
        ({"w": [1, 2]}, "is a list, not an entry dict"),
        ({"w": {"dense": [1.0]}}, "not a tensor"),
        ([1, 2], "'tensors' must be a dict"),
    ],
)
def test_crafted_sparse_files_raise_checkpoint_error(tmp_path, tensors, message):
    """Negative or out-of-range positions, missing keys and wrong types name the tensor."""
    _craft(tmp_path / "s.pt", tensors)
    with pytest.raises(CheckpointError, match=message):
        load_sparse(tmp_path / "s.pt")


def test_crafted_sparse_entry_that_is_valid_loads(tmp_path):
    _craft(tmp_path / "s.pt", {"w": _entry(), "b": {"dense": torch.ones(2)}})
    back = load_sparse(tmp_path / "s.pt")
    assert torch.equal(back["w"], torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]))
    assert torch.equal(back["b"], torch.ones(2))
