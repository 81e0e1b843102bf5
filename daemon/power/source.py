"""What every power source gives the sampler: one reading per rail, now."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["PowerSource", "RailSample", "SourceError", "read_int", "read_text"]


class SourceError(OSError):
    """The sensor could not be read at all this time (a missing rail is not an error)."""


@dataclass(frozen=True)
class RailSample:
    """One rail's reading: instantaneous watts, or a cumulative energy counter in joules.

    Sources with an energy counter (RAPL) report ``joules`` already made monotonic across
    the hardware counter's wrap-around; the sampler takes differences of it. Sources with
    a power sensor (INA3221, the Pi 5 PMIC) report ``watts`` and the sampler integrates.
    """

    watts: float | None = None
    joules: float | None = None


class PowerSource(Protocol):
    #: Short stable name, the ``source`` label of ``lorad_power_source_info``.
    name: str

    def rails(self) -> Mapping[str, RailSample]:
        """Every rail readable now; a rail that vanished is simply absent."""
        ...

    def total(self, rails: Mapping[str, float]) -> float:
        """The device's draw from the per-rail watts (without double counting sub-rails)."""
        ...


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None
