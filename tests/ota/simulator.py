"""An in-memory broker and fleet for tests: the remote side, on the Transport interface.

:class:`SimBroker` keeps retained messages (with expiry), delivers to subscribers
synchronously, counts deliveries per topic and can go down (every operation then fails
as a real disconnect would). :class:`FleetSim` is a signing fleet publisher on top of a
:class:`lorad.ota.repository.FleetRepository`: it publishes, rotates keys, and can replay stale
files or serve forged ones under any name, as an attacker holding the broker could.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorad.ota.errors import TransportError
from lorad.ota.files import RepoIndex, publish_files
from lorad.ota.repository import FleetRepository, RepoSettings
from lorad.ota.transport import Handler, Transport, topic_matches

__all__ = ["SimBroker", "SimTransport", "FleetSim"]


@dataclass
class _Retained:
    payload: bytes
    expires_at: float | None


class SimBroker:
    """Retained messages, expiry by an injectable clock, per-topic delivery counts."""

    def __init__(self, *, max_payload: int = 16 * 1024, clock: Callable[[], float] | None = None) -> None:
        self.max_payload = max_payload
        self._clock = clock or (lambda: 0.0)
        self._lock = threading.RLock()
        self._retained: dict[str, _Retained] = {}
        self._subs: list[tuple[SimTransport, str, Handler]] = []
        self.deliveries: dict[str, int] = {}
        self.up = True

    def _live(self, topic: str) -> bytes | None:
        r = self._retained.get(topic)
        if r is None:
            return None
        if r.expires_at is not None and self._clock() >= r.expires_at:
            del self._retained[topic]
            return None
        return r.payload

    def _publish(self, topic: str, payload: bytes, retain: bool, expiry_s: int | None) -> None:
        with self._lock:
            if retain:
                if payload:
                    exp = None if expiry_s is None else self._clock() + expiry_s
                    self._retained[topic] = _Retained(payload, exp)
                else:
                    self._retained.pop(topic, None)  # MQTT: an empty retained message deletes
            targets = [(t, h) for t, f, h in self._subs if topic_matches(f, topic)]
        for t, h in targets:
            self._deliver(t, topic, payload, h)

    def _deliver(self, t: SimTransport, topic: str, payload: bytes, h: Handler) -> None:
        with self._lock:
            self.deliveries[topic] = self.deliveries.get(topic, 0) + 1
        h(topic, payload)

    def _subscribe(self, t: SimTransport, topics: Sequence[str], handler: Handler) -> None:
        with self._lock:
            for f in topics:
                self._subs = [s for s in self._subs if not (s[0] is t and s[1] == f)]
                self._subs.append((t, f, handler))
            hits = [(topic, p) for topic in list(self._retained) for f in topics
                    if topic_matches(f, topic) and (p := self._live(topic)) is not None]
        for topic, p in hits:
            self._deliver(t, topic, p, handler)

    def _unsubscribe(self, t: SimTransport, topics: Sequence[str]) -> None:
        with self._lock:
            self._subs = [s for s in self._subs if not (s[0] is t and s[1] in topics)]

    def retained(self, topic: str) -> bytes | None:
        with self._lock:
            return self._live(topic)

    def connect(self) -> SimTransport:
        return SimTransport(self)


class SimTransport(Transport):
    """A client of a :class:`SimBroker`."""

    def __init__(self, broker: SimBroker) -> None:
        self._b = broker
        self.closed = False

    def _check(self, what: str) -> None:
        if self.closed:
            raise TransportError(f"{what}: transport is closed")
        if not self._b.up:
            raise TransportError(f"{what}: broker unreachable (simulated outage)")

    @property
    def max_payload(self) -> int:
        return self._b.max_payload

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                expiry_s: int | None = None) -> None:
        self._check(f"publish to {topic!r}")
        if len(payload) > self._b.max_payload:
            raise TransportError(f"message of {len(payload)} bytes on {topic!r} exceeds the "
                                 f"broker's limit of {self._b.max_payload} bytes of payload")
        self._b._publish(topic, payload, retain, expiry_s)

    def subscribe(self, topics: Sequence[str], handler: Handler) -> None:
        self._check(f"subscribe to {list(topics)}")
        self._b._subscribe(self, topics, handler)

    def unsubscribe(self, topics: Sequence[str]) -> None:
        self._b._unsubscribe(self, topics)

    def close(self) -> None:
        self.closed = True
        self._b._unsubscribe(self, [f for t, f, _ in self._b._subs if t is self])


@dataclass
class FleetSim:
    """A fleet repository publishing to a broker, with an attacker's tools."""

    repo: FleetRepository
    transport: Transport
    index: RepoIndex = field(default_factory=lambda: RepoIndex({}))

    @classmethod
    def create(cls, directory: Path, transport: Transport, *, settings: RepoSettings | None = None,
               clock: Callable[[], datetime.datetime] | None = None) -> FleetSim:
        kw: dict[str, Any] = {"settings": settings}
        if clock is not None:
            kw["clock"] = clock
        sim = cls(FleetRepository.init(directory, **kw), transport)
        sim.push()
        return sim

    def push(self, *, offer: bool = True) -> RepoIndex:
        self.index = self.repo.push(self.transport, current=self.index, offer=offer)
        return self.index

    def files(self) -> dict[str, bytes]:
        """Everything published now, to replay later."""
        return self.repo.repo_files()

    def serve(self, files: dict[str, bytes], *, chunk_size: int = 8 * 1024) -> None:
        """Publish ``files`` under their names (forged, stale or mixed), keeping the index."""
        entries = publish_files(self.transport, files, index=self.index.files,
                                chunk_size={n: chunk_size for n in files})
        self.index = RepoIndex(entries)
