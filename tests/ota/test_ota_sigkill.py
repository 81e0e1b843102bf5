"""A real ``lorad serve`` is SIGKILLed at every write of an OTA install (a delta against the
installed version), then started again: every answer it gives is the previous version's
or the new one's, never a mixture, and after the restart the new version serves.

The kill comes from outside the daemon (``killpoint/sitecustomize.py`` on PYTHONPATH
counts renames under the state directory); each run starts from a copy of the state the
daemon left after installing the first version and stopping cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.mosquitto import Broker
from lorad.adapters.engine import InferenceEngine
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_model_path
from lorad.ota.cli import FleetSession
from lorad.ota.repository import FleetRepository
from lorad.ota.status import FleetView
from lorad.ota.target import Audience
from tests.integration.lorad_process import RunningDaemon, digit_probe, logits_of, start_daemon
from tests.ota.demo_kit import demo_adapter, demo_logits, demo_probes

KILLPOINT = Path(__file__).parent / "killpoint"


def _fleet_version(view: FleetView) -> int | None:
    st = view.status.get("dev1")
    return None if st is None else (st.adapters.get("digits") or {}).get("fleet_version")


def _start(state: Path, cfg: Path, kill_at: int) -> RunningDaemon | None:
    """lorad serve with the kill point armed; None if it was killed before it served."""
    env = {"PYTHONPATH": os.pathsep.join([str(KILLPOINT), os.environ.get("PYTHONPATH", "")]),
           "LORAD_KILL_AT_RENAME": str(kill_at),
           "LORAD_KILL_UNDER": os.pathsep.join([str(state / "ota"), str(state / "adapters")])}
    try:
        return start_daemon(state, "--config", str(cfg), env=env)
    except RuntimeError as e:
        if f"exited with {-signal.SIGKILL}" in str(e):
            return None
        raise


def _answers(d: RunningDaemon) -> np.ndarray | None:
    r = d.infer(digit_probe(), adapter="digits")
    return logits_of(r) if r.status == 200 else None


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_lorad_serve_sigkilled_at_every_write_of_an_install(mqtt: Broker, tmp_path: Path) -> None:
    engine = InferenceEngine(demo_model_path(), targets=DEMO_TARGETS, rank=DEMO_RANK)
    repo = FleetRepository.init(tmp_path / "fleet")
    fleet = FleetSession(mqtt.connect("fleet"))
    view = FleetView(mqtt.connect("fleet"))
    a1, a2 = demo_adapter(engine, 1), demo_adapter(engine, 2)
    v1 = demo_logits(engine, a1, digit_probe())
    v2 = demo_logits(engine, a2, digit_probe())
    east = Audience(groups=("east",))
    repo.publish_adapter("digits", a1, audience=east, probes=demo_probes(engine, a1))
    fleet.push(repo)
    cfg = tmp_path / "lorad.yaml"
    cfg.write_text(yaml.safe_dump({"ota": {
        "enabled": True, "device_id": "dev1", "groups": ["east"], "trusted_root": str(repo.dir / "metadata/1.root.json"),
        "broker": {"host": "127.0.0.1", "port": mqtt.port, "ca_file": str(mqtt.ca), "cert_file": str(mqtt.cert("dev1")),
                   "key_file": str(mqtt.key("dev1")), "username": "dev1",
                   "password_file": str(mqtt.password_file("dev1")), "timeout_s": 5},
        "status_interval_s": 1}}))
    state = tmp_path / "state"
    d = _start(state, cfg, 0)
    assert d is not None
    try:
        assert view.wait_for(lambda v: _fleet_version(v) == 1, 60), d.logs()
        got = _answers(d)
        assert got is not None and np.allclose(got, v1, atol=1e-4)
    finally:
        assert d.stop() == 0, d.logs()
    baseline = tmp_path / "baseline"
    shutil.copytree(state, baseline, symlinks=True)

    repo.publish_adapter("digits", a2, audience=east, delta_from=1, probes=demo_probes(engine, a2), chunk_size=4096)
    fleet.push(repo)
    kills = 0
    for n in range(1, 100):
        shutil.rmtree(state)
        shutil.copytree(baseline, state, symlinks=True)
        (state / "lorad.addr").unlink(missing_ok=True)
        view = _fresh_view(mqtt)
        d = _start(state, cfg, n)
        if d is not None:
            # it serves: wait until the install completed or the kill point was hit
            deadline = time.monotonic() + 60
            while d.proc.poll() is None and _fleet_version(view) != 2 and time.monotonic() < deadline:
                view.wait_for(lambda v: _fleet_version(v) == 2, 0.5)
            if d.proc.poll() is None:
                assert _fleet_version(view) == 2, d.logs()  # fewer than n writes: all covered
                d.stop()
                break
            assert d.proc.returncode == -signal.SIGKILL, d.logs()
        kills += 1
        view = _fresh_view(mqtt)
        # restart: every answer is v1's or v2's, and v2 serves once the update completes
        d = _start(state, cfg, 0)
        assert d is not None
        try:
            deadline = time.monotonic() + 60
            while True:
                got = _answers(d)
                assert got is None or np.allclose(got, v1, atol=1e-4) or np.allclose(got, v2, atol=1e-4), (n, got)
                if got is not None and np.allclose(got, v2, atol=1e-4) and _fleet_version(view) == 2:
                    break
                assert time.monotonic() < deadline, (n, d.logs())
                view.wait_for(lambda v: _fleet_version(v) == 2, 0.2)
        finally:
            assert d.stop() == 0, d.logs()
    print(f"SIGKILLed lorad serve at {kills} write points")
    assert kills >= 5, f"only {kills} write points"


def _fresh_view(mqtt: Broker) -> FleetView:
    """A view that knows only what the next run reports (the retained status is cleared)."""
    t = mqtt.connect("fleet")
    t.publish("lorad/v1/device/dev1/status", b"", retain=True)
    return FleetView(t)
