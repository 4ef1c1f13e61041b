"""write_directory: a directory appears whole or not at all, an existing one is replaced only when
asked, and a failure at any step leaves the old one as it was and nothing else behind."""

import os

import pytest

from prunekit.export import directory
from prunekit.export.directory import json_writer, write_directory


def _files() -> dict:
    return {"a.json": json_writer({"x": 1}), "b.bin": lambda f: f.write(b"12345")}


def test_files_are_written_with_their_sizes(tmp_path):
    sizes = write_directory(tmp_path / "d", _files())
    assert sizes == {"a.json": len('{\n  "x": 1\n}\n'), "b.bin": 5}
    assert (tmp_path / "d" / "b.bin").read_bytes() == b"12345"
    assert oct((tmp_path / "d").stat().st_mode & 0o777) == oct(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_an_existing_path_is_refused_and_a_file_even_with_overwrite(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        write_directory(tmp_path / "d", _files())
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is not a directory"):
        write_directory(tmp_path / "f", _files(), overwrite=True)
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("failing", ["moving the old aside", "moving the new in"])
def test_overwrite_swaps_in_the_new_directory_and_a_failed_swap_restores_the_old(
    failing, tmp_path, monkeypatch
):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old.txt").write_text("old")
    real = os.replace

    def failing_rename(src, dst):
        if str(dst).endswith(".old"):
            step = "moving the old aside"
        elif str(src).endswith(".tmp") and os.path.isdir(src):  # the staging directory
            step = "moving the new in"
        else:
            step = "a file"
        if step == failing:
            raise OSError("no space")
        real(src, dst)

    monkeypatch.setattr(directory.os, "replace", failing_rename)
    with pytest.raises(OSError, match="no space"):
        write_directory(tmp_path / "d", {"b.bin": lambda f: f.write(b"1")}, overwrite=True)
    monkeypatch.setattr(directory.os, "replace", real)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    write_directory(tmp_path / "d", {"b.bin": lambda f: f.write(b"1")}, overwrite=True)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["b.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_writer_that_fails_leaves_nothing(tmp_path):
    def broken(f):
        f.write(b"half")
        raise RuntimeError("encoder bug")

    with pytest.raises(RuntimeError, match="encoder bug"):
        write_directory(tmp_path / "d", {"a.json": json_writer({}), "b.bin": broken})
    assert list(tmp_path.iterdir()) == []
