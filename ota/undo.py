"""Put a directory tree back exactly as it was when an operation fails half-way.

The fleet tool signs in place; :class:`DirUndo` remembers the bytes of every small
file (metadata, state, keys) and the names of the others (payloads and canonical copies
are written once under new names and never changed), so that :meth:`restore` leaves the
tree byte-identical: changed files rewritten, new files and directories removed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from lorad.adapters.fsutil import atomic_write_bytes

__all__ = ["DirUndo"]

_SMALL = 1 << 20  # files larger than this are remembered by name only (never rewritten)


class DirUndo:
    """Snapshot of ``roots`` (directories that may not exist yet) taken at construction."""

    def __init__(self, roots: Iterable[Path], *, write_once: Iterable[Path] = ()) -> None:
        """``write_once``: directories whose files are never rewritten (payloads, canonical
        copies): remembered by name only, whatever their size."""
        self._roots = [Path(r) for r in roots]
        once = tuple(str(Path(p)) + "/" for p in write_once)
        self._files: dict[Path, bytes | None] = {}
        self._modes: dict[Path, int] = {}
        self._dirs: set[Path] = set()
        for root in self._roots:
            if not root.exists():
                continue
            self._dirs.add(root)
            for dirpath, dirnames, filenames in os.walk(root):
                d = Path(dirpath)
                self._dirs.update(d / n for n in dirnames)
                for n in filenames:
                    p = d / n
                    st = p.stat()
                    self._modes[p] = st.st_mode & 0o777
                    small = st.st_size <= _SMALL and not str(p).startswith(once)
                    self._files[p] = p.read_bytes() if small else None

    def restore(self) -> None:
        """Undo every change made since the snapshot."""
        for root in self._roots:
            if not root.exists():
                continue
            for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
                d = Path(dirpath)
                for n in filenames:
                    if d / n not in self._files:
                        (d / n).unlink()
                if d not in self._dirs:
                    d.rmdir()
        for p, data in self._files.items():
            if data is not None and (not p.exists() or p.read_bytes() != data):
                atomic_write_bytes(p, data, mode=self._modes[p])
