"""When training may run: a device idle enough (per adapter, the scheduler also needs
budget left and a private start test that says there are enough examples: service.py).

The device is read from ``/proc`` and ``/sys`` trees whose roots are arguments, so tests
pass fixture trees (as prometheus client_python's process collector does):

- busy: the serving request rate (from a monotonic request counter the daemon already
  keeps) and the 1-minute load average per CPU (``<proc>/loadavg``);
- power: ``<sys>/class/power_supply/*/{type,online}`` — on external power when a
  non-battery supply is online, or when the device has no battery at all (a Jetson or a
  Pi on its wall adapter reports no supply, or only a ``Mains`` one);
- battery: the lowest ``<sys>/class/power_supply/*/capacity`` (percent) of the batteries;
- heat: the hottest ``<sys>/class/thermal/thermal_zone*/temp`` (millidegrees Celsius);
- draw: the device's power in watts from an injected ``power_watts()`` callable (the
  daemon passes its power sampler's reading; the trainer does not read sensors itself).
  It bounds the whole draw, training included: a run waits between steps while the
  device draws more than the limit;
- an optional local time window.

Every check returns a :class:`Decision` with the reasons it says no, which the scheduler
shows in its status (so "why is it not training?" has an answer).
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import PolicyConfig

__all__ = ["Decision", "SystemProbe", "RateMeter", "TrainingPolicy"]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reasons: tuple[str, ...] = ()

    @staticmethod
    def of(reasons: list[str]) -> Decision:
        return Decision(not reasons, tuple(reasons))


class SystemProbe:
    """Reads load, power and temperature below ``proc_root`` and ``sys_root``."""

    def __init__(self, *, proc_root: Path = Path("/proc"), sys_root: Path = Path("/sys"),
                 cpu_count: int | None = None) -> None:
        self.proc_root = Path(proc_root)
        self.sys_root = Path(sys_root)
        self.cpu_count = cpu_count or len(os.sched_getaffinity(0)) or 1

    def load_per_cpu(self) -> float | None:
        """The 1-minute load average divided by the CPUs this process may use."""
        try:
            return float((self.proc_root / "loadavg").read_text().split()[0]) / self.cpu_count
        except (OSError, ValueError, IndexError):
            return None

    def on_external_power(self) -> bool:
        supplies = sorted((self.sys_root / "class" / "power_supply").glob("*"))
        has_battery = False
        for supply in supplies:
            kind = _read(supply / "type")
            if kind == "Battery":
                has_battery = True
            elif _read(supply / "online") == "1":
                return True
        # No battery at all: the device can only be running on external power.
        return not has_battery

    def battery_percent(self) -> float | None:
        """The lowest charge of the device's batteries; None without a battery."""
        levels = []
        for supply in sorted((self.sys_root / "class" / "power_supply").glob("*")):
            if _read(supply / "type") != "Battery":
                continue
            try:
                levels.append(float(_read(supply / "capacity") or ""))
            except ValueError:
                continue
        return min(levels) if levels else None

    def max_temperature_c(self) -> float | None:
        temps = []
        for zone in (self.sys_root / "class" / "thermal").glob("thermal_zone*"):
            try:
                temps.append(int(_read(zone / "temp") or "") / 1000.0)
            except ValueError:
                continue  # a zone whose sensor cannot be read right now
        return max(temps) if temps else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


class RateMeter:
    """Events per second from a monotonic counter, over the time since the previous call
    (at least ``min_window_s``, so back-to-back calls do not divide by ~0)."""

    def __init__(self, counter: Callable[[], float], *, clock: Callable[[], float] = time.monotonic,
                 min_window_s: float = 5.0) -> None:
        self._counter = counter
        self._clock = clock
        self._min_window = min_window_s
        self._lock = threading.Lock()
        self._last = (clock(), counter())
        self._rate = 0.0

    def __call__(self) -> float:
        with self._lock:
            now, count = self._clock(), self._counter()
            then, before = self._last
            if now - then >= self._min_window:
                self._rate = max(0.0, count - before) / (now - then)
                self._last = (now, count)
            return self._rate


class TrainingPolicy:
    """The scheduler's rules, as pure-ish checks over the probe and the clock."""

    def __init__(
        self,
        config: PolicyConfig,
        *,
        probe: SystemProbe,
        request_rate: Callable[[], float] = lambda: 0.0,
        power_watts: Callable[[], float | None] = lambda: None,
        now: Callable[[], datetime.datetime] = datetime.datetime.now,
    ) -> None:
        self.config = config
        self._probe = probe
        self._request_rate = request_rate
        self._power_watts = power_watts
        self._now = now

    def device(self) -> Decision:
        """May the device train now (idle, window, power, heat)?"""
        c = self.config
        reasons = []
        if c.time_window is not None and not _in_window(self._now(), c.time_window):
            start, end = c.time_window
            reasons.append(f"outside the time window {start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}")
        rate = self._request_rate()
        if rate > c.max_requests_per_s:
            reasons.append(f"serving {rate:.1f} requests/s (limit {c.max_requests_per_s:g})")
        load = self._probe.load_per_cpu()
        if load is not None and load > c.max_load_per_cpu:
            reasons.append(f"load average {load:.2f} per CPU (limit {c.max_load_per_cpu:g})")
        if c.require_external_power and not self._probe.on_external_power():
            reasons.append("on battery (policy requires external power)")
        if c.max_temperature_c is not None:
            temp = self._probe.max_temperature_c()
            if temp is not None and temp > c.max_temperature_c:
                reasons.append(f"temperature {temp:.1f} °C (limit {c.max_temperature_c:g} °C)")
        if c.max_power_watts is not None:
            watts = self._power_watts()
            if watts is not None and watts > c.max_power_watts:
                reasons.append(f"drawing {watts:.1f} W (limit {c.max_power_watts:g} W)")
        if c.min_battery_percent is not None:
            level = self._probe.battery_percent()
            if level is not None and level < c.min_battery_percent:
                reasons.append(f"battery at {level:g} % (needs {c.min_battery_percent:g} %)")
        return Decision.of(reasons)


    def time_left_s(self) -> float | None:
        """Seconds until the time window closes (None: no window, or outside it)."""
        window = self.config.time_window
        now = self._now()
        if window is None or not _in_window(now, window):
            return None
        minute = now.hour * 60 + now.minute + now.second / 60.0
        return ((window[1] - minute) % (24 * 60)) * 60.0

    def slowdown(self) -> float:
        """How much slower than measured a step will run now: training runs niced, so it
        gets about 1 / (1 + load) of a CPU while the rest of the device keeps the CPUs busy."""
        load = self._probe.load_per_cpu()
        return 1.0 + max(0.0, load or 0.0)


def _in_window(now: datetime.datetime, window: tuple[int, int]) -> bool:
    minute = now.hour * 60 + now.minute
    start, end = window
    return start <= minute < end if start < end else (minute >= start or minute < end)
