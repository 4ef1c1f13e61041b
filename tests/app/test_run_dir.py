"""RunDir: the overwrite rule, resume identity and completion, without training anything."""

import json

import pytest

from prunekit.app.run_dir import MANIFEST, RunDir, differences
from prunekit.config import ConfigError

IDENTITY = {"recipe": {"optimizer": {"lr": 0.05}, "epochs": 3}, "world_size": 1, "data": "abc"}


def _open(path, identity=IDENTITY, kind="train", **kwargs):
    run = RunDir(path, kind)
    run.check_writable()
    return run, run.open(identity, **kwargs)


def _with(**changes):
    identity = json.loads(json.dumps(IDENTITY))
    for key, value in changes.items():
        node = identity
        *parents, last = key.split("__")
        for k in parents:
            node = node[k]
        node[last] = value
    return identity


def test_differences_name_nested_keys_with_both_values():
    diff = differences(IDENTITY, _with(recipe__optimizer__lr=0.01, world_size=2))
    assert diff == {"recipe.optimizer.lr": (0.05, 0.01), "world_size": (1, 2)}
    assert differences(IDENTITY, json.loads(json.dumps(IDENTITY))) == {}


def test_new_then_resume_then_complete(tmp_path):
    run, opening = _open(tmp_path / "r")
    assert opening.status == "new"
    run.write_text("report.md", "x")
    assert _open(tmp_path / "r")[1].status == "resume"  # unfinished, same identity
    run.complete()
    assert _open(tmp_path / "r")[1].status == "complete"
    assert json.loads((tmp_path / "r" / MANIFEST).read_text())["status"] == "complete"


def test_another_run_is_refused_naming_the_difference_and_the_files(tmp_path):
    run, _ = _open(tmp_path)
    run.write_text("report.md", "first")
    with pytest.raises(ConfigError, match=r"recipe.epochs 3 -> 4; report.md\); choose another"):
        _open(tmp_path, _with(recipe__epochs=4))
    assert (tmp_path / "report.md").read_text() == "first"
    _, opening = _open(tmp_path, _with(recipe__epochs=4), overwrite=True)
    assert opening.status == "new" and not (tmp_path / "report.md").exists()


def test_only_resumable_keys_may_change_on_resume(tmp_path):
    _open(tmp_path)
    changed = _with(recipe__optimizer__lr=0.01)
    _, opening = _open(tmp_path, changed, resumable=("recipe.optimizer.lr",))
    assert opening.status == "resume"
    assert opening.changes == {"recipe.optimizer.lr": (0.05, 0.01)}
    assert json.loads((tmp_path / MANIFEST).read_text())["identity"] == changed  # the latest
    with pytest.raises(ConfigError, match=r"recipe.epochs 3 -> 5"):
        _open(
            tmp_path,
            _with(recipe__optimizer__lr=0.02, recipe__epochs=5),
            resumable=("recipe.optimizer.lr",),
        )


def test_a_complete_run_with_a_resumable_change_is_refused(tmp_path):
    run, _ = _open(tmp_path)
    run.complete()
    with pytest.raises(ConfigError, match="holds a complete run that differs"):
        _open(tmp_path, _with(recipe__optimizer__lr=0.01), resumable=("recipe.optimizer.lr",))


def test_world_size_of_an_unfinished_run_must_match_but_not_of_a_complete_one(tmp_path):
    run, _ = _open(tmp_path, _with(world_size=2))
    with pytest.raises(ConfigError, match=r"interrupted at world size 2.*--nproc 2"):
        _open(tmp_path, same_when_complete=("world_size",))
    run.complete()
    assert _open(tmp_path, same_when_complete=("world_size",))[1].status == "complete"


def test_another_kind_and_unrecorded_outputs_are_refused(tmp_path):
    run, _ = _open(tmp_path / "c", kind="compress")
    run.write_text("layer_error.png", "png")
    with pytest.raises(
        ConfigError, match=r"holds a compress run .*layer_error.png.*not a train run"
    ):
        _open(tmp_path / "c")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.pt").write_text("weights of an older run")
    (tmp_path / "old" / "notes.txt").write_text("the user's own file")
    with pytest.raises(ConfigError, match=r"recorded nothing \(model.pt\)"):
        _open(tmp_path / "old")
    _open(tmp_path / "old", overwrite=True)
    assert not (tmp_path / "old" / "model.pt").exists()
    assert (tmp_path / "old" / "notes.txt").exists()  # never another file


def test_a_damaged_record_is_one_line(tmp_path):
    _open(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ConfigError, match=r"run.json is damaged"):
        _open(tmp_path)


def test_abandon_removes_what_a_failed_new_run_wrote_and_the_directory_it_made(tmp_path):
    run, _ = _open(tmp_path / "new")
    run.write_text("report.md", "partial")
    run.abandon()
    assert not (tmp_path / "new").exists()
    # a run with a checkpoint keeps everything: it can be resumed
    run, _ = _open(tmp_path / "kept")
    run.save("checkpoint.pt", {"epoch": 1})
    run.abandon()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["checkpoint.pt", MANIFEST]
    # a directory the user made, with their files, is never removed
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    run, _ = _open(tmp_path / "mine")
    run.abandon()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_only_the_kinds_own_outputs_can_be_written(tmp_path):
    run, _ = _open(tmp_path)
    with pytest.raises(ValueError, match="not an output of a train run"):
        run.write_text("notes.txt", "x")
