"""RunDir: the overwrite rule, resume identity and completion, without training anything."""

import json
import subprocess
import sys

import pytest

from prunekit.app.run_dir import LOCK, MANIFEST, REPLACED, RunDir, differences, portable
from prunekit.config import ConfigError

IDENTITY = {"recipe": {"optimizer": {"lr": 0.05}, "epochs": 3}, "world_size": 1, "data": "abc"}


def _open(path, identity=IDENTITY, kind="train", **kwargs):
    """Open a run directory as a command would, then let go of its lock (as a command that
    ends, or is killed, does): the next call here is the next command."""
    run = RunDir(path, kind)
    run.check_writable()
    opening = run.open(identity, **kwargs)
    run.close()
    return run, opening


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
    # --overwrite sets the old outputs aside; a failure before the first checkpoint puts them back
    run, opening = _open(tmp_path, _with(recipe__epochs=4), overwrite=True)
    assert opening.status == "new" and not (tmp_path / "report.md").exists()
    run.write_text("metrics.json", "{}")
    run.abandon()
    assert (tmp_path / "report.md").read_text() == "first"
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / REPLACED).exists()
    assert json.loads((tmp_path / MANIFEST).read_text())["identity"] == IDENTITY
    # ... and once the new run has its first checkpoint they are gone
    run, _ = _open(tmp_path, _with(recipe__epochs=4), overwrite=True)
    run.save("checkpoint.pt", {"epoch": 1})
    run.checkpoint_saved()
    assert not (tmp_path / REPLACED).exists() and not (tmp_path / "report.md").exists()


def test_only_resumable_keys_may_change_on_resume(tmp_path):
    _open(tmp_path)
    changed = _with(recipe__optimizer__lr=0.01)
    _, opening = _open(tmp_path, changed, resumable=("recipe.optimizer.lr",))
    assert opening.status == "resume"
    assert opening.changes == {"recipe.optimizer.lr": (0.05, 0.01)}
    # recorded only once the resumed run has checkpointed: a failed resume changes nothing
    assert json.loads((tmp_path / MANIFEST).read_text())["identity"] == IDENTITY
    run, _ = _open(tmp_path, changed, resumable=("recipe.optimizer.lr",))
    run.checkpoint_saved()
    assert json.loads((tmp_path / MANIFEST).read_text())["identity"] == changed
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
    old = tmp_path / "old"
    (old / "slim").mkdir(parents=True)
    (old / "slim" / "important.txt").write_text("the user's own folder")
    (old / "model.pt").write_text("weights of an older run, or the user's")
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    for overwrite in (False, True):  # files no run recorded are never touched
        with pytest.raises(ConfigError, match=r"holds model.pt, slim, which no prunekit run"):
            _open(old, overwrite=overwrite)
        assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert not (old / LOCK).exists()


def test_a_record_this_prunekit_cannot_vouch_for_is_never_replaced(tmp_path):
    """Damaged, foreign or newer: refused in one line, even with --overwrite."""
    (tmp_path / "model.pt").write_text("precious")
    for content, message in (
        ("{not json", "run.json is damaged"),
        ("[" * 100_000, r"run.json is damaged \(RecursionError\)"),
        (json.dumps({"experiment": "x"}), "is not a prunekit run record"),
        (json.dumps({"version": 99, "kind": "train", "identity": {}}), "newer prunekit"),
    ):
        (tmp_path / MANIFEST).write_text(content)
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match=message):
                _open(tmp_path, overwrite=overwrite)
            assert (tmp_path / MANIFEST).read_text() == content
            assert (tmp_path / "model.pt").read_text() == "precious"


def test_overwrite_moves_only_the_files_the_record_lists(tmp_path):
    run, _ = _open(tmp_path)
    run.write_text("report.md", "old")
    run.complete()
    (tmp_path / "layer_error.png").write_text("the user's own file, a prunekit name")
    run, _ = _open(tmp_path, _with(recipe__epochs=9), overwrite=True)
    assert sorted(p.name for p in (tmp_path / REPLACED).iterdir()) == ["report.md", MANIFEST]
    run.complete()
    assert (tmp_path / "layer_error.png").read_text().startswith("the user's own")


def test_a_run_inside_another_run_is_refused(tmp_path):
    _open(tmp_path / "outer")
    with pytest.raises(ConfigError, match="lies inside the run directory"):
        RunDir(tmp_path / "outer" / "slim" / "inner", "train").check_writable()
    assert not (tmp_path / "outer" / "slim").exists()


def test_an_interrupted_replacement_is_put_back_by_the_next_command(tmp_path):
    """A process killed after --overwrite set the old outputs aside (before the new run's first
    checkpoint): the next command finds them and puts them back."""
    run, _ = _open(tmp_path)
    run.write_text("report.md", "old run")
    run.complete()
    _open(tmp_path, _with(recipe__epochs=9), overwrite=True)  # then killed: nothing else runs
    assert not (tmp_path / "report.md").exists()
    _, opening = _open(tmp_path)  # the original command again
    assert opening.status == "complete" and (tmp_path / "report.md").read_text() == "old run"
    assert not (tmp_path / REPLACED).exists()


_HOLD = """
import sys, time
from prunekit.app.run_dir import RunDir
run = RunDir(sys.argv[1], "train")
run.check_writable()
run.open({"recipe": {}, "world_size": 1, "data": "x"})
print("held", flush=True)
time.sleep(60)
"""


def test_a_directory_in_use_by_another_process_is_refused_until_it_ends(tmp_path):
    identity = {"recipe": {}, "world_size": 1, "data": "x"}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            ConfigError, match=rf"in use by another prunekit process \(pid {holder.pid} "
        ):
            _open(tmp_path, identity)
    finally:
        holder.kill()  # killed: the kernel releases its lock; its lock file stays behind
        holder.wait()
    assert (tmp_path / LOCK).exists()
    run = RunDir(tmp_path, "train")
    run.check_writable()
    assert run.open(identity).status == "resume"
    run.close()
    assert not (tmp_path / LOCK).exists()


def test_the_identity_ignores_the_name_and_paths_whose_content_is_fingerprinted():
    recipe = {"name": "a", "model": {"run": "runs/x"}, "data": {"root": "/d", "batch_size": 8}}
    other = {"name": "b", "model": {"run": "/abs/runs/x"}, "data": {"root": "d", "batch_size": 8}}
    assert portable(recipe) == portable(other) == {"data": {"batch_size": 8}}


def test_abandon_removes_what_a_failed_new_run_wrote_and_the_directories_it_made(tmp_path):
    run, _ = _open(tmp_path / "new" / "a" / "b")
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


def test_an_empty_out_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--out '' is not a run directory"):
        RunDir("", "train").check_writable()


def test_only_the_kinds_own_outputs_can_be_written(tmp_path):
    run, _ = _open(tmp_path)
    with pytest.raises(ValueError, match="not an output of a train run"):
        run.write_text("notes.txt", "x")
