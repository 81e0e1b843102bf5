"""The registry's listing index: what listing needs of each adapter, the file stamps that
say whether it still holds, and the codec of its files.

The index is derived data, never the source of truth. An entry is what a full check of the
adapter's current version (pointer, lorad.json, its files present at their recorded sizes,
as :meth:`AdapterRegistry.get` makes it) found, with the stamps (inode, size, mtime, ctime)
of the pointer and of lorad.json taken before they were read. Listing trusts an entry while
two ``lstat`` calls find both stamps unchanged, and checks the adapter again otherwise:

- every change through the registry replaces the pointer (a new inode) or removes the
  adapter, so a crash between a change and the index's update leaves an entry that no
  longer holds, never a wrong listing;
- damage done behind the daemon's back to the pointer or lorad.json (rewritten, truncated,
  removed, a symbolic link put in its place, the version directory removed) moves a stamp;
- what ``get`` checks beyond those two files (each adapter file's presence and size, a
  sha256 that did not match when read) is found on the read path (every load reads the
  files), which drops the entry, so the next listing checks the adapter and lists it damaged;
- a damaged adapter has no entry: it is checked at every listing, so it is listed damaged
  exactly as long as it is.

A stamp is not trusted while the file was younger than :data:`RACY_NS` when it was taken
("racy", as git calls it): a rewrite within the file system's timestamp granularity could
keep both size and times. Such an entry is checked again until its files are old enough.

On disk: a snapshot ``.index.json`` (its sha256 on the first line, then JSON), written
atomically, and a journal ``.index.log`` of the changes since (a header naming the
snapshot's sha256, then one self-checked line per change), so a change costs one appended
line rather than a rewrite of every entry. A snapshot that is missing, torn or of another
format is rebuilt from the version directories; a journal line that is torn, or a journal of
another snapshot, is left out; either way a stale entry is only checked again.

No I/O here but the ``lstat`` of :meth:`IndexEntry.holds`: entries in, bytes out, and back.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["IndexedAdapter", "IndexEntry", "IndexDamaged", "RACY_NS", "INDEX_FILE", "JOURNAL_FILE", "Stamp",
           "stamp_of", "too_young", "scalar_meta", "encode", "journal_header", "encode_change", "decode"]

INDEX_FILE = ".index.json"
JOURNAL_FILE = ".index.log"
_FORMAT = 1
#: A stamp taken less than this after the file last changed is not trusted (see above).
RACY_NS = 1_000_000_000
#: The meta values an entry keeps: short scalars (listing's rank, bytes, source...).
_MAX_META_STR = 256

#: (inode, size, mtime_ns, ctime_ns) of a file.
Stamp = tuple[int, int, int, int]


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def too_young(newest_ns: int, checked_ns: int) -> bool:
    """Whether a stamp whose newest time is ``newest_ns``, taken at ``checked_ns``, is racy."""
    return newest_ns > checked_ns - RACY_NS


def scalar_meta(meta: Mapping[str, object]) -> dict[str, object]:
    """The values of ``meta`` an entry keeps: numbers, booleans, null and short strings."""
    return {k: v for k, v in meta.items()
            if v is None or isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= _MAX_META_STR)}


@dataclass(frozen=True)
class IndexedAdapter:
    """What listing knows of an adapter's current version without reading its lorad.json:
    ``meta`` holds the record's short scalar values (:meth:`AdapterRegistry.get` has all)."""

    name: str
    version: int
    meta: Mapping[str, object]
    created: float


@dataclass(frozen=True)
class IndexEntry:
    """One sound adapter as its last full check found it (see the module docstring)."""

    adapter: IndexedAdapter
    #: Stamps of the pointer and of the current version's lorad.json, taken before reading.
    pointer: Stamp
    record: Stamp
    #: time.time_ns() before the check read anything.
    checked_ns: int
    #: (name, size lorad.json records or None) of each file of the version: what a start
    #: checks beyond the stamps (see :meth:`holds`).
    files: tuple[tuple[str, int | None], ...]
    #: Whether the pointer or lorad.json was too young, when checked, to trust its stamp.
    racy: bool = field(init=False, compare=False, repr=False)
    #: The two files' paths, relative to the registry's root.
    _paths: tuple[str, str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        newest = max(self.pointer[2], self.pointer[3], self.record[2], self.record[3])
        object.__setattr__(self, "racy", too_young(newest, self.checked_ns))
        name, version = self.adapter.name, self.adapter.version
        object.__setattr__(self, "_paths", (f"{name}/current", f"{name}/{version}/lorad.json"))

    def holds(self, root_fd: int, *, files: bool = False) -> bool:
        """Whether the entry still describes the adapter: two ``lstat`` relative to the
        root's directory descriptor (listing's hot loop). With ``files`` (a start), also
        each file present, regular and of its recorded size, as ``get`` checks them."""
        if self.racy:
            return False
        try:
            st = os.lstat(self._paths[0], dir_fd=root_fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self.pointer:
                return False
            st = os.lstat(self._paths[1], dir_fd=root_fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self.record:
                return False
            if files:
                vdir = self._paths[1].rpartition("/")[0]
                for filename, size in self.files:
                    st = os.lstat(f"{vdir}/{filename}", dir_fd=root_fd)
                    if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size):
                        return False
        except OSError:
            return False
        return True

    def row(self) -> list[object]:
        a = self.adapter
        return [a.version, dict(a.meta), a.created, list(self.pointer), list(self.record), self.checked_ns,
                [list(f) for f in self.files]]


class IndexDamaged(Exception):
    """The index file is not one this module wrote (torn, edited, another format)."""


def _digest(body: bytes) -> bytes:
    return hashlib.sha256(body).hexdigest().encode()


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def encode(entries: Mapping[str, IndexEntry]) -> bytes:
    """The snapshot file: the sha256 of the body on the first line, then the body (JSON)."""
    body = _dumps({"format": _FORMAT, "entries": {name: e.row() for name, e in entries.items()}})
    return _digest(body) + b"\n" + body


def journal_header(snapshot: bytes) -> bytes:
    """The journal's first line: which snapshot its changes apply to."""
    return b"base " + snapshot[:64] + b"\n"


def encode_change(name: str, entry: IndexEntry | None) -> bytes:
    """One journal line: ``name`` is now ``entry`` (None: no longer indexed)."""
    body = _dumps([name, None if entry is None else entry.row()])
    return _digest(body) + b" " + body + b"\n"


def _stamp(value: object) -> Stamp:
    if not (isinstance(value, list) and len(value) == 4 and all(type(v) is int for v in value)):
        raise IndexDamaged(f"bad stamp {value!r}")
    return (value[0], value[1], value[2], value[3])


def _entry(name: str, row: object, valid_file: Callable[[str], object]) -> IndexEntry:
    if not (isinstance(row, list) and len(row) == 7):
        raise IndexDamaged(f"entry {name!r} is not a row of 7")
    version, meta, created, pointer, record, checked_ns, files = row
    if type(version) is not int or version < 1 or not isinstance(meta, dict) or type(created) not in (int, float):
        raise IndexDamaged(f"entry {name!r}: bad version, meta or created")
    if type(checked_ns) is not int or not isinstance(files, list) or not files:
        raise IndexDamaged(f"entry {name!r}: bad check time or files")
    pairs: list[tuple[str, int | None]] = []
    for f in files:
        if not (isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and valid_file(f[0])
                and (f[1] is None or type(f[1]) is int)):
            raise IndexDamaged(f"entry {name!r}: bad file {f!r}")
        pairs.append((f[0], f[1]))
    adapter = IndexedAdapter(name, version, MappingProxyType(scalar_meta(meta)), float(created))
    return IndexEntry(adapter, _stamp(pointer), _stamp(record), checked_ns, tuple(pairs))


def decode(snapshot: bytes, journal: bytes | None, valid_name: Callable[[str], object],
           valid_file: Callable[[str], object]) -> tuple[dict[str, IndexEntry], int, bool]:
    """The entries of a snapshot written by :func:`encode` with the changes of its journal
    applied; IndexDamaged when the snapshot is not one. Also returns the number of journal
    lines applied, and whether any journal content was left out (a torn last append, or a
    journal of another snapshot)."""
    digest, sep, body = snapshot.partition(b"\n")
    if not sep or _digest(body) != digest:
        raise IndexDamaged("its sha256 does not match (torn or edited)")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise IndexDamaged(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or not isinstance(doc.get("entries"), dict):
        raise IndexDamaged(f"format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {_FORMAT}")
    entries = {}
    for name, row in doc["entries"].items():
        if not valid_name(name):
            raise IndexDamaged(f"bad adapter name {name!r}")
        entries[name] = _entry(name, row, valid_file)
    if not journal:
        return entries, 0, False
    lines = journal.split(b"\n")
    if lines[0] != journal_header(snapshot)[:-1]:
        return entries, 0, True
    applied = 0
    for line in lines[1:-1]:  # the last piece follows the last newline: empty unless torn
        digest, _, body = line.partition(b" ")
        try:
            if _digest(body) != digest:
                raise IndexDamaged("sha256")
            name, row = json.loads(body)
            if not isinstance(name, str) or not valid_name(name):
                raise IndexDamaged(f"bad adapter name {name!r}")
            if row is None:
                entries.pop(name, None)
            else:
                entries[name] = _entry(name, row, valid_file)
        except (IndexDamaged, ValueError, TypeError, RecursionError):
            return entries, applied, True
        applied += 1
    return entries, applied, lines[-1] != b""
