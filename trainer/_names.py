"""The trainer's adapter-name check: :mod:`lorad.adapters.names`' rule (names become directories)."""

from __future__ import annotations

from lorad.adapters.names import NAME_RULE, is_name

__all__ = ["check_adapter_name", "is_adapter_name"]


def is_adapter_name(name: object) -> bool:
    return is_name(name)


def check_adapter_name(name: object) -> None:
    """ValueError naming the bad name and the rule, as the registry would raise."""
    if not is_name(name):
        raise ValueError(f"adapter name must match {NAME_RULE}, got {name!r}")
