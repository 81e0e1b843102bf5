"""daemon.power: each source on a fixture tree copied from a real device, and the sampler's
energy integration checked exactly against a synthetic power curve."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from lorad.adapters.config_types import ConfigError
from lorad.daemon.power import NoSource, PowerSampler, RailSample, SourceError, detect_source
from lorad.daemon.power.ina3221_hwmon import Ina3221Hwmon
from lorad.daemon.power.ina3221_iio import Ina3221Iio
from lorad.daemon.power.rapl import Rapl
from lorad.daemon.power.vcgencmd import VcgencmdPmic, parse_pmic_read_adc

FIXTURES = Path(__file__).parent / "power_fixtures"
PI5_OUTPUT = (FIXTURES / "rpi5-pmic_read_adc.txt").read_text()


def _tree(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(FIXTURES / name / "sys", root)
    return root


def _no_vcgencmd(argv: Sequence[str]) -> str:
    raise FileNotFoundError(argv[0])


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------- sources


def test_jetson_hwmon_rails_are_mv_times_ma(tmp_path: Path) -> None:
    root = _tree(tmp_path, "orin-nano-jp5")
    src = detect_source(sys_root=root, runner=_no_vcgencmd)
    assert isinstance(src, Ina3221Hwmon)
    rails = {k: v.watts for k, v in src.rails().items()}
    # in7 "sum of shunt voltages" has no current: not a rail
    assert rails == pytest.approx({"VDD_IN": 5.064 * 1.216, "VDD_CPU_GPU_CV": 5.064 * 0.248, "VDD_SOC": 5.064 * 0.336})
    # VDD_IN is the module's input; the others are parts of it and are not added again
    assert src.total(rails) == pytest.approx(5.064 * 1.216)


def test_jetson_iio_reads_milliwatts_with_rail_names(tmp_path: Path) -> None:
    root = _tree(tmp_path, "nano-jp4")
    src = detect_source(sys_root=root, runner=_no_vcgencmd)
    assert isinstance(src, Ina3221Iio)
    rails = {k: v.watts for k, v in src.rails().items()}
    assert rails == {"POM_5V_IN": 2.95, "POM_5V_GPU": 0.12, "POM_5V_CPU": 0.87}
    assert src.total(rails) == 2.95


def test_pi5_pmic_sums_rails_paired_by_name() -> None:
    rails = parse_pmic_read_adc(PI5_OUTPUT)
    assert "EXT5V" not in rails and "BATT" not in rails  # voltages without a current
    assert len(rails) == 12
    assert rails["VDD_CORE"] == pytest.approx(6.22421 * 0.861733)
    src = detect_source(sys_root=Path("/nonexistent"), runner=lambda argv: PI5_OUTPUT)
    assert isinstance(src, VcgencmdPmic)
    watts = {k: v.watts or 0.0 for k, v in src.rails().items()}
    assert src.total(watts) == pytest.approx(sum(rails.values()))
    assert 7.0 < src.total(watts) < 8.0


def test_pi4_has_no_power_source_and_says_why(tmp_path: Path) -> None:
    def pi4(argv: Sequence[str]) -> str:  # firmware without the PMIC ADC command
        raise subprocess.CalledProcessError(255, list(argv))

    got = detect_source(sys_root=tmp_path, runner=pi4)
    assert isinstance(got, NoSource)
    assert "not a Raspberry Pi 5" in got.reason and "RAPL" in got.reason
    # a firmware that answers but has no current channels: voltages only
    got = detect_source(sys_root=tmp_path, runner=lambda argv: "EXT5V_V volt(24)=5.09066000V\n")
    assert isinstance(got, NoSource) and "voltages only" in got.reason
    # asked for by name, that is a configuration error saying why
    with pytest.raises(ConfigError, match=r"^power\.source: got 'rpi5-pmic', which this machine does not have "
                                          r"\(.*voltages only\)"):
        detect_source("rpi5-pmic", sys_root=tmp_path, runner=lambda argv: "EXT5V_V volt(24)=5.09066000V\n")


def test_rapl_counter_wraps_into_a_monotonic_count(tmp_path: Path) -> None:
    root = _tree(tmp_path, "x86-rapl")
    src = detect_source(sys_root=root, runner=_no_vcgencmd)
    assert isinstance(src, Rapl)
    first = src.rails()
    assert set(first) == {"package-0", "package-0/core", "package-0/uncore", "psys"}
    pkg = root / "class/powercap/intel-rapl:0/energy_uj"
    pkg.write_text("262143000000\n")  # 328850 µJ below the range
    src.rails()
    pkg.write_text("671150\n")  # wrapped: 328850 + 671150 µJ = 1 J later
    after = src.rails()
    assert after["package-0"].joules is not None
    assert after["package-0"].joules - (262143000000 / 1e6) == pytest.approx(1.0)
    # psys covers the packages: the total is psys alone
    assert src.total({"package-0": 10.0, "package-0/core": 6.0, "psys": 14.0}) == 14.0
    assert src.total({"package-0": 10.0, "package-0/core": 6.0}) == 10.0


def test_no_source_at_all(tmp_path: Path) -> None:
    got = detect_source(sys_root=tmp_path, runner=_no_vcgencmd)
    assert isinstance(got, NoSource)
    assert "no INA3221 hwmon device" in got.reason and "no vcgencmd" in got.reason
    assert detect_source("none", sys_root=tmp_path) == NoSource("disabled by power.source: none")
    with pytest.raises(ValueError, match="allowed: auto, none"):
        detect_source("bogus", sys_root=tmp_path)


def test_an_explicit_source_the_machine_lacks_is_a_config_error_naming_what_it_has(tmp_path: Path) -> None:
    """power.source: rapl on a machine without RAPL stops the start (never a silent none);
    the error names the key, why the source is not there and the sources the machine has."""
    with pytest.raises(ConfigError) as e:
        detect_source("rapl", sys_root=tmp_path, runner=_no_vcgencmd)
    assert e.value.key == "power.source"
    assert str(e.value) == (f"power.source: got 'rapl', which this machine does not have (no readable RAPL "
                            f"powercap zone under {tmp_path}/class/powercap); this machine has no power source "
                            "lorad can read; allowed: auto (the first present), none")
    jetson = _tree(tmp_path, "orin-nano-jp5")
    with pytest.raises(ConfigError, match=r"this machine has jetson-ina3221-hwmon; allowed: auto \(the first "
                                          r"present\), none, jetson-ina3221-hwmon$"):
        detect_source("rapl", sys_root=jetson, runner=_no_vcgencmd)
    # named and present: that source; auto on the bare machine: none, and why
    assert isinstance(detect_source("jetson-ina3221-hwmon", sys_root=jetson, runner=_no_vcgencmd), Ina3221Hwmon)
    assert isinstance(detect_source("rapl", sys_root=_tree(tmp_path, "x86-rapl"), runner=_no_vcgencmd), Rapl)
    assert isinstance(detect_source("auto", sys_root=tmp_path / "bare", runner=_no_vcgencmd), NoSource)


# ---------------------------------------------------------------- sampler


class Curve:
    """A piecewise-linear power curve sampled at its knots: the trapezoid rule is exact."""

    name = "synthetic"

    def __init__(self, clock: Clock, knots: list[tuple[float, float]]) -> None:
        self.clock, self.knots = clock, knots

    def watts(self, t: float) -> float:
        for (t0, p0), (t1, p1) in itertools.pairwise(self.knots):
            if t0 <= t <= t1:
                return p0 + (p1 - p0) * (t - t0) / (t1 - t0)
        raise AssertionError(t)

    def rails(self) -> Mapping[str, RailSample]:
        return {"VDD_IN": RailSample(watts=self.watts(self.clock.t))}

    def total(self, rails: Mapping[str, float]) -> float:
        return sum(rails.values())


def test_energy_is_the_exact_integral_of_the_power_curve() -> None:
    clock = Clock()
    t0 = clock.t
    # 2 W for 4 s, ramp to 10 W over 2 s, 10 W for 2 s, down to 0 W over 8 s
    knots = [(t0, 2.0), (t0 + 4, 2.0), (t0 + 6, 10.0), (t0 + 8, 10.0), (t0 + 16, 0.0)]
    curve = Curve(clock, knots)
    training = [False]
    busy = {"adapter": 0.0, "base": 0.0}
    s = PowerSampler(curve, interval_s=1.0, clock=clock, training_active=lambda: training[0],
                     inference_busy_s=lambda: dict(busy))
    expected = 2 * 4 + (2 + 10) / 2 * 2 + 10 * 2 + 10 / 2 * 8  # = 8 + 12 + 20 + 40 = 80 J
    for step in range(17):
        clock.t = t0 + step
        if step == 6:
            training[0] = True  # the intervals ending at 6, 7 and 8 s go to training
        if step == 9:
            training[0] = False
        if step == 12:
            busy["adapter"] += 0.25  # a quarter of 11..12 s answering an adapter request
            busy["base"] += 0.25
        s.sample()
    t = s.totals()
    assert t.rail_joules == {"VDD_IN": expected}
    assert sum(t.phase_joules.values()) == expected
    # intervals ending at 6, 7 and 8 s: 5..6 s ramps 6 → 10 W, then 10 W twice
    assert t.phase_joules["training"] == (6.0 + 10.0) / 2 + 10.0 + 10.0
    interval_11_12 = (6.25 + 5.0) / 2  # P(11) = 6.25 W, P(12) = 5 W on the 10 → 0 W ramp
    assert t.phase_joules["inference"] == interval_11_12 * 0.5
    assert t.inference_joules == {"adapter": interval_11_12 * 0.25, "base": interval_11_12 * 0.25}
    assert t.total_watts == 0.0 and s.total_watts() == 0.0


class Flaky:
    """A source whose second rail disappears and comes back, and which can fail outright."""

    name = "flaky"

    def __init__(self) -> None:
        self.rails_now: dict[str, float] = {"A": 1.0, "B": 2.0}
        self.fail = False

    def rails(self) -> Mapping[str, RailSample]:
        if self.fail:
            raise SourceError("i2c read failed")
        return {k: RailSample(watts=v) for k, v in self.rails_now.items()}

    def total(self, rails: Mapping[str, float]) -> float:
        return sum(rails.values())


def test_a_rail_that_disappears_keeps_its_energy_and_the_gap_is_not_guessed(caplog: pytest.LogCaptureFixture) -> None:
    clock, src = Clock(), Flaky()
    s = PowerSampler(src, interval_s=1.0, clock=clock)
    s.sample()
    clock.t += 1
    s.sample()  # A 1 J, B 2 J
    del src.rails_now["B"]
    clock.t += 1
    s.sample()
    t = s.totals()
    assert t.rail_joules == {"A": 2.0, "B": 2.0} and t.watts == {"A": 1.0}
    assert sum("rail B of flaky disappeared" in r.message for r in caplog.records) == 1
    clock.t += 1
    s.sample()
    src.rails_now["B"] = 2.0
    clock.t += 1
    s.sample()  # B is back: no energy for the gap, integration restarts here
    clock.t += 1
    s.sample()
    assert s.totals().rail_joules == {"A": 5.0, "B": 4.0}
    src.fail = True
    clock.t += 1
    s.sample()
    s.sample()
    assert s.totals().errors == 2 and s.total_watts() is None
    assert sum("cannot be read" in r.message for r in caplog.records) == 1
    src.fail = False
    clock.t += 10
    s.sample()
    clock.t += 1
    s.sample()  # the 10 s while unreadable are not integrated
    assert s.totals().rail_joules == {"A": 6.0, "B": 6.0}


def test_rapl_energy_through_the_sampler_is_monotonic_across_a_wrap(tmp_path: Path) -> None:
    root = _tree(tmp_path, "x86-rapl")
    clock = Clock()
    s = PowerSampler(Rapl(root), interval_s=1.0, clock=clock)
    pkg = root / "class/powercap/intel-rapl:0/energy_uj"
    psys = root / "class/powercap/intel-rapl:1/energy_uj"
    pkg.write_text("262142000000\n")
    psys.write_text("1000000\n")
    s.sample()
    clock.t += 2
    pkg.write_text("671150\n")  # wrapped: 1328850 µJ to the range, then 671150 µJ
    psys.write_text("5000000\n")
    s.sample()
    t = s.totals()
    assert t.rail_joules["package-0"] == pytest.approx(2.0)
    assert t.watts["package-0"] == pytest.approx(1.0)
    assert t.total_watts == pytest.approx(2.0)  # psys: 4 J over 2 s
    assert t.phase_joules["idle"] == pytest.approx(4.0)


def test_a_jetson_rail_that_disappears_from_the_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path, "orin-nano-jp5")
    hwmon = root / "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    clock = Clock()
    s = PowerSampler(Ina3221Hwmon(root), interval_s=1.0, clock=clock)
    s.sample()
    clock.t += 2
    s.sample()
    soc = 5.064 * 0.336
    assert s.totals().rail_joules["VDD_SOC"] == pytest.approx(2 * soc)
    (hwmon / "curr3_input").unlink()  # the channel's current can no longer be read
    clock.t += 2
    s.sample()
    t = s.totals()
    assert "VDD_SOC" not in t.watts and t.rail_joules["VDD_SOC"] == pytest.approx(2 * soc)
    assert t.rail_joules["VDD_IN"] == pytest.approx(4 * 5.064 * 1.216)
    (hwmon / "curr3_input").write_text("336\n")
    clock.t += 2
    s.sample()  # back: the gap is not integrated
    clock.t += 1
    s.sample()
    assert s.totals().rail_joules["VDD_SOC"] == pytest.approx(3 * soc)
