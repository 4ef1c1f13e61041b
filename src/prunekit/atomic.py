"""Atomic file writes: a temporary file in the target's directory, flushed to disk, then renamed.

A reader sees the old file or the new one, never a half-written one; a failed write (disk full, an
exception in the writer) leaves the old file untouched and no temporary file behind. The directory
is flushed after the rename, so a file recorded as written is there after a crash.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` with ``write(file)`` through a temporary file, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself survives a crash


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (temp file + fsync + rename)."""
    data = text.encode("utf-8")
    write_atomic(path, lambda f: f.write(data))


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (the renames in it) to disk, where the platform allows."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
