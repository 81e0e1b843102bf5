"""The one adapter-name check of the trainer: the registry's rule (names become directories)."""

from __future__ import annotations

import re

from adapters.registry import NAME_RULE

__all__ = ["check_adapter_name", "is_adapter_name"]

_NAME = re.compile(NAME_RULE)


def is_adapter_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_adapter_name(name: object) -> None:
    """ValueError naming the bad name and the rule, as the registry would raise."""
    if not is_adapter_name(name):
        raise ValueError(f"adapter name must match {NAME_RULE}, got {name!r}")
