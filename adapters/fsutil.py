"""Crash-safe file writes: temp file, fsync, rename, fsync of the directory.

Every file lorad persists goes through here, so that a power cut leaves either the old
or the new content, never a torn file.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "fsync_dir", "atomic_replace_dir", "disk_full", "free_bytes"]

#: What a full filesystem answers a write with (no space, or the user's quota).
_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(e: BaseException | None) -> bool:
    """Whether ``e``, or an error it was raised from, says the filesystem is full."""
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``path``."""
    return int(shutil.disk_usage(path).free)


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
