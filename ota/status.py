"""Device status kept retained on the broker, and the fleet's live view of it.

Two retained topics per device: ``.../online`` (``online``/``offline``; the broker writes
``offline`` itself through the Last Will when the device vanishes) and ``.../status``
(JSON: adapters and versions served, the last update result with its reason code, ε spent
per adapter when the trainer reports it). Encoding and decoding are pure.

A device writes only its own topics (the broker's ACLs), but what it writes there is its
word alone: :meth:`DeviceStatus.decode` checks every field's type (bounded size and depth
first, :mod:`lorad.ota.wire`), and :class:`FleetView` keeps a status that fails as that
device's :attr:`FleetView.errors` entry, so one device's garbage is reported for it and
never breaks what the fleet tool shows of the others.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import wire
from .transport import TOPIC_ROOT, Transport

__all__ = ["DeviceStatus", "status_topic", "online_topic", "will_for", "StatusReporter", "FleetView"]

_MAX_STATUS_BYTES = 256 * 1024


def status_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/device/{device_id}/status"


def online_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/device/{device_id}/online"


def will_for(device_id: str) -> tuple[str, bytes]:
    """The Last Will a device's transport registers (``MqttConfig.will``)."""
    return online_topic(device_id), b"offline"


@dataclass(frozen=True)
class DeviceStatus:
    device_id: str
    #: adapter name -> {"version": local registry version served now, "fleet_version": the OTA
    #: version it was installed as (None: not one the fleet sent), "privacy_epsilon": ε of its
    #: signed privacy record, "previous_local": served before that install, "held": fleet
    #: version an operator turned the device away from (it and older ones are not installed
    #: again), "pinned": held in the cache}
    adapters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: {"adapter", "version", "result", "reason", "message", "at"} of the last update
    last_update: Mapping[str, Any] | None = None
    #: adapter name -> ε spent (from the trainer's privacy ledger)
    epsilon: Mapping[str, float] = field(default_factory=dict)
    groups: tuple[str, ...] = ()
    #: {"result", "action", "adapter", "seq", "reason", "message", "at"} of the last command
    last_command: Mapping[str, Any] | None = None
    at: float = 0.0
    #: adapter name -> highest fleet version refused for good (health check, install)
    refused: Mapping[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({"device_id": self.device_id, "groups": list(self.groups),
                           "adapters": {k: dict(v) for k, v in self.adapters.items()},
                           "last_update": None if self.last_update is None else dict(self.last_update),
                           "last_command": None if self.last_command is None else dict(self.last_command),
                           "epsilon": dict(self.epsilon), "at": self.at, "refused": dict(self.refused)},
                          sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> DeviceStatus:
        """The status in ``data``, every field's type checked; ValueError naming the first bad one."""
        d = wire.mapping(wire.loads(data, what="status", max_bytes=_MAX_STATUS_BYTES), "status")
        if "device_id" not in d:
            raise ValueError("status: no device_id")
        groups = d.get("groups", [])
        if not isinstance(groups, list):
            raise ValueError(f"groups: expected a list, got {wire.describe(groups)}")
        adapters = {wire.name(n, "adapters key"): wire.scalars(a, f"adapters.{n}", _ADAPTER_FIELDS)
                    for n, a in wire.mapping(d.get("adapters", {}), "adapters").items()}
        return cls(
            device_id=wire.name(d["device_id"], "device_id"),
            adapters=adapters,
            last_update=_optional_record(d.get("last_update"), "last_update"),
            epsilon={wire.name(n, "epsilon key"): wire.number(e, f"epsilon.{n}")
                     for n, e in wire.mapping(d.get("epsilon", {}), "epsilon").items()},
            groups=tuple(wire.name(g, f"groups[{i}]") for i, g in enumerate(groups)),
            last_command=_optional_record(d.get("last_command"), "last_command"),
            at=wire.number(d.get("at", 0.0), "at"),
            refused={wire.name(n, "refused key"): wire.integer(v, f"refused.{n}", minimum=0)
                     for n, v in wire.mapping(d.get("refused", {}), "refused").items()})


_INT, _NUM, _STR = (int,), (int, float), (str,)
_OPT_INT, _OPT_STR = (int, type(None)), (str, type(None))
#: what ``OtaClient.device_status`` writes per adapter (other fields: any scalar)
_ADAPTER_FIELDS: Mapping[str, tuple[type, ...]] = {
    "version": _INT, "fleet_version": _OPT_INT, "privacy_epsilon": _NUM, "previous_local": _OPT_INT,
    "held": _INT, "pinned": (bool,)}
#: an update result (``UpdateResult.to_dict``) or a command result (``CommandExecutor``)
_RECORD_FIELDS: Mapping[str, tuple[type, ...]] = {
    "result": _STR, "adapter": _OPT_STR, "version": _OPT_INT, "reason": _OPT_STR, "message": _STR,
    "at": _NUM, "action": _OPT_STR, "seq": _OPT_INT}


def _optional_record(value: object, where: str) -> Mapping[str, Any] | None:
    return None if value is None else wire.scalars(value, where, _RECORD_FIELDS)


class StatusReporter:
    """Publishes one device's status and online flag (retained)."""

    def __init__(self, transport: Transport, device_id: str) -> None:
        self._t = transport
        self.device_id = device_id

    def online(self) -> None:
        self._t.publish(online_topic(self.device_id), b"online", retain=True)

    def offline(self) -> None:
        """Say goodbye on a clean shutdown (the Last Will covers the unclean ones)."""
        self._t.publish(online_topic(self.device_id), b"offline", retain=True)

    def publish(self, status: DeviceStatus) -> None:
        self._t.publish(status_topic(status.device_id), status.encode(), retain=True)


class FleetView:
    """The fleet's live picture: every device's last status and online flag.

    A status that cannot be read (:meth:`DeviceStatus.decode` refuses it, or it names
    another device than the topic it came on) replaces what was known of that device by
    an entry in :attr:`errors` (why), until the device sends a good one again; ``on_error``
    hears of it as ``on_change`` hears of the good ones.
    """

    def __init__(self, transport: Transport,
                 on_change: Callable[[str, DeviceStatus | None, bool | None], None] | None = None, *,
                 on_error: Callable[[str, str], None] | None = None) -> None:
        self._t = transport
        self._lock = threading.Condition()
        self.status: dict[str, DeviceStatus] = {}
        self.online: dict[str, bool] = {}
        #: device -> why its last status was refused (it has no entry in ``status`` then)
        self.errors: dict[str, str] = {}
        #: messages seen so far (wait for it to change to wait for news)
        self.changes = 0
        self._on_change = on_change
        self._on_error = on_error
        transport.subscribe([status_topic("+"), online_topic("+")], self._on_message)

    def _on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        device, kind = parts[-2], parts[-1]
        error: str | None = None
        changed: tuple[DeviceStatus | None, bool | None] = (None, None)
        if kind == "status":
            try:
                st = DeviceStatus.decode(payload)
                if st.device_id != device:
                    raise ValueError(f"device_id: {st.device_id!r} on the status topic of {device!r}")
                changed = (st, None)
            except ValueError as e:
                error = str(e)
        with self._lock:
            if kind == "online":
                self.online[device] = payload == b"online"
                changed = (None, self.online[device])
            elif error is not None:  # a device sent garbage about itself: shown as such
                self.status.pop(device, None)
                self.errors[device] = error
            else:
                self.errors.pop(device, None)
                self.status[device] = st
            self.changes += 1
            self._lock.notify_all()
        if error is not None:
            if self._on_error is not None:
                self._on_error(device, error)
        elif self._on_change is not None:
            self._on_change(device, *changed)

    def snapshot(self) -> dict[str, DeviceStatus]:
        """Every device's last (readable) status, as of now."""
        with self._lock:
            return dict(self.status)

    def error_snapshot(self) -> dict[str, str]:
        """Every device whose last status could not be read, and why, as of now."""
        with self._lock:
            return dict(self.errors)

    def wait_for(self, predicate: Callable[[FleetView], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True
