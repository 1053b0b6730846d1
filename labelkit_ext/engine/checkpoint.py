"""Checkpoints: plain state dicts + metadata, written atomically, read with ``weights_only``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from labelkit_ext.errors import MissingFileError, UsageError, reading

__all__ = ["CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "temp_path"]

CHECKPOINT_VERSION = 1


def temp_path(path: Path) -> Path:
    """A hidden sibling of ``path`` for writing before ``os.replace`` (same file system, so the
    replace is atomic; the pid keeps concurrent writers apart; created with the umask's mode)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, state dicts, numbers, strings, lists, dicts) to ``path``.

    The file is written beside the target and moved into place with ``os.replace``, so an
    interruption leaves the previous checkpoint intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": CHECKPOINT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} not found")
    with reading(path, "a labelkit checkpoint"):
        state = torch.load(path, map_location=map_location, weights_only=True)
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != CHECKPOINT_VERSION:
        raise UsageError(f"{path} is not a labelkit checkpoint (format_version {version!r})")
    return state
