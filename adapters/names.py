"""The one naming rule of lorad: adapter, model, device and group names.

Names become directory names (the registry), MQTT topic levels (OTA) and config keys
(per-adapter training), so they are short, portable and free of path separators.
"""

from __future__ import annotations

import re

__all__ = ["NAME_RULE", "NAME_ALLOWED", "is_name", "check_name"]

#: The rule as a regular expression (also published in the config's JSON Schema).
NAME_RULE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: The rule in words, for error messages.
NAME_ALLOWED = "letters, digits, '.', '_', '-' (1-64, not starting with a symbol)"

_NAME = re.compile(NAME_RULE)


def is_name(name: object) -> bool:
    """Whether ``name`` follows :data:`NAME_RULE`."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: object, *, what: str = "adapter name") -> str:
    """``name`` itself, or ValueError naming the bad name and the rule."""
    if not is_name(name):
        raise ValueError(f"bad {what} {name!r}: names must match {NAME_RULE} ({NAME_ALLOWED})")
    assert isinstance(name, str)
    return name
