"""Pick the device's power source: the first present of Jetson hwmon, Jetson IIO, Pi 5 PMIC, RAPL.

``auto`` takes the first source present, or none (said once in the log and in
``lorad_power_source_info``). A source named explicitly is a promise the operator made:
when the machine does not have it, that is a configuration error (key ``power.source``,
naming what the machine has), never a silent ``none``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from lorad.adapters.config_types import ConfigError
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


def _probes(sys_root: Path, runner: Runner) -> dict[str, Callable[[], tuple[PowerSource | None, str]]]:
    """Per source name: a check returning (the source, "") when present, else (None, why not)."""
    hwmon, iio, rapl, pmic = Ina3221Hwmon(sys_root), Ina3221Iio(sys_root), Rapl(sys_root), VcgencmdPmic(runner)

    def present(src: Ina3221Hwmon | Ina3221Iio | Rapl, why: str) -> Callable[[], tuple[PowerSource | None, str]]:
        return lambda: (src, "") if src.present() else (None, why)

    def pi() -> tuple[PowerSource | None, str]:
        reason = pmic.probe()
        return (pmic, "") if reason is None else (None, reason)

    return {hwmon.name: present(hwmon, f"no INA3221 hwmon device under {sys_root}/bus/i2c/drivers/ina3221"),
            iio.name: present(iio, f"no INA3221 IIO device under {sys_root}/bus/i2c/drivers/ina3221x"),
            pmic.name: pi,
            rapl.name: present(rapl, f"no readable RAPL powercap zone under {sys_root}/class/powercap")}


def detect_source(
    wanted: str = "auto",
    *,
    sys_root: Path = Path("/sys"),
    runner: Runner = run_command,
) -> PowerSource | NoSource:
    """The source named by ``wanted`` (``auto``: the first present), or why there is none.

    Raises :class:`lorad.adapters.config_types.ConfigError` (key ``power.source``) when
    ``wanted`` names a source this machine does not have.
    """
    if wanted == "none":
        return NoSource("disabled by power.source: none")
    probes = _probes(sys_root, runner)
    if wanted != "auto" and wanted not in probes:
        raise ValueError(f"unknown power source {wanted!r}; allowed: auto, none, {', '.join(SOURCES)}")
    if wanted == "auto":
        why: list[str] = []
        for name in SOURCES:
            found, reason = probes[name]()
            if found is not None:
                return found
            why.append(reason)
        return NoSource("; ".join(why))
    found, reason = probes[wanted]()
    if found is not None:
        return found
    has = [name for name in SOURCES if name != wanted and probes[name]()[0] is not None]
    raise ConfigError("power.source", f"got {wanted!r}, which this machine does not have ({reason}); this machine "
                      f"has {', '.join(has) if has else 'no power source lorad can read'}; allowed: auto (the first "
                      f"present), none{''.join(', ' + n for n in has)}")
