"""Durable, all-or-nothing file writes (shared by checkpoints and the token cache)."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def fsync_dir(path) -> None:
    """Makes renames inside `path` durable, so a power cut cannot undo a completed write."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(final_path, write: Callable):
    """write(file) into a temp file next to final_path, fsync, then rename over it;
    returns write's result. Readers see the old file or the whole new one, never a part."""
    folder, name = os.path.split(os.fspath(final_path))
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result
