"""The ``power:`` section: which power source the daemon samples, how often, and the limit.

Owned here, beside the sources it names; :mod:`lorad.daemon.config` only composes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from lorad.adapters.config_types import ConfigModel, ConfigPath

__all__ = ["PowerConfig", "SourceName"]

#: Names of the sources (:data:`lorad.daemon.power.detect.SOURCES`, in detection order).
SourceName = Literal["jetson-ina3221-hwmon", "jetson-ina3221-iio", "rpi5-pmic", "rapl"]


class PowerConfig(ConfigModel):
    """Power and energy (daemon/power): which source, how often it is sampled."""

    config_key = "power"

    source: Literal["auto", "none", SourceName] = Field(
        "auto", description="Power source: auto (the first present of jetson-ina3221-hwmon, jetson-ina3221-iio, "
                            "rpi5-pmic, rapl), none (no power series), or one of those names.")
    sample_interval_s: float = Field(1.0, ge=0.05, le=3600.0, description="Seconds between power samples; energy "
                                                                          "is integrated over them.")
    sys_root: ConfigPath = Field(Path("/sys"), description="Root of the sysfs tree the sources read (relative: from "
                                                           "the config file's directory; tests pass a fixture tree).")
    limit_watts: float | None = Field(None, ge=0.0, description="Exported as lorad_power_limit_watts for the "
                                                                "'power above limit' alert, W; null: no limit.")
