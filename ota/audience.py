"""Who a signed target is for, decided by each device from its own id: pure, no I/O.

An :class:`Audience` is a union of four kinds of members:

- ``everyone``;
- named ``groups`` (a device knows its groups from its ``ota.groups``);
- a range of hash ``buckets`` of a ``salt`` (a rollout's stages): a device is in bucket
  :func:`bucket` ``= int(sha256("<salt>:<device_id>")[:8 bytes]) * 10000 // 2**64`` and is a
  member when ``lo <= bucket < hi``, so 5 % of any fleet is ``[0, 500)`` — a few bytes whatever the
  fleet's size, and the same rollout always picks the same devices;
- explicit ``devices`` (small canaries only: about 15 bytes per device in the signed
  metadata, which every device downloads).

Signed form (``custom["lorad"]["audience"]``; canonical JSON, so integers only)::

    {"all": false, "devices": [...], "groups": [...], "buckets": [0, 500], "salt": "spring"}

``buckets`` and ``salt`` appear only when used: what devices signed before buckets existed
reads back unchanged, and a device that predates buckets finds no member kind it knows in a
bucket-only audience and refuses the target as malformed instead of installing it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorad.adapters.names import NAME_RULE, is_name

__all__ = ["BUCKETS", "MAX_LISTED_DEVICES", "Audience", "bucket", "point"]

#: Buckets of a salt (resolution 0.01 % of the fleet).
BUCKETS = 10_000
#: Most devices the fleet tool lists by name in one audience (canaries); more is a group or a percentage.
MAX_LISTED_DEVICES = 100


def point(device_id: str, salt: str) -> int:
    """Where ``device_id`` falls under ``salt``: the first 8 bytes of ``sha256("<salt>:<device_id>")``
    as a big-endian integer (``0 <= p < 2**64``); buckets are its ranges, in its order."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{device_id}".encode()).digest()[:8], "big")


def bucket(device_id: str, salt: str) -> int:
    """The bucket (``0 <= b < BUCKETS``) of ``device_id`` under ``salt``: ``point * BUCKETS // 2**64``."""
    return (point(device_id, salt) * BUCKETS) >> 64


@dataclass(frozen=True)
class Audience:
    """Who a target is for: everyone, named groups, a bucket range of a salt, named devices."""

    devices: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    everyone: bool = False
    #: ``(lo, hi)``: buckets ``lo <= b < hi`` of ``salt`` (None: no bucket range)
    buckets: tuple[int, int] | None = None
    salt: str = ""

    def __post_init__(self) -> None:
        if not self.everyone and not self.devices and not self.groups and self.buckets is None:
            raise ValueError("an audience needs everyone=True, devices, groups or buckets")
        for n in (*self.devices, *self.groups):
            if not is_name(n):
                raise ValueError(f"device/group name {n!r} must match {NAME_RULE}")
        if self.buckets is not None:
            lo, hi = self.buckets
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi <= BUCKETS):
                raise ValueError(f"buckets {self.buckets!r}: expected [lo, hi) with 0 <= lo < hi <= {BUCKETS}")
            if not is_name(self.salt):
                raise ValueError(f"bucket salt {self.salt!r} must match {NAME_RULE}")
        elif self.salt:
            raise ValueError("a salt without buckets")

    def includes(self, device_id: str, groups: Sequence[str]) -> bool:
        """Whether the device ``device_id`` in ``groups`` is a member (what a device asks itself)."""
        if self.everyone or device_id in self.devices or bool(set(groups) & set(self.groups)):
            return True
        if self.buckets is None:
            return False
        return self.buckets[0] <= bucket(device_id, self.salt) < self.buckets[1]

    @property
    def label(self) -> str:
        """Short tag used in target paths: ``all``, ``g-<group>``, ``d-<device>``, ``m-<hash>``."""
        if self.everyone:
            return "all"
        if self.buckets is None and len(self.groups) == 1 and not self.devices:
            return f"g-{self.groups[0]}"
        if self.buckets is None and len(self.devices) == 1 and not self.groups:
            return f"d-{self.devices[0]}"
        return "m-" + hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        """In words, for messages: ``everyone``, ``groups east, west + 1,200 listed devices``."""
        if self.everyone:
            return "everyone"
        parts = []
        if self.groups:
            parts.append(f"group{'s' if len(self.groups) > 1 else ''} {', '.join(sorted(self.groups))}")
        if self.buckets is not None:
            lo, hi = self.buckets
            parts.append(f"buckets [{lo}, {hi}) of {self.salt!r} ({(hi - lo) * 100 / BUCKETS:g} %)")
        if self.devices:
            parts.append(f"{len(self.devices):,} listed device{'s' if len(self.devices) > 1 else ''}")
        return " + ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"all": self.everyone, "devices": sorted(self.devices), "groups": sorted(self.groups)}
        if self.buckets is not None:
            d["buckets"], d["salt"] = list(self.buckets), self.salt
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Audience:
        raw = d.get("buckets")
        buckets = None
        if raw is not None:
            if not isinstance(raw, list) or len(raw) != 2 or not all(
                    isinstance(x, int) and not isinstance(x, bool) for x in raw):
                raise ValueError(f"buckets {raw!r}: expected [lo, hi]")
            buckets = (raw[0], raw[1])
        salt = d.get("salt", "")
        if not isinstance(salt, str):
            raise ValueError(f"salt {salt!r}: expected a string")
        for key in ("devices", "groups"):
            if not isinstance(d.get(key, []), list):
                raise ValueError(f"{key}: expected a list of names")
        return cls(devices=tuple(d.get("devices", ())), groups=tuple(d.get("groups", ())),
                   everyone=bool(d.get("all", False)), buckets=buckets, salt=salt)
