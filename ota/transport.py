"""The message channel between fleet and devices: a small interface and its MQTT form.

Everything above this module (repository files, status, commands, offers) speaks to a
:class:`Transport`; tests plug in ``tests/ota/simulator.py`` (not shipped) instead of a broker.
Every public method of a transport turns any failure into one :class:`TransportError`
chained to its cause. Subscriptions are remembered and restored after a reconnect, so a
broker restart costs only the messages that were in flight.
"""

from __future__ import annotations

import abc
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
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

__all__ = ["TOPIC_ROOT", "Handler", "Transport", "MqttConfig", "MqttTransport", "topic_matches", "barrier"]

#: Every topic lorad uses lives under this prefix (versioned so the layout can change).
TOPIC_ROOT = "lorad/v1"

#: Called with (topic, payload) for every message that matches a subscription.
Handler = Callable[[str, bytes], None]

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


def barrier(transport: Transport, timeout_s: float) -> None:
    """Return once the broker has delivered everything queued for us before this call.

    A broker sends the retained messages of a subscription right after its SUBACK, ahead
    of anything published later; so a message we publish to a topic of our own and get
    back marks the end of them (an answer, not a guess from a quiet interval). Raises
    TransportError if the marker does not come back within ``timeout_s``.
    """
    topic = f"{TOPIC_ROOT}/fleet/sync/{uuid.uuid4().hex}"
    seen = threading.Event()
    transport.subscribe([topic], lambda t, p: seen.set())
    try:
        transport.publish(topic, b"sync")
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


class MqttTransport(Transport):
    """:class:`Transport` over paho-mqtt 2 (callback API 2), MQTT v5, QoS 1, mutual TLS.

    paho's own loop thread reconnects with backoff; on every CONNACK the remembered
    subscriptions are sent again (the session is clean, so the broker forgot them).
    """

    def __init__(self, config: MqttConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._connected = threading.Condition(self._lock)
        self._is_connected = False
        self._connect_error: str | None = None
        self._subs: dict[str, Handler] = {}
        self._acks: dict[int, list[ReasonCode] | None] = {}
        self._acked = threading.Condition(self._lock)
        self._broker_max_packet = 268_435_455  # MQTT's maximum when the broker sets none
        self._closed = False
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=config.client_id, protocol=mqtt.MQTTv5)
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
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_connect_fail = self._on_connect_fail
        client.on_socket_open = _no_delay
        self._client = client

    # --- lifecycle -----------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection and wait for the broker's CONNACK."""
        cfg = self._config
        props = Properties(PacketTypes.CONNECT)
        props.MaximumPacketSize = cfg.max_packet_size
        props.SessionExpiryInterval = 0
        try:
            self._client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s,
                                 clean_start=True, properties=props)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise TransportError(f"cannot connect to mqtts://{cfg.host}:{cfg.port}: {e}") from e
        self._client.loop_start()
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
        props = Properties(PacketTypes.CONNECT)
        props.MaximumPacketSize = cfg.max_packet_size
        props.SessionExpiryInterval = 0
        try:
            self._client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s,
                                       clean_start=True, properties=props)
        except ValueError as e:
            raise TransportError(f"cannot connect to mqtts://{cfg.host}:{cfg.port}: {e}") from e
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

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._client.disconnect()
        except (OSError, ValueError):
            pass  # already gone: nothing left to tell the broker
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
                if self._connect_error is not None and not self._is_connected:
                    err = self._connect_error
                    if err.startswith("refused"):
                        raise TransportError(f"broker {self._config.host}:{self._config.port} {err}")
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
            refused = [t for t, c in zip(topics, codes, strict=True) if c.is_failure]
            if refused:
                raise TransportError(f"broker refused subscription to {refused} "
                                     f"({next(str(c) for c in codes if c.is_failure)})")
            return

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            with self._connected:
                self._connect_error = f"refused the connection: {reason_code}"
                self._connected.notify_all()
            return
        with self._connected:
            max_packet = getattr(properties, "MaximumPacketSize", None)
            if isinstance(max_packet, int) and max_packet > 0:
                self._broker_max_packet = max_packet
            self._is_connected = True
            self._connect_error = None
            topics = list(self._subs)
            self._connected.notify_all()
        if topics:
            # Restore the subscriptions the clean session dropped; the SUBACK is awaited by
            # whoever subscribed first, so here it is fire-and-forget.
            client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        with self._connected:
            self._connect_error = f"cannot reach mqtts://{self._config.host}:{self._config.port}"
            self._connected.notify_all()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._connected:
            refused = not self._is_connected and (self._connect_error or "").startswith("refused")
            self._is_connected = False
            if not refused:  # the broker closes the socket after a refusing CONNACK: keep why it refused
                self._connect_error = f"disconnected: {reason_code}"
            self._connected.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        with self._acked:
            self._acks[mid] = list(reason_codes)
            self._acked.notify_all()

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
