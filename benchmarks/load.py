"""The machine's load around a benchmark run, and whether its goal verdicts may be printed.

On these 2-core machines a parallel job turned a 50 ms forward into seconds: a figure taken
under load says nothing about a goal. Every benchmark that judges goals seals its result with
:meth:`LoadWatch.seal`: the 1-minute load average before and after goes into ``loadavg``,
and when either exceeded :data:`MAX_LOAD_PER_CORE` per core the figures are still printed
but every verdict (a boolean under ``goals``/``goals_met``) becomes null, with
``verdicts_withheld`` saying why. The benchmark's own processes count too: a benchmark that
needs more than 1.5 busy cores of its own cannot judge its goals on this machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_LOAD_PER_CORE", "LoadWatch"]

#: The load per core above which a run's goal verdicts are withheld.
MAX_LOAD_PER_CORE = 1.5


def _without_verdicts(value: Any) -> Any:
    """``value`` with every boolean (a verdict) replaced by None, numbers and text kept."""
    if isinstance(value, bool):
        return None
    if isinstance(value, dict):
        return {k: _without_verdicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_verdicts(v) for v in value]
    return value


@dataclass
class LoadWatch:
    """Made when a benchmark starts (it records the load then); :meth:`seal` at the end."""

    before: tuple[float, float, float] = field(default_factory=os.getloadavg)

    def seal(self, result: dict[str, Any], *, verdicts: Sequence[str] = ("goals", "goals_met"),
             after: tuple[float, float, float] | None = None, cores: int | None = None) -> dict[str, Any]:
        """Add ``loadavg`` and ``verdicts_withheld`` to ``result`` (in place, returned); null
        the verdicts under the keys ``verdicts`` when the load was too high."""
        after = os.getloadavg() if after is None else after
        cores = cores or os.cpu_count() or 1
        per_core = max(self.before[0], after[0]) / cores
        earlier = result.get("loadavg")
        loadavg: dict[str, Any] = earlier if isinstance(earlier, dict) else {}
        result["loadavg"] = {**loadavg, "before": [round(x, 2) for x in self.before],
                             "after": [round(x, 2) for x in after], "cores": cores,
                             "max_1min_per_core": round(per_core, 2)}
        withheld = None
        if per_core > MAX_LOAD_PER_CORE:
            withheld = (f"the 1-minute load average reached {per_core * cores:.2f} on {cores} cores "
                        f"({per_core:.2f} per core, above {MAX_LOAD_PER_CORE}): figures printed, goal verdicts not")
            for key in verdicts:
                if key in result:
                    result[key] = _without_verdicts(result[key])
        result["verdicts_withheld"] = withheld
        return result
