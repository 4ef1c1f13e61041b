"""A run's output directory: what is written where, who may write there, and when a run resumes.

Every ``prunekit train`` / ``prunekit compress`` run owns one directory. :class:`RunDir` is the only
code that writes in it, and it keeps four promises:

* **Nothing is overwritten by another run.** ``run.json`` records the run's kind and identity (its
  recipe, world size, a fingerprint of its data and of the weights it starts from) and whether it
  is complete. A directory holding another run's outputs (another identity, another kind) is
  refused with one line naming the difference and the files, unless ``overwrite``
  (``--overwrite``): the old outputs are then moved aside into ``.prunekit-replaced/`` and deleted
  only once the new run has its first checkpoint (or is complete); a new run that fails before
  that puts them back. Files with prunekit's names that no run recorded (an older prunekit's run,
  or the user's own) are never touched, even with ``overwrite``.
* **One process at a time.** ``.prunekit.lock`` (pid and host) is held while a run works in the
  directory; a second command on it is refused while that process lives.
* **A resume matches.** The same identity with an unfinished record resumes from its checkpoint;
  only the keys in ``resumable`` (e.g. the learning rate, to get past a diverged epoch) may
  change, and the change is reported (and recorded once the resumed run has checkpointed, so a
  failed resume changes nothing). Another world size, recipe or data set is an error.
* **A complete run is left as it is**: running it again writes nothing and returns its metrics.
* **Every file is written atomically**, and a run that fails before anything worth keeping (no
  checkpoint) removes what it wrote, the record and the directory if it created it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prunekit.atomic import save_atomic, write_text_atomic
from prunekit.config import ConfigError, short_repr
from prunekit.serialization import save_sparse

__all__ = ["MANIFEST", "OUTPUTS", "Opening", "RunDir", "differences", "portable"]

logger = logging.getLogger(__name__)

Kind = Literal["train", "compress"]

MANIFEST = "run.json"
#: the version of ``run.json`` this prunekit writes (a newer one is refused)
RECORD_VERSION = 1
CHECKPOINT = "checkpoint.pt"
LOCK = ".prunekit.lock"
REPLACED = ".prunekit-replaced"
#: the files and folders each kind of run writes (a superset: some are written by some runs only)
OUTPUTS: dict[str, tuple[str, ...]] = {
    "train": (
        "model.pt",
        "model_sparse.pt",
        "metrics.json",
        "report.md",
        "accuracy.png",
        "layer_sparsity.png",
        "model_dense_pair.pt",
        "slim",
        CHECKPOINT,
    ),
    "compress": (
        "model.pt",
        "model_sparse.pt",
        "model_quantized.pt",
        "model",
        "metrics.json",
        "report.md",
        "layer_error.png",
    ),
}
_OWNED = sorted({MANIFEST, *OUTPUTS["train"], *OUTPUTS["compress"]})


def differences(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two nested dicts, with ``(old, new)`` values."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(old) | set(new), key=str):
            out.update(differences(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return {} if old == new else {prefix.rstrip("."): (old, new)}


def portable(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe dict without what does not change the result: its ``name``, and the paths whose
    content the identity fingerprints instead (``model`` is replaced by the resolved architecture
    and a hash of its weights; ``data.root`` by a hash of the data)."""
    out = json.loads(json.dumps(dict(recipe)))
    out.pop("name", None)
    out.pop("model", None)
    if isinstance(out.get("data"), dict):
        out["data"].pop("root", None)
    return out


def _describe(diff: Mapping[str, tuple[Any, Any]], limit: int = 3) -> str:
    items = [
        f"{k} {short_repr(old)} -> {short_repr(new)}"
        for k, (old, new) in list(diff.items())[:limit]
    ]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(items) + more


@dataclass
class Opening:
    """How a run starts in its directory: ``new`` (from scratch), ``resume`` (from its checkpoint,
    if any) or ``complete`` (already done: nothing to do), and the resumable keys that changed."""

    status: Literal["new", "resume", "complete"]
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def _holder(lock: Path) -> str:
    """Who holds a lock file, as far as it says (never raises)."""
    try:
        holder = json.loads(lock.read_text(encoding="utf-8")[:200])
        return f"pid {int(holder['pid'])} on {str(holder['host'])[:60]}"
    except Exception:
        return "a process that has not written its pid yet"


class RunDir:
    """The output directory of one run (see the module docstring).

    Args:
        path: the directory (``--out``).
        kind: ``"train"`` or ``"compress"``.
    """

    def __init__(self, path: str | Path, kind: Kind) -> None:
        self._given = str(path)  # Path("") is "."
        self.path = Path(path)
        self.kind = kind
        self._created: list[Path] = []  # directories this process created, deepest first
        self._started = False  # this process started the run (status "new")
        self._written: list[str] = []
        self._pending: dict[str, Any] | None = None  # identity to record at the next checkpoint
        self._replaced = False  # another run's outputs are set aside in REPLACED
        self._lock_fd: int | None = None
        self._identity: dict[str, Any] | None = None

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    # -- claiming the directory ------------------------------------------------------------------

    def check_writable(self) -> None:
        """Create the directory and make sure files can be written in it, before any work.

        Raises:
            ConfigError: it is empty, names a file, or cannot be created or written to.
        """
        out = self.path
        if not self._given.strip():
            raise ConfigError(
                f"--out {self._given!r} is not a run directory; name a directory (e.g. runs/x)"
            )
        if out.is_symlink() and not out.exists():
            raise ConfigError(f"--out {out} is a symlink to nothing; choose a directory for --out")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output directory {out} is a file; choose a directory for --out")
        try:
            parents = out.resolve().parents
        except (OSError, RuntimeError):
            raise ConfigError(f"--out {out} cannot be resolved (a symlink loop?)") from None
        for parent in parents:
            if (parent / MANIFEST).is_file():
                raise ConfigError(
                    f"--out {out} lies inside the run directory {parent}; choose a directory "
                    "outside it"
                )
        try:
            missing, p = [], out
            while not p.exists():
                missing.append(p)
                p = p.parent
            out.mkdir(parents=True, exist_ok=True)
            self._created = missing
            with tempfile.TemporaryFile(dir=out, prefix=".prunekit-write-test."):
                pass
        except OSError as exc:
            raise ConfigError(
                f"output directory {out} is not writable ({exc.strerror or exc}); choose another --out"
            ) from None

    def _lock(self) -> None:
        """Take ``.prunekit.lock`` with ``flock`` (released by the kernel when the process ends,
        even killed), or refuse while another process holds it. The file names its holder."""
        path = self.path / LOCK
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(
                    f"{self.path} is in use by another prunekit process ({_holder(path)}); wait "
                    "for it to end"
                ) from None
            try:  # the file may have been removed (and another made) since we opened it
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._lock_fd = fd

    def _read_record(self) -> tuple[dict[str, Any] | None, str | None]:
        """The run record, or why ``run.json`` is not one (``(None, None)``: no record)."""
        path = self.path / MANIFEST
        if not path.exists() and not path.is_symlink():
            return None, None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            return None, f"is damaged ({type(exc).__name__})"
        if not (isinstance(record, dict) and isinstance(record.get("identity"), dict)):
            return None, "is not a prunekit run record"
        if record.get("kind") not in OUTPUTS:
            return None, f"records an unknown kind of run ({short_repr(record.get('kind'))})"
        if (
            not isinstance(record.get("version", 1), int)
            or record.get("version", 1) > RECORD_VERSION
        ):
            return None, (
                f"was written by a newer prunekit (record version {short_repr(record.get('version'))}"
                f", this one reads <= {RECORD_VERSION})"
            )
        return record, None

    def refuse_inside(self, source: Path, what: str) -> None:
        """Refuse a run whose ``source`` (a file or directory it reads) is this directory or lies
        inside it: the run would replace what it reads.

        Raises:
            ConfigError: naming ``what`` (e.g. ``model.run``).
        """
        try:
            out, src = self.path.resolve(), source.resolve()
        except (OSError, RuntimeError):
            raise ConfigError(
                f"--out {self.path} or {what} {source} cannot be resolved (a symlink loop?)"
            ) from None
        if src == out or out in src.parents:
            raise ConfigError(
                f"--out {self.path} holds what this run reads ({what} {source}); choose another "
                "--out"
            )

    def existing_outputs(self) -> list[str]:
        """The names prunekit runs write that exist in the directory now."""
        return [n for n in _OWNED if (self.path / n).exists() or (self.path / n).is_symlink()]

    def open(
        self,
        identity: dict[str, Any],
        *,
        overwrite: bool = False,
        resume: bool = True,
        resumable: tuple[str, ...] = (),
        same_when_complete: tuple[str, ...] = (),
    ) -> Opening:
        """Claim the directory for the run ``identity`` describes (call :meth:`check_writable`
        first; release it with :meth:`close` or :meth:`abandon`).

        Args:
            identity: what makes two runs the same run (JSON-ready; nested dicts compared by key).
            overwrite: replace another run's outputs instead of refusing.
            resume: continue an unfinished run of the same identity (``False``: start it again).
            resumable: dotted keys of ``identity`` that may change on resume.
            same_when_complete: dotted keys whose difference does not matter once the run is
                complete (its outputs are then left as they are), e.g. the world size.

        Raises:
            ConfigError: the directory is in use, holds another run's outputs (and not
                ``overwrite``), files no run recorded, or a resume that does not match.
        """
        identity = json.loads(json.dumps(identity))  # the form it has once read back
        self._lock()
        try:
            return self._open(identity, overwrite, resume, resumable, same_when_complete)
        except BaseException:
            self._release()
            raise

    def _open(
        self,
        identity: dict[str, Any],
        overwrite: bool,
        resume: bool,
        resumable: tuple[str, ...],
        same_when_complete: tuple[str, ...],
    ) -> Opening:
        self._recover()
        record, problem = self._read_record()
        existing = self.existing_outputs()
        if problem is not None:  # not a record this prunekit can vouch for: never replaced
            raise ConfigError(
                f"{self.path / MANIFEST} {problem}; move it (and that run's files) away or choose "
                "another --out"
            )
        if record is None:
            if existing:
                raise ConfigError(
                    f"{self.path} holds {', '.join(existing)}, which no prunekit run recorded (an "
                    "older prunekit's run, or your own files); move them away or choose another "
                    "--out"
                )
            return self._start(identity, replace=[])
        if overwrite:
            return self._start(identity, replace=self._outputs_of(record))
        same_kind = record["kind"] == self.kind
        diff = differences(record["identity"], identity) if same_kind else {}
        done = record.get("status") == "complete"
        if same_kind and done and all(k in same_when_complete for k in diff):
            if diff:
                logger.info("%s is complete (%s)", self.path, _describe(diff))
            self._release()
            return Opening("complete", diff)
        if same_kind and not diff and not done:
            if resume:
                self._identity = identity
                return Opening("resume")
            return self._start(identity, replace=self._outputs_of(record))  # --no-resume
        if same_kind and not done and resume and all(k in resumable for k in diff):
            logger.warning("resuming %s with changed %s", self.path, _describe(diff))
            self._pending = identity  # recorded once the resumed run has checkpointed
            self._identity = identity
            return Opening("resume", diff)
        raise ConfigError(self._conflict(record, diff, existing))

    def _conflict(
        self, record: dict[str, Any], diff: dict[str, tuple[Any, Any]], existing: list[str]
    ) -> str:
        files = ", ".join(n for n in existing if n != MANIFEST) or "no outputs yet"
        fix = "choose another --out, or pass --overwrite to replace them"
        if record["kind"] != self.kind:
            return (
                f"{self.path} holds a {record['kind']} run ({files}), not a {self.kind} run; {fix}"
            )
        if record.get("status") != "complete" and set(diff) == {"world_size"}:
            return self._world_size_message(*diff["world_size"], files)
        state = "a complete" if record.get("status") == "complete" else "an unfinished"
        return f"{self.path} holds {state} run that differs ({_describe(diff)}; {files}); {fix}"

    def _world_size_message(self, old: Any, new: int, files: str) -> str:
        return (
            f"{self.path} holds a run interrupted at world size {old} ({files}); resume it "
            f"with {old} ranks (--nproc {old}), not {new}, or pass --overwrite to start again"
        )

    def refuse_other_world_size(self, world_size: int) -> None:
        """Before any rank starts: refuse an unfinished run of this kind recorded at another
        world size (the message the ranks' own check would give; a damaged record is left to
        them).

        Raises:
            ConfigError: the run was interrupted at another world size.
        """
        record, _ = self._read_record()
        if record is None or record["kind"] != self.kind or record.get("status") == "complete":
            return
        old = record["identity"].get("world_size")
        if old != world_size:
            files = ", ".join(n for n in self.existing_outputs() if n != MANIFEST)
            raise ConfigError(self._world_size_message(old, world_size, files or "no outputs yet"))

    def _outputs_of(self, record: dict[str, Any]) -> list[str]:
        """The files a recorded run owns: those its record lists (complete), or the outputs its
        kind writes (unfinished), and the record itself."""
        listed = record.get("outputs")
        names = (
            [n for n in listed if isinstance(n, str) and n in OUTPUTS[record["kind"]]]
            if isinstance(listed, list)
            else list(OUTPUTS[record["kind"]])
        )
        return [n for n in [*names, MANIFEST] if (self.path / n).exists()]

    def _start(self, identity: dict[str, Any], replace: list[str]) -> Opening:
        """A new run: ``replace`` (the files of the run it replaces) set aside, then recorded."""
        if replace:
            aside = self.path / REPLACED
            aside.mkdir()
            self._replaced = True  # before the moves: a failure half-way is put back too
            for name in replace:
                os.replace(self.path / name, aside / name)
            logger.warning("replacing %s in %s", ", ".join(replace), self.path)
        self._started = True
        self._identity = identity
        self._write_record(identity, "running")
        return Opening("new")

    def _recover(self) -> None:
        """Outputs an interrupted replacement set aside (the process was killed before it could
        put them back): restored when the new run left no checkpoint, else refused."""
        aside = self.path / REPLACED
        if not aside.exists():
            return
        if self.checkpoint.exists():
            raise ConfigError(
                f"{aside} holds the outputs of a run that --overwrite or --no-resume replaced, "
                f"and the new run has a checkpoint; keep one: delete {aside}, or move it back"
            )
        (self.path / MANIFEST).unlink(missing_ok=True)  # the record of the run that never began
        self._replaced = True
        self._put_back()
        logger.warning("%s: restored the outputs an interrupted run had set aside", self.path)

    def recover(self) -> None:
        """After the processes of a run died without cleaning up (a launcher whose ranks were
        killed): put back what a replacement set aside, if the new run has no checkpoint."""
        if not (self.path / REPLACED).exists():
            return
        with contextlib.suppress(ConfigError):
            self._lock()
            try:
                self._recover()
            finally:
                self._release()

    def _put_back(self) -> None:
        aside = self.path / REPLACED
        if not (self._replaced and aside.is_dir()):
            return
        left = []
        for item in aside.iterdir():
            try:
                os.replace(item, self.path / item.name)
            except OSError:
                left.append(item.name)
        if left:
            logger.error("could not put back %s: they are in %s", ", ".join(left), aside)
        else:
            aside.rmdir()
        self._replaced = False

    def _write_record(self, identity: dict[str, Any], status: str, **extra: Any) -> None:
        record = {
            "version": RECORD_VERSION,
            "kind": self.kind,
            "status": status,
            "identity": identity,
            **extra,
        }
        write_text_atomic(self.path / MANIFEST, json.dumps(record, indent=1))

    # -- writing outputs -------------------------------------------------------------------------

    def _mark(self, name: str) -> Path:
        if name.split("/")[0] not in OUTPUTS[self.kind]:
            raise ValueError(f"{name!r} is not an output of a {self.kind} run")
        self._written.append(name)
        return self.path / name

    def save(self, name: str, obj: Any) -> int:
        """``torch.save`` ``obj`` as output ``name`` atomically; returns the file's size."""
        path = self._mark(name)
        save_atomic(obj, path)
        return path.stat().st_size

    def save_sparse(self, name: str, state: Mapping[str, Any], metadata: Mapping[str, Any]) -> int:
        """A state dict in the sparse export format (:func:`prunekit.serialization.save_sparse`)."""
        path = self._mark(name)
        save_sparse(state, path, metadata)
        return path.stat().st_size

    def write_text(self, name: str, text: str) -> None:
        write_text_atomic(self._mark(name), text)

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        self.write_text("metrics.json", json.dumps(metrics, indent=2))

    def write_with(self, name: str, write: Callable[[Path], Any]) -> Any:
        """Output ``name`` written by ``write(path)`` (a plot, a folder): it must write atomically."""
        return write(self._mark(name))

    def read_metrics(self) -> dict[str, Any]:
        """The metrics a complete run wrote.

        Raises:
            ConfigError: ``metrics.json`` is missing or damaged.
        """
        path = self.path / "metrics.json"
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            metrics = exc
        if not isinstance(metrics, dict):
            why = type(metrics).__name__
            raise ConfigError(
                f"{path} is missing or damaged ({why}) although {self.path} is recorded complete; "
                "pass --overwrite to run it again"
            )
        return metrics

    def written(self) -> list[str]:
        """The outputs this process wrote, in order (each once)."""
        return list(dict.fromkeys(self._written))

    def checkpoint_saved(self) -> None:
        """After each checkpoint: record a resume's changed identity, and delete the outputs of
        the run this one replaced (the new run can now be resumed instead)."""
        if self._pending is not None:
            self._write_record(self._pending, "running")
            self._pending = None
        self._drop_replaced()

    def _drop_replaced(self) -> None:
        if self._replaced:
            shutil.rmtree(self.path / REPLACED, ignore_errors=True)
            self._replaced = False

    def complete(self) -> None:
        """Record the run as complete (running it again leaves its outputs as they are) and
        release the directory."""
        identity = self._pending if self._pending is not None else self._identity
        if identity is None:
            raise RuntimeError("RunDir.complete() before open()")
        outputs = [n for n in OUTPUTS[self.kind] if (self.path / n).exists()]
        self._write_record(identity, "complete", outputs=outputs)
        self._pending = None
        self._drop_replaced()
        self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            (self.path / LOCK).unlink(missing_ok=True)  # while still held: the next one is new
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def close(self) -> None:
        """Release the directory (idempotent)."""
        self._release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        """A run that raised (an interrupt included) is :meth:`abandon`-ed; the directory is
        released either way."""
        try:
            if kind is not None:
                self.abandon()
        finally:
            self.close()

    def abandon(self) -> None:
        """After an error: if this process started the run and left no checkpoint to resume
        from, remove what it wrote and its record, put back the outputs it was replacing, and
        remove the directories it created (only if empty)."""
        if self._started and not self.checkpoint.exists():
            for name in [*self.written(), MANIFEST]:
                path = self.path / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            self._put_back()
        self._release()
        for directory in self._created:  # deepest first; only if empty: never another file
            with contextlib.suppress(OSError):
                directory.rmdir()
