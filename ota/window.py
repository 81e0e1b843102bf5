"""Maintenance windows: when a device may install an update (device local time). Pure.

A window is one or more ranges, each ``[DAYS ]HH:MM-HH:MM``: ``01:00-05:00`` every day,
``Mon-Fri 22:00-06:00`` (a range past midnight belongs to the day it starts on),
``Sat,Sun 00:00-24:00``. An update that arrives outside the window is downloaded and
verified, then installed when the window next opens.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TimeRange", "InstallWindow"]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE_RE = re.compile(r"^(?:(?P<days>[A-Za-z,-]+)\s+)?(?P<h1>\d{1,2}):(?P<m1>\d{2})\s*-\s*(?P<h2>\d{1,2}):(?P<m2>\d{2})$")
_FORMAT = "'[DAYS ]HH:MM-HH:MM', DAYS like Mon-Fri or Sat,Sun"


def _days(spec: str) -> frozenset[int]:
    out: set[int] = set()
    for part in spec.lower().split(","):
        lo, _, hi = part.partition("-")
        if lo[:3] not in _DAYS or (hi and hi[:3] not in _DAYS):
            raise ValueError(f"day {part!r}: expected names from {', '.join(d.title() for d in _DAYS)}")
        a, b = _DAYS.index(lo[:3]), _DAYS.index((hi or lo)[:3])
        out.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(out)


@dataclass(frozen=True)
class TimeRange:
    """Minutes since midnight [start, end) on the given weekdays (0 = Monday)."""

    start: int
    end: int
    days: frozenset[int] = frozenset(range(7))

    def __post_init__(self) -> None:
        if not (0 <= self.start < 1440 and 0 < self.end <= 1440) or self.start == self.end:
            raise ValueError(f"time range {self.start}-{self.end} minutes: start 0..1439, end 1..1440, not equal")
        if not self.days or not self.days <= frozenset(range(7)):
            raise ValueError(f"time range needs weekdays 0..6, got {sorted(self.days)}")

    @classmethod
    def parse(cls, spec: str) -> TimeRange:
        m = _RANGE_RE.match(spec.strip())
        if m is None:
            raise ValueError(f"install window {spec!r}: expected {_FORMAT}")
        h1, m1, h2, m2 = (int(m[k]) for k in ("h1", "m1", "h2", "m2"))
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            raise ValueError(f"install window {spec!r}: hours 00..24, minutes 00..59")
        try:
            # An end of 00:00 is the midnight that closes the day (22:00-00:00 is 22:00-24:00).
            return cls(h1 * 60 + m1, h2 * 60 + m2 or 1440, _days(m["days"]) if m["days"] else frozenset(range(7)))
        except ValueError as e:
            raise ValueError(f"install window {spec!r}: {e}") from e

    def _opens(self, day: datetime.date, tz: datetime.tzinfo | None) -> tuple[datetime.datetime, datetime.datetime]:
        start = datetime.datetime.combine(day, datetime.time(), tz) + datetime.timedelta(minutes=self.start)
        length = (self.end - self.start) % 1440 or 1440
        return start, start + datetime.timedelta(minutes=length)

    def span_at(self, now: datetime.datetime) -> tuple[datetime.datetime, datetime.datetime] | None:
        """The (start, end) of the first opening that ends after ``now``, within a week."""
        for offset in range(-1, 8):
            day = now.date() + datetime.timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            start, end = self._opens(day, now.tzinfo)
            if end > now:
                return start, end
        return None


@dataclass(frozen=True)
class InstallWindow:
    """Installs happen only inside one of ``ranges`` (device local time)."""

    ranges: tuple[TimeRange, ...]

    def __post_init__(self) -> None:
        if not self.ranges:
            raise ValueError("an install window needs at least one time range")

    @classmethod
    def parse(cls, specs: str | Sequence[str]) -> InstallWindow:
        items = [specs] if isinstance(specs, str) else list(specs)
        return cls(tuple(TimeRange.parse(s) for s in items))

    def is_open(self, now: datetime.datetime) -> bool:
        return any((s := r.span_at(now)) is not None and s[0] <= now for r in self.ranges)

    def next_open(self, now: datetime.datetime) -> datetime.datetime:
        """``now`` if the window is open, else when it opens next."""
        spans = [s for r in self.ranges if (s := r.span_at(now)) is not None]
        if any(start <= now for start, _ in spans):
            return now
        return min(start for start, _ in spans)
