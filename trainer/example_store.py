"""Local training examples, per adapter, in one SQLite file on the device (never sent out).

Each example is a few named numpy arrays (the model's inputs) plus a label array, stored
as raw bytes with their dtype and shape. The store is bounded: at most
``max_examples_per_adapter`` per adapter, ``max_bytes`` of array data in all, nothing
older than ``retention_days``. At a count or size bound it refuses the new example
(:class:`StoreFullError`) and never evicts a stored one: an eviction would make adding one
example also remove another (possibly another adapter's), and the privacy accountant
assumes add-or-remove of one example. Retention deletes by age only, each example on its
own clock.

WAL mode lets the trainer read batches while the HTTP API adds examples. Deleting is
erasing: ``secure_delete`` overwrites freed content, and after every deletion a
``TRUNCATE`` checkpoint moves the overwritten pages into the database and empties the
write-ahead log, which still holds the examples as they were written. Sampling for
DP-SGD is Poisson (every example independently with probability q), which is what the
accountant assumes. The train/holdout split hashes each example id with a seed, so an
example stays on its side of the split as examples come and go.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from lorad.adapters.fsutil import disk_full, free_bytes
from lorad.trainer._names import check_adapter_name
from lorad.trainer.errors import BadTrainingDataError, StoreFullError, TrainingFailedError

__all__ = ["Example", "ExampleStore"]

_log = logging.getLogger(__name__)

_SCHEMA_VERSION = 1
# Below this many free bytes an unreadable database is taken for a full disk (SQLite says
# "disk I/O error" when it cannot create its write-ahead log).
_MIN_FREE_BYTES = 1 << 20
_INPUT_NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,256}$")
# Numbers only: object/string arrays cannot be stored as raw bytes safely.
_KINDS = "biuf"
_MAX_TENSORS = 64
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    adapter TEXT NOT NULL,
    created_at REAL NOT NULL,
    nbytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_adapter ON examples (adapter, id);
CREATE INDEX IF NOT EXISTS examples_created ON examples (created_at);
-- Who contributed an example (optional): the per-user contribution limit counts these.
-- A table of its own, so that stores written before it existed open unchanged.
CREATE TABLE IF NOT EXISTS example_users (
    example_id INTEGER PRIMARY KEY REFERENCES examples (id) ON DELETE CASCADE,
    user TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS example_users_user ON example_users (user);
CREATE TABLE IF NOT EXISTS tensors (
    example_id INTEGER NOT NULL REFERENCES examples (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (example_id, name)
);
"""
# The label is stored as a tensor under a name no input can have (inputs match _INPUT_NAME).
_LABEL = "#label"


@dataclass(frozen=True)
class Example:
    id: int
    adapter: str
    inputs: dict[str, npt.NDArray[np.generic]]
    label: npt.NDArray[np.generic]
    created_at: float


class ExampleStore:
    """Bounded per-adapter example store; thread-safe (one connection under a lock)."""

    def __init__(
        self,
        path: Path,
        *,
        max_examples_per_adapter: int,
        max_bytes: int,
        retention_days: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in (("max_examples_per_adapter", max_examples_per_adapter),
                            ("max_bytes", max_bytes)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(retention_days, (int, float)) and retention_days > 0):
            raise ValueError(f"retention_days must be a number > 0, got {retention_days!r}")
        self.path = Path(path)
        self.max_examples_per_adapter = max_examples_per_adapter
        self.max_bytes = max_bytes
        self.retention_days = float(retention_days)
        self._clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = self._open()

    # --- writing ------------------------------------------------------------------------

    def add(
        self, adapter: str, inputs: Mapping[str, npt.NDArray[np.generic]],
        label: npt.NDArray[np.generic] | int | float, *, user: str | None = None,
        max_per_user: int | None = None,
    ) -> int:
        """Store one example; returns its id. Retention is enforced afterwards; a full store
        refuses (StoreFullError) and keeps every stored example.

        ``user``: who contributed it; with ``max_per_user``, a user who already has that
        many examples of this adapter is refused (BadTrainingDataError), so that no one
        person's data weighs more than the per-user guarantee assumes.
        """
        check_adapter_name(adapter)
        if user is not None and not (isinstance(user, str) and 1 <= len(user) <= 128 and user.isprintable()):
            raise BadTrainingDataError(f"user id {user!r} is not allowed; allowed: 1 to 128 printable characters")
        tensors = _encode_inputs(inputs)
        tensors.append(_encode(_LABEL, np.asarray(label), "label"))
        nbytes = sum(len(t[3]) for t in tensors)
        if nbytes > self.max_bytes:
            raise BadTrainingDataError(
                f"example of {nbytes} bytes is larger than the store's max_bytes={self.max_bytes}"
            )
        with self._transaction() as db:
            expired = self._enforce(db)  # expired examples make room first
            (have,) = db.execute("SELECT COUNT(*) FROM examples WHERE adapter = ?", (adapter,)).fetchone()
            if have >= self.max_examples_per_adapter:
                raise StoreFullError(
                    f"adapter {adapter!r} has {have} examples, the store's limit per adapter "
                    f"(trainer.store.max_examples_per_adapter); stored examples are never evicted to make room. "
                    "Delete the adapter's examples, raise the limit, or wait for retention (retention_days)")
            (total,) = db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM examples").fetchone()
            if total + nbytes > self.max_bytes:
                raise StoreFullError(
                    f"the example store holds {total} bytes; this example's {nbytes} would take it past "
                    f"trainer.store.max_bytes={self.max_bytes}, and stored examples are never evicted to make room. "
                    "Delete examples, raise max_bytes, or wait for retention (retention_days)")
            if user is not None and max_per_user is not None:
                (have,) = db.execute(
                    "SELECT COUNT(*) FROM example_users u JOIN examples e ON e.id = u.example_id "
                    "WHERE u.user = ? AND e.adapter = ?", (user, adapter)).fetchone()
                if have >= max_per_user:
                    raise BadTrainingDataError(
                        f"user {user!r} already has {have} examples of adapter {adapter!r}; the per-user limit "
                        f"is {max_per_user} (trainer.store.max_examples_per_user)")
            cur = db.execute("INSERT INTO examples (adapter, created_at, nbytes) VALUES (?, ?, ?)",
                             (adapter, self._clock(), nbytes))
            example_id = cur.lastrowid
            assert example_id is not None
            if user is not None:
                db.execute("INSERT INTO example_users (example_id, user) VALUES (?, ?)", (example_id, user))
            db.executemany(
                "INSERT INTO tensors (example_id, name, dtype, shape, data) VALUES (?, ?, ?, ?, ?)",
                [(example_id, *t) for t in tensors],
            )
        if expired:
            self._erase_deleted()
        return example_id

    def enforce_retention(self) -> int:
        """Delete what is older than retention_days now (the scheduler calls this); returns deletions."""
        with self._transaction() as db:
            deleted = self._enforce(db)
        if deleted:
            self._erase_deleted()
        return deleted

    def delete_adapter(self, adapter: str) -> int:
        """Forget every example of ``adapter``; returns how many were deleted."""
        check_adapter_name(adapter)
        with self._transaction() as db:
            deleted = int(db.execute("DELETE FROM examples WHERE adapter = ?", (adapter,)).rowcount)
        if not self._erase_deleted():
            raise TrainingFailedError(
                f"example store {self.path}: the examples of {adapter!r} are deleted but still in the "
                f"write-ahead log (another connection is reading); delete again to erase them")
        return deleted

    # --- reading ------------------------------------------------------------------------

    def count(self, adapter: str, since_id: int | None = None) -> int:
        """Examples of ``adapter`` (with id > ``since_id`` when given: the new ones)."""
        check_adapter_name(adapter)
        with self._transaction(write=False) as db:
            row = db.execute("SELECT COUNT(*) FROM examples WHERE adapter = ? AND id > ?",
                             (adapter, -1 if since_id is None else since_id)).fetchone()
        return int(row[0])

    def adapters(self) -> list[str]:
        """Every adapter that has stored examples, sorted."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT DISTINCT adapter FROM examples ORDER BY adapter").fetchall()
        return [str(r[0]) for r in rows]

    def ids(self, adapter: str) -> list[int]:
        check_adapter_name(adapter)
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT id FROM examples WHERE adapter = ? ORDER BY id",
                              (adapter,)).fetchall()
        return [int(r[0]) for r in rows]

    def sample_poisson(
        self, adapter: str, q: float, rng: np.random.Generator,
        *, among: Sequence[int] | None = None,
    ) -> list[int]:
        """Ids of a Poisson sample: each example (of ``among`` if given) kept with prob. q."""
        if not (isinstance(q, (int, float)) and 0 < q <= 1):
            raise ValueError(f"q (sampling rate) must be in (0, 1], got {q!r}")
        candidates = np.asarray(self.ids(adapter) if among is None else list(among), dtype=np.int64)
        # One independent draw per candidate, whatever the outcome: this is the sampling
        # the accountant's Poisson-subsampled Gaussian assumes.
        return [int(i) for i in candidates[rng.random(candidates.size) < q]]

    def split(
        self, adapter: str, holdout_fraction: float, seed: int
    ) -> tuple[list[int], list[int]]:
        """(train ids, holdout ids), decided per example by a hash of (seed, id)."""
        if not (isinstance(holdout_fraction, (int, float)) and 0 <= holdout_fraction < 1):
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
        train: list[int] = []
        holdout: list[int] = []
        threshold = holdout_fraction * 2.0**64
        for i in self.ids(adapter):
            digest = hashlib.sha256(f"{seed}:{i}".encode()).digest()
            (holdout if int.from_bytes(digest[:8], "big") < threshold else train).append(i)
        return train, holdout

    def load(self, ids: Sequence[int], *, skip_missing: bool = False) -> list[Example]:
        """The examples with these ids, in that order.

        Retention may delete an example between sampling and loading; with
        ``skip_missing`` such ids are dropped (as if never sampled), else LookupError.
        """
        wanted = [int(i) for i in ids]
        if not wanted:
            return []
        found: dict[int, Example] = {}
        with self._transaction(write=False) as db:
            for start in range(0, len(wanted), 500):  # stay under SQLite's variable limit
                part = wanted[start : start + 500]
                marks = ",".join("?" * len(part))
                rows = db.execute(
                    f"SELECT e.id, e.adapter, e.created_at, t.name, t.dtype, t.shape, t.data "
                    f"FROM examples e JOIN tensors t ON t.example_id = e.id WHERE e.id IN ({marks})",
                    part,
                ).fetchall()
                for eid, adapter, created, name, dtype, shape, data in rows:
                    array = _decode(eid, name, dtype, shape, data)
                    ex = found.get(eid) or Example(eid, adapter, {}, np.empty(0), created)
                    if name == _LABEL:
                        ex = Example(eid, adapter, ex.inputs, array, created)
                    else:
                        ex.inputs[name] = array
                    found[eid] = ex
        missing = [i for i in wanted if i not in found]
        if missing and not skip_missing:
            raise LookupError(f"examples not in the store (deleted by retention?): {missing[:20]}")
        return [found[i] for i in wanted if i in found]

    def close(self) -> None:
        """Close the database; safe to call twice."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> ExampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            # Create the file private to the daemon's user before SQLite does (umask 022).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=10.0)
        except OSError as e:
            raise TrainingFailedError(f"cannot open example store {self.path}: {e}") from e
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA secure_delete=ON")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),))
            elif row[0] != str(_SCHEMA_VERSION):
                raise BadTrainingDataError(
                    f"example store {self.path} has schema version {row[0]!r}, "
                    f"this lorad reads {_SCHEMA_VERSION}"
                )
        except sqlite3.DatabaseError as e:
            db.close()
            free = free_bytes(self.path.parent)
            if disk_full(e) or free < _MIN_FREE_BYTES:
                raise TrainingFailedError(
                    f"cannot open example store {self.path}: the filesystem is full ({free} bytes free); free space and "
                    "restart the daemon to train again") from e
            raise BadTrainingDataError(
                f"example store {self.path} is not a valid database ({e}); move it aside to start an empty store "
                "(its examples are lost; the privacy ledger keeps what was spent on them)") from e
        except BaseException:
            db.close()
            raise
        return db

    @contextlib.contextmanager
    def _transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                raise RuntimeError(f"example store {self.path} is closed")
            db = self._db
            try:
                # Writers take the write lock up front so that a concurrent writer in
                # another process waits (busy timeout) instead of failing mid-transaction.
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise TrainingFailedError(f"example store {self.path} failed: {e}") from e

    def _erase_deleted(self) -> bool:
        """Empty the write-ahead log into the database (whose freed pages secure_delete zeroed).

        False if another connection's read kept part of the log (the next deletion retries).
        """
        with self._lock:
            if self._db is None:
                raise RuntimeError(f"example store {self.path} is closed")
            try:
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.DatabaseError as e:
                raise TrainingFailedError(f"example store {self.path}: erasing deleted examples failed: {e}") from e
        if busy:
            _log.warning("example store %s: deleted examples are still in its write-ahead log (another "
                         "connection is reading); the next deletion empties it", self.path)
        return not busy

    def _enforce(self, db: sqlite3.Connection) -> int:
        """Retention: delete examples older than retention_days (by age only)."""
        return int(db.execute("DELETE FROM examples WHERE created_at < ?",
                              (self._clock() - self.retention_days * 86400.0,)).rowcount)


def _encode_inputs(inputs: Mapping[str, npt.NDArray[np.generic]]) -> list[tuple[str, str, str, bytes]]:
    if not isinstance(inputs, Mapping) or not inputs:
        raise BadTrainingDataError("an example needs a non-empty mapping of input name -> array")
    if len(inputs) > _MAX_TENSORS:
        raise BadTrainingDataError(f"an example may have at most {_MAX_TENSORS} inputs, "
                                   f"got {len(inputs)}")
    out = []
    for name, value in inputs.items():
        if not (isinstance(name, str) and _INPUT_NAME.match(name)):
            raise BadTrainingDataError(f"input name must match {_INPUT_NAME.pattern}, got {name!r}")
        if not isinstance(value, np.ndarray):
            raise BadTrainingDataError(
                f"input {name!r} must be a numpy array, got {type(value).__name__}")
        out.append(_encode(name, value, f"input {name!r}"))
    return out


def _encode(name: str, array: npt.NDArray[np.generic], what: str) -> tuple[str, str, str, bytes]:
    if array.dtype.kind not in _KINDS:
        raise BadTrainingDataError(f"{what} has dtype {array.dtype}; allowed: bool, integers, floats")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadTrainingDataError(f"{what} contains NaN or infinity")
    # Little-endian on disk whatever the host, so a store survives a board swap.
    le = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return name, le.dtype.str, json.dumps(list(array.shape)), np.ascontiguousarray(le).tobytes()


def _decode(eid: int, name: str, dtype: str, shape: str, data: bytes) -> npt.NDArray[np.generic]:
    where = f"example {eid}, tensor {name!r}"
    try:
        dt = np.dtype(dtype)
        dims = json.loads(shape)
    except (TypeError, ValueError) as e:
        raise BadTrainingDataError(f"example store is corrupt at {where}: {e}") from e
    if (dt.kind not in _KINDS or not isinstance(dims, list)
            or not all(isinstance(d, int) and d >= 0 for d in dims)
            or len(data) != dt.itemsize * math.prod(dims)):
        raise BadTrainingDataError(f"example store is corrupt at {where}: dtype {dtype}, "
                                   f"shape {shape}, {len(data)} bytes do not agree")
    return np.frombuffer(data, dtype=dt).reshape(dims).astype(dt.newbyteorder("="))
