"""AdapterCache: byte budget, LRU, pins, leases, hot swap, threads."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import Counter
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorad.adapters.cache import AdapterCache
from lorad.adapters.errors import AdapterNotFoundError, CacheFullError


@dataclass(frozen=True)
class Item:
    name: str
    version: int
    nbytes: int
    payload: tuple[int, ...] = ()


class Store:
    """The loader: what is "on disk", with a count of loads per name."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.items = {n: Item(n, 1, b) for n, b in sizes.items()}
        self.loads: Counter[str] = Counter()

    def load(self, name: str) -> Item:
        self.loads[name] += 1
        try:
            return self.items[name]
        except KeyError:
            raise AdapterNotFoundError(name) from None


def names_of(cache: AdapterCache[Item]) -> list[str]:
    return [e.name for e in cache.entries()]


def use(cache: AdapterCache[Item], name: str) -> Item:
    with cache.lease(name) as item:
        return item


def test_budget_is_in_bytes() -> None:
    store = Store({"a": 40, "b": 40, "c": 40, "tiny1": 1, "tiny2": 1})
    cache = AdapterCache(100, store.load)
    use(cache, "a")
    use(cache, "b")
    assert cache.stats.bytes_used == 80
    use(cache, "c")  # 120 > 100: the least recently used goes
    assert names_of(cache) == ["b", "c"]
    assert cache.stats.bytes_used == 80
    use(cache, "tiny1")
    use(cache, "tiny2")  # many small items fit where a count limit would have evicted
    assert names_of(cache) == ["b", "c", "tiny1", "tiny2"]
    s = cache.stats
    assert (s.hits, s.misses, s.loads, s.evictions, s.bytes_used, s.budget_bytes) == (
        0, 5, 5, 1, 82, 100,
    )  # fmt: skip


def test_hit_does_no_io() -> None:
    store = Store({"a": 10})
    cache = AdapterCache(100, store.load)
    first = use(cache, "a")
    assert use(cache, "a") is first
    assert store.loads["a"] == 1
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_lru_order() -> None:
    store = Store({n: 30 for n in "abcd"})
    cache = AdapterCache(100, store.load)
    for n in "abc":
        use(cache, n)
    use(cache, "a")  # a is now the most recently used
    assert names_of(cache) == ["b", "c", "a"]
    use(cache, "d")
    assert names_of(cache) == ["c", "a", "d"]
    assert cache.stats.evictions == 1


def test_pins_survive_pressure() -> None:
    store = Store({"p": 50, "x": 40, "y": 40, "z": 40})
    cache = AdapterCache(100, store.load)
    cache.pin("p")
    assert store.loads["p"] == 1 and cache.stats.misses == 0  # a pin is not a request
    for n in "xyzxyz":
        use(cache, n)
    assert "p" in names_of(cache)
    assert [e.pinned for e in cache.entries() if e.name == "p"] == [True]
    with pytest.raises(ValueError, match="pinned; unpin first"):
        cache.evict("p")
    cache.unpin("p")
    cache.unpin("p")  # idempotent
    use(cache, "x")
    use(cache, "y")
    assert not cache.contains("p")


def test_cache_full_when_rest_is_pinned() -> None:
    store = Store({"p1": 40, "p2": 30, "big": 50, "huge": 101, "small": 30})
    cache = AdapterCache(100, store.load)
    cache.pin("p1")
    cache.pin("p2")
    with pytest.raises(CacheFullError) as ei:
        use(cache, "big")
    msg = str(ei.value)
    assert "'big' version 1 needs 50 bytes" in msg
    assert "100-byte" in msg and "'p1' (40 bytes)" in msg and "'p2' (30 bytes)" in msg
    assert not cache.contains("big")
    assert cache.stats.bytes_used == 70
    with pytest.raises(CacheFullError, match="needs 101 bytes, more than the whole cache budget of 100"):
        use(cache, "huge")
    assert use(cache, "small").name == "small"  # what fits is still served
    with pytest.raises(CacheFullError):
        cache.pin("big")
    cache.unpin("p1")
    assert use(cache, "big").name == "big"


def test_pin_of_cached_entry_checked_against_other_pins() -> None:
    store = Store({"a": 60, "b": 50})
    cache = AdapterCache(100, store.load)
    with cache.lease("b"):
        cache.pin("a")  # fits next to the (zero) other pins; b in use keeps its place
        assert cache.stats.bytes_used == 110
        with pytest.raises(CacheFullError, match="'b' version 1 needs 50 bytes"):
            cache.pin("b")
    assert names_of(cache) == ["a"]  # b evicted once its lease ended
    assert cache.stats.bytes_used == 60


def test_leases_prevent_eviction_and_tearing() -> None:
    store = Store({"a": 60, "b": 60, "c": 60})
    cache = AdapterCache(100, store.load)
    with cache.lease("a") as a:
        with cache.lease("b"):
            # both in use: over budget temporarily, nothing can be evicted
            assert cache.stats.bytes_used == 120
            assert names_of(cache) == ["a", "b"]
        assert names_of(cache) == ["a"]  # b went when its lease ended, a is still in use
        assert a is use(cache, "a")
        with cache.lease("c") as c:
            assert names_of(cache) == ["a", "c"]
            assert a.name == "a" and c.name == "c"
        assert names_of(cache) == ["a"]
    assert cache.stats.bytes_used == 60


def test_hot_swap_visible_to_next_lease_only() -> None:
    store = Store({"a": 10})
    cache = AdapterCache(100, store.load)
    with cache.lease("a") as old:
        cache.put(Item("a", 2, 15))
        assert old.version == 1  # the request keeps its object
        assert cache.stats.bytes_used == 25  # old is still held
        with cache.lease("a") as new:
            assert new.version == 2
        assert [(e.name, e.version, e.leases) for e in cache.entries()] == [("a", 2, 0)]
    assert cache.stats.bytes_used == 15  # old released with its last lease
    assert use(cache, "a").version == 2
    assert store.loads["a"] == 1  # the swap needed no load


def test_put_keeps_pin_and_can_roll_back() -> None:
    store = Store({"a": 10})
    cache = AdapterCache(100, store.load)
    cache.pin("a")
    cache.put(Item("a", 2, 10))
    cache.put(Item("a", 1, 10))  # rollback is a put of the older version
    assert [(e.version, e.pinned) for e in cache.entries()] == [(1, True)]
    assert cache.stats.bytes_used == 10


def test_put_that_does_not_fit_changes_nothing() -> None:
    store = Store({"p": 80, "a": 10})
    cache = AdapterCache(100, store.load)
    cache.pin("p")
    use(cache, "a")
    with pytest.raises(CacheFullError):
        cache.put(Item("a", 2, 30))
    assert [(e.name, e.version) for e in cache.entries()] == [("p", 1), ("a", 1)]


def test_evict_leased_releases_bytes_at_lease_end() -> None:
    store = Store({"a": 10})
    cache = AdapterCache(100, store.load)
    with cache.lease("a") as a:
        assert cache.evict("a") is True
        assert not cache.contains("a")
        assert cache.stats.bytes_used == 10
        assert a.name == "a"
    assert cache.stats.bytes_used == 0
    assert cache.evict("a") is False
    assert use(cache, "a") is not None and store.loads["a"] == 2


def test_discard_drops_even_pinned() -> None:
    store = Store({"a": 10})
    cache = AdapterCache(100, store.load)
    cache.pin("a")
    assert cache.discard("a") is True
    assert cache.discard("a") is False
    assert cache.entries() == [] and cache.stats.bytes_used == 0


def test_load_error_propagates_and_caches_nothing() -> None:
    cache = AdapterCache(100, Store({}).load)
    with pytest.raises(AdapterNotFoundError):
        use(cache, "nope")
    assert cache.entries() == [] and cache.stats.bytes_used == 0


def test_on_event_hook() -> None:
    seen: list[tuple[str, str]] = []
    store = Store({"a": 60, "b": 60})
    cache = AdapterCache(100, store.load, on_event=lambda kind, name: seen.append((kind, name)))
    use(cache, "a")
    use(cache, "a")
    use(cache, "b")
    cache.put(Item("b", 2, 60))
    assert seen == [
        ("miss", "a"), ("load", "a"), ("hit", "a"),
        ("miss", "b"), ("load", "b"), ("evict", "a"), ("swap", "b"),
    ]  # fmt: skip


def test_failing_hook_does_not_fail_requests(caplog: pytest.LogCaptureFixture) -> None:
    def hook(kind: str, name: str) -> None:
        raise RuntimeError("metrics down")

    cache = AdapterCache(100, Store({"a": 1}).load, on_event=hook)
    assert use(cache, "a").name == "a"
    assert "on_event hook failed" in caplog.text
    assert cache.entries()[0].leases == 0


def test_concurrent_misses_load_once() -> None:
    gate = threading.Event()
    store = Store({"a": 10})

    def slow_load(name: str) -> Item:
        gate.wait(10)
        return store.load(name)

    cache = AdapterCache(100, slow_load)
    got: list[Item] = []
    threads = [threading.Thread(target=lambda: got.append(use(cache, "a"))) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(got) == 4 and all(g is got[0] for g in got)
    assert store.loads["a"] == 1
    assert cache.stats.misses == 4 and cache.stats.loads == 1 and cache.stats.hits == 0


def test_concurrent_miss_failure_reaches_every_waiter() -> None:
    gate = threading.Event()
    calls = Counter[str]()

    def failing_load(name: str) -> Item:
        calls[name] += 1
        gate.wait(10)
        raise AdapterNotFoundError(name)

    cache = AdapterCache(100, failing_load)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            use(cache, "a")
        except AdapterNotFoundError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 3 and calls["a"] == 1


def test_put_during_load_wins() -> None:
    """A load that started before a hot swap must not install the older item over it."""
    started, gate = threading.Event(), threading.Event()
    store = Store({"a": 10})

    def slow_load(name: str) -> Item:
        started.set()
        gate.wait(10)
        return store.load(name)

    cache = AdapterCache(100, slow_load)
    got: list[Item] = []
    t = threading.Thread(target=lambda: got.append(use(cache, "a")))
    t.start()
    assert started.wait(10)
    cache.put(Item("a", 2, 10))
    gate.set()
    t.join(10)
    assert got[0].version == 2
    assert [(e.name, e.version) for e in cache.entries()] == [("a", 2)]
    assert cache.stats.bytes_used == 10


def test_concurrent_leases_with_puts_see_consistent_objects() -> None:
    """Threads lease while hot swaps happen: each lease keeps one intact object."""

    def make(name: str, version: int) -> Item:
        return Item(name, version, 10 + version % 7, payload=(version,) * 8)

    latest = {n: 1 for n in "abc"}
    cache = AdapterCache(40, lambda n: make(n, latest[n]))
    errors: list[BaseException] = []
    leases = Counter[int]()
    stop = threading.Event()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                name = rng.choice("abc")
                with cache.lease(name) as item:
                    first = (item.version, item.payload)
                    time.sleep(rng.random() / 2000)
                    assert item.name == name
                    assert item.payload == (item.version,) * 8
                    assert (item.version, item.payload) == first
                leases[seed] += 1
        except BaseException as e:  # collected for the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    v = 1
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        v += 1
        name = "abc"[v % 3]
        latest[name] = v
        cache.put(make(name, v))
        if v % 50 == 0:
            cache.evict(name)
        time.sleep(0.0002)
    stop.set()
    for t in threads:
        t.join(30)
    assert errors == []
    assert v > 20 and all(leases[s] > 0 for s in range(6)) and sum(leases.values()) > 50
    # nothing is leased any more: every replaced object's bytes were released
    entries = cache.entries()
    assert all(e.leases == 0 for e in entries)
    assert cache.stats.bytes_used == sum(e.nbytes for e in entries) <= 40
    assert all(e.version == latest[e.name] for e in entries)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["lease", "hold", "release", "put", "pin", "unpin", "evict", "discard"]),
            st.sampled_from("abcd"),
            st.integers(1, 60),
        ),
        max_size=40,
    )
)
def test_accounting_invariants(ops: list[tuple[str, str, int]]) -> None:
    """Random operations keep bytes_used exact and the budget honoured once idle."""
    sizes = {"a": 20, "b": 30, "c": 45, "d": 10}
    versions = itertools.count(1)  # every object gets its own (name, version)
    cache = AdapterCache(100, lambda n: Item(n, next(versions), sizes[n]))
    held: list[tuple[ContextManager[Item], Item]] = []
    for op, name, size in ops:
        try:
            if op == "lease":
                use(cache, name)
            elif op == "hold":
                cm = cache.lease(name)
                held.append((cm, cm.__enter__()))
            elif op == "release" and held:
                held.pop(0)[0].__exit__(None, None, None)
            elif op == "put":
                cache.put(Item(name, next(versions), size))
            elif op == "pin":
                cache.pin(name)
            elif op == "unpin":
                cache.unpin(name)
            elif op == "evict":
                cache.evict(name)
            elif op == "discard":
                cache.discard(name)
        except (CacheFullError, ValueError):
            pass
        entries = cache.entries()
        assert sum(e.nbytes for e in entries if e.pinned) <= 100
        assert {n: e.item.version for n, e in cache._pinned.items()} == {e.name: e.version for e in entries if e.pinned}
        assert all(cache.entry(e.name) == e for e in entries) and cache.entry("zz") is None
        indexed = {(e.name, e.version) for e in entries}
        detached = {(i.name, i.version): i.nbytes for _, i in held if (i.name, i.version) not in indexed}
        assert cache.stats.bytes_used == sum(e.nbytes for e in entries) + sum(detached.values())
        assert Counter((i.name, i.version) for _, i in held) == Counter(
            {(e.name, e.version): e.leases for e in entries if e.leases}
        ) + Counter({k: sum(1 for _, i in held if (i.name, i.version) == k) for k in detached})
        if not held:
            assert cache.stats.bytes_used <= 100
    for cm, _ in held:
        cm.__exit__(None, None, None)
    assert cache.stats.bytes_used == sum(e.nbytes for e in cache.entries()) <= 100
