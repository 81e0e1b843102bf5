"""On-disk, versioned adapter registry under the daemon's state directory.

Layout::

    <root>/<name>/<version>/   one directory per version: the adapter's files + lorad.json
    <root>/<name>/current      the current version number (text), replaced atomically
    <root>/.hwm/<name>         highest version number ever handed out for <name>
    <root>/.staging/           versions being written; leftovers removed on open
    <root>/.trash/             directories being removed; leftovers removed on open

Why this shape: a version directory becomes visible only by one rename of a complete,
fsynced directory, and the current version changes only by one atomic replace of the
pointer file, so a crash at any point leaves the previous current version intact and
readable. Version numbers come from a durable high-water mark so that a number is never
handed out twice, even after prunes or a delete: OTA and the trainer rely on versions of a
name only ever going up.

One process (the daemon) owns a root: opening it removes what an interrupted write left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from lorad.adapters.errors import AdapterNotFoundError, AdapterStorageError
from lorad.adapters.fsutil import atomic_replace_dir, atomic_write_bytes, fsync_dir
from lorad.adapters.names import NAME_RULE

__all__ = ["AdapterRegistry", "StoredAdapter", "NAME_RULE", "FILE_NAME_RULE", "META_FILE"]

FILE_NAME_RULE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
META_FILE = "lorad.json"  # reserved: written by the registry into every version directory

_NAME_RE = re.compile(NAME_RULE)
_FILE_NAME_RE = re.compile(FILE_NAME_RULE)
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
_FORMAT = 1
_CHUNK = 1 << 20
_MAX_SMALL_FILE = 1 << 20  # pointer, high-water mark and lorad.json are tiny
_POINTER = "current"

_crash_points: Callable[[str], None] | None = None
"""Fault-injection seam, for tests/fault only; None in production.

When set, it is called with the name of each step of the write protocol right after the
step completed: "hwm", "file" (once per file staged), "staged", "renamed", "current",
"trashed" (a directory moved to the trash, before it is removed) and "pruned". The crash
tests set it in a child process to SIGKILL itself after a chosen step.
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


def _read_small(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(_MAX_SMALL_FILE + 1)
    if len(data) > _MAX_SMALL_FILE:
        raise AdapterStorageError(f"{path} is corrupt: larger than {_MAX_SMALL_FILE} bytes")
    return data


def _parse_number(path: Path, data: bytes) -> int:
    text = data.decode("ascii", errors="replace").strip()
    if not _VERSION_RE.fullmatch(text):
        raise AdapterStorageError(f"{path} is corrupt: {text[:40]!r} is not a version number")
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
        with _storage_errors(f"cannot open adapter registry at {self.root}"):
            for d in (self.root, self._staging, self._trash, self._hwm):
                d.mkdir(parents=True, exist_ok=True)
            self._clean_leftovers()

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
            previous = self._read_current(name)
            version = self._allocate_version(name)
            staging = self._staging / f"{name}.{version}.{uuid.uuid4().hex}"
            try:
                staging.mkdir()
                for filename, data in files.items():
                    with open(staging / filename, "xb") as f:
                        f.write(data)
                    _step("file")
                record = {
                    "format": _FORMAT,
                    "name": name,
                    "version": version,
                    "created": time.time(),
                    "files": {f: {"sha256": digests[f], "size": len(d)} for f, d in files.items()},
                    "meta": user_meta,
                }
                (staging / META_FILE).write_bytes(json.dumps(record, indent=1).encode())
                _step("staged")
                if not adir.is_dir():
                    adir.mkdir()
                    fsync_dir(self.root)
                atomic_replace_dir(staging, adir / str(version))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            _step("renamed")
            self._write_current(name, version)
            _step("current")
            self._prune(name, version, previous)
            _step("pruned")
            return version

    def set_current(self, name: str, version: int) -> None:
        """Make an existing version current (rollback or roll-forward), atomically."""
        _check_name(name)
        _check_version(version)
        with self._lock, _storage_errors(f"cannot set current version of adapter {name!r}"):
            vdir = self.root / name / str(version)
            if not vdir.is_dir():
                raise AdapterNotFoundError(name, version)
            self._read_record(name, version, vdir)
            self._write_current(name, version)

    def delete(self, name: str) -> None:
        """Remove every version of ``name``; its version numbers stay used."""
        _check_name(name)
        with self._lock, _storage_errors(f"cannot delete adapter {name!r}"):
            adir = self.root / name
            if not adir.is_dir():
                raise AdapterNotFoundError(name)
            self._remove_dir(adir)

    # -- reading -------------------------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> StoredAdapter:
        """Describe ``version`` of ``name`` (the current one when None)."""
        _check_name(name)
        with self._lock, _storage_errors(f"cannot read adapter {name!r}"):
            if version is None:
                current = self._read_current(name)
                if current is None:
                    raise AdapterNotFoundError(name)
                vdir = self.root / name / str(current)
                if not vdir.is_dir():
                    raise AdapterStorageError(
                        f"adapter {name!r}: {self.root / name / _POINTER} names version"
                        f" {current} but {vdir} is missing"
                    )
                version = current
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
        if digest != stored.sha256[filename]:
            raise AdapterStorageError(
                f"{path} is corrupt: sha256 {digest} does not match {stored.sha256[filename]}"
                f" recorded when version {stored.version} of {name!r} was stored"
            )
        return data

    def current_version(self, name: str) -> int | None:
        """The current version of ``name``, None when there is no such adapter."""
        _check_name(name)
        with self._lock, _storage_errors(f"cannot read adapter {name!r}"):
            return self._read_current(name)

    def versions(self, name: str) -> list[int]:
        """Stored versions of ``name``, ascending; empty when there is no such adapter."""
        _check_name(name)
        with self._lock, _storage_errors(f"cannot read adapter {name!r}"):
            return self._version_dirs(name)

    def names(self) -> list[str]:
        """Adapters that have a current version, sorted."""
        with self._lock, _storage_errors(f"cannot list {self.root}"):
            return sorted(
                e.name
                for e in self.root.iterdir()
                if _NAME_RE.fullmatch(e.name) and (e / _POINTER).is_file()
            )

    # -- helpers (lock held) -------------------------------------------------------------

    def _read_current(self, name: str) -> int | None:
        path = self.root / name / _POINTER
        try:
            data = _read_small(path)
        except FileNotFoundError:
            return None
        return _parse_number(path, data)

    def _write_current(self, name: str, version: int) -> None:
        atomic_write_bytes(self.root / name / _POINTER, f"{version}\n".encode())

    def _allocate_version(self, name: str) -> int:
        path = self._hwm / name
        try:
            hwm = _parse_number(path, _read_small(path))
        except FileNotFoundError:
            hwm = 0
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
        shutil.rmtree(trashed)

    def _read_record(self, name: str, version: int, vdir: Path) -> StoredAdapter:
        path = vdir / META_FILE
        try:
            record = json.loads(_read_small(path))
        except FileNotFoundError as e:
            raise AdapterStorageError(f"{vdir} is corrupt: {META_FILE} is missing") from e
        except ValueError as e:
            raise AdapterStorageError(f"{path} is corrupt: {e}") from e
        problem = _record_problem(record, name, version)
        if problem:
            raise AdapterStorageError(f"{path} is corrupt: {problem}")
        files = record["files"]
        return StoredAdapter(
            name=name,
            version=version,
            path=vdir,
            meta=MappingProxyType(record["meta"]),
            files=tuple(sorted(files)),
            sha256=MappingProxyType({f: v["sha256"] for f, v in files.items()}),
            created=float(record["created"]),
        )

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
        for d in [self._hwm, *(e for e in self.root.iterdir() if _NAME_RE.fullmatch(e.name))]:
            if d.is_dir():
                for tmp in d.glob(".*.tmp"):
                    tmp.unlink()


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
