"""Where the daemon keeps its state, as ``lorad`` and ``loractl`` both need to know it.

Kept apart from :mod:`lorad.daemon.config` (pydantic, every section's model): a ``loractl``
command finds the daemon's address and token with the standard library alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["TOKEN_FILE", "ADDR_FILE", "default_state_dir"]

#: Default name of the API token file in the state directory.
TOKEN_FILE = "api-token"
#: Written to the state directory by a serving daemon: where loractl and tests find it.
ADDR_FILE = "lorad.addr"


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$STATE_DIRECTORY`` under systemd (its first entry), else the per-user state dir."""
    env = os.environ if environ is None else environ
    sd = env.get("STATE_DIRECTORY", "")
    if sd:
        return Path(sd.split(":")[0])
    import platformdirs

    return Path(platformdirs.user_state_dir("lorad", appauthor=False))
