"""``loractl fleet ...``: the fleet's OTA tools (root of trust, publish, keys, commands,
status), defined in :mod:`ota.cli` so they work without a daemon."""

from __future__ import annotations

from ota.cli import register

__all__ = ["register"]
