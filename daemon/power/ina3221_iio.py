"""Jetson INA3221 power monitor through IIO (JetPack 4, NVIDIA's ``ina3221x`` driver).

Layout (L4T 32, e.g. Nano, TX2, Xavier on JetPack 4)::

    <sys>/bus/i2c/drivers/ina3221x/<bus>-<addr>/iio:device<N>/
        rail_name_<K>       POM_5V_IN, POM_5V_GPU, POM_5V_CPU ... (channel 0-2)
        in_power<K>_input   mW
        in_current<K>_input mA, in_voltage<K>_input mV

The driver computes the power itself, so ``in_power<K>_input`` is read directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lorad.daemon.power.ina3221_hwmon import input_rail_total
from lorad.daemon.power.source import RailSample, read_int, read_text

__all__ = ["Ina3221Iio"]


class Ina3221Iio:
    name = "jetson-ina3221-iio"

    def __init__(self, sys_root: Path = Path("/sys")) -> None:
        self._driver = Path(sys_root) / "bus" / "i2c" / "drivers" / "ina3221x"

    def _dirs(self) -> list[Path]:
        return sorted(self._driver.glob("*/iio:device*"))

    def present(self) -> bool:
        return any(self._dirs())

    def rails(self) -> Mapping[str, RailSample]:
        out: dict[str, RailSample] = {}
        for d in self._dirs():
            for power_file in sorted(d.glob("in_power*_input")):
                k = power_file.name[len("in_power"):-len("_input")]
                mw = read_int(power_file)
                if mw is None:
                    continue
                label = read_text(d / f"rail_name_{k}") or f"{d.name}_power{k}"
                if label in out:
                    label = f"{label}@{d.parent.name}"
                out[label] = RailSample(watts=mw / 1e3)
        return out

    def total(self, rails: Mapping[str, float]) -> float:
        return input_rail_total(rails)
