"""When training may run: fixture /proc and /sys trees, a fake clock and request counter."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from lorad.trainer.config import PolicyConfig
from lorad.trainer.policy import RateMeter, SystemProbe, TrainingPolicy


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _probe(tmp_path: Path, *, load: str = "0.10 0.20 0.30 1/100 42", cpus: int = 2) -> SystemProbe:
    _write(tmp_path / "proc", "loadavg", load)
    (tmp_path / "sys").mkdir(exist_ok=True)
    return SystemProbe(proc_root=tmp_path / "proc", sys_root=tmp_path / "sys", cpu_count=cpus)


def _policy(probe: SystemProbe, *, rate: float = 0.0, hour: int = 12, **config: object) -> TrainingPolicy:
    return TrainingPolicy(PolicyConfig(**config), probe=probe, request_rate=lambda: rate,  # type: ignore[arg-type]
                          now=lambda: datetime.datetime(2026, 1, 1, hour, 30))


def test_idle_device_is_allowed(tmp_path: Path) -> None:
    decision = _policy(_probe(tmp_path)).device()
    assert decision.allowed and decision.reasons == ()


def test_load_per_cpu(tmp_path: Path) -> None:
    probe = _probe(tmp_path, load="1.60 1.0 1.0 2/100 7", cpus=2)
    assert probe.load_per_cpu() == pytest.approx(0.8)
    decision = _policy(probe, max_load_per_cpu=0.7).device()
    assert not decision.allowed and "load average 0.80 per CPU" in decision.reasons[0]
    assert _policy(probe, max_load_per_cpu=0.9).device().allowed


def test_missing_loadavg_does_not_block(tmp_path: Path) -> None:
    probe = SystemProbe(proc_root=tmp_path / "nothing", sys_root=tmp_path / "nothing", cpu_count=1)
    assert probe.load_per_cpu() is None
    assert _policy(probe).device().allowed


def test_serving_rate(tmp_path: Path) -> None:
    decision = _policy(_probe(tmp_path), rate=12.0, max_requests_per_s=5.0).device()
    assert not decision.allowed and "12.0 requests/s" in decision.reasons[0]


@pytest.mark.parametrize(
    ("supplies", "external"),
    [
        ({}, True),  # no power supply class at all: a board on its wall adapter
        ({"BAT0": ("Battery", None)}, False),
        ({"BAT0": ("Battery", None), "AC": ("Mains", "0")}, False),
        ({"BAT0": ("Battery", None), "AC": ("Mains", "1")}, True),
        ({"BAT0": ("Battery", None), "usb": ("USB", "1")}, True),
        ({"AC": ("Mains", "1")}, True),
    ],
)
def test_external_power(tmp_path: Path, supplies: dict[str, tuple[str, str | None]], external: bool) -> None:
    probe = _probe(tmp_path)
    for name, (kind, online) in supplies.items():
        _write(tmp_path / "sys", f"class/power_supply/{name}/type", kind)
        if online is not None:
            _write(tmp_path / "sys", f"class/power_supply/{name}/online", online)
    assert probe.on_external_power() is external
    decision = _policy(probe, require_external_power=True).device()
    assert decision.allowed is external
    assert _policy(probe, require_external_power=False).device().allowed


def test_thermal_limit(tmp_path: Path) -> None:
    probe = _probe(tmp_path)
    assert probe.max_temperature_c() is None
    _write(tmp_path / "sys", "class/thermal/thermal_zone0/temp", "45000")
    _write(tmp_path / "sys", "class/thermal/thermal_zone1/temp", "81500")
    _write(tmp_path / "sys", "class/thermal/thermal_zone2/temp", "garbage")
    assert probe.max_temperature_c() == pytest.approx(81.5)
    decision = _policy(probe, max_temperature_c=80.0).device()
    assert not decision.allowed and "81.5 °C" in decision.reasons[0]
    assert _policy(probe, max_temperature_c=85.0).device().allowed


@pytest.mark.parametrize(
    ("window", "hour", "allowed"),
    [((60, 300), 2, True), ((60, 300), 12, False), ((22 * 60, 6 * 60), 23, True),
     ((22 * 60, 6 * 60), 3, True), ((22 * 60, 6 * 60), 12, False)],
)
def test_time_window(tmp_path: Path, window: tuple[int, int], hour: int, allowed: bool) -> None:
    decision = _policy(_probe(tmp_path), hour=hour, time_window=window).device()
    assert decision.allowed is allowed
    if not allowed:
        assert "outside the time window" in decision.reasons[0]


def test_reasons_accumulate(tmp_path: Path) -> None:
    probe = _probe(tmp_path, load="9 9 9 1/1 1")
    decision = _policy(probe, rate=100.0, hour=12, time_window=(60, 120)).device()
    assert len(decision.reasons) == 3


def test_rate_meter() -> None:
    now, count = [0.0], [0.0]
    meter = RateMeter(lambda: count[0], clock=lambda: now[0], min_window_s=5.0)
    count[0], now[0] = 50.0, 10.0
    assert meter() == pytest.approx(5.0)
    count[0], now[0] = 60.0, 11.0  # too soon: the last rate stands
    assert meter() == pytest.approx(5.0)
    now[0] = 20.0
    assert meter() == pytest.approx(1.0)


def test_power_draw_limit_uses_the_injected_probe(tmp_path: Path) -> None:
    probe = _probe(tmp_path)
    draw: list[float | None] = [12.5]

    def policy(**config: object) -> TrainingPolicy:
        return TrainingPolicy(PolicyConfig(**config), probe=probe, power_watts=lambda: draw[0])  # type: ignore[arg-type]

    decision = policy(max_power_watts=10.0).device()
    assert not decision.allowed and decision.reasons == ("drawing 12.5 W (limit 10 W)",)
    assert policy(max_power_watts=15.0).device().allowed
    assert policy().device().allowed  # no limit configured
    draw[0] = None  # no power source: no figure, no block
    assert policy(max_power_watts=10.0).device().allowed


def test_battery_level(tmp_path: Path) -> None:
    probe = _probe(tmp_path)
    assert probe.battery_percent() is None
    assert _policy(probe, min_battery_percent=50.0).device().allowed  # no battery: nothing to wait for
    _write(tmp_path / "sys", "class/power_supply/BAT0/type", "Battery")
    _write(tmp_path / "sys", "class/power_supply/BAT0/capacity", "35")
    _write(tmp_path / "sys", "class/power_supply/AC/type", "Mains")
    _write(tmp_path / "sys", "class/power_supply/AC/capacity", "0")  # not a battery: ignored
    assert probe.battery_percent() == 35.0
    decision = _policy(probe, min_battery_percent=50.0).device()
    assert not decision.allowed and decision.reasons == ("battery at 35 % (needs 50 %)",)
    assert _policy(probe, min_battery_percent=30.0).device().allowed


def test_time_left_in_the_window(tmp_path: Path) -> None:
    config = PolicyConfig(time_window="22:30-06:00")
    at = [datetime.datetime(2026, 12, 7, 23, 0)]
    policy = TrainingPolicy(config, probe=_probe(tmp_path), now=lambda: at[0])
    assert policy.time_left_s() == pytest.approx(7 * 3600)
    at[0] = datetime.datetime(2026, 12, 7, 12, 0)
    assert policy.time_left_s() is None
    assert TrainingPolicy(PolicyConfig(), probe=_probe(tmp_path)).time_left_s() is None
