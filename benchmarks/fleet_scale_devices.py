"""Light simulated devices for ``benchmarks/fleet_scale.py``: lorad's own device code, no model.

Each simulated device is what a lorad device runs for OTA, minus the model and the threads:

- its transport is lorad's :class:`lorad.ota.transport.MqttTransport` (MQTT v5, QoS 1, mutual
  TLS with the device's own client certificate, user name and password, so the broker's
  per-device ACLs apply); only who drives paho's network loop differs: one selector thread
  per process (:class:`NetLoop`) serves every connection of the process, where a device
  has paho's own thread per connection;
- its updater is lorad's :class:`lorad.ota.client.OtaClient` (python-tuf's ngclient over
  the broker, per-chunk digests, the install journal, health check, status) with its state
  in its own directory, and its commands lorad's :class:`lorad.ota.commands.CommandExecutor`;
  only the device's worker thread is replaced: a shared pool of ``workers`` threads runs
  each device's cycle (commands first, then an update) when an offer or a command arrives,
  exactly as ``OtaClient._run`` would, one cycle of a device at a time;
- its adapter service is :class:`_Sink`: versions per name in memory, and a health-check
  "model" (:func:`probe_outputs`, a sum of LoRA products) the fleet side records probes
  with. A ``broken`` device answers the probes wrongly (its health check fails).

Several processes (:func:`run_shard`, started by ``fleet_scale.py`` with ``multiprocessing``)
each carry a share of the fleet. What each device's socket carried (TCP payload bytes both
ways, TLS records included, read from the kernel's ``TCP_INFO``) and its MQTT messages
(PUBLISH packets in and out, SUBSCRIBE and UNSUBSCRIBE requests) are counted per device.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from lorad.adapters.errors import AdapterNotFoundError
from lorad.adapters.lora import LoraAdapter
from lorad.ota.broker_setup import load_broker
from lorad.ota.client import ClientConfig, OtaClient, UpdateResult
from lorad.ota.commands import command_topic
from lorad.ota.config import MqttConfig
from lorad.ota.errors import TransportError
from lorad.ota.repository import offer_topic
from lorad.ota.status import will_for
from lorad.ota.transport import Handler, MqttTransport

__all__ = ["PROBE_DIM", "ShardSpec", "NetLoop", "probe_outputs", "run_shard", "topic_kind"]

_log = logging.getLogger(__name__)

#: in and out features of every weight of the adapter the rollout signs with probes
PROBE_DIM = 64
#: struct tcp_info (linux/tcp.h): tcpi_bytes_acked, tcpi_bytes_received, tcpi_segs_out, tcpi_segs_in
_TCP_INFO = struct.Struct("=QQII")
_TCP_INFO_AT = 120


def probe_outputs(adapter: LoraAdapter | None, x: np.ndarray) -> dict[str, np.ndarray]:
    """The light devices' "model": ``y = sum over weights of scale * (x @ A) @ B``; the fleet
    side records the probe set of an adapter with it, every device answers with it."""
    y = np.zeros((x.shape[0], PROBE_DIM), np.float32)
    if adapter is not None:
        for w in adapter.weights.values():
            if w.A.shape[0] == PROBE_DIM and w.B.shape[1] == PROBE_DIM:
                y += np.float32(adapter.scale) * (x @ w.A) @ w.B
    return {"y": y}


# --- the network: one selector thread drives every paho client of the process --------

class NetLoop:
    """paho's network loop for many clients in one thread (``loop_read``/``loop_write``/
    ``loop_misc`` on an epoll selector), as paho's own thread does it for one.

    Other threads only queue packets (paho's ``publish``/``subscribe``); they ask for a write
    through ``on_socket_register_write`` and a wake-up byte, so only this thread touches
    the sockets. A sweep every 0.1 s writes what a lost wake-up left queued (paho's flag
    for a registered write can race between threads), and keep-alives run every second.
    """

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._rx, self._tx = socket.socketpair()
        self._rx.setblocking(False)
        self._tx.setblocking(False)
        self._sel.register(self._rx, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._clients: dict[int, mqtt.Client] = {}
        self._writing: set[int] = set()
        self._dirty: set[mqtt.Client] = set()
        self._woken = False
        self._stop = threading.Event()
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="fleet-scale-net", daemon=True)
        self._thread.start()

    def add(self, client: mqtt.Client) -> None:
        """Serve ``client``'s socket (connected, its CONNECT queued) from now on."""
        sock = client.socket()
        if sock is None:
            raise TransportError("the client has no socket to serve")
        with self._lock:
            fd = sock.fileno()
            self._clients[fd] = client
            self._sel.register(fd, selectors.EVENT_READ, client)
        self.register_write(client, None, sock)

    def register_write(self, client: mqtt.Client, userdata: object, sock: object) -> None:
        """paho's ``on_socket_register_write``: ``client`` has packets to send (any thread)."""
        with self._lock:
            self._dirty.add(client)
            wake, self._woken = not self._woken, True
        if wake:
            try:
                self._tx.send(b"w")
            except BlockingIOError:
                pass

    def closed(self, client: mqtt.Client, userdata: object, sock: object) -> None:
        """paho's ``on_socket_close``: forget the socket (its descriptor is still open here)."""
        if not isinstance(sock, socket.socket):
            return
        with self._lock:
            fd = sock.fileno()
            if self._clients.pop(fd, None) is not None:
                self._writing.discard(fd)
                self._sel.unregister(fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sel.close()
        self._rx.close()
        self._tx.close()

    def _run(self) -> None:
        sweep = misc = time.monotonic()
        while not self._stop.is_set():
            for key, mask in self._sel.select(0.05):
                c = key.data
                if c is None:
                    try:
                        while self._rx.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    with self._lock:
                        self._woken = False
                    continue
                if mask & selectors.EVENT_READ:
                    self._guard(self._read, c)
                if mask & selectors.EVENT_WRITE:
                    self._guard(self._write, c)
            with self._lock:
                dirty, self._dirty = self._dirty, set()
                self._woken = False
            for c in dirty:
                self._guard(self._write, c)
            now = time.monotonic()
            if now - sweep >= 0.1:
                sweep = now
                with self._lock:
                    clients = list(self._clients.values())
                for c in clients:
                    if c.want_write():
                        self._guard(self._write, c)
                if now - misc >= 1.0:
                    misc = now
                    for c in clients:
                        self._guard(c.loop_misc)

    def _guard(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # one connection's trouble must not end the loop of all
            self.errors += 1
            _log.exception("network loop")

    @staticmethod
    def _read(c: mqtt.Client) -> None:
        c.loop_read()
        # TLS may hold decrypted bytes the kernel no longer shows as readable
        for _ in range(10_000):
            sock = c.socket()
            if not isinstance(sock, ssl.SSLSocket) or sock.pending() <= 0:
                return
            c.loop_read()

    def _write(self, c: mqtt.Client) -> None:
        sock = c.socket()
        if sock is None:
            return
        c.loop_write()
        sock = c.socket()
        if sock is None:
            return
        fd = sock.fileno()
        want = c.want_write()
        with self._lock:
            if fd not in self._clients or want == (fd in self._writing):
                return
            if want:
                self._writing.add(fd)
                self._sel.modify(fd, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
            else:
                self._writing.discard(fd)
                self._sel.modify(fd, selectors.EVENT_READ, c)


def topic_kind(topic: str) -> str:
    """``offer``, ``index``, ``metadata``, ``payload``, ``command`` or ``other`` (lorad's topic layout)."""
    if topic.endswith("/offer"):
        return "offer"
    if topic.endswith("/repo/index"):
        return "index"
    if "/repo/f/meta" in topic:
        return "metadata"
    if "/repo/f/targets" in topic:
        return "payload"
    if topic.endswith("/cmd"):
        return "command"
    return "other"


class _LightTransport(MqttTransport):
    """lorad's MQTT transport with its network loop in a shared :class:`NetLoop`, counting
    what it sends and receives."""

    def __init__(self, config: MqttConfig, net: NetLoop) -> None:
        super().__init__(config)
        self._net = net
        self.published = 0
        self.received = 0
        self.subscribes = 0
        self.unsubscribes = 0
        self.disconnects = 0
        #: PUBLISH packets received per kind of topic (:func:`topic_kind`)
        self.kinds: collections.Counter[str] = collections.Counter()
        self._last_wire = (0, 0, 0, 0)
        self._client.on_socket_register_write = net.register_write
        self._client.on_socket_close = net.closed

    def _serve(self) -> None:
        """The shared loop serves the socket, not a paho thread per device."""
        self._net.add(self._client)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, expiry_s: int | None = None) -> None:
        self.published += 1
        super().publish(topic, payload, retain=retain, expiry_s=expiry_s)

    def subscribe(self, topics: Sequence[str], handler: Handler) -> None:
        self.subscribes += 1
        super().subscribe(topics, handler)

    def unsubscribe(self, topics: Sequence[str]) -> None:
        self.unsubscribes += 1
        super().unsubscribe(topics)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        self.kinds[topic_kind(msg.topic)] += 1
        super()._on_message(client, userdata, msg)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: Any,
                       properties: Properties | None) -> None:
        self.disconnects += 1
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def wire(self) -> tuple[int, int, int, int]:
        """TCP payload bytes out (acknowledged) and in, segments out and in, of this socket so far."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            try:
                raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                out, into, segs_out, segs_in = _TCP_INFO.unpack_from(raw, _TCP_INFO_AT)
                self._last_wire = (out, into, segs_out, segs_in)
            except OSError:
                pass
        return self._last_wire


# --- the adapter service of a light device -------------------------------------------

@dataclass(frozen=True)
class _Info:
    name: str
    version: int


@dataclass(frozen=True)
class _Outcome:
    outputs: dict[str, np.ndarray]
    version: int | None


class _Sink:
    """Versions per adapter name in memory (the adapters themselves shared per process by
    digest: every device receives the same bytes); ``run`` answers with :func:`probe_outputs`,
    wrongly on a ``broken`` device."""

    def __init__(self, pool: dict[str, LoraAdapter], *, broken: bool) -> None:
        self._pool = pool
        self.broken = broken
        self._versions: dict[str, list[str]] = {}
        self._current: dict[str, int] = {}

    def install(self, name: str, adapter: LoraAdapter, *, meta: Mapping[str, object] = {}) -> _Info:
        digest = str(meta.get("adapter_sha256", "")) or f"id-{id(adapter)}"
        self._pool.setdefault(digest, adapter)
        self._versions.setdefault(name, []).append(digest)
        self._current[name] = len(self._versions[name])
        return _Info(name, self._current[name])

    def rollback(self, name: str, version: int) -> _Info:
        if not 1 <= version <= len(self._versions.get(name, ())):
            raise AdapterNotFoundError(name, version)
        self._current[name] = version
        return _Info(name, version)

    def delete(self, name: str) -> None:
        self._current.pop(name, None)
        self._versions.pop(name, None)

    def info(self, name: str) -> _Info:
        if name not in self._current:
            raise AdapterNotFoundError(name)
        return _Info(name, self._current[name])

    def run(self, tensors: Mapping[str, np.ndarray], adapter: str | None = None) -> _Outcome:
        version = self._current.get(adapter) if adapter else None
        served = self._pool[self._versions[adapter][version - 1]] if adapter and version else None
        out = probe_outputs(served, tensors["x"])
        if self.broken:
            out = {k: v + 1.0 for k, v in out.items()}
        return _Outcome(out, version)

    def load(self, name: str) -> _Info:
        return self.info(name)

    pin = unpin = evict = load


# --- one shard of the fleet ----------------------------------------------------------

@dataclass(frozen=True)
class ShardSpec:
    """What one process of simulated devices needs (picklable)."""

    broker_dir: Path
    #: device -> groups
    devices: Mapping[str, tuple[str, ...]]
    state_dir: Path
    trusted_root: bytes
    base_fingerprint: str
    #: devices whose health check fails (they answer the probes wrongly)
    broken: frozenset[str] = frozenset()
    workers: int = 32
    connect_threads: int = 4
    keepalive_s: int = 30
    timeout_s: float = 10.0
    fetch_timeout_s: float = 10.0
    max_packet: int = 1 << 20


@dataclass
class _Device:
    name: str
    transport: _LightTransport
    client: OtaClient
    offered: bool = False
    scheduled: bool = False
    inbox: collections.deque[bytes] = field(default_factory=collections.deque)
    #: (adapter, fleet version) -> when the cycle that installed it ended (status published)
    installed_at: dict[tuple[str, int], float] = field(default_factory=dict)
    cycles: int = 0


class _Shard:
    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self.layout = load_broker(spec.broker_dir)
        self.net = NetLoop()
        self.pool: dict[str, LoraAdapter] = {}
        self.devices: dict[str, _Device] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Device | None] = queue.SimpleQueue()
        self.results: collections.Counter[str] = collections.Counter()
        self.commands: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        #: the first message of each kind of failed or rejected update
        self.samples: dict[str, str] = {}
        self.busy = 0
        self._idle = threading.Condition(self._lock)
        self._workers = [threading.Thread(target=self._work, name=f"fleet-scale-worker-{i}", daemon=True)
                         for i in range(spec.workers)]
        for w in self._workers:
            w.start()

    # scheduling: one cycle of a device at a time, as its own worker thread would run them
    def schedule(self, dev: _Device) -> None:
        with self._lock:
            if dev.scheduled:
                return
            dev.scheduled = True
            self.busy += 1
        self._queue.put(dev)

    def _work(self) -> None:
        while (dev := self._queue.get()) is not None:
            try:
                self._cycle(dev)
            except Exception as e:  # keep the worker alive, as OtaClient._run does
                with self._lock:
                    self.failures.append(f"{dev.name}: {type(e).__name__}: {e}")
            with self._lock:
                if dev.offered or dev.inbox:
                    again = True
                else:
                    again, dev.scheduled = False, False
                    self.busy -= 1
                    self._idle.notify_all()
            if again:
                self._queue.put(dev)

    def _cycle(self, dev: _Device) -> None:
        commands = dev.client.commands
        while dev.inbox and commands is not None:
            commands.handle(dev.inbox.popleft())
        if dev.offered:
            dev.offered = False
            results = dev.client.update()
            dev.cycles += 1
            done = time.time()
            for r in results:
                if r.result == "installed" and r.adapter is not None and r.version is not None:
                    dev.installed_at[(r.adapter, r.version)] = done

    def _on_result(self, r: UpdateResult) -> None:
        key = r.result + (f" {r.reason}" if r.reason else "")
        with self._lock:
            self.results[key] += 1
            if r.result in ("failed", "rejected") and len(self.samples) < 50:
                self.samples.setdefault(key, f"{r.adapter} v{r.version}: {r.message}"[:300])

    def _on_command(self, result: Mapping[str, Any]) -> None:
        key = f"{result.get('result')} {result.get('action') or result.get('reason')}"
        with self._lock:
            self.commands[key] += 1

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True

    # set-up: connect, announce, subscribe, and a first cycle (the daemon's start)
    def bring_up(self, name: str, groups: tuple[str, ...]) -> None:
        spec, layout = self.spec, self.layout
        cfg = MqttConfig(host="127.0.0.1", port=layout.port, client_id=name, ca_file=layout.ca,
                         cert_file=layout.cert(name), key_file=layout.key(name), username=name,
                         password=layout.password(name), keepalive_s=spec.keepalive_s, timeout_s=spec.timeout_s,
                         will=will_for(name), max_packet_size=spec.max_packet)
        transport = _LightTransport(cfg, self.net)
        transport.connect()
        sink = _Sink(self.pool, broken=name in spec.broken)
        client = OtaClient(ClientConfig(device_id=name, groups=groups, state_dir=spec.state_dir / name,
                                        trusted_root=spec.trusted_root, base_fingerprint=spec.base_fingerprint,
                                        fetch_timeout_s=spec.fetch_timeout_s),
                           transport, sink, on_result=self._on_result, on_command=self._on_command)
        client.attach_commands(sink)
        dev = _Device(name, transport, client)
        with self._lock:
            self.devices[name] = dev

        def offered(topic: str, payload: bytes) -> None:
            dev.offered = True
            self.schedule(dev)

        def command(topic: str, payload: bytes) -> None:
            dev.inbox.append(payload)
            self.schedule(dev)

        # OtaClient.start() without its thread: online, status, offers, commands, a first cycle
        client.publish_online()
        client.publish_status()
        transport.subscribe([offer_topic("all"), offer_topic("device", name),
                             *(offer_topic("group", g) for g in groups)], offered)
        transport.subscribe([command_topic(name)], command)
        dev.offered = True
        self.schedule(dev)

    def counters(self, installed_of: tuple[str, int] | None) -> dict[str, Any]:
        names = sorted(self.devices)
        wires = [self.devices[n].transport.wire() for n in names]
        ts = [self.devices[n].transport for n in names]
        kinds: collections.Counter[str] = collections.Counter()
        for t in ts:
            kinds.update(t.kinds)
        with self._lock:
            results, commands = dict(self.results), dict(self.commands)
            failures = list(self.failures[-20:])
            samples = dict(self.samples)
        return {
            "names": names,
            "bytes_out": [w[0] for w in wires], "bytes_in": [w[1] for w in wires],
            "segs_out": [w[2] for w in wires], "segs_in": [w[3] for w in wires],
            "pub_out": [t.published for t in ts], "pub_in": [t.received for t in ts],
            "subscribes": [t.subscribes for t in ts], "unsubscribes": [t.unsubscribes for t in ts],
            "cycles": [self.devices[n].cycles for n in names],
            "installed_at": ([self.devices[n].installed_at.get(installed_of) for n in names]
                             if installed_of is not None else []),
            "connected": sum(t.connected for t in ts), "disconnects": sum(t.disconnects for t in ts),
            "results": results, "commands": commands, "failures": failures, "busy": self.busy, "kinds": dict(kinds),
            "samples": samples,
            "net_errors": self.net.errors, "cpu_s": time.process_time(), "rss_mb": _rss_mb(),
            "threads": threading.active_count(), "pid": os.getpid()}

    def close(self) -> None:
        for dev in list(self.devices.values()):
            dev.transport.close()
        time.sleep(0.5)  # the loop sends the DISCONNECTs
        for _ in self._workers:
            self._queue.put(None)
        self.net.close()


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def run_shard(conn: Connection, spec: ShardSpec) -> None:
    """One process of simulated devices, driven over ``conn``:

    - it connects and starts every device of ``spec``, waits for their first cycles and sends
      ``("ready", counters)``, or ``("error", why)``;
    - then answers ``("counters", (adapter, version) | None)`` with its counters and stops at
      ``("stop",)``.
    """
    logging.basicConfig(level=logging.ERROR, format="%(processName)s %(name)s: %(message)s")
    shard: _Shard | None = None
    try:
        shard = _Shard(spec)
        t0 = time.perf_counter()
        errors: list[str] = []
        with ThreadPoolExecutor(spec.connect_threads) as ex:
            futures = {ex.submit(shard.bring_up, n, g): n for n, g in spec.devices.items()}
            for f, n in futures.items():
                e = f.exception()
                if e is not None:
                    errors.append(f"{n}: {type(e).__name__}: {e}")
        connected_s = time.perf_counter() - t0
        idle = shard.wait_idle(600)
        ready = shard.counters(None)
        ready.update(connect_errors=errors[:20], connect_failed=len(errors), connect_s=round(connected_s, 2),
                     first_cycles_s=round(time.perf_counter() - t0, 2), first_cycles_done=idle)
        conn.send(("ready", ready))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            if msg[0] == "counters":
                conn.send(("counters", shard.counters(msg[1])))
            elif msg[0] == "idle":
                conn.send(("idle", shard.wait_idle(float(msg[1]))))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        if shard is not None:
            shard.close()
        conn.close()
