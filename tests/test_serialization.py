"""The sparse export format: smallest encoding per tensor, exact round trip, damage refused."""

import pytest
import torch

from prunekit import CheckpointError, load_sparse, save_sparse


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


@pytest.mark.parametrize("density", [0.0, 0.01, 0.03, 0.2, 0.5, 0.8, 0.9, 1.0])
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1001])
def test_every_density_and_size_round_trips_exactly(tmp_path, density, numel):
    g = torch.Generator().manual_seed(numel)
    w = torch.randn(numel, generator=g)
    w[torch.rand(numel, generator=g) >= density] = 0
    save_sparse({"w": w, "z": torch.zeros(0)}, tmp_path / "s.pt")
    back = load_sparse(tmp_path / "s.pt")
    assert torch.equal(back["w"], w) and back["z"].numel() == 0


def _sizes(tmp_path, density, n=200_000):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=g)
    w[torch.rand(n, generator=g) >= density] = 0
    save_sparse({"w": w}, tmp_path / "s.pt")
    torch.save({"w": w}, tmp_path / "d.pt")
    return (tmp_path / "s.pt").stat().st_size, (tmp_path / "d.pt").stat().st_size


@pytest.mark.parametrize(
    ("density", "ratio"),
    [(0.5, 0.5 + 1 / 32), (0.2, 0.2 + 1 / 32), (0.02, 2 * 0.02), (0.95, 1.0)],
)
def test_the_sparse_file_is_never_larger_than_the_dense_one(tmp_path, density, ratio):
    """Sizes from the encodings' byte counts (n/8 + 4 nnz bitmask, 8 nnz indices, 4 n dense),
    independent of the code: at 50% density the file is ~53% of the dense one, not larger."""
    sparse, dense = _sizes(tmp_path, density)
    assert sparse <= ratio * dense * 1.01 + 2048, (sparse, dense)


def _bitmask_entry(**changes):
    entry = {
        "shape": [2, 5],
        "bitmask": torch.tensor([0b10000001, 0b10], dtype=torch.uint8),  # positions 0, 7, 9
        "values": torch.tensor([1.0, 2.0, 3.0]),
    }
    entry.update(changes)
    return entry


def test_a_crafted_bitmask_entry_loads_in_bit_order(tmp_path):
    torch.save(
        {"format": "prunekit-sparse", "version": 2, "tensors": {"w": _bitmask_entry()}},
        tmp_path / "s.pt",
    )
    expected = torch.zeros(10)
    expected[[0, 7, 9]] = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(load_sparse(tmp_path / "s.pt")["w"], expected.view(2, 5))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bitmask": torch.tensor([1], dtype=torch.uint8)}, "bitmask of 1 bytes, expected 2"),
        ({"values": torch.tensor([1.0, 2.0])}, "3 bits set but 2 values"),
        ({"bitmask": torch.tensor([1, 2], dtype=torch.int32)}, "not a 1-D uint8"),
    ],
)
def test_a_damaged_bitmask_entry_names_the_tensor(tmp_path, changes, message):
    torch.save(
        {"format": "prunekit-sparse", "version": 2, "tensors": {"w": _bitmask_entry(**changes)}},
        tmp_path / "s.pt",
    )
    with pytest.raises(CheckpointError, match=f"tensor 'w' .*{message}"):
        load_sparse(tmp_path / "s.pt")
