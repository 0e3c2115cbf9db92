"""Renames that survive a power cut: the new name is made durable by syncing the directory that holds it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["replace", "fsync_dir"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (new and renamed names) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace`` and then sync the destination's directory, so the rename is not lost in a crash."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)
