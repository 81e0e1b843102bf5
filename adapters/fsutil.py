"""Crash-safe file writes: temp file, fsync, rename, fsync of the directory.

Every file lorad persists goes through here, so that a power cut leaves either the old
or the new content, never a torn file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "fsync_dir", "atomic_replace_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` by ``data`` so that readers see the old or the new bytes only."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(target.parent)


def atomic_replace_dir(staging: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Move a fully written and fsynced directory ``staging`` to the new name ``final``.

    ``final`` must not exist (directories cannot be replaced atomically on Linux); both
    must be on one filesystem. The parent of ``final`` is fsynced afterwards.
    """
    staging_path = Path(staging)
    for entry in staging_path.iterdir():
        if entry.is_file():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(staging_path)
    os.rename(staging_path, final)
    fsync_dir(Path(final).parent)
