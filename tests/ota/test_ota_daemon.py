"""The daemon itself as an OTA device: a real ``lorad serve`` with an ``ota:`` config on the
test broker installs what ``loractl fleet publish`` signed, serves it over HTTP, reports
its status on the broker and in /metrics, and says offline when it stops.
``mqtt`` is the conftest fixture (annotations are not evaluated)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.mosquitto import Broker
from lorad.daemon.config import ConfigError, build_config
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_adapter_dirs, demo_model_path
from lorad.ota.cli import main as fleet_main
from lorad.ota.status import FleetView
from tests.integration.lorad_process import digit_probe, fleet_args, start_daemon, wait_until


def _ota_section(mqtt: Broker, root: Path) -> dict[str, Any]:
    return {"enabled": True, "device_id": "dev1", "groups": ["east"], "trusted_root": str(root),
            "broker": {"host": "127.0.0.1", "port": mqtt.port, "ca_file": str(mqtt.ca),
                       "cert_file": str(mqtt.cert("dev1")), "key_file": str(mqtt.key("dev1")),
                       "username": "dev1", "password_file": str(mqtt.password_file("dev1")),
                       "timeout_s": 5},
            "status_interval_s": 1}




def _metric(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_lorad_serve_installs_fleet_update_serves_it_and_reports(mqtt: Broker, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "fleet"
    assert fleet_main(["fleet", "init", str(repo), "--threshold", "targets=1"]) == 0
    capsys.readouterr()
    cfg = tmp_path / "lorad.yaml"
    cfg.write_text(yaml.safe_dump({"ota": _ota_section(mqtt, repo / "metadata" / "1.root.json")}))
    view = FleetView(mqtt.connect("fleet"))
    daemon = start_daemon(tmp_path / "state", "--config", str(cfg))
    try:
        assert view.wait_for(lambda v: v.online.get("dev1") is True, 20), daemon.logs()
        rc = fleet_main(["--json", "fleet", "publish", str(repo), "--name", "ota-invert",
                         "--adapter", str(demo_adapter_dirs()["invert"]), "--group", "east",
                         "--base-model", str(demo_model_path()), "--targets", *DEMO_TARGETS,
                         "--rank", str(DEMO_RANK), *fleet_args(mqtt)])
        assert rc == 0, capsys.readouterr()
        assert json.loads(capsys.readouterr().out)["version"] == 1

        local = wait_until(lambda: daemon.adapters().get("ota-invert"), 30, "the OTA install")["version"]
        r = daemon.infer(digit_probe(), adapter="ota-invert")
        assert r.status == 200, r.body
        assert r.json()["parameters"] == {"adapter": "ota-invert", "adapter_version": local}

        assert view.wait_for(lambda v: (getattr(v.status.get("dev1"), "adapters", {}).get("ota-invert") or {})
                             .get("fleet_version") == 1, 20), daemon.logs()
        last = view.status["dev1"].last_update or {}
        assert (last.get("result"), last.get("adapter"), last.get("version")) == ("installed", "ota-invert", 1)

        metrics = daemon.request("GET", "/metrics").body.decode()
        assert _metric(metrics, "lorad_ota_connected ") == 1
        assert _metric(metrics, 'lorad_ota_updates_total{reason="",result="installed"}') == 1
        assert (_metric(metrics, "lorad_ota_fetched_bytes_total ") or 0) > 0
        assert f"OTA: installed adapter 'ota-invert' version 1 from mqtts://127.0.0.1:{mqtt.port}" in daemon.logs()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.logs()
    assert view.wait_for(lambda v: v.online.get("dev1") is False, 10)  # said goodbye


def test_lorad_serve_without_broker_keeps_serving_and_says_so(mqtt: Broker, tmp_path: Path) -> None:
    repo = tmp_path / "fleet"
    assert fleet_main(["fleet", "init", str(repo)]) == 0
    section = _ota_section(mqtt, repo / "metadata" / "1.root.json")
    mqtt.stop()
    try:
        cfg = tmp_path / "lorad.yaml"
        cfg.write_text(yaml.safe_dump({"ota": section}))
        daemon = start_daemon(tmp_path / "state", "--config", str(cfg))
        try:
            assert daemon.infer(digit_probe()).status == 200
            metrics = daemon.request("GET", "/metrics").body.decode()
            assert _metric(metrics, "lorad_ota_connected ") == 0
            for result in ("installed", "failed", "rejected"):  # there at 0 before any broker answered
                assert _metric(metrics, f'lorad_ota_updates_total{{reason="",result="{result}"}}') == 0
            assert daemon.logs().count("not connected to the fleet broker") == 1
        finally:
            assert daemon.stop() == 0, daemon.logs()
    finally:
        mqtt.start()


def test_ota_config_errors_name_key_value_and_what_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^ota\.device_id: got nothing; required"):
        build_config({"ota": {"enabled": True}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^ota\.trusted_root: got '.*missing\.json'; expected an existing"):
        build_config({"ota": {"enabled": True, "device_id": "d1", "trusted_root": "missing.json"}},
                     base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^ota\.groups: got 'bad/group'; allowed: letters"):
        build_config({"ota": {"groups": ["bad/group"]}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^ota\.limits\.max_packet_bytes: got 100; expected a size from 4KiB"):
        build_config({"ota": {"limits": {"max_packet_bytes": 100}}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^ota\.broker\.prot: unknown key"):
        build_config({"ota": {"broker": {"prot": 1}}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^ota\.limits\.max_raw_bytes: got 1024; expected at least"):
        build_config({"ota": {"limits": {"max_raw_bytes": "1KiB"}}}, base_dir=tmp_path)
    limits = build_config({"ota": {"limits": {"max_raw_bytes": "512MiB"}}}, base_dir=tmp_path).ota.limits
    assert limits.max_raw_bytes == 512 * 1024**2
    assert build_config({}, base_dir=tmp_path).ota.enabled is False
