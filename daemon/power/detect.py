"""Pick the device's power source: the first present of Jetson hwmon, Jetson IIO, Pi 5 PMIC, RAPL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from lorad.daemon.power.config import SourceName
from lorad.daemon.power.ina3221_hwmon import Ina3221Hwmon
from lorad.daemon.power.ina3221_iio import Ina3221Iio
from lorad.daemon.power.rapl import Rapl
from lorad.daemon.power.source import PowerSource
from lorad.daemon.power.vcgencmd import Runner, VcgencmdPmic, run_command

__all__ = ["NoSource", "SOURCES", "detect_source"]

#: Names accepted by ``power.source`` (besides ``auto`` and ``none``).
SOURCES: tuple[str, ...] = get_args(SourceName)


@dataclass(frozen=True)
class NoSource:
    """No power series: ``reason`` says why, in ``lorad_power_source_info`` and the log."""

    reason: str


def detect_source(
    wanted: str = "auto",
    *,
    sys_root: Path = Path("/sys"),
    runner: Runner = run_command,
) -> PowerSource | NoSource:
    """The source named by ``wanted`` (``auto``: the first present), or why there is none."""
    if wanted == "none":
        return NoSource("disabled by power.source: none")
    hwmon, iio, rapl, pmic = Ina3221Hwmon(sys_root), Ina3221Iio(sys_root), Rapl(sys_root), VcgencmdPmic(runner)
    order: Sequence[str] = SOURCES if wanted == "auto" else (wanted,)
    why: list[str] = []
    for name in order:
        if name == hwmon.name:
            if hwmon.present():
                return hwmon
            why.append("no INA3221 hwmon device")
        elif name == iio.name:
            if iio.present():
                return iio
            why.append("no INA3221 IIO device")
        elif name == pmic.name:
            reason = pmic.probe()
            if reason is None:
                return pmic
            why.append(reason)
        elif name == rapl.name:
            if rapl.present():
                return rapl
            why.append("no readable RAPL powercap zone")
        else:
            raise ValueError(f"unknown power source {name!r}; allowed: auto, none, {', '.join(SOURCES)}")
    return NoSource("; ".join(why))
