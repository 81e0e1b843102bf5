"""Device status kept retained on the broker, and the fleet's live view of it.

Two retained topics per device: ``.../online`` (``online``/``offline``; the broker writes
``offline`` itself through the Last Will when the device vanishes) and ``.../status``
(JSON: adapters and versions served, the last update result with its reason code, ε spent
per adapter when the trainer reports it). Encoding and decoding are pure.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    #: adapter name -> {"version": local registry version, "fleet_version": OTA version,
    #: "privacy_epsilon": ε of its signed privacy record, "previous_local": served before OTA}
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
        if len(data) > _MAX_STATUS_BYTES:
            raise ValueError(f"status of {len(data)} bytes exceeds {_MAX_STATUS_BYTES}")
        d = json.loads(data)
        return cls(device_id=str(d["device_id"]), adapters=d.get("adapters", {}),
                   last_update=d.get("last_update"), epsilon=d.get("epsilon", {}),
                   groups=tuple(d.get("groups", ())), last_command=d.get("last_command"),
                   at=float(d.get("at", 0.0)), refused=d.get("refused", {}))


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
    """The fleet's live picture: every device's last status and online flag."""

    def __init__(self, transport: Transport,
                 on_change: Callable[[str, DeviceStatus | None, bool | None], None] | None = None) -> None:
        self._t = transport
        self._lock = threading.Condition()
        self.status: dict[str, DeviceStatus] = {}
        self.online: dict[str, bool] = {}
        #: messages seen so far (wait for it to change to wait for news)
        self.changes = 0
        self._on_change = on_change
        transport.subscribe([status_topic("+"), online_topic("+")], self._on_message)

    def _on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        device, kind = parts[-2], parts[-1]
        with self._lock:
            if kind == "online":
                self.online[device] = payload == b"online"
                changed: tuple[DeviceStatus | None, bool | None] = (None, self.online[device])
            else:
                try:
                    st = DeviceStatus.decode(payload)
                except (ValueError, KeyError, TypeError):
                    return  # a device sent garbage about itself: nothing to show
                self.status[device] = st
                changed = (st, None)
            self.changes += 1
            self._lock.notify_all()
        if self._on_change is not None:
            self._on_change(device, *changed)

    def snapshot(self) -> dict[str, DeviceStatus]:
        """Every device's last status, as of now."""
        with self._lock:
            return dict(self.status)

    def wait_for(self, predicate: Callable[[FleetView], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True
