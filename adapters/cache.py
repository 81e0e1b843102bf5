"""In-memory adapter cache: a budget in bytes, LRU eviction, pins, leases and hot swap.

Requests take a *lease* on an adapter for the duration of one inference. A leased object
is never evicted or replaced under the request: a hot swap (:meth:`AdapterCache.put`)
installs the new version for the *next* lease while running requests keep the object they
got, and the old object's bytes stay accounted until its last lease ends.

Over budget: pinned entries never leave; idle (unpinned, unleased) entries leave in LRU
order. Entries in use cannot leave either, so an item that fits next to the pinned ones
is admitted even when the entries in use push the total over the budget; the overshoot
is bounded by the bytes of in-flight requests and is evicted, LRU first, as soon as
their leases end. An item that cannot fit next to the pinned ones, or that alone exceeds
the budget, is refused with :class:`CacheFullError`.

The cache knows nothing of disks or metrics: ``load`` is injected, and ``on_event`` lets
the daemon count events without this module importing prometheus.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from lorad.adapters.errors import CacheFullError

__all__ = ["AdapterCache", "CacheItem", "CacheEntryInfo", "CacheStats", "CacheEvent"]

_log = logging.getLogger(__name__)

CacheEvent = Literal["hit", "miss", "load", "evict", "swap"]
"""hit/miss: a lease found the adapter cached or not; load: ``load`` returned an item;
evict: an entry left the cache (pressure or :meth:`AdapterCache.evict`); swap: ``put``
installed an item."""


class CacheItem(Protocol):
    """What the cache needs to know of an item (read-only, so frozen dataclasses fit)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=CacheItem)


@dataclass(frozen=True)
class CacheEntryInfo:
    name: str
    version: int
    nbytes: int
    pinned: bool
    leases: int


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    loads: int
    bytes_used: int  # includes replaced or evicted items still held by running requests
    budget_bytes: int


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    nbytes: int
    pinned: bool = False
    leases: int = 0
    indexed: bool = True  # False once replaced/evicted; bytes go when leases reach 0


@dataclass(eq=False)
class _Load:
    """A load in flight: concurrent misses of one name wait on it instead of loading too."""

    done: Future[None] = field(default_factory=Future)
    stale: bool = False  # a put/discard happened meanwhile: the loaded item is outdated


class AdapterCache(Generic[T]):
    """Thread-safe cache of adapters by name; see the module docstring for the policy."""

    def __init__(
        self,
        budget_bytes: int,
        load: Callable[[str], T],
        *,
        on_event: Callable[[CacheEvent, str], None] | None = None,
    ) -> None:
        if budget_bytes < 1:
            raise ValueError(f"budget_bytes must be a positive number of bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._load = load
        self._on_event = on_event
        self._lock = threading.Lock()
        self._index: OrderedDict[str, _Entry[T]] = OrderedDict()  # least recently used first
        #: The pinned entries of the index, so that admitting an item costs O(pins), not O(entries).
        self._pinned: dict[str, _Entry[T]] = {}
        self._loading: dict[str, _Load] = {}
        self._bytes_used = 0
        self._hits = self._misses = self._evictions = self._loads = 0

    # -- requests ------------------------------------------------------------------------

    @contextmanager
    def lease(self, name: str) -> Iterator[T]:
        """Hold the current item of ``name`` for one request; loads it on a miss."""
        item, release = self.hold(name)
        try:
            yield item
        finally:
            release()

    def hold(self, name: str) -> tuple[T, Callable[[], None]]:
        """:meth:`lease` for a request that ends in another thread (a batch): the item and the
        function that ends the lease, to be called once."""
        with self._lock:  # the common case, a hit, in one step: this runs for every request
            entry = self._index.get(name)
            if entry is not None:
                self._take(entry, pin=False)
                self._hits += 1
        if entry is None:
            entry = self._acquire(name, pin=False)
        elif self._on_event is not None:
            self._emit([("hit", name)])
        return entry.item, functools.partial(self._release, entry)

    def put(self, item: T) -> None:
        """Hot swap: the next lease of ``item.name`` gets ``item``; running leases keep theirs."""
        events: list[tuple[CacheEvent, str]] = [("swap", item.name)]
        with self._lock:
            self._admit(item, pin=False, lease=False, events=events)
            load = self._loading.get(item.name)
            if load is not None:
                load.stale = True  # what that load returns is older than ``item``
        self._emit(events)

    def swap_if_cached(self, item: T) -> bool:
        """A new version of ``item.name`` became current: hot swap it in if that name is
        cached (False when not), and mark a load of that name in flight stale either way.

        The load in flight may have read the previous version; once stale, its result is
        dropped and the lease that started it loads again, so no request after the change
        gets the old version from the cache.
        """
        events: list[tuple[CacheEvent, str]] = []
        with self._lock:
            load = self._loading.get(item.name)
            if load is not None:
                load.stale = True
            if item.name not in self._index:
                return False
            events.append(("swap", item.name))
            self._admit(item, pin=False, lease=False, events=events)
        self._emit(events)
        return True

    # -- control -------------------------------------------------------------------------

    def pin(self, name: str) -> None:
        """Keep ``name`` cached whatever the pressure (loads it if needed)."""
        self._acquire(name, pin=True)

    def unpin(self, name: str) -> None:
        """Let ``name`` be evicted again; nothing happens when it is not pinned."""
        events: list[tuple[CacheEvent, str]] = []
        with self._lock:
            entry = self._index.get(name)
            if entry is not None:
                entry.pinned = False
                self._pinned.pop(name, None)
                self._shrink(events)
        self._emit(events)

    def evict(self, name: str) -> bool:
        """Drop ``name`` from the cache; False when it was not cached.

        A leased entry leaves the index now; its bytes are released when its leases end.
        """
        with self._lock:
            entry = self._index.get(name)
            if entry is None:
                return False
            if entry.pinned:
                raise ValueError(f"adapter {name!r} is pinned; unpin first")
            self._drop(entry)
            self._evictions += 1
        self._emit([("evict", name)])
        return True

    def discard(self, name: str) -> bool:
        """Forget ``name`` entirely, pinned or not (its adapter was deleted)."""
        with self._lock:
            load = self._loading.get(name)
            if load is not None:
                load.stale = True
            entry = self._index.get(name)
            if entry is None:
                return False
            self._drop(entry)
            return True

    # -- inspection ----------------------------------------------------------------------

    def contains(self, name: str) -> bool:
        with self._lock:
            return name in self._index

    def entry(self, name: str) -> CacheEntryInfo | None:
        """The cached entry of ``name``, None when it is not cached."""
        with self._lock:
            e = self._index.get(name)
            return None if e is None else CacheEntryInfo(name, e.item.version, e.nbytes, e.pinned, e.leases)

    def entries(self) -> list[CacheEntryInfo]:
        """Cached entries, least recently used first."""
        with self._lock:
            return [
                CacheEntryInfo(n, e.item.version, e.nbytes, e.pinned, e.leases)
                for n, e in self._index.items()
            ]

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                loads=self._loads,
                bytes_used=self._bytes_used,
                budget_bytes=self.budget_bytes,
            )

    # -- internals -----------------------------------------------------------------------

    def _acquire(self, name: str, *, pin: bool) -> _Entry[T]:
        """Find or load ``name``; take a lease on it, or pin it when ``pin``.

        Only one thread loads a given name; the others wait for that load and look again.
        """
        counted = pin  # pins are not requests: they count neither as hits nor as misses
        while True:
            events: list[tuple[CacheEvent, str]] = []
            with self._lock:
                entry = self._index.get(name)
                if entry is not None:
                    self._take(entry, pin=pin)
                    if not counted:
                        self._hits += 1
                        events.append(("hit", name))
                else:
                    if not counted:
                        self._misses += 1
                        events.append(("miss", name))
                        counted = True
                    owner = name not in self._loading
                    load = self._loading.setdefault(name, _Load())
            self._emit(events)
            if entry is not None:
                return entry
            if not owner:
                load.done.result()  # re-raises the loader's error
                continue
            entry = self._load_and_admit(name, load, pin=pin)
            if entry is not None:
                return entry

    def _load_and_admit(self, name: str, load: _Load, *, pin: bool) -> _Entry[T] | None:
        """Call ``load`` outside the lock, then install the item; None when it went stale."""
        try:
            item = self._load(name)
            if item.name != name:
                raise RuntimeError(f"load({name!r}) returned an item named {item.name!r}")
        except BaseException as e:
            with self._lock:
                del self._loading[name]
            load.done.set_exception(e)
            raise
        events: list[tuple[CacheEvent, str]] = [("load", name)]
        try:
            with self._lock:
                del self._loading[name]
                self._loads += 1
                try:
                    entry = None
                    if not load.stale:
                        entry = self._admit(item, pin=pin, lease=not pin, events=events)
                except BaseException as e:  # waiters must never wait on an unset future
                    load.done.set_exception(e)
                    raise
                load.done.set_result(None)
            return entry
        finally:
            self._emit(events)

    def _take(self, entry: _Entry[T], *, pin: bool) -> None:
        if pin:
            if not entry.pinned:
                self._check_fits(entry.item, entry.nbytes, exclude=entry)
                entry.pinned = True
                self._pinned[entry.item.name] = entry
        else:
            entry.leases += 1
        self._index.move_to_end(entry.item.name)

    def _release(self, entry: _Entry[T]) -> None:
        events: list[tuple[CacheEvent, str]] = []
        with self._lock:
            entry.leases -= 1
            if entry.leases == 0:
                if not entry.indexed:
                    self._bytes_used -= entry.nbytes
                self._shrink(events)
        if events:
            self._emit(events)

    def _admit(
        self, item: T, *, pin: bool, lease: bool, events: list[tuple[CacheEvent, str]]
    ) -> _Entry[T]:
        """Install ``item`` as the current entry of its name (lock held)."""
        old = self._index.get(item.name)
        nbytes = item.nbytes
        self._check_fits(item, nbytes, exclude=old)
        entry = _Entry(
            item, nbytes, pinned=pin or (old is not None and old.pinned), leases=int(lease)
        )
        if old is not None:
            self._drop(old)
        self._index[item.name] = entry
        if entry.pinned:
            self._pinned[item.name] = entry
        self._bytes_used += nbytes
        self._shrink(events, keep=entry)
        return entry

    def _check_fits(self, item: T, nbytes: int, *, exclude: _Entry[T] | None) -> None:
        """Refuse what cannot fit next to the pinned entries, which never leave."""
        pinned = {n: e.nbytes for n, e in self._pinned.items() if e is not exclude}
        free = self.budget_bytes - sum(pinned.values())
        if nbytes <= free:
            return
        what = f"adapter {item.name!r} version {item.version} needs {nbytes} bytes"
        if nbytes > self.budget_bytes:
            raise CacheFullError(
                f"{what}, more than the whole cache budget of {self.budget_bytes} bytes;"
                " raise the cache budget"
            )
        listed = ", ".join(f"{n!r} ({b} bytes)" for n, b in pinned.items())
        raise CacheFullError(
            f"{what} but only {free} of the {self.budget_bytes}-byte cache budget are not"
            f" pinned (pinned: {listed}); unpin an adapter or raise the cache budget"
        )

    def _drop(self, entry: _Entry[T]) -> None:
        """Take ``entry`` out of the index; its bytes go now or when its last lease ends."""
        del self._index[entry.item.name]
        if self._pinned.get(entry.item.name) is entry:
            del self._pinned[entry.item.name]
        entry.indexed = False
        if entry.leases == 0:
            self._bytes_used -= entry.nbytes

    def _shrink(
        self, events: list[tuple[CacheEvent, str]], *, keep: _Entry[T] | None = None
    ) -> None:
        """Evict idle entries, least recently used first, until within budget."""
        if self._bytes_used <= self.budget_bytes:
            return  # the common case, without a look at every entry
        for name, entry in list(self._index.items()):
            if self._bytes_used <= self.budget_bytes:
                return
            if entry.pinned or entry.leases or entry is keep:
                continue
            self._drop(entry)
            self._evictions += 1
            events.append(("evict", name))

    def _emit(self, events: list[tuple[CacheEvent, str]]) -> None:
        """Report events without the lock held; a failing hook must not fail a request."""
        if self._on_event is None:
            return
        for kind, name in events:
            try:
                self._on_event(kind, name)
            except Exception:
                _log.exception("cache on_event hook failed for %s of %r", kind, name)
