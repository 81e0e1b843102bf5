"""x86 RAPL energy counters through the powercap class (``intel-rapl`` zones).

Layout::

    <sys>/class/powercap/intel-rapl:<P>/         a package (or ``psys``, the platform)
        name                  package-0, psys, ...
        energy_uj             cumulative µJ, wraps to 0 after max_energy_range_uj
        max_energy_range_uj
    <sys>/class/powercap/intel-rapl:<P>:<S>/     a sub-zone (core, uncore, dram)

The counter wraps (at ~2^32 µJ on many CPUs: minutes at full load), so each read
extends it into a monotonic joule count: a value below the previous one means one wrap.
Sampling faster than one wrap period is the sampler's job (its interval is seconds).
The total is ``psys`` when present (it covers the packages), else the packages' sum;
sub-zones are parts of their package and never added.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

from lorad.daemon.power.source import RailSample, read_int, read_text

__all__ = ["Rapl"]


class Rapl:
    name = "rapl"

    def __init__(self, sys_root: Path = Path("/sys")) -> None:
        self._root = Path(sys_root) / "class" / "powercap"
        self._lock = threading.Lock()
        # zone dir name -> (last raw µJ, wraps seen, range µJ)
        self._state: dict[str, tuple[int, int, int]] = {}
        self._top: set[str] = set()

    def _zones(self) -> list[Path]:
        return sorted(p for p in self._root.glob("intel-rapl:*") if (p / "energy_uj").exists())

    def present(self) -> bool:
        return any(read_int(z / "energy_uj") is not None for z in self._zones())

    def rails(self) -> Mapping[str, RailSample]:
        out: dict[str, RailSample] = {}
        with self._lock:
            for zone in self._zones():
                raw = read_int(zone / "energy_uj")
                span = read_int(zone / "max_energy_range_uj")
                if raw is None or span is None or span <= 0:
                    continue  # unreadable (energy_uj is root-only on newer kernels) or gone
                name = read_text(zone / "name") or zone.name
                top = zone.name.count(":") == 1
                if not top:
                    parent = read_text(zone.parent / zone.name.rsplit(":", 1)[0] / "name")
                    name = f"{parent}/{name}" if parent else f"{zone.name}/{name}"
                last = self._state.get(zone.name)
                wraps = 0
                if last is not None:
                    before, wraps, _ = last
                    if raw < before:
                        wraps += 1
                self._state[zone.name] = (raw, wraps, span)
                if top:
                    self._top.add(name)
                out[name] = RailSample(joules=(raw + wraps * span) / 1e6)
        return out

    def total(self, rails: Mapping[str, float]) -> float:
        with self._lock:
            top = {n: w for n, w in rails.items() if n in self._top}
        platform = [w for n, w in top.items() if n.startswith("psys")]
        return sum(platform) if platform else sum(top.values())
