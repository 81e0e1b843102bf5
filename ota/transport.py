"""The message channel between fleet and devices: a small interface and its MQTT form.

Everything above this module (repository files, status, commands, offers) speaks to a
:class:`Transport`; tests plug in ``tests/ota/simulator.py`` (not shipped) instead of a broker.
Every public method of a transport turns any failure into one :class:`TransportError`
chained to its cause. Subscriptions are remembered and restored after a reconnect, so a
broker restart costs only the messages that were in flight.

Nothing the broker refuses passes silently: a CONNACK, PUBACK or SUBACK with a failure
reason code (an ACL that denies the topic, a quota) raises :class:`BrokerRefusal`, which
names the operation, the topic and the user, and is counted per operation
(:attr:`MqttTransport.refusals`, exported as ``lorad_ota_broker_refusals_total``).
Reconnects wait an exponential back-off with jitter (:class:`Backoff`), so a fleet that
lost its broker does not come back all in the same second.
"""

from __future__ import annotations

import abc
import logging
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from .errors import TransportError

if TYPE_CHECKING:
    # ota.config holds the pydantic ``ota:`` section too: the fleet tools that reach no broker
    # (``fleet keys``) load neither it nor pydantic. ``MqttConfig`` is still importable from
    # here (:func:`__getattr__`).
    from .config import MqttConfig

__all__ = ["TOPIC_ROOT", "OPERATIONS", "Handler", "Transport", "MqttConfig", "MqttTransport", "Backoff",
           "BrokerRefusal", "topic_matches", "barrier"]

#: Every topic lorad uses lives under this prefix (versioned so the layout can change).
TOPIC_ROOT = "lorad/v1"

#: Called with (topic, payload) for every message that matches a subscription.
Handler = Callable[[str, bytes], None]

#: What a broker can refuse, the ``operation`` of :class:`BrokerRefusal` and of the counts.
OPERATIONS = ("connect", "publish", "subscribe")
#: MQTT v5 reason code "Not authorized" (CONNACK, PUBACK, SUBACK): the password or the ACL.
_NOT_AUTHORIZED = 0x87

_log = logging.getLogger(__name__)


def __getattr__(name: str) -> object:
    if name == "MqttConfig":
        from .config import MqttConfig

        return MqttConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Bytes of an MQTT PUBLISH that are not payload, beyond the topic: fixed header (up to 5),
# topic length (2), packet id (2), properties (message expiry 5 + length 4) with margin.
_PUBLISH_OVERHEAD = 64
# Room kept for the topic when announcing ``max_payload`` (lorad's topics are shorter).
_TOPIC_RESERVE = 512


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT wildcard matching (``+`` one level, ``#`` the rest)."""
    return bool(mqtt.topic_matches_sub(topic_filter, topic))


class BrokerRefusal(TransportError):
    """The broker answered with a failure reason code: it refused ``operation`` (one of
    :data:`OPERATIONS`) on ``topic`` (None for a connection) with ``reason``."""

    def __init__(self, operation: str, topic: str | None, reason: str, message: str, *,
                 not_authorized: bool) -> None:
        super().__init__(message)
        self.operation = operation
        self.topic = topic
        self.reason = reason
        #: the broker's password file or ACL said no (reason code 0x87)
        self.not_authorized = not_authorized


@dataclass(frozen=True)
class Backoff:
    """How long to wait before connection attempt ``n`` (0, 1, ...) after a failure.

    Exponential with "equal jitter": the span doubles from ``initial_s`` up to ``max_s``
    and the wait is drawn from its upper half, so it grows surely while devices that lost
    the broker together spread their returns over half the span. A connection that
    stayed up ``stable_s`` starts the count again.
    """

    initial_s: float = 1.0
    max_s: float = 60.0
    stable_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s or self.stable_s < 0:
            raise ValueError(f"need 0 < initial_s <= max_s and stable_s >= 0, got {self}")

    def span(self, attempt: int) -> float:
        """The upper bound of the wait before attempt ``attempt``."""
        return min(self.max_s, self.initial_s * 2.0 ** min(max(attempt, 0), 64))

    def delay(self, attempt: int, draw: Callable[[], float]) -> float:
        """The wait before attempt ``attempt``; ``draw()`` is uniform in [0, 1)."""
        span = self.span(attempt)
        return span / 2 + draw() * span / 2


def barrier(transport: Transport, timeout_s: float) -> None:
    """Return once the broker has delivered everything queued for us before this call.

    A broker sends the retained messages of a subscription right after its SUBACK, ahead
    of anything published later; so a message we publish to a topic of our own and get
    back marks the end of them (an answer, not a guess from a quiet interval). Raises
    TransportError if the marker does not come back within ``timeout_s``, at once if the
    broker refuses it (a device's credentials: only the fleet user may write there).
    """
    topic = f"{TOPIC_ROOT}/fleet/sync/{uuid.uuid4().hex}"
    seen = threading.Event()
    transport.subscribe([topic], lambda t, p: seen.set())
    try:
        try:
            transport.publish(topic, b"sync")
        except BrokerRefusal as e:
            if not e.not_authorized:
                raise
            raise BrokerRefusal(e.operation, e.topic, e.reason,
                                f"{e}; the fleet tool waits for the broker's answer on {TOPIC_ROOT}/fleet/#, "
                                "which only the fleet user may write (give the fleet's credentials, not a "
                                "device's)", not_authorized=True) from e
        if not seen.wait(timeout_s):
            raise TransportError(f"the broker did not answer within {timeout_s} s "
                                 f"(slow or overloaded; try a larger --timeout)")
    finally:
        transport.unsubscribe([topic])


def _no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    # Every publish waits for its PUBACK and every fetch for its SUBACK: with Nagle's
    # algorithm against delayed ACKs each such round trip costs up to 40 ms more.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Transport(abc.ABC):
    """Publish/subscribe with QoS 1, retained messages and message expiry."""

    @property
    @abc.abstractmethod
    def max_payload(self) -> int:
        """Largest payload (bytes) one message may carry on ``topic``s of normal length."""

    @abc.abstractmethod
    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                expiry_s: int | None = None) -> None:
        """Deliver ``payload`` to the broker (acknowledged) or raise TransportError."""

    @abc.abstractmethod
    def subscribe(self, topics: Sequence[str], handler: Handler) -> None:
        """Subscribe (acknowledged, restored on reconnect); ``handler`` runs per message."""

    @abc.abstractmethod
    def unsubscribe(self, topics: Sequence[str]) -> None:
        """Forget ``topics``; messages on them are no longer delivered."""

    @abc.abstractmethod
    def close(self) -> None:
        """Disconnect; safe to call twice."""


class _Client(mqtt.Client):
    """paho's client, waiting between connection attempts as lorad's transport says.

    paho's loop thread calls ``_reconnect_wait`` before every new attempt (the first
    connection's retries included); its own wait doubles a fixed delay, the same on every
    device. pyproject pins paho-mqtt below 3, and
    ``tests/ota/test_ota_transport.py::test_reconnects_wait_a_jittered_exponential_backoff``
    fails if a release stops calling it.
    """

    def __init__(self, wait: Callable[[], None], client_id: str) -> None:
        super().__init__(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
        self._lorad_wait = wait

    def _reconnect_wait(self) -> None:
        self._lorad_wait()


class MqttTransport(Transport):
    """:class:`Transport` over paho-mqtt 2 (callback API 2), MQTT v5, QoS 1, mutual TLS.

    paho's own loop thread reconnects, waiting as ``backoff`` says between attempts;
    on every CONNACK the remembered subscriptions are sent again (the session is clean,
    so the broker forgot them). ``draw`` (uniform in [0, 1)) jitters the waits; each
    transport has its own random source by default.
    """

    def __init__(self, config: MqttConfig, *, backoff: Backoff | None = None,
                 draw: Callable[[], float] | None = None) -> None:
        self._config = config
        self._backoff = backoff or Backoff()
        self._draw = draw or random.Random().random
        self._lock = threading.Lock()
        self._connected = threading.Condition(self._lock)
        self._is_connected = False
        self._connect_error: str | None = None
        self._connect_refusal: BrokerRefusal | None = None
        self._subs: dict[str, Handler] = {}
        self._acks: dict[int, list[ReasonCode] | None] = {}
        self._acked = threading.Condition(self._lock)
        #: PUBACK reason codes by message id (paho's MQTTMessageInfo does not carry them)
        self._pubacks: dict[int, ReasonCode] = {}
        #: SUBACKs of the subscriptions restored after a reconnect: message id -> topics
        self._restoring: dict[int, list[str]] = {}
        self._refusals = dict.fromkeys(OPERATIONS, 0)
        self._attempt = 0
        self._tried = False  # a connection attempt started since the last wait
        self._connected_at: float | None = None
        self._closing = threading.Event()
        #: the waits before connection attempts so far, seconds (newest last, at most 64)
        self.reconnect_waits: list[float] = []
        self._broker_max_packet = 268_435_455  # MQTT's maximum when the broker sets none
        self._closed = False
        client = _Client(self._reconnect_wait, config.client_id)
        try:
            client.tls_set(ca_certs=str(config.ca_file), certfile=str(config.cert_file),
                           keyfile=str(config.key_file), cert_reqs=ssl.CERT_REQUIRED,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise TransportError(f"cannot load TLS material for {config.client_id!r}: {e}") from e
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.will is not None:
            client.will_set(config.will[0], config.will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_connect_fail = self._on_connect_fail
        client.on_pre_connect = self._on_pre_connect
        client.on_socket_open = _no_delay
        self._client = client

    # --- lifecycle -----------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection and wait for the broker's CONNACK."""
        cfg = self._config
        try:
            self._client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s,
                                 clean_start=True, properties=self._connect_properties())
        except (OSError, ssl.SSLError, ValueError) as e:
            raise TransportError(f"cannot connect to mqtts://{cfg.host}:{cfg.port}: {e}") from e
        self._serve()
        try:
            self._wait_connected()
        except TransportError:
            self.close()
            raise

    def start(self) -> None:
        """Connect in the background and keep trying (the daemon's way in).

        paho's loop retries the first connection as it retries every later one, so a
        broker that is down when the device starts is reached once it is up; until then
        operations raise TransportError and :attr:`connected` is False.
        """
        cfg = self._config
        try:
            self._client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s,
                                       clean_start=True, properties=self._connect_properties())
        except ValueError as e:
            raise TransportError(f"cannot connect to mqtts://{cfg.host}:{cfg.port}: {e}") from e
        self._serve()

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.MaximumPacketSize = self._config.max_packet_size
        props.SessionExpiryInterval = 0
        return props

    def _serve(self) -> None:
        """Serve the socket: paho's own loop thread (a simulation of many devices serves
        them all from one loop instead: benchmarks/fleet_scale_devices.py)."""
        self._client.loop_start()

    def wait_connected(self, timeout_s: float) -> bool:
        """True once connected, False if not within ``timeout_s`` or the broker refused us."""
        try:
            self._wait_connected(time.monotonic() + timeout_s)
        except TransportError:
            return False
        return True

    @property
    def last_error(self) -> str | None:
        """Why the transport is not connected (None when it is)."""
        with self._lock:
            return None if self._is_connected else self._connect_error

    @property
    def refusals(self) -> dict[str, int]:
        """How many times the broker refused each of :data:`OPERATIONS` so far."""
        with self._lock:
            return dict(self._refusals)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._client.disconnect()  # first: paho's loop then makes no new attempt
        except (OSError, ValueError):
            pass  # already gone: nothing left to tell the broker
        self._closing.set()  # a wait between connection attempts ends now
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._is_connected

    def _packet_limit(self) -> int:
        return min(self._broker_max_packet, self._config.max_packet_size)

    @property
    def max_payload(self) -> int:
        with self._lock:
            return self._packet_limit() - _PUBLISH_OVERHEAD - _TOPIC_RESERVE

    # --- operations ----------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                expiry_s: int | None = None) -> None:
        props = None
        if expiry_s is not None:
            if expiry_s <= 0:
                raise ValueError(f"expiry_s must be positive, got {expiry_s}")
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = int(expiry_s)
        with self._lock:
            limit = self._packet_limit()
        if len(payload) + len(topic.encode()) + _PUBLISH_OVERHEAD > limit:
            raise TransportError(f"message of {len(payload)} bytes on {topic!r} exceeds the "
                                 f"broker's limit of {limit} bytes per packet")
        deadline = time.monotonic() + self._config.timeout_s
        while True:
            self._wait_connected(deadline)
            try:
                info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
                info.wait_for_publish(max(0.01, deadline - time.monotonic()))
            except RuntimeError as e:
                # Disconnected between the check and the send: try again until the deadline.
                if time.monotonic() >= deadline:
                    raise TransportError(f"publish to {topic!r} failed: {e}") from e
                continue
            except ValueError as e:
                raise TransportError(f"publish to {topic!r} failed: {e}") from e
            if info.is_published():
                with self._lock:
                    # paho records the PUBACK's code before it marks the message published
                    code = self._pubacks.pop(info.mid, None)
                if code is not None and code.is_failure:
                    raise self._refused("publish", topic, code)
                return
            raise TransportError(f"publish to {topic!r} not acknowledged within "
                                 f"{self._config.timeout_s} s")

    def subscribe(self, topics: Sequence[str], handler: Handler) -> None:
        if not topics:
            return
        with self._lock:
            for t in topics:
                self._subs[t] = handler
        self._send_subscribe(list(topics), time.monotonic() + self._config.timeout_s)

    def unsubscribe(self, topics: Sequence[str]) -> None:
        if not topics:
            return
        with self._lock:
            for t in topics:
                self._subs.pop(t, None)
            if not self._is_connected:
                return  # nothing to tell the broker: the clean session forgot them
        try:
            self._client.unsubscribe(list(topics))
        except (OSError, ValueError) as e:
            raise TransportError(f"unsubscribe from {list(topics)} failed: {e}") from e

    # --- internals -----------------------------------------------------------------

    def _wait_connected(self, deadline: float | None = None) -> None:
        if deadline is None:
            deadline = time.monotonic() + self._config.timeout_s
        with self._connected:
            while not self._is_connected:
                refusal = self._connect_refusal
                if refusal is not None and (self._connect_error or "").startswith("refused"):
                    raise BrokerRefusal(refusal.operation, None, refusal.reason, str(refusal),
                                        not_authorized=refusal.not_authorized)
                if self._closed:
                    raise TransportError("transport is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(
                        f"not connected to {self._config.host}:{self._config.port} within "
                        f"{self._config.timeout_s} s" +
                        (f" (last error: {self._connect_error})" if self._connect_error else ""))
                self._connected.wait(min(left, 0.2))

    def _send_subscribe(self, topics: list[str], deadline: float) -> None:
        opts = SubscribeOptions(qos=1)
        while True:
            self._wait_connected(deadline)
            try:
                rc, mid = self._client.subscribe([(t, opts) for t in topics])
            except (OSError, ValueError) as e:
                raise TransportError(f"subscribe to {topics} failed: {e}") from e
            if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
                if time.monotonic() >= deadline:
                    raise TransportError(f"subscribe to {topics} failed: {mqtt.error_string(rc)}")
                time.sleep(0.05)
                continue
            with self._acked:
                while mid not in self._acks or self._acks[mid] is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._acks.pop(mid, None)
                        raise TransportError(f"subscribe to {topics} not acknowledged in time")
                    if not self._is_connected:
                        break  # the reconnect handler subscribes again
                    self._acked.wait(min(left, 0.2))
                codes = self._acks.pop(mid, None)
            if codes is None:
                return
            refused = [(t, c) for t, c in zip(topics, codes, strict=True) if c.is_failure]
            if refused:
                for t, _ in refused:
                    with self._lock:
                        self._subs.pop(t, None)  # not restored after a reconnect either
                raise self._refused("subscribe", refused[0][0], refused[0][1],
                                    also=[t for t, _ in refused[1:]])
            return

    def _refused(self, operation: str, topic: str | None, code: ReasonCode, *,
                 also: Sequence[str] = ()) -> BrokerRefusal:
        """Count a refusal and say it: the operation, the topic, the reason, the user."""
        with self._lock:
            self._refusals[operation] += 1
        cfg = self._config
        denied = code.value == _NOT_AUTHORIZED
        what = {"connect": "the connection", "publish": f"the publish to {topic!r}",
                "subscribe": f"the subscription to {topic!r}"}[operation]
        if also:
            what += f" (and to {list(also)})"
        why = str(code)
        if denied and operation == "publish":
            why += f": its ACL does not let user {cfg.username!r} write this topic"
        elif denied and operation == "subscribe":
            why += f": its ACL does not let user {cfg.username!r} read this topic"
        elif denied:
            why += f": user {cfg.username!r} with this password is not admitted on this listener"
        return BrokerRefusal(operation, topic, str(code),
                             f"broker {cfg.host}:{cfg.port} refused {what}: {why}", not_authorized=denied)

    def _reconnect_wait(self) -> None:
        """Between connection attempts (paho's loop thread): the back-off, cut short by close."""
        with self._lock:
            if not self._tried:
                return  # paho's second turn after a failed first connection: it has waited already
            self._tried = False
            wait = self._backoff.delay(self._attempt, self._draw)
            self._attempt += 1
            self.reconnect_waits = [*self.reconnect_waits[-63:], wait]
        self._closing.wait(wait)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            refusal = self._refused("connect", None, reason_code)
            with self._connected:
                again = self._connect_refusal is not None and str(self._connect_refusal) == str(refusal)
                self._connect_error = f"refused the connection: {reason_code}"
                self._connect_refusal = refusal
                self._connected.notify_all()
            if not again:  # every attempt is counted; the same refusal is said once
                _log.warning("%s", refusal)
            return
        with self._connected:
            max_packet = getattr(properties, "MaximumPacketSize", None)
            if isinstance(max_packet, int) and max_packet > 0:
                self._broker_max_packet = max_packet
            self._is_connected = True
            self._connect_error = None
            self._connect_refusal = None
            self._connected_at = time.monotonic()
            topics = list(self._subs)
            self._connected.notify_all()
        if topics:
            # Restore the subscriptions the clean session dropped. Whoever subscribed first
            # has had its answer; this SUBACK is checked by _on_subscribe (a broker whose
            # ACL changed meanwhile is logged and counted, not ignored).
            rc, mid = client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])
            if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                with self._lock:
                    self._restoring[mid] = topics

    def _on_pre_connect(self, client: mqtt.Client, userdata: object) -> None:
        with self._lock:
            self._tried = True

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        with self._connected:
            self._connect_error = f"cannot reach mqtts://{self._config.host}:{self._config.port}"
            self._connected.notify_all()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._connected:
            refused = not self._is_connected and (self._connect_error or "").startswith("refused")
            if self._connected_at is not None and time.monotonic() - self._connected_at >= self._backoff.stable_s:
                self._attempt = 0  # it had settled: the next outage starts from the shortest wait
            self._connected_at = None
            self._is_connected = False
            if not refused:  # the broker closes the socket after a refusing CONNACK: keep why it refused
                self._connect_error = f"disconnected: {reason_code}"
            self._connected.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        with self._acked:
            restored = self._restoring.pop(mid, None)
            if restored is None:
                self._acks[mid] = list(reason_codes)
                self._acked.notify_all()
        if restored is not None:
            for t, code in zip(restored, reason_codes, strict=False):
                if code.is_failure:
                    with self._lock:
                        self._subs.pop(t, None)
                    _log.warning("%s (restoring it after a reconnect)", self._refused("subscribe", t, code))

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._lock:
            self._pubacks[mid] = reason_code

    def _on_unsubscribe(self, client: mqtt.Client, userdata: object, mid: int,
                        reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        return

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = {h for f, h in self._subs.items() if topic_matches(f, msg.topic)}
        for h in handlers:
            try:
                h(msg.topic, bytes(msg.payload))
            except Exception:  # an exception would end paho's network thread
                _log.exception("handler for %r failed", msg.topic)
