"""JSON that arrives from outside (the broker, another device): bounded, then typed.

:func:`loads` bounds the size and the nesting depth (a hostile ``[[[[...`` is refused as a
bad message, never a RecursionError in the thread that reads it); the readers below check
one field each. Pure functions: every problem is a ValueError whose message names the
field and says what it holds (:func:`describe`: its type and at most a few characters,
never the whole of a hostile value) and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lorad.adapters.bounded_json import loads_bounded
from lorad.adapters.names import NAME_ALLOWED, is_name

__all__ = ["MAX_DEPTH", "loads", "describe", "mapping", "integer", "number", "string", "name", "scalars"]

#: Deepest nesting accepted in any message (lorad's own go three levels deep).
MAX_DEPTH = 16
_SHOWN = 24


def describe(value: object) -> str:
    """A short account of ``value`` for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {str(value).lower()}"
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"{type(value).__name__} {text if len(text) <= _SHOWN else text[:_SHOWN] + '...'}"
    if isinstance(value, str):
        shown = value[:_SHOWN].encode("unicode_escape").decode("ascii")
        return f"str {shown!r}{'...' if len(value) > _SHOWN else ''}"
    if isinstance(value, Mapping):
        return f"a mapping of {len(value)}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return type(value).__name__


def loads(data: bytes, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """``data`` decoded as JSON, or ValueError: over ``max_bytes``, not JSON, too deep
    (the one bounded decoder, :mod:`lorad.adapters.bounded_json`, measures the nesting
    before parsing)."""
    if len(data) > max_bytes:
        raise ValueError(f"{what} of {len(data)} bytes exceeds {max_bytes}")
    return loads_bounded(data, what=what, max_depth=max_depth)


def mapping(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {describe(value)}")
    return value


def integer(value: object, where: str, *, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: expected an integer, got {describe(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: expected an integer >= {minimum}, got {describe(value)}")
    return value


def number(value: object, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{where}: expected a number, got {describe(value)}")
    return float(value)


def string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {describe(value)}")
    return value


def name(value: object, where: str) -> str:
    """A device, group or adapter name (:data:`lorad.adapters.names.NAME_RULE`)."""
    if not is_name(value):
        raise ValueError(f"{where}: expected a name ({NAME_ALLOWED}), got {describe(value)}")
    assert isinstance(value, str)
    return value


def scalars(value: object, where: str, typed: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    """A flat mapping: every value a string, number, bool or null; keys in ``typed`` of those types
    (``int`` never admits a bool)."""
    d = mapping(value, where)
    for k, v in d.items():
        kinds = typed.get(k, (str, int, float, bool, type(None)))
        ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
        if isinstance(v, float) and math.isnan(v):
            ok = False
        if not ok:
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in kinds)
            raise ValueError(f"{where}.{k}: expected {allowed}, got {describe(v)}")
    return d
