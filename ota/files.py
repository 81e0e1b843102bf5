"""Repository files carried as retained, chunked MQTT messages.

Layout under ``lorad/v1/repo/``:

- ``index``: retained JSON ``{"files": {name: {"length", "chunk_size", "chunks"}}}``,
  published last, so it only names files whose chunks are all on the broker. It is not
  signed: TUF verifies every file, and the index only says what exists (a name missing
  from it is TUF's "404").
- ``f/<quoted name>/<i>``: retained chunk ``i`` of a file, each below the broker's limit.

A reader subscribes to exactly the chunks it still lacks; after a reconnect the
transport restores those subscriptions and the broker resends the retained chunks, so
nothing already received is fetched again. Every size is bounded while data arrives.

The index is unsigned, so nothing it says may make a fetch longer: a metadata file
(:meth:`RepoReader.fetch`) must arrive in full within ``meta_timeout_s`` and at most
``max_meta_bytes`` may be received for it (duplicates included), however many chunks the
index announces; a broker that drips chunks (a slow-retrieval attack) is cut off there.
Adapter payloads are chunked as their signed target says and resume where they stopped.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from . import wire
from .errors import TransportError, UpdateRejectedError
from .transport import TOPIC_ROOT, Transport, barrier

__all__ = [
    "INDEX_TOPIC",
    "FileEntry",
    "RepoIndex",
    "chunk_topic",
    "publish_files",
    "RepoReader",
    "NotOnBroker",
]

INDEX_TOPIC = f"{TOPIC_ROOT}/repo/index"
_MAX_INDEX_BYTES = 4 << 20
#: smallest chunk of a metadata file in several chunks (the fleet sends 8 KiB or what the broker carries)
MIN_META_CHUNK = 1024


def chunk_topic(name: str, index: int) -> str:
    # quote() leaves no "/", "+" or "#" in the name, so it is one topic level.
    return f"{TOPIC_ROOT}/repo/f/{quote(name, safe='')}/{index}"


@dataclass(frozen=True)
class FileEntry:
    length: int
    chunk_size: int
    chunks: int

    def __post_init__(self) -> None:
        if self.length < 0 or self.chunk_size <= 0 or self.chunks != max(1, -(-self.length // self.chunk_size)):
            raise ValueError(f"inconsistent file entry {self}")


@dataclass(frozen=True)
class RepoIndex:
    files: Mapping[str, FileEntry]

    def encode(self) -> bytes:
        return json.dumps({"files": {n: {"length": e.length, "chunk_size": e.chunk_size,
                                         "chunks": e.chunks} for n, e in sorted(self.files.items())}},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> RepoIndex:
        if len(data) > _MAX_INDEX_BYTES:
            raise UpdateRejectedError("too_large", f"repository index of {len(data)} bytes exceeds "
                                      f"{_MAX_INDEX_BYTES}")
        try:
            raw = wire.mapping(wire.loads(data, what="repository index", max_bytes=_MAX_INDEX_BYTES), "index")
            files = {}
            for n, e in wire.mapping(raw.get("files"), "files").items():
                where = f"files[{n[:64]!r}]"
                e = wire.mapping(e, where)
                files[n] = FileEntry(*(wire.integer(e.get(k), f"{where}.{k}") for k in ("length", "chunk_size", "chunks")))
            return cls(files)
        except ValueError as e:
            raise UpdateRejectedError("metadata_invalid", f"repository index is malformed: {e}") from e


def publish_files(transport: Transport, files: Mapping[str, bytes], *, index: Mapping[str, FileEntry],
                  chunk_size: Mapping[str, int] | int) -> dict[str, FileEntry]:
    """Publish ``files`` as retained chunks, then the index naming them plus ``index``.

    Returns the new index entries. ``chunk_size`` may be per file (targets are chunked as
    their signed spec says).
    """
    entries = dict(index)
    for name, data in files.items():
        size = chunk_size if isinstance(chunk_size, int) else chunk_size[name]
        size = min(size, transport.max_payload)
        if isinstance(chunk_size, Mapping) and size != chunk_size[name]:
            raise ValueError(f"chunk size {chunk_size[name]} of {name!r} exceeds the broker's "
                             f"message limit ({transport.max_payload} bytes of payload)")
        if not data:
            raise ValueError(f"{name!r} is empty; MQTT cannot retain an empty message")
        entry = FileEntry(len(data), size, max(1, -(-len(data) // size)))
        for i in range(entry.chunks):
            transport.publish(chunk_topic(name, i), data[i * size:(i + 1) * size], retain=True)
        entries[name] = entry
    transport.publish(INDEX_TOPIC, RepoIndex(entries).encode(), retain=True)
    return entries


class NotOnBroker(LookupError):
    """The index does not name the file (TUF treats this as HTTP 404)."""


class RepoReader:
    """Reads repository files from the broker through a :class:`Transport`.

    ``fetch_count`` counts chunk messages received per file name, so tests and the
    benchmark can see what was fetched again after a disconnect.
    """

    def __init__(self, transport: Transport, *, timeout_s: float = 10.0,
                 max_file_bytes: int = 64 << 20, meta_timeout_s: float = 120.0,
                 max_meta_bytes: int = 8 << 20) -> None:
        """``timeout_s``: longest wait for the index or for the next chunk (progress);
        ``meta_timeout_s`` and ``max_meta_bytes``: the whole of one :meth:`fetch`."""
        if min(timeout_s, meta_timeout_s) <= 0 or min(max_file_bytes, max_meta_bytes) <= 0:
            raise ValueError("timeouts and byte limits must be positive")
        self._t = transport
        self._timeout = timeout_s
        self._max_file = max_file_bytes
        self._meta_timeout = meta_timeout_s
        self._max_meta = max_meta_bytes
        self._index: RepoIndex | None = None
        self._index_error: Exception | None = None
        self._cv = threading.Condition()
        self._subscribed = False
        self.fetch_count: dict[str, int] = {}
        self.bytes_received = 0

    def index(self, *, fresh: bool = False) -> RepoIndex:
        """The latest index on the broker (waits for the retained one after subscribing)."""
        with self._cv:
            if fresh:
                self._index = None
            if not self._subscribed:
                self._subscribed = True
                subscribe = True
            else:
                subscribe = False
        if subscribe:
            try:
                self._t.subscribe([INDEX_TOPIC], self._on_index)
            except TransportError:
                with self._cv:
                    self._subscribed = False
                raise
        elif fresh:
            # Ask again: the broker resends the retained index on a new subscription.
            self._t.unsubscribe([INDEX_TOPIC])
            self._t.subscribe([INDEX_TOPIC], self._on_index)
        deadline = time.monotonic() + self._timeout
        with self._cv:
            while self._index is None:
                if self._index_error is not None:
                    err, self._index_error = self._index_error, None
                    raise err
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(f"no repository index on the broker within {self._timeout} s")
                self._cv.wait(left)
            return self._index

    def index_if_any(self) -> RepoIndex | None:
        """The index on the broker, or None when the broker holds none (the fleet tool's
        first push). Waits for the broker's answer (:func:`lorad.ota.transport.barrier`)."""
        with self._cv:
            subscribe, self._subscribed = not self._subscribed, True
        if subscribe:
            self._t.subscribe([INDEX_TOPIC], self._on_index)
        barrier(self._t, self._timeout)
        with self._cv:
            if self._index_error is not None:
                err, self._index_error = self._index_error, None
                raise err
            return self._index

    def close(self) -> None:
        with self._cv:
            was, self._subscribed = self._subscribed, False
        if was:
            self._t.unsubscribe([INDEX_TOPIC])

    def _on_index(self, topic: str, payload: bytes) -> None:
        with self._cv:
            try:
                self._index = RepoIndex.decode(payload)
            except UpdateRejectedError as e:
                self._index_error = e
            self._cv.notify_all()

    def entry(self, name: str) -> FileEntry:
        e = self.index().files.get(name)
        if e is None:
            raise NotOnBroker(name)
        return e

    def fetch(self, name: str, *, max_length: int) -> bytes:
        """A whole (small) file, e.g. metadata; at most ``max_length`` bytes (and the reader's
        ``max_meta_bytes``) are accepted, and it must arrive within ``meta_timeout_s``."""
        entry = self.entry(name)
        max_length = min(max_length, self._max_meta)
        if entry.length > max_length:
            raise UpdateRejectedError("too_large", f"{name} is announced with {entry.length} bytes, "
                                      f"at most {max_length} allowed")
        if entry.chunks > 1 and entry.chunk_size < MIN_META_CHUNK:
            raise UpdateRejectedError("metadata_invalid", f"{name} is announced in {entry.chunks} chunks of "
                                      f"{entry.chunk_size} bytes; chunks under {MIN_META_CHUNK} bytes are refused")
        parts: dict[int, bytes] = {}

        def accept(i: int, data: bytes) -> None:
            if len(data) > entry.chunk_size or sum(map(len, parts.values())) + len(data) > max_length:
                raise UpdateRejectedError("too_large", f"{name}: more bytes than the "
                                          f"{min(entry.length, max_length)} announced")
            parts[i] = data

        self.fetch_chunks(name, range(entry.chunks), accept, max_chunk=entry.chunk_size,
                          total_s=self._meta_timeout, max_received=self._max_meta)
        data = b"".join(parts[i] for i in range(entry.chunks))
        if len(data) != entry.length:
            raise TransportError(f"{name}: got {len(data)} bytes, index announced {entry.length}")
        return data

    def fetch_chunks(self, name: str, wanted: Iterable[int], accept: Callable[[int, bytes], None],
                     *, max_chunk: int, total_s: float | None = None, max_received: int | None = None) -> None:
        """Receive each chunk in ``wanted`` once and hand it to ``accept``.

        ``accept`` verifies (and may persist) the chunk; its UpdateRejectedError aborts the
        fetch. Messages longer than ``max_chunk`` are refused before ``accept`` sees them.
        Raises TransportError if chunks are still missing after the timeout (per chunk:
        the wait for progress) or after ``total_s`` (the whole fetch, however much
        progress); UpdateRejectedError once more than ``max_received`` bytes arrived
        (duplicates included).
        """
        topics = {chunk_topic(name, i): i for i in wanted}
        if not topics:
            return
        if max_chunk > self._max_file:
            raise UpdateRejectedError("too_large", f"{name}: chunk size {max_chunk} exceeds {self._max_file}")
        inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()

        def deliver(topic: str, payload: bytes) -> None:
            inbox.put((topic, payload))
            if payload:
                # Forget the subscription as soon as the chunk is here, not once it is stored:
                # a reconnect in between must not ask the broker for it again.
                self._t.unsubscribe([topic])

        start = time.monotonic()
        end = math.inf if total_s is None else start + total_s
        received = 0
        self._t.subscribe(list(topics), deliver)
        missing = dict(topics)
        try:
            deadline = min(start + self._timeout, end)
            while missing:
                try:
                    topic, payload = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    if deadline >= end:
                        raise TransportError(
                            f"{name}: not complete within {total_s} s, the bound of one metadata fetch "
                            f"({len(missing)} of {len(topics)} chunks still missing; the index is unsigned "
                            f"and cannot extend it)") from None
                    raise TransportError(
                        f"{name}: {len(missing)} of {len(topics)} chunks still missing after "
                        f"{self._timeout} s (first missing: {min(missing.values())})") from None
                if not payload:
                    continue  # a retained chunk being deleted, not data (files are never empty)
                received += len(payload)
                if max_received is not None and received > max_received:
                    raise UpdateRejectedError("too_large", f"{name}: more than {max_received} bytes received "
                                              f"in one fetch (duplicates included)")
                i = missing.pop(topic, None)
                if i is None:
                    continue  # a duplicate after a reconnect: already have it
                self.fetch_count[name] = self.fetch_count.get(name, 0) + 1
                self.bytes_received += len(payload)
                if len(payload) > max_chunk:
                    raise UpdateRejectedError("too_large", f"{name}: chunk {i} has {len(payload)} "
                                              f"bytes, at most {max_chunk} allowed")
                accept(i, payload)
                # progress: the timeout is per chunk, within the bound of the whole fetch
                deadline = min(time.monotonic() + self._timeout, end)
        finally:
            if missing:
                self._t.unsubscribe(list(missing))
