"""Power and energy of the device: one module per source, a detector, and a sampler.

Every source reads below a root directory passed in (``/sys`` by default) or through an
injected command runner, so tests feed fixture trees copied from real devices and real
captured command output. :func:`detect_source` picks the first source present;
:class:`PowerSampler` integrates its readings into energy and attributes the energy to
what the daemon was doing (idle, inference, training).
"""

from lorad.daemon.power.detect import NoSource, detect_source
from lorad.daemon.power.sampler import PHASES, EnergyTotals, PowerSampler
from lorad.daemon.power.source import PowerSource, RailSample, SourceError

__all__ = [
    "PHASES",
    "EnergyTotals",
    "NoSource",
    "PowerSampler",
    "PowerSource",
    "RailSample",
    "SourceError",
    "detect_source",
]
