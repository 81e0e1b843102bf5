"""On-disk, versioned adapter registry under the daemon's state directory.

Layout::

    <root>/<name>/<version>/   one directory per version: the adapter's files + lorad.json
    <root>/<name>/current      the current version number (text), replaced atomically
    <root>/.hwm/<name>         highest version number ever handed out for <name>
    <root>/.staging/           versions being written; leftovers removed on open
    <root>/.trash/             directories being removed; leftovers removed on open
    <root>/.index.json         the listing index (snapshot): derived, rebuilt when missing or damaged
    <root>/.index.log          changes to it since that snapshot, one line each

Why this shape: a version directory becomes visible only by one rename of a complete,
fsynced directory, and the current version changes only by one atomic replace of the
pointer file, so a crash at any point leaves the previous current version intact and
readable. Version numbers come from a durable high-water mark so that a number is never
handed out twice, even after prunes or a delete: OTA and the trainer rely on versions of a
name only ever going up.

A new adapter appears the same way: its directory is built in the staging area with its
first version and its pointer, and becomes visible by one rename, so a creation killed
half-way leaves nothing under its name.

One process (the daemon) owns a root: opening it removes what an interrupted write left
(and an empty adapter directory an older lorad left when killed while creating one), and
logs every damaged adapter.

Damage: a pointer that is not a version number, names a version that is not stored or is a
symbolic link; a ``lorad.json`` missing, truncated or not describing its directory; an
adapter file missing, of another size than recorded or (found when it is read) of another
sha256. Every read checks what it touches and raises :class:`AdapterDamagedError` naming the
adapter, the reason and the sound versions a rollback can go to; the other adapters are not
affected. A new version (put), a rollback to a sound version (set_current) or a delete
repairs it.

Listing (:meth:`AdapterRegistry.listing`) reads an index, not every adapter: per adapter,
what a full check found and the stamps of the pointer and lorad.json it read, trusted only
while two ``lstat`` calls find them unchanged; an adapter whose stamps moved (a change, a
crash between a change and the index's update, damage done behind the daemon's back) is
checked again, and a damaged one at every listing. :mod:`lorad.adapters.registry_index`
says what that covers; the index is never the source of truth.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from lorad.adapters.errors import AdapterDamagedError, AdapterNotFoundError, AdapterStorageError
from lorad.adapters.fsutil import atomic_replace_dir, atomic_write_bytes, fsync_dir
from lorad.adapters.names import NAME_RULE
from lorad.adapters.registry_index import (
    INDEX_FILE,
    JOURNAL_FILE,
    IndexDamaged,
    IndexedAdapter,
    IndexEntry,
    Stamp,
    decode,
    encode,
    encode_change,
    journal_header,
    scalar_meta,
    stamp_of,
    too_young,
)

__all__ = ["AdapterRegistry", "StoredAdapter", "IndexedAdapter", "NAME_RULE", "FILE_NAME_RULE", "META_FILE"]

FILE_NAME_RULE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
META_FILE = "lorad.json"  # reserved: written by the registry into every version directory

_NAME_RE = re.compile(NAME_RULE)
_FILE_NAME_RE = re.compile(FILE_NAME_RULE)
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
_FORMAT = 1
_CHUNK = 1 << 20
_MAX_SMALL_FILE = 1 << 20  # pointer, high-water mark and lorad.json are tiny
_MAX_INDEX_FILE = 64 << 20  # about 300 bytes per adapter
_MIN_COMPACT = 64  # journal lines before a new snapshot, or one per indexed adapter if more
_POINTER = "current"

_log = logging.getLogger(__name__)

_crash_points: Callable[[str], None] | None = None
"""Fault-injection seam, for tests/fault only; None in production.

When set, it is called with the name of each step of the write protocol right after the
step completed: "hwm", "file" (once per file staged), "staged", "renamed", "current" (the
pointer replaced, by put or set_current),
"trashed" (a directory moved to the trash, before it is removed), "pruned" and "indexed"
(the listing index written); for a new adapter "renamed" is the rename that moves it in
whole, pointer included. The crash tests
set it in a child process to SIGKILL itself after a chosen step.
"""


def _step(point: str) -> None:
    if _crash_points is not None:
        _crash_points(point)


@dataclass(frozen=True)
class StoredAdapter:
    """One stored version: where it is and what lorad.json says about it."""

    name: str
    version: int
    path: Path
    meta: Mapping[str, object] = field(hash=False)
    files: tuple[str, ...]
    sha256: Mapping[str, str] = field(hash=False)
    created: float


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"bad adapter name {name!r}: names must match {NAME_RULE}")


def _check_file_name(filename: str) -> None:
    if (
        not isinstance(filename, str)
        or not _FILE_NAME_RE.fullmatch(filename)
        or ".." in filename
        or filename == META_FILE
    ):
        raise ValueError(
            f"bad adapter file name {filename!r}: file names must match {FILE_NAME_RULE},"
            f" contain no '..' and not be {META_FILE!r} (reserved)"
        )


def _valid_file_name(filename: str) -> bool:
    return bool(_FILE_NAME_RE.fullmatch(filename)) and ".." not in filename and filename != META_FILE


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"bad version {version!r}: versions are integers >= 1")


@contextmanager
def _storage_errors(what: str) -> Iterator[None]:
    """Turn disk failures into the package's storage error, keeping the cause."""
    try:
        yield
    except OSError as e:
        raise AdapterStorageError(f"{what}: {e}") from e


class _Corrupt(Exception):
    """A stored file is not what the registry wrote; the public methods raise it as
    :class:`AdapterDamagedError`. ``version``: the stored version it concerns, if known."""

    def __init__(self, message: str, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


def _read_small(path: Path) -> bytes:
    """A pointer, high-water mark or lorad.json: a regular file (never followed through a
    symbolic link) of at most ``_MAX_SMALL_FILE`` bytes. FileNotFoundError when absent."""
    return _read_stamped(path)[0]


def _read_stamped(path: Path, limit: int = _MAX_SMALL_FILE) -> tuple[bytes, Stamp]:
    """:func:`_read_small`, with the file's stamp taken before reading (so a later change
    always moves it: the index never pairs older stamps with newer content)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _Corrupt(f"{path} is a symbolic link; the registry writes regular files only") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _Corrupt(f"{path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _Corrupt(f"{path} is corrupt: larger than {limit} bytes")
    return data, stamp_of(st)


def _parse_number(path: Path, data: bytes) -> int:
    text = data.decode("ascii", errors="replace").strip()
    if not _VERSION_RE.fullmatch(text):
        raise _Corrupt(f"{path} is corrupt: {text[:40]!r} is not a version number")
    return int(text)


class AdapterRegistry:
    """Versioned adapter files on disk; see the module docstring for the layout.

    Thread-safe: one lock serialises every change and every lookup, so a reader never
    meets a version half pruned or a pointer half moved. File contents are read outside
    the lock once the file is open (a later prune cannot take an open file away).
    """

    def __init__(
        self, root: Path, *, keep_versions: int = 3, max_file_bytes: int = 256 * 1024 * 1024
    ) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        if max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be >= 1, got {max_file_bytes}")
        self.root = Path(root)
        self.keep_versions = keep_versions
        self.max_file_bytes = max_file_bytes
        self._lock = threading.RLock()
        self._staging = self.root / ".staging"
        self._trash = self.root / ".trash"
        self._hwm = self.root / ".hwm"
        #: Files whose sha256 did not match when read: path -> (size, mtime_ns, reason), so
        #: that listing shows them damaged until the file changes (listing hashes nothing).
        self._bad_digests: dict[Path, tuple[int, int, str]] = {}
        #: The listing index: sound adapters only (a damaged one is checked at every listing).
        self._index: dict[str, IndexEntry] = {}
        #: The last scan of the root's names, and the root's stamp before it (None: scan again).
        self._names: tuple[Stamp | None, list[str]] = (None, [])
        #: The journal's header (None: no snapshot to log changes against) and its length.
        self._journal_base: bytes | None = None
        self._journal_lines = 0
        with _storage_errors(f"cannot open adapter registry at {self.root}"):
            for d in (self.root, self._staging, self._trash, self._hwm):
                d.mkdir(parents=True, exist_ok=True)
            self._clean_leftovers()
            self._open_index()

    # -- writing -------------------------------------------------------------------------

    def put(
        self, name: str, files: Mapping[str, bytes], *, meta: Mapping[str, object] | None = None
    ) -> int:
        """Store ``files`` as a new version of ``name``, make it current, return its number.

        The caller has validated the content; only names and sizes are checked here.
        """
        _check_name(name)
        if not files:
            raise ValueError(f"adapter {name!r}: at least one file is needed")
        for filename, data in files.items():
            _check_file_name(filename)
            if len(data) > self.max_file_bytes:
                raise ValueError(
                    f"adapter {name!r}: file {filename!r} has {len(data)} bytes,"
                    f" the limit is {self.max_file_bytes}"
                )
        user_meta = dict(meta or {})
        try:
            json.dumps(user_meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"adapter {name!r}: meta must be JSON-serialisable: {e}") from e
        digests = {f: hashlib.sha256(d).hexdigest() for f, d in files.items()}

        with self._lock, _storage_errors(f"cannot store adapter {name!r}"):
            adir = self.root / name
            previous = self._previous(name)
            version = self._allocate_version(name)
            staging = self._staging / f"{name}.{version}.{uuid.uuid4().hex}"
            # A new adapter is built whole (first version and pointer) and moved in by one rename.
            create = not adir.is_dir()
            vstage = staging / str(version) if create else staging
            try:
                vstage.mkdir(parents=True)
                for filename, data in files.items():
                    with open(vstage / filename, "xb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    _step("file")
                record = {
                    "format": _FORMAT,
                    "name": name,
                    "version": version,
                    "created": time.time(),
                    "files": {f: {"sha256": digests[f], "size": len(d)} for f, d in files.items()},
                    "meta": user_meta,
                }
                with open(vstage / META_FILE, "xb") as f:
                    f.write(json.dumps(record, indent=1).encode())
                    f.flush()
                    os.fsync(f.fileno())
                _step("staged")
                if create:
                    fsync_dir(vstage)
                    atomic_write_bytes(staging / _POINTER, f"{version}\n".encode())
                    atomic_replace_dir(staging, adir)
                else:
                    atomic_replace_dir(staging, adir / str(version))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            _step("renamed")
            if not create:
                self._write_current(name, version)
            _step("current")
            self._prune(name, version, previous)
            _step("pruned")
            self._forget(name)
            _step("indexed")
            return version

    def set_current(self, name: str, version: int) -> None:
        """Make an existing version current (rollback or roll-forward), atomically."""
        _check_name(name)
        _check_version(version)
        with self._lock, _storage_errors(f"cannot set current version of adapter {name!r}"), self._checked(name):
            vdir = self.root / name / str(version)
            if not vdir.is_dir():
                raise AdapterNotFoundError(name, version, stored=self._version_dirs(name))
            self._read_record(name, version, vdir)  # a damaged version is refused (AdapterDamagedError)
            self._write_current(name, version)
            _step("current")
            self._forget(name)

    def delete(self, name: str) -> None:
        """Remove every version of ``name``; its version numbers stay used."""
        _check_name(name)
        with self._lock, _storage_errors(f"cannot delete adapter {name!r}"):
            adir = self.root / name
            if not adir.is_dir():
                raise AdapterNotFoundError(name)
            self._remove_dir(adir)
            self._forget(name)

    # -- reading -------------------------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> StoredAdapter:
        """Describe ``version`` of ``name`` (the current one when None), checked: its
        lorad.json sound, its files present with their recorded sizes. AdapterDamagedError
        when that fails (or the pointer is damaged)."""
        _check_name(name)
        with self._lock, _storage_errors(f"cannot read adapter {name!r}"), self._checked(name):
            if version is None:
                current = self._current(name)
                if current is None:
                    raise AdapterNotFoundError(name)
                version, vdir = current
            else:
                _check_version(version)
                vdir = self.root / name / str(version)
                if not vdir.is_dir():
                    raise AdapterNotFoundError(name, version, stored=self._version_dirs(name))
            return self._read_record(name, version, vdir)

    def read_file(self, name: str, version: int | None, filename: str) -> bytes:
        """The bytes of one file, checked against its size limit and recorded sha256."""
        _check_file_name(filename)
        with self._lock:
            stored = self.get(name, version)
            if filename not in stored.files:
                raise ValueError(
                    f"adapter {name!r} version {stored.version} has no file {filename!r};"
                    f" it has {list(stored.files)}"
                )
            path = stored.path / filename
            with _storage_errors(f"cannot read {path}"):
                f = open(path, "rb")  # noqa: SIM115 - opened under the error mapping, closed by the with below
        with f, _storage_errors(f"cannot read {path}"):
            data, digest = self._read_limited(f, path)
            seen = os.fstat(f.fileno())
        if digest != stored.sha256[filename]:
            reason = (f"{path} is corrupt: sha256 {digest} does not match {stored.sha256[filename]}"
                      f" recorded when version {stored.version} of {name!r} was stored")
            with self._lock, _storage_errors(f"cannot read adapter {name!r}"):
                self._bad_digests[path] = (seen.st_size, seen.st_mtime_ns, reason)
                self._index.pop(name, None)  # listing checks it again, and finds this
                raise self._damaged(name, reason, stored.version)
        return data

    def current_version(self, name: str) -> int | None:
        """The current version of ``name``, None when there is no such adapter;
        AdapterDamagedError when its pointer is damaged or names a version not stored."""
        _check_name(name)
        with self._lock, _storage_errors(f"cannot read adapter {name!r}"), self._checked(name):
            current = self._current(name)
            return None if current is None else current[0]

    def versions(self, name: str) -> list[int]:
        """Stored versions of ``name``, ascending; empty when there is no such adapter."""
        _check_name(name)
        with self._lock, _storage_errors(f"cannot read adapter {name!r}"):
            return self._version_dirs(name)

    def names(self) -> list[str]:
        """Stored adapters, sorted: sound or damaged (:meth:`get` tells which)."""
        with self._lock, _storage_errors(f"cannot list {self.root}"):
            return list(self._scan_names())

    def listing(self) -> dict[str, IndexedAdapter | AdapterStorageError]:
        """Every stored adapter, by name, sorted: what the index knows of its current
        version, or why it cannot be served (:class:`AdapterDamagedError` as :meth:`get`
        raises it; AdapterStorageError when its files cannot be read).

        Reads the index and checks each entry with two ``lstat`` calls (pointer and
        lorad.json); an adapter whose files changed since it was indexed is checked again
        as :meth:`get` does. What ``get`` checks beyond those two files (each adapter
        file's presence and size, a sha256 that did not match) is found on the read path,
        which makes listing check that adapter again.
        """
        with self._lock, _storage_errors(f"cannot list {self.root}"):
            names = self._scan_names()
            for gone in self._index.keys() - set(names):
                del self._index[gone]
            with self._root_dir() as root_fd:
                found = {name: self._lookup(name, root_fd) for name in names}
            return {name: f for name, f in found.items() if f is not None}

    def indexed(self, name: str) -> IndexedAdapter:
        """One adapter as :meth:`listing` sees it; AdapterNotFoundError, or the
        AdapterDamagedError :meth:`get` would raise."""
        _check_name(name)
        with self._lock, _storage_errors(f"cannot read adapter {name!r}"), self._root_dir() as root_fd:
            found = self._lookup(name, root_fd)
        if found is None:
            raise AdapterNotFoundError(name)
        if isinstance(found, AdapterStorageError):
            raise found
        return found

    # -- helpers (lock held) -------------------------------------------------------------

    @contextmanager
    def _checked(self, name: str) -> Iterator[None]:
        """Raise what :class:`_Corrupt` found as the adapter's AdapterDamagedError."""
        try:
            yield
        except _Corrupt as e:
            self._index.pop(name, None)  # listing checks it again (e.g. a file truncated behind our back)
            raise self._damaged(name, str(e), e.version) from None

    def _damaged(self, name: str, reason: str, version: int | None) -> AdapterDamagedError:
        sound = []
        for v in self._version_dirs(name):
            try:
                self._read_record(name, v, self.root / name / str(v))
            except (_Corrupt, OSError):
                continue
            sound.append(v)
        return AdapterDamagedError(name, reason, version=version, sound_versions=sound)

    def _current(self, name: str) -> tuple[int, Path] | None:
        """The current version and its directory; None when there is no such adapter."""
        found = self._current_stamped(name)
        return None if found is None else (found[0], found[1])

    def _current_stamped(self, name: str) -> tuple[int, Path, Stamp] | None:
        """:meth:`_current`, with the pointer's stamp."""
        adir = self.root / name
        path = adir / _POINTER
        try:
            data, pointer = _read_stamped(path)
        except FileNotFoundError:
            stored = self._version_dirs(name)
            if stored:
                raise _Corrupt(f"{path} is missing; stored versions: {stored}") from None
            return None
        version = _parse_number(path, data)
        vdir = adir / str(version)
        try:
            st = os.lstat(vdir)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise _Corrupt(f"{vdir} is a symbolic link; the registry writes directories only", version)
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise _Corrupt(f"{path} names version {version} but {vdir} is missing", version)
        return version, vdir, pointer

    def _previous(self, name: str) -> int | None:
        """The version a put replaces; None when there is none or the pointer is damaged
        (the new version repairs it)."""
        try:
            current = self._current(name)
        except _Corrupt as e:
            _log.warning("adapter %r: %s; the new version replaces the damaged pointer", name, e)
            return None
        return None if current is None else current[0]

    def _write_current(self, name: str, version: int) -> None:
        atomic_write_bytes(self.root / name / _POINTER, f"{version}\n".encode())

    def _allocate_version(self, name: str) -> int:
        path = self._hwm / name
        try:
            hwm = _parse_number(path, _read_small(path))
        except FileNotFoundError:
            hwm = 0
        except _Corrupt as e:
            raise AdapterStorageError(
                f"{e}: the highest version ever handed out for {name!r} is unknown, so a new version could"
                f" repeat an old number; write into it a number at least as high as any version of {name!r}"
                " ever stored") from None
        version = max([hwm, *self._version_dirs(name)]) + 1
        atomic_write_bytes(path, f"{version}\n".encode())
        _step("hwm")
        return version

    def _version_dirs(self, name: str) -> list[int]:
        adir = self.root / name
        if not adir.is_dir():
            return []
        return sorted(
            int(e.name) for e in adir.iterdir() if _VERSION_RE.fullmatch(e.name) and e.is_dir()
        )

    def _prune(self, name: str, current: int, previous: int | None) -> None:
        """Keep the newest ``keep_versions`` plus the current and the one it replaced."""
        versions = self._version_dirs(name)
        keep = set(versions[-self.keep_versions :]) | {current}
        if previous is not None:
            keep.add(previous)
        for v in versions:
            if v not in keep:
                self._remove_dir(self.root / name / str(v))

    def _remove_dir(self, path: Path) -> None:
        """Rename into the trash first so that no half-removed directory is ever visible."""
        trashed = self._trash / f"{path.name}.{uuid.uuid4().hex}"
        os.rename(path, trashed)
        fsync_dir(path.parent)
        _step("trashed")
        if trashed.is_symlink():
            trashed.unlink()
        else:
            shutil.rmtree(trashed)

    def _read_record(self, name: str, version: int, vdir: Path) -> StoredAdapter:
        """The version's lorad.json, checked, with its files present at their recorded sizes."""
        return self._load_record(name, version, vdir)[0]

    def _load_record(self, name: str, version: int, vdir: Path
                     ) -> tuple[StoredAdapter, Stamp, tuple[tuple[str, int | None], ...]]:
        """:meth:`_read_record`, with lorad.json's stamp and each file's recorded size."""
        path = vdir / META_FILE
        try:
            data, stamp = _read_stamped(path)
            record = json.loads(data)
        except FileNotFoundError:
            raise _Corrupt(f"{vdir} is corrupt: {META_FILE} is missing", version) from None
        except _Corrupt as e:
            raise _Corrupt(str(e), version) from None
        except (ValueError, RecursionError) as e:
            raise _Corrupt(f"{path} is corrupt: {e}", version) from None
        problem = _record_problem(record, name, version)
        if problem:
            raise _Corrupt(f"{path} is corrupt: {problem}", version)
        files = record["files"]
        for filename, entry in files.items():
            self._check_file(vdir / filename, entry.get("size"), version)
        sizes = tuple((f, v["size"] if type(v.get("size")) is int else None) for f, v in sorted(files.items()))
        return StoredAdapter(
            name=name,
            version=version,
            path=vdir,
            meta=MappingProxyType(record["meta"]),
            files=tuple(sorted(files)),
            sha256=MappingProxyType({f: v["sha256"] for f, v in files.items()}),
            created=float(record["created"]),
        ), stamp, sizes

    def _check_file(self, path: Path, size: object, version: int) -> None:
        """Present, a regular file, of the recorded size, and not known to hash wrong."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise _Corrupt(f"{path} is missing", version) from None
        if not stat.S_ISREG(st.st_mode):
            raise _Corrupt(f"{path} is not a regular file", version)
        if isinstance(size, int) and st.st_size != size:
            raise _Corrupt(f"{path} has {st.st_size} bytes, {META_FILE} records {size} (truncated or replaced)", version)
        bad = self._bad_digests.get(path)
        if bad is not None:
            if bad[:2] == (st.st_size, st.st_mtime_ns):
                raise _Corrupt(bad[2], version)
            del self._bad_digests[path]  # changed since: hashed again when next read

    def _read_limited(self, f: BinaryIO, path: Path) -> tuple[bytes, str]:
        """Read at most ``max_file_bytes``, hashing as it streams in."""
        h = hashlib.sha256()
        parts: list[bytes] = []
        total = 0
        while chunk := f.read(_CHUNK):
            total += len(chunk)
            if total > self.max_file_bytes:
                raise AdapterStorageError(
                    f"{path} is larger than the limit of {self.max_file_bytes} bytes"
                )
            h.update(chunk)
            parts.append(chunk)
        return b"".join(parts), h.hexdigest()

    def _clean_leftovers(self) -> None:
        """Remove what a crashed put/delete left: staging, trash, atomic-write temp files."""
        for d in (self._staging, self._trash):
            for entry in d.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        names = self._scan_names()  # one listing of each directory: this runs at every start
        for d in [self.root, self._hwm, *(self.root / n for n in names)]:
            with os.scandir(d) as entries:
                found = [e.name for e in entries]
            for tmp in found:
                if tmp.startswith(".") and tmp.endswith(".tmp"):
                    (d / tmp).unlink()
            if all(n.startswith(".") and n.endswith(".tmp") for n in found) and d.parent == self.root and d.name in names and not d.is_symlink():
                # An older lorad created the directory before its first version: killed between
                # the two, it left the directory empty. Nothing was ever stored there.
                d.rmdir()
                fsync_dir(self.root)
                _log.warning("removed %s: an empty adapter directory left by a creation that was interrupted", d)

    # -- the listing index (lock held) ---------------------------------------------------

    def _scan_names(self) -> list[str]:
        """The adapters' directories: the last scan while the root's stamp is unchanged
        (and was not racy), else a new one."""
        scanned_ns = time.time_ns()
        st = os.stat(self.root)
        root = stamp_of(st)
        if root == self._names[0]:
            return self._names[1]
        with os.scandir(self.root) as entries:
            names = sorted(e.name for e in entries if _NAME_RE.fullmatch(e.name) and e.is_dir())
        self._names = (None if too_young(max(st.st_mtime_ns, st.st_ctime_ns), scanned_ns) else root, names)
        return names

    @contextmanager
    def _root_dir(self) -> Iterator[int]:
        """A descriptor of the root, for stats relative to it (shorter path walks)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield fd
        finally:
            os.close(fd)

    def _lookup(self, name: str, root_fd: int, *, files: bool = False) -> IndexedAdapter | AdapterStorageError | None:
        """What the index says of ``name`` if it still holds (``files``: see
        :meth:`IndexEntry.holds`), else a fresh check's answer; None when there is no such
        adapter."""
        entry = self._index.get(name)
        if entry is not None and entry.holds(root_fd, files=files):
            return entry.adapter
        found = self._check_entry(name)
        if isinstance(found, IndexEntry):
            self._index[name] = found
            return found.adapter
        self._index.pop(name, None)
        return found

    def _check_entry(self, name: str) -> IndexEntry | AdapterStorageError | None:
        """A full check of the current version of ``name``, as :meth:`get` makes it."""
        checked_ns = time.time_ns()
        try:
            current = self._current_stamped(name)
            if current is None:
                return None
            version, vdir, pointer = current
            stored, record, files = self._load_record(name, version, vdir)
        except _Corrupt as e:
            try:
                return self._damaged(name, str(e), e.version)
            except OSError as e2:
                return AdapterStorageError(f"cannot read adapter {name!r}: {e2}")
        except OSError as e:
            return AdapterStorageError(f"cannot read adapter {name!r}: {e}")
        adapter = IndexedAdapter(name, version, MappingProxyType(scalar_meta(stored.meta)), stored.created)
        return IndexEntry(adapter, pointer, record, checked_ns, files)

    def _forget(self, name: str) -> None:
        """After a change of ``name``: drop its entry, in memory and in the journal. The
        next listing checks it, as it would anyway: an entry of files just written is racy."""
        self._index.pop(name, None)
        self._log_change(name)

    def _log_change(self, name: str) -> None:
        """Append ``name``'s entry to the journal: O(1) per change, where a snapshot is
        O(adapters). Not fsynced: the index is derived, a torn or lost append only makes an
        entry stale, and a stale entry is checked again. A new snapshot once the journal
        holds more lines than the index has entries."""
        if self._journal_base is None or self._journal_lines >= max(_MIN_COMPACT, len(self._index)):
            self._save_index()
            return
        line = encode_change(name, self._index.get(name))
        path = self.root / JOURNAL_FILE
        try:
            if self._journal_lines == 0:
                with open(path, "wb") as f:
                    f.write(self._journal_base + line)
            else:
                with open(path, "ab") as f:
                    f.write(line)
        except OSError as e:
            _log.warning("cannot write the listing index's journal %s: %s; the next start checks"
                         " the adapters it missed", path, e)
            self._journal_base = None  # the next change writes a snapshot instead
            return
        self._journal_lines += 1

    def _save_index(self) -> None:
        """Write a snapshot of the index atomically and start an empty journal. A failure
        costs no data (the index is derived, a stale one is detected), so it is logged,
        never raised into the change that ran."""
        path = self.root / INDEX_FILE
        snapshot = encode(self._index)
        try:
            atomic_write_bytes(path, snapshot)
            (self.root / JOURNAL_FILE).unlink(missing_ok=True)
        except OSError as e:
            _log.warning("cannot write the listing index %s: %s; the next start rebuilds it", path, e)
            self._journal_base = None
            return
        self._journal_base, self._journal_lines = journal_header(snapshot), 0

    def _open_index(self) -> None:
        """Load the index, check every adapter against it (a full check where it does not
        hold) and log the damaged ones. What changed goes to the journal; a new snapshot
        only when the old one (or its journal) could not be used or the journal would grow
        too long, so that a start writes little and, most of the time, renames nothing."""
        path = self.root / INDEX_FILE
        loaded: dict[str, IndexEntry] = {}
        rewrite = False
        try:
            snapshot = _read_stamped(path, _MAX_INDEX_FILE)[0]
            try:
                journal: bytes | None = _read_stamped(self.root / JOURNAL_FILE, _MAX_INDEX_FILE)[0]
            except FileNotFoundError:
                journal = None
            loaded, lines, torn = decode(snapshot, journal, _NAME_RE.fullmatch, _valid_file_name)
            self._journal_base, self._journal_lines = journal_header(snapshot), lines
            rewrite = torn  # a torn append: start a clean journal
        except FileNotFoundError:
            rewrite = True
        except (_Corrupt, IndexDamaged) as e:
            _log.warning("the listing index %s is damaged (%s): rebuilt from the version directories", path, e)
            rewrite = True
        names = self._scan_names()
        self._index = dict(loaded)
        changed = sorted(loaded.keys() - set(names))
        for gone in changed:
            del self._index[gone]
        with self._root_dir() as root_fd:
            for name in names:
                before = self._index.get(name)
                found = self._lookup(name, root_fd, files=True)  # a start checks what get checks
                if isinstance(found, AdapterStorageError):
                    _log.warning("%s", found)
                if self._index.get(name) is not before:
                    changed.append(name)
        if rewrite or self._journal_lines + len(changed) >= max(_MIN_COMPACT, len(self._index)):
            self._save_index()
        else:
            for name in changed:
                self._log_change(name)


def _record_problem(record: object, name: str, version: int) -> str | None:
    """What is wrong with a parsed lorad.json, None when it is sound."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("format") != _FORMAT:
        return f"format {record.get('format')!r}, expected {_FORMAT}"
    if record.get("name") != name or record.get("version") != version:
        return f"it describes {record.get('name')!r} version {record.get('version')!r}"
    if not isinstance(record.get("meta"), dict) or not isinstance(record.get("created"), (int, float)):
        return "meta or created missing"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return "no files listed"
    for filename, entry in files.items():
        if not _FILE_NAME_RE.fullmatch(filename) or ".." in filename or filename == META_FILE:
            return f"bad file name {filename!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            return f"no sha256 for {filename!r}"
    return None
