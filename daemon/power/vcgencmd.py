"""Raspberry Pi 5 power from the PMIC's ADC: ``vcgencmd pmic_read_adc``.

Output (one line per reading; current and voltage channels have different indices, so
rails are paired by name)::

      VDD_CORE_A current(7)=6.22421000A
      VDD_CORE_V volt(15)=0.86173300V
         EXT5V_V volt(24)=5.09066000V      (no current: not a rail)

A rail is a name with both a current and a voltage; the total is the sum of the rails.
That sum is what the PMIC's regulators deliver, not the wall draw: USB peripherals and
conversion losses are not in it.

The Pi 4 and earlier have no PMIC ADC: ``vcgencmd measure_volts`` gives voltages only
and there is no current sensor, so lorad reports no power source there (the info metric
says why) instead of inventing a figure.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping, Sequence

from lorad.daemon.power.source import RailSample, SourceError

__all__ = ["Runner", "VcgencmdPmic", "parse_pmic_read_adc", "run_command"]

#: Runs a command, returns its standard output; raises OSError / CalledProcessError.
Runner = Callable[[Sequence[str]], str]

_LINE_RE = re.compile(r"^\s*(\S+)_([AV])\s+(current|volt)\(\d+\)=([0-9.eE+-]+|nan)[AV]\s*$")
_COMMAND = ("vcgencmd", "pmic_read_adc")


def run_command(argv: Sequence[str]) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True, timeout=5).stdout


def parse_pmic_read_adc(text: str) -> dict[str, float]:
    """Rail name → watts, for each rail that has both a current and a voltage line."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE_RE.match(line)
        if m is None:
            continue
        rail, unit, _, value = m.groups()
        try:
            x = float(value)
        except ValueError:
            continue
        if x != x:  # nan: the ADC had no reading
            continue
        (amps if unit == "A" else volts)[rail] = x
    return {rail: amps[rail] * volts[rail] for rail in sorted(amps) if rail in volts}


class VcgencmdPmic:
    name = "rpi5-pmic"

    def __init__(self, runner: Runner = run_command) -> None:
        self._run = runner

    def probe(self) -> str | None:
        """None when the PMIC answers with rails; else why not (for the info metric)."""
        try:
            text = self._run(_COMMAND)
        except FileNotFoundError:
            return "no vcgencmd"
        except (OSError, subprocess.SubprocessError) as e:
            return f"vcgencmd pmic_read_adc failed ({type(e).__name__}): not a Raspberry Pi 5"
        if not parse_pmic_read_adc(text):
            return "vcgencmd pmic_read_adc reports no current readings (Raspberry Pi 4 or earlier: voltages only)"
        return None

    def rails(self) -> Mapping[str, RailSample]:
        try:
            text = self._run(_COMMAND)
        except (OSError, subprocess.SubprocessError) as e:
            raise SourceError(f"vcgencmd pmic_read_adc failed: {e}") from e
        return {rail: RailSample(watts=w) for rail, w in parse_pmic_read_adc(text).items()}

    def total(self, rails: Mapping[str, float]) -> float:
        return sum(rails.values())
