"""Jetson INA3221 power monitor through hwmon (JetPack 5 and later, upstream ``ina3221`` driver).

Layout (L4T 35/36, e.g. Orin and Xavier NX on JetPack 5)::

    <sys>/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon<N>/
        in<K>_label   VDD_IN, VDD_CPU_GPU_CV, VDD_SOC ... (channel 1-3)
        in<K>_input   bus voltage, mV
        curr<K>_input current, mA
        in7_label     "sum of shunt voltages" (no curr7: not a rail)

A rail is a channel with a label, a voltage and a current; watts = mV × mA / 1e6.
``VDD_IN`` (or an input rail such as ``5V_IN``/``POM_5V_IN``) is the whole module's draw;
the other channels are parts of it, so the total is the input rail when there is one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from lorad.daemon.power.source import RailSample, read_int, read_text

__all__ = ["Ina3221Hwmon", "input_rail_total"]

_INPUT_RE = re.compile(r"^(VDD_IN|(POM_)?5V_IN|VIN|SYS5V_IN)$")


def input_rail_total(rails: Mapping[str, float]) -> float:
    """The input rail's watts when one is present, else the sum of the rails."""
    inputs = [w for name, w in rails.items() if _INPUT_RE.match(name)]
    return sum(inputs) if inputs else sum(rails.values())


class Ina3221Hwmon:
    name = "jetson-ina3221-hwmon"

    def __init__(self, sys_root: Path = Path("/sys")) -> None:
        self._driver = Path(sys_root) / "bus" / "i2c" / "drivers" / "ina3221"

    def present(self) -> bool:
        return any(self._dirs())

    def _dirs(self) -> list[Path]:
        return sorted(self._driver.glob("*/hwmon/hwmon*"))

    def rails(self) -> Mapping[str, RailSample]:
        out: dict[str, RailSample] = {}
        dirs = self._dirs()
        for d in dirs:
            for label_file in sorted(d.glob("in*_label")):
                k = label_file.name[2:-len("_label")]
                label = read_text(label_file)
                mv, ma = read_int(d / f"in{k}_input"), read_int(d / f"curr{k}_input")
                if not label or mv is None or ma is None:
                    continue  # not a rail (the shunt sum) or unreadable right now
                if label in out and len(dirs) > 1:
                    label = f"{label}@{d.parent.parent.name}"
                out[label] = RailSample(watts=mv * ma / 1e6)
        return out

    def total(self, rails: Mapping[str, float]) -> float:
        return input_rail_total(rails)
