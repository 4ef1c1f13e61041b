"""A model directory written all at once, and read back: ``config.json`` and safetensors files.

:func:`write_directory` builds every file in a hidden staging directory next to the target (each
file through :func:`~prunekit.atomic.write_atomic`), then renames the staging directory into
place: a reader sees no directory or the whole new one, never part of it; on any error the
staging directory is removed and the target is as it was. An existing target is refused unless
``overwrite``, which replaces it and everything in it.

``safetensors`` is imported when a file is written or read, not with the package.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from torch import Tensor

from prunekit.atomic import fsync_dir, write_atomic
from prunekit.serialization import CheckpointError

__all__ = ["json_writer", "read_directory", "safetensors_writer", "write_directory"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


def write_directory(
    directory: str | Path,
    files: Mapping[str, Callable[[IO[bytes]], object]],
    *,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write ``files`` (name → writer of the file's bytes) as the directory ``directory``.

    Returns:
        The size in bytes of each file written, by name.

    Raises:
        FileExistsError: ``directory`` exists and ``overwrite`` is not set, or it is a file.
    """
    target = Path(directory)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory; choose another path")
        if not overwrite:
            raise FileExistsError(
                f"{target} already exists; choose a new directory or pass overwrite=True to "
                "replace it (and everything in it)"
            )
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        for name, write in files.items():
            write_atomic(staging / name, write)
        os.chmod(staging, 0o755)
        fsync_dir(staging)
        _swap_into_place(staging, target.absolute())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(parent)
    return {name: (target / name).stat().st_size for name in files}


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and removed
    once the new one is in place (moved back if the rename fails)."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    try:
        os.replace(target, old)  # onto an empty directory: allowed
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def safetensors_writer(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> Callable[[IO[bytes]], object]:
    """A writer of the safetensors file of ``tensors`` (contiguous CPU tensors that share no
    memory) with ``metadata``."""
    save = _safetensors().torch.save
    data = save(dict(tensors), metadata=dict(metadata))
    return lambda f: f.write(data)


def json_writer(obj: Any) -> Callable[[IO[bytes]], object]:
    """A writer of ``obj`` as indented, key-sorted JSON."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return lambda f: f.write(data)


def read_directory(
    directory: str | Path,
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
    """``config.json``, every tensor and the metadata of the first weights file of a model
    directory (one ``model.safetensors``, or the shards its ``model.safetensors.index.json``
    lists).

    Raises:
        CheckpointError: the directory, its config or its weights are missing or unreadable.
    """
    safe_open = _safetensors().safe_open
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    config = _read_json(path / CONFIG_NAME)
    if (path / INDEX_NAME).exists():
        weight_map = _read_json(path / INDEX_NAME).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_NAME).exists():
        shards = [WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{path} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, str] = {}
    for shard in shards:
        try:
            with safe_open(str(path / shard), framework="pt") as f:
                metadata = metadata or dict(f.metadata() or {})
                tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        except Exception as exc:
            raise CheckpointError(
                f"{path / shard} cannot be read as safetensors ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:160]})"
            ) from None
    return config, tensors, metadata


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "prunekit.export writes and reads safetensors files: pip install safetensors "
            "(or prunekit[hf])"
        ) from None
    return safetensors


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a JSON object")
    return obj
