"""A run's output directory: what is written where, who may write there, and when a run resumes.

Every ``prunekit train`` / ``prunekit compress`` run owns one directory. :class:`RunDir` is the only
code that writes in it, and it keeps four promises:

* **Nothing is overwritten by another run.** ``run.json`` records the run's kind and identity (its
  recipe, world size, a fingerprint of its data and of the weights it starts from) and whether it
  is complete. A directory holding another run's outputs (another identity, another kind, or
  prunekit outputs with no record) is refused with one line naming the difference and the files,
  unless ``overwrite`` (``--overwrite``), which removes those outputs first.
* **A resume matches.** The same identity with an unfinished record resumes from its checkpoint;
  only the keys in ``resumable`` (e.g. the learning rate, to get past a diverged epoch) may
  change, and the change is reported. Another world size, recipe or data set is an error.
* **A complete run is left as it is**: running it again writes nothing and returns its metrics.
* **Every file is written atomically**, and a run that fails before anything worth keeping (no
  checkpoint) removes what it wrote, the record and the directory if it created it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prunekit.atomic import save_atomic, write_text_atomic
from prunekit.config import ConfigError
from prunekit.serialization import save_sparse

__all__ = ["MANIFEST", "OUTPUTS", "Opening", "RunDir", "differences"]

logger = logging.getLogger(__name__)

Kind = Literal["train", "compress"]

MANIFEST = "run.json"
CHECKPOINT = "checkpoint.pt"
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


def _describe(diff: Mapping[str, tuple[Any, Any]], limit: int = 3) -> str:
    items = [f"{k} {old!r} -> {new!r}" for k, (old, new) in list(diff.items())[:limit]]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(items) + more


@dataclass
class Opening:
    """How a run starts in its directory: ``new`` (from scratch), ``resume`` (from its checkpoint,
    if any) or ``complete`` (already done: nothing to do), and the resumable keys that changed."""

    status: Literal["new", "resume", "complete"]
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)


class RunDir:
    """The output directory of one run (see the module docstring).

    Args:
        path: the directory (``--out``).
        kind: ``"train"`` or ``"compress"``.
    """

    def __init__(self, path: str | Path, kind: Kind) -> None:
        self.path = Path(path)
        self.kind = kind
        self._created = False  # this process created the directory
        self._started = False  # this process started the run (status "new")
        self._written: list[str] = []

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    # -- claiming the directory ------------------------------------------------------------------

    def check_writable(self) -> None:
        """Create the directory and make sure files can be written in it, before any work.

        Raises:
            ConfigError: it names a file, or cannot be created or written to.
        """
        out = self.path
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output directory {out} is a file; choose a directory for --out")
        try:
            if not out.exists():
                out.mkdir(parents=True)
                self._created = True
            with tempfile.TemporaryFile(dir=out, prefix=".prunekit-write-test."):
                pass
        except OSError as exc:
            raise ConfigError(
                f"output directory {out} is not writable ({exc.strerror or exc}); choose another --out"
            ) from None

    def _record(self) -> dict[str, Any] | None:
        path = self.path / MANIFEST
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{path} is damaged ({type(exc).__name__}); choose another --out, or pass "
                "--overwrite to replace that run"
            ) from None
        if not isinstance(record, dict) or "kind" not in record or "identity" not in record:
            raise ConfigError(
                f"{path} is not a prunekit run record; choose another --out, or pass --overwrite"
            )
        return record

    def existing_outputs(self) -> list[str]:
        """The names prunekit runs write that exist in the directory now."""
        return [n for n in _OWNED if (self.path / n).exists()]

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
        first).

        Args:
            identity: what makes two runs the same run (JSON-ready; nested dicts compared by key).
            overwrite: replace another run's outputs instead of refusing.
            resume: continue an unfinished run of the same identity (``False``: start it again).
            resumable: dotted keys of ``identity`` that may change on resume.
            same_when_complete: dotted keys whose difference does not matter once the run is
                complete (its outputs are then left as they are), e.g. the world size.

        Raises:
            ConfigError: the directory holds another run's outputs (and not ``overwrite``), or a
                resume that does not match.
        """
        identity = json.loads(json.dumps(identity))  # the form it has once read back
        record = self._record()
        existing = self.existing_outputs()
        if record is not None and not overwrite:
            same_kind = record["kind"] == self.kind
            diff = differences(record["identity"], identity) if same_kind else {}
            done = record.get("status") == "complete"
            if same_kind and done and diff and all(k in same_when_complete for k in diff):
                logger.warning("%s is complete (%s)", self.path, _describe(diff))
                return Opening("complete", diff)
            if same_kind and not diff:
                if done:
                    return Opening("complete")
                if resume:
                    return Opening("resume")
                self._clear()
                return self._start(identity)
            if same_kind and not done and resume and all(k in resumable for k in diff):
                logger.warning("resuming %s with changed %s", self.path, _describe(diff))
                self._write_record(identity, "running")
                return Opening("resume", diff)
            raise ConfigError(self._conflict(record, diff, existing))
        if existing and not overwrite:
            raise ConfigError(
                f"{self.path} holds outputs of a prunekit run that recorded nothing "
                f"({', '.join(existing)}); choose another --out, or pass --overwrite to replace them"
            )
        if overwrite and (record is not None or existing):
            logger.warning("--overwrite: removing %s from %s", ", ".join(existing), self.path)
            self._clear()
        return self._start(identity)

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
            old, new = diff["world_size"]
            return (
                f"{self.path} holds a run interrupted at world size {old} ({files}); resume it "
                f"with {old} ranks (--nproc {old}), not {new}, or pass --overwrite to start again"
            )
        state = "a complete" if record.get("status") == "complete" else "an unfinished"
        return f"{self.path} holds {state} run that differs ({_describe(diff)}; {files}); {fix}"

    def _clear(self) -> None:
        for name in _OWNED:
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def _start(self, identity: dict[str, Any]) -> Opening:
        self._started = True
        self._write_record(identity, "running")
        return Opening("new")

    def _write_record(self, identity: dict[str, Any], status: str) -> None:
        record = {"kind": self.kind, "status": status, "identity": identity}
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
        """The metrics a complete run wrote."""
        metrics = json.loads((self.path / "metrics.json").read_text(encoding="utf-8"))
        return dict(metrics)

    def written(self) -> list[str]:
        """The outputs this process wrote, in order (each once)."""
        return list(dict.fromkeys(self._written))

    def complete(self) -> None:
        """Record the run as complete: running it again leaves its outputs as they are."""
        record = self._record()
        assert record is not None, "complete() before open()"
        self._write_record(record["identity"], "complete")

    def abandon(self) -> None:
        """After an error: if this process started the run and left no checkpoint to resume
        from, remove what it wrote, the record, and the directory if it created it."""
        if self._started and not self.checkpoint.exists():
            for name in [*self.written(), MANIFEST]:
                path = self.path / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        if self._created:
            with contextlib.suppress(OSError):  # only if empty: never another file
                self.path.rmdir()
