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


def _ota_section(mqtt: Broker, root: Path, *, user: str = "dev1") -> dict[str, Any]:
    """dev1's ``ota:`` section; ``user``: whose broker credentials it connects with."""
    return {"enabled": True, "device_id": "dev1", "groups": ["east"], "trusted_root": str(root),
            "broker": {"host": "127.0.0.1", "port": mqtt.port, "ca_file": str(mqtt.ca),
                       "cert_file": str(mqtt.cert(user)), "key_file": str(mqtt.key(user)),
                       "username": user, "password_file": str(mqtt.password_file(user)),
                       "timeout_s": 5},
            "status_interval_s": 1}


def _metric(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def _dev1(view: FleetView, adapter: str) -> dict[str, Any]:
    st = view.status.get("dev1")
    return dict(st.adapters.get(adapter) or {}) if st is not None else {}


def _publish(repo: Path, mqtt: Broker, name: str, demo: str) -> int:
    rc = fleet_main(["--json", "fleet", "publish", str(repo), "--name", name,
                     "--adapter", str(demo_adapter_dirs()[demo]), "--group", "east",
                     "--base-model", str(demo_model_path()), "--targets", *DEMO_TARGETS,
                     "--rank", str(DEMO_RANK), *fleet_args(mqtt)])
    return rc


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


def test_lorad_serve_is_idle_before_anything_is_published_and_tells_the_truth_after_a_rollback(
        mqtt: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The first cycle on an empty broker is idle (not failed). After v1 and v2, a signed
    rollback to v1's local version: the status reports that version and fleet version 1,
    the daemon serves it, and the command is in the device's log with its outcome."""
    repo = tmp_path / "fleet"
    assert fleet_main(["fleet", "init", str(repo), "--threshold", "targets=1"]) == 0
    section = _ota_section(mqtt, repo / "metadata" / "1.root.json")
    section["limits"] = {"fetch_timeout_s": 1}
    cfg = tmp_path / "lorad.yaml"
    cfg.write_text(yaml.safe_dump({"ota": section}))
    view = FleetView(mqtt.connect("fleet"))
    daemon = start_daemon(tmp_path / "state", "--config", str(cfg))
    try:
        assert view.wait_for(lambda v: (getattr(v.status.get("dev1"), "last_update", None) or {})
                             .get("result") == "idle", 30), daemon.logs()
        metrics = daemon.request("GET", "/metrics").body.decode()
        assert (_metric(metrics, 'lorad_ota_updates_total{reason="",result="idle"}') or 0) >= 1
        assert _metric(metrics, 'lorad_ota_updates_total{reason="",result="failed"}') == 0
        assert _metric(metrics, 'lorad_ota_broker_refusals_total{operation="publish"}') == 0

        assert _publish(repo, mqtt, "ota-demo", "invert") == 0, capsys.readouterr()
        assert view.wait_for(lambda v: _dev1(v, "ota-demo").get("fleet_version") == 1, 30), daemon.logs()
        local1 = _dev1(view, "ota-demo")["version"]
        assert _publish(repo, mqtt, "ota-demo", "mirror") == 0, capsys.readouterr()
        assert view.wait_for(lambda v: _dev1(v, "ota-demo").get("fleet_version") == 2, 30), daemon.logs()
        capsys.readouterr()

        rc = fleet_main(["--json", "fleet", "command", str(repo), "dev1", "rollback", "--adapter", "ota-demo",
                         "--version", str(local1), "--wait", *fleet_args(mqtt)])
        out = capsys.readouterr()
        assert rc == 0, out
        sent = json.loads(out.out)
        assert view.wait_for(lambda v: (_dev1(v, "ota-demo").get("version"), _dev1(v, "ota-demo").get("fleet_version"))
                             == (local1, 1), 20), (view.status.get("dev1"), daemon.logs())
        assert _dev1(view, "ota-demo")["held"] == 2
        r = daemon.infer(digit_probe(), adapter="ota-demo")
        assert r.json()["parameters"] == {"adapter": "ota-demo", "adapter_version": local1}
        assert (f"OTA command seq {sent['seq']} rollback ota-demo: done: ota-demo rolled back; serving local "
                f"version {local1}; ota-demo serves local version {local1} (fleet version 1)") in daemon.logs()
    finally:
        assert daemon.stop() == 0, daemon.logs()


def test_a_broker_refusing_the_devices_status_is_logged_once_and_counted(mqtt: Broker, tmp_path: Path) -> None:
    """dev1's daemon with dev2's broker credentials: the ACL refuses every write to dev1's
    topics. The daemon keeps serving, says so once naming topic, user and ACL, and
    /metrics counts every refusal."""
    repo = tmp_path / "fleet"
    assert fleet_main(["fleet", "init", str(repo)]) == 0
    cfg = tmp_path / "lorad.yaml"
    cfg.write_text(yaml.safe_dump({"ota": _ota_section(mqtt, repo / "metadata" / "1.root.json", user="dev2")}))
    daemon = start_daemon(tmp_path / "state", "--config", str(cfg))
    try:
        def refusals() -> float:
            text = daemon.request("GET", "/metrics").body.decode()
            return _metric(text, 'lorad_ota_broker_refusals_total{operation="publish"}') or 0

        # the online flag and the status, at start and again every status interval (1 s)
        wait_until(lambda: refusals() >= 6, 30, "six refused publishes")
        logs = daemon.logs()
        assert ("OTA: online flag not published: broker 127.0.0.1:" in logs and "refused the publish to "
                "'lorad/v1/device/dev1/online': Not authorized: its ACL does not let user 'dev2' write this topic"
                in logs), logs
        assert logs.count("OTA: online flag not published") == 1, logs
        assert logs.count("OTA: status not published") == 1, logs
        assert daemon.infer(digit_probe()).status == 200
    finally:
        assert daemon.stop() == 0, daemon.logs()
